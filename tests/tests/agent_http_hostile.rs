//! The HTTP listeners against clients that hold connections (slowloris): ones that never finish
//! their headers, that stop or trickle a body, that open many sockets and send nothing. Run
//! against the real agent (and the relay's admin listener) on loopback: each such connection is
//! closed by the server after its deadline, at most `http.max_connections` are held at once and
//! the rest are answered 503 at once, and meanwhile scanners on MQTT get every PUBACK and
//! well-behaved HTTP clients are served.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::events::{id_of, pick, unique_id};
use backhaul_tests::mqtt::{V4Client, v4_options};
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::{example_config, free_port, poll_until, run_binary};
use serde_json::{Value, json};

/// Bounds a wait for the server to close a connection. The deadlines under test are 1 to 5 s;
/// this only keeps a listener that never closes from hanging the test.
const CLOSE_WITHIN: Duration = Duration::from_secs(20);

/// An agent with the given `[http]` deadlines (seconds) and connection cap.
fn agent_with(header: i64, body: i64, idle: i64, max_connections: i64) -> AgentProcess {
    AgentProcess::start(
        AgentOptions::default()
            .set("http.header_timeout_secs", header)
            .set("http.body_timeout_secs", body)
            .set("http.idle_timeout_secs", idle)
            .set("http.max_connections", max_connections),
    )
}

fn connect(agent: &AgentProcess) -> TcpStream {
    let addr = agent.http_url().trim_start_matches("http://").to_string();
    TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// A reset or a broken pipe is the server closing the connection too.
fn is_closed(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
    )
}

fn is_wait(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Reads until the server closes the connection: what it sent before closing, or `None` when
/// it was still open after `within`.
fn wait_closed(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).expect("read timeout");
        match stream.read(&mut buf) {
            Ok(0) => return Some(received),
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if is_wait(&e) => continue,
            Err(e) if is_closed(&e) => return Some(received),
            Err(e) => panic!("reading from the server: {e}"),
        }
    }
}

/// Sends one byte of `filler` every `every` until the server closes the connection: what it
/// sent before closing, or `None` when it was still open after `within`. The wait for an
/// answer between two bytes is the pacing.
fn trickle_until_closed(
    stream: &mut TcpStream,
    filler: u8,
    every: Duration,
    within: Duration,
) -> Option<Vec<u8>> {
    let deadline = Instant::now() + within;
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    stream.set_read_timeout(Some(every)).expect("read timeout");
    while Instant::now() < deadline {
        match stream.write_all(&[filler]) {
            Ok(()) => {}
            Err(e) if is_closed(&e) => return Some(received),
            Err(e) => panic!("writing to the server: {e}"),
        }
        match stream.read(&mut buf) {
            Ok(0) => return Some(received),
            Ok(n) => {
                received.extend_from_slice(&buf[..n]);
                // An answer came: the close follows it.
                return wait_closed(stream, within).map(|rest| [received, rest].concat());
            }
            Err(e) if is_wait(&e) => {}
            Err(e) if is_closed(&e) => return Some(received),
            Err(e) => panic!("reading from the server: {e}"),
        }
    }
    None
}

fn status_line(answer: &[u8]) -> String {
    String::from_utf8_lossy(answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The open file descriptors of a process.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or_else(|e| panic!("/proc/{pid}/fd: {e}"))
}

fn healthz_ok(agent: &AgentProcess) -> bool {
    agent
        .http()
        .get(format!("{}/healthz", agent.http_url()))
        .timeout(Duration::from_secs(2))
        .send()
        .is_ok_and(|r| r.status() == 200)
}

#[test]
fn a_client_that_never_finishes_its_headers_is_closed_after_the_header_deadline() {
    // The idle timeout is long, so the header deadline is what closes these connections.
    let agent = agent_with(1, 30, 300, 256);

    // A request cut off in the middle of its headers, then nothing.
    let mut partial = connect(&agent);
    let opened = Instant::now();
    partial
        .write_all(b"POST /v1/events HTTP/1.1\r\nHost: agent\r\nContent-Ty")
        .expect("write a partial request");
    let answer = wait_closed(&mut partial, CLOSE_WITHIN)
        .expect("the agent did not close a connection whose headers never ended");
    eprintln!(
        "partial headers: closed after {:?}, answer {:?}",
        opened.elapsed(),
        status_line(&answer)
    );

    // Headers trickled one byte at a time: activity, but never a whole request.
    let mut trickle = connect(&agent);
    let opened = Instant::now();
    trickle
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nX-Slow: ")
        .expect("write the start of a request");
    let answer = trickle_until_closed(&mut trickle, b'a', Duration::from_millis(100), CLOSE_WITHIN)
        .expect("the agent did not close a connection trickling its headers");
    eprintln!(
        "trickled headers: closed after {:?}, answer {:?}",
        opened.elapsed(),
        status_line(&answer)
    );
    assert!(
        !status_line(&answer).contains("200"),
        "a request whose headers never ended was answered: {}",
        String::from_utf8_lossy(&answer)
    );

    // A connection that sends nothing at all.
    let mut silent = connect(&agent);
    let opened = Instant::now();
    assert!(
        wait_closed(&mut silent, CLOSE_WITHIN).is_some(),
        "the agent did not close a connection that sent nothing"
    );
    eprintln!("silent connection: closed after {:?}", opened.elapsed());

    assert!(healthz_ok(&agent), "/healthz does not answer");
    assert!(agent.log_events().is_empty(), "something was stored");
}

#[test]
fn a_body_that_stops_or_trickles_is_answered_408_and_closed() {
    let agent = agent_with(10, 1, 300, 256);
    let whole = pick(&unique_id("slow-body"), "SO-1");
    let event = serde_json::to_vec(&whole).expect("JSON");
    let head = "POST /v1/events HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n\
                Content-Length: 1000\r\n\r\n";

    // The headers promise 1000 bytes; 10 come, then nothing.
    let mut stopped = connect(&agent);
    stopped.write_all(head.as_bytes()).expect("write headers");
    stopped
        .write_all(&event[..10])
        .expect("write a bit of body");
    let opened = Instant::now();
    let answer = wait_closed(&mut stopped, CLOSE_WITHIN)
        .expect("the agent did not close a connection whose body stopped");
    eprintln!(
        "stopped body: closed after {:?}, answer {:?}",
        opened.elapsed(),
        status_line(&answer)
    );
    assert!(
        status_line(&answer).starts_with("HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(text.contains("http.body_timeout_secs"), "{text}");

    // The same promise kept one byte every 100 ms: activity, but never the whole body.
    let mut trickle = connect(&agent);
    trickle.write_all(head.as_bytes()).expect("write headers");
    let opened = Instant::now();
    let answer = trickle_until_closed(&mut trickle, b' ', Duration::from_millis(100), CLOSE_WITHIN)
        .expect("the agent did not close a connection trickling its body");
    eprintln!(
        "trickled body: closed after {:?}, answer {:?}",
        opened.elapsed(),
        status_line(&answer)
    );
    // The answer can be lost to the reset that closing on unread bytes makes; when it is read,
    // it is the 408.
    if !answer.is_empty() {
        assert!(
            status_line(&answer).starts_with("HTTP/1.1 408"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }

    // Neither half-sent event was stored; a whole one, sent properly, is.
    assert!(
        agent.log_events().is_empty(),
        "a half-sent event was stored"
    );
    let response = agent.post_events(&whole, None);
    assert_eq!(response.status(), 202);
    assert_eq!(agent.log_events().len(), 1);
}

#[test]
fn idle_sockets_over_the_cap_are_refused_and_mqtt_scanners_get_every_puback_meanwhile() {
    const MAX: usize = 20;
    const SOCKETS: usize = 200;
    const EVENTS: usize = 50;
    let agent = agent_with(5, 5, 5, MAX as i64);
    let pid = agent.pid().expect("the agent runs");
    let mut scanner = V4Client::connect_retrying(
        &v4_options(agent.mqtt_addr(), "scanner-under-siege"),
        Duration::from_secs(10),
    );
    let fds_before = open_fds(pid);

    let opened = Instant::now();
    // Each socket, what the agent has sent on it so far, and whether the agent closed it.
    let mut sockets: Vec<(TcpStream, Vec<u8>, bool)> = (0..SOCKETS)
        .map(|_| (connect(&agent), Vec::new(), false))
        .collect();
    for (socket, _, _) in &sockets {
        socket.set_nonblocking(true).expect("non-blocking");
    }
    // The agent answers the sockets over the cap at once; the others it holds.
    let all_refused = poll_until(CLOSE_WITHIN, || {
        for (socket, answer, closed) in sockets.iter_mut().filter(|(_, _, closed)| !closed) {
            match socket.read_to_end(answer) {
                Ok(_) => *closed = true,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) if is_closed(&e) => *closed = true,
                Err(e) => panic!("reading from the agent: {e}"),
            }
        }
        let refused = sockets.iter().filter(|(_, _, closed)| *closed).count();
        (refused >= SOCKETS - MAX).then_some(())
    });
    let (refused, held): (Vec<_>, Vec<_>) = sockets.into_iter().partition(|(_, _, closed)| *closed);
    assert!(
        all_refused.is_some(),
        "only {} of {SOCKETS} idle sockets were refused with http.max_connections = {MAX}",
        refused.len()
    );
    let refused: Vec<Vec<u8>> = refused.into_iter().map(|(_, answer, _)| answer).collect();
    let mut held: Vec<TcpStream> = held.into_iter().map(|(socket, _, _)| socket).collect();
    eprintln!(
        "{SOCKETS} idle sockets: {} refused, {} held, after {:?}",
        refused.len(),
        held.len(),
        opened.elapsed()
    );
    // The agent holds up to max_connections: these sockets, and the kept-alive connection of
    // the harness's HTTP client (which waited for /healthz at start) while it is still open.
    assert!(held.len() <= MAX, "{} sockets held", held.len());
    let answered_503 = refused
        .iter()
        .filter(|a| status_line(a).starts_with("HTTP/1.1 503"))
        .count();
    assert_eq!(
        answered_503,
        refused.len(),
        "every refused socket is told 503: {:?}",
        refused.iter().map(|a| status_line(a)).collect::<Vec<_>>()
    );
    let fds_held = open_fds(pid);
    eprintln!("agent file descriptors: {fds_before} before, {fds_held} while {MAX} are held");
    assert!(
        fds_held <= fds_before + MAX + 5,
        "the agent has {fds_held} descriptors open ({fds_before} before the sockets)"
    );

    // A scanner publishing meanwhile gets every PUBACK.
    let still_open = |held: &[TcpStream]| {
        held.iter()
            .filter(|s| {
                let mut byte = [0u8; 1];
                matches!(s.peek(&mut byte), Err(e) if e.kind() == ErrorKind::WouldBlock)
            })
            .count()
    };
    let mut sent = Vec::new();
    let mut acked_while_held = 0;
    for i in 0..EVENTS {
        let event = pick(&unique_id("siege"), &format!("SO-{i}"));
        scanner
            .publish(
                "scans/scanner-under-siege",
                1,
                serde_json::to_vec(&event).expect("JSON"),
            )
            .unwrap_or_else(|e| {
                panic!("event {i} got no PUBACK while HTTP sockets were held: {e}")
            });
        // Counted after the PUBACK: by then every socket over the cap has surely been refused.
        if still_open(&held) >= MAX - 1 {
            acked_while_held += 1;
        }
        sent.push(event);
    }
    eprintln!(
        "{EVENTS} PUBACKs, {acked_while_held} of them while the agent still held at least {} \
         of the sockets",
        MAX - 1
    );
    assert!(
        acked_while_held > 0,
        "the held sockets were gone before the first PUBACK; the test proves nothing"
    );

    // This side keeps its end of every socket open to the end, as an attacker would.
    let mut lifetimes = Vec::new();
    for socket in held.iter_mut() {
        socket.set_nonblocking(false).expect("blocking");
        assert!(
            wait_closed(socket, CLOSE_WITHIN).is_some(),
            "a held idle socket was never closed by the agent"
        );
        lifetimes.push(opened.elapsed());
    }
    eprintln!(
        "held sockets closed by the agent after {:?} to {:?}",
        lifetimes.iter().min(),
        lifetimes.iter().max()
    );
    assert!(
        poll_until(Duration::from_secs(10), || healthz_ok(&agent).then_some(())).is_some(),
        "/healthz does not answer after the held sockets were closed"
    );
    let fds_after = open_fds(pid);
    eprintln!("agent file descriptors after: {fds_after}");
    assert!(fds_after <= fds_before + 2, "{fds_after} descriptors open");

    let logged: Vec<String> = agent
        .log_events()
        .iter()
        .map(|e| id_of(e).to_string())
        .collect();
    let sent: Vec<String> = sent.iter().map(|e| id_of(e).to_string()).collect();
    assert_eq!(
        logged, sent,
        "every acknowledged event is in the log, in order"
    );
    scanner.disconnect();
}

#[test]
fn well_behaved_clients_are_served_and_a_kept_alive_connection_ends_when_idle() {
    let agent = agent_with(2, 2, 300, 256);

    // Posts through a pooled client (kept-alive connections), one of them the largest array.
    let batch: Vec<Value> = (0..1000)
        .map(|i| pick(&unique_id("big"), &format!("SO-{}", i % 50)))
        .collect();
    let response = agent.post_events(&json!(batch), None);
    assert_eq!(response.status(), 202);
    for i in 0..5 {
        let response = agent.post_events(&pick(&unique_id("ok"), &format!("SO-{i}")), None);
        assert_eq!(response.status(), 202);
    }
    assert_eq!(agent.log_events().len(), 1005);

    // Two requests on one raw connection; then it sits idle and the agent closes it.
    let mut socket = connect(&agent);
    socket
        .set_read_timeout(Some(CLOSE_WITHIN))
        .expect("read timeout");
    for _ in 0..2 {
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n")
            .expect("write a request");
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        while !answer.ends_with(b"ok\n") {
            let n = socket.read(&mut buf).expect("an answer");
            assert!(n > 0, "closed before answering");
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(
            status_line(&answer).starts_with("HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
    }
    let idle_since = Instant::now();
    let rest = wait_closed(&mut socket, CLOSE_WITHIN)
        .expect("the agent kept an idle kept-alive connection open");
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    eprintln!(
        "kept-alive connection closed after {:?} idle",
        idle_since.elapsed()
    );
}

#[test]
fn sigterm_while_slow_clients_hold_connections_stops_cleanly() {
    // Deadlines far longer than the agent's stop: the stop must not wait for them.
    let mut agent = agent_with(60, 60, 60, 256);
    let mut slow: Vec<TcpStream> = (0..5).map(|_| connect(&agent)).collect();
    for socket in &mut slow {
        socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: ag")
            .expect("write a partial request");
    }
    let mut body = connect(&agent);
    body.write_all(
        b"POST /v1/events HTTP/1.1\r\nHost: agent\r\nContent-Length: 1000\r\n\r\n{\"v\":",
    )
    .expect("write a partial body");
    // The agent has taken the connections in once another request is answered after them.
    assert!(healthz_ok(&agent));
    let asked = Instant::now();
    let status = agent.terminate();
    eprintln!("agent stopped {:?} after SIGTERM", asked.elapsed());
    assert!(status.success(), "exit status {status}");
    let stderr = agent.stderr();
    assert!(stderr.contains("agent stopped"), "{stderr}");
    assert!(
        !stderr.contains("stopped before every connection finished"),
        "{stderr}"
    );
}

#[test]
fn bad_limits_fail_at_start_naming_the_file_the_key_and_the_range() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let example = std::fs::read_to_string(example_config("agent.toml")).expect("agent.toml");
    for (line, wrong, expected) in [
        (
            "# max_connections = 256\n",
            "max_connections = 0\n",
            "key `http.max_connections`: expected 1 to 65536 (connections served at once)",
        ),
        (
            "header_timeout_secs = 10\n",
            "header_timeout_secs = 0\n",
            "key `http.header_timeout_secs`: expected 1 to 3600 (seconds)",
        ),
        (
            "body_timeout_secs = 30\n",
            "body_timeout_secs = 86400\n",
            "key `http.body_timeout_secs`: expected 1 to 3600 (seconds)",
        ),
        (
            "idle_timeout_secs = 60\n",
            "idle_timeout_secs = 0\n",
            "key `http.idle_timeout_secs`: expected 1 to 3600 (seconds)",
        ),
    ] {
        assert_eq!(example.matches(line).count(), 1, "{line:?} in agent.toml");
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, example.replace(line, wrong)).expect("write the config");
        let out = run_binary(
            "backhaul-agent",
            &["run", "--config", &file.to_string_lossy()],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{wrong:?} accepted: {stderr}");
        assert!(
            stderr.contains(&format!("{}: {expected}", file.display())),
            "{stderr}"
        );
    }

    let example = std::fs::read_to_string(example_config("relay.toml")).expect("relay.toml");
    let file = dir.path().join("relay.toml");
    std::fs::write(
        &file,
        example.replace("header_timeout_secs = 10\n", "header_timeout_secs = 0\n"),
    )
    .expect("write the config");
    let out = run_binary(
        "backhaul-relay",
        &["check-config", "--config", &file.to_string_lossy()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {stderr}");
    assert!(
        stderr.contains(&format!(
            "{}: key `admin.header_timeout_secs`: expected 1 to 3600 (seconds)",
            file.display()
        )),
        "{stderr}"
    );
}

#[test]
fn the_relay_admin_listener_closes_slow_clients_and_refuses_over_its_cap() {
    const MAX: usize = 4;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let relay = RelayProcess::start_with(
        dir.path(),
        free_port(),
        true,
        None,
        &[
            ("admin.header_timeout_secs", 2.into()),
            ("admin.idle_timeout_secs", 300.into()),
            ("admin.max_connections", (MAX as i64).into()),
        ],
    );
    let addr = format!("127.0.0.1:{}", relay.admin_port);

    // Twice the cap of sockets that send nothing: the ones over it are told 503 at once, the
    // ones held are closed without an answer at the header deadline. (A connection of the
    // readiness check may still hold a slot, so "over the cap" is counted loosely.)
    let mut idle: Vec<TcpStream> = (0..2 * MAX)
        .map(|_| TcpStream::connect(&addr).expect("connect to the relay"))
        .collect();
    let answers: Vec<Vec<u8>> = idle
        .iter_mut()
        .map(|socket| {
            wait_closed(socket, CLOSE_WITHIN).expect("the relay never closed an idle socket")
        })
        .collect();
    let refused = answers
        .iter()
        .filter(|a| status_line(a).starts_with("HTTP/1.1 503"))
        .count();
    let held_then_closed = answers.iter().filter(|a| a.is_empty()).count();
    eprintln!(
        "{} idle sockets: {refused} told 503, {held_then_closed} held",
        2 * MAX
    );
    assert!(refused >= MAX, "{refused} refused over a cap of {MAX}");
    assert!(held_then_closed > 0, "none was served");
    assert_eq!(refused + held_then_closed, 2 * MAX, "{answers:?}");

    // Headers that never end.
    let mut partial = TcpStream::connect(&addr).expect("connect to the relay");
    partial
        .write_all(b"GET /v1/sites HTTP/1.1\r\nHost: re")
        .expect("write a partial request");
    assert!(
        wait_closed(&mut partial, CLOSE_WITHIN).is_some(),
        "the relay did not close a connection whose headers never ended"
    );

    let healthy = poll_until(Duration::from_secs(10), || {
        reqwest::blocking::get(format!("http://{addr}/healthz"))
            .ok()
            .filter(|r| r.status() == 200)
    });
    assert!(healthy.is_some(), "the relay's /healthz does not answer");
}
