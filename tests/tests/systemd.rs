//! The systemd units: they pass `systemd-analyze verify`, score "OK" or better on
//! `systemd-analyze security`, and the real binaries speak the notify protocol (readiness once
//! listening, watchdog pings, stopping on SIGTERM) to a fake NOTIFY_SOCKET; a relay whose
//! pipeline fails exits non-zero (so `Restart=on-failure` acts) instead of staying "ready".

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::{ChildGuard, binary, poll_until};

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(name)
}

/// The unit with its ExecStart pointing at the binary built here, since nothing is installed.
fn unit_with_built_binary(dir: &Path, service: &str) -> PathBuf {
    let text = std::fs::read_to_string(unit(&format!("backhaul-{service}.service"))).unwrap();
    let built = binary(&format!("backhaul-{service}"));
    let text = text.replace(
        &format!("/usr/bin/backhaul-{service}"),
        &built.display().to_string(),
    );
    let path = dir.join(format!("backhaul-{service}.service"));
    std::fs::write(&path, text).unwrap();
    path
}

fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze is missing: install Debian's systemd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn units_verify_and_score_ok_or_better() {
    let dir = tempfile::tempdir().unwrap();
    for service in ["agent", "relay"] {
        let path = unit_with_built_binary(dir.path(), service);
        let (ok, text) = systemd_analyze(&["verify", &path.to_string_lossy()]);
        assert!(
            ok && text.trim().is_empty(),
            "systemd-analyze verify backhaul-{service}.service:\n{text}"
        );
        let (_, text) = systemd_analyze(&["security", "--offline=true", &path.to_string_lossy()]);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        println!(
            "backhaul-{service}.service: {}",
            line.trim_start_matches('→').trim()
        );
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the score of {line:?}"));
        // systemd calls 0-2.0 "SAFE" and up to 4.9 "OK"; stay well inside.
        assert!(
            score <= 3.0,
            "backhaul-{service}.service exposure {score}: {line}"
        );
    }
}

#[test]
fn the_agent_speaks_the_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // An agent config written by the same helper the other tests use, started by hand here
    // so that its environment can carry the notify socket.
    let mut agent = backhaul_tests::agent::AgentProcess::start(AgentOptions::default());
    let config = agent.config_path();
    agent.kill9();
    let mut child = ChildGuard::spawn(
        "backhaul-agent",
        Command::new(binary("backhaul-agent"))
            .args(["run", "--config", &config.to_string_lossy()])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .stderr(std::process::Stdio::null()),
    );
    let mut messages = Vec::new();
    let wait_for = |wanted: &str, messages: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = message.lines().any(|l| l == wanted);
                messages.push(message);
                if found {
                    return;
                }
            }
        }
        panic!("no {wanted} from the agent; got {messages:?}");
    };
    wait_for("READY=1", &mut messages);
    wait_for("WATCHDOG=1", &mut messages);
    wait_for("WATCHDOG=1", &mut messages);
    let status = child
        .terminate(Duration::from_secs(20))
        .expect("the agent stops on SIGTERM");
    wait_for("STOPPING=1", &mut messages);
    assert!(status.success(), "exit status {status}");
}

/// A small tmpfs mounted for one test, unmounted when dropped.
struct SmallFilesystem {
    path: PathBuf,
}

impl SmallFilesystem {
    fn mount(path: &Path, size: &str) -> SmallFilesystem {
        std::fs::create_dir_all(path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output()
            .expect("mount(8) is missing: install Debian's mount package");
        assert!(
            output.status.success(),
            "this test fills a small tmpfs and needs to mount one (run the tests as root): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        SmallFilesystem {
            path: path.to_path_buf(),
        }
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[test]
fn a_relay_whose_outbox_cannot_be_written_exits_non_zero_and_stops_feeding_the_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _filesystem = SmallFilesystem::mount(&state, "3m");
    let broker_port = backhaul_tests::free_port();
    let settings: Vec<(&str, toml_edit::Value)> = vec![
        ("state_dir", state.display().to_string().into()),
        // The cap would refuse batches cleanly; this test is about a disk that fails first.
        ("outbox.max_bytes", "1 GiB".into()),
        ("delivery.retry_min_ms", 60_000.into()),
    ];
    // The ERP is down (nothing listens there), so what the agent sends stays in the outbox.
    let erp_down = format!(
        "[sink.http]\nurl = \"http://127.0.0.1:{}/events\"\n",
        backhaul_tests::free_port()
    );
    let mut relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker_port,
        true,
        Some(&erp_down),
        &settings,
    );
    relay.kill9();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let stderr_path = dir.path().join("relay.stderr");
    let mut child = ChildGuard::spawn(
        "backhaul-relay",
        Command::new(binary("backhaul-relay"))
            .args(["run", "--config", &relay.config_path().to_string_lossy()])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .env("BACKHAUL_LOG", "info,rumqttd=warn")
            .stderr(std::fs::File::create(&stderr_path).unwrap()),
    );
    let mut messages: Vec<String> = Vec::new();
    let receive = |messages: &mut Vec<String>| {
        let mut buf = [0u8; 512];
        while let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    };
    let fed = poll_until(Duration::from_secs(30), || {
        receive(&mut messages);
        (messages.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2).then_some(())
    });
    assert!(
        fed.is_some(),
        "the relay never fed the watchdog: {messages:?}"
    );

    // An agent sends events of about 15 kB until the relay's disk is full.
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", "wh-full")
            .set("uplink.client_id", format!("agent-full-{broker_port}")),
    );
    let attrs: serde_json::Map<String, serde_json::Value> = (0..58)
        .map(|i| (format!("a{i}"), serde_json::Value::String("x".repeat(250))))
        .collect();
    let mut sent = 0;
    let exited = poll_until(Duration::from_secs(90), || {
        // Read the notifications as systemd would: a full socket blocks the sender.
        receive(&mut messages);
        if let Ok(Some(status)) = child.child.try_wait() {
            return Some(status);
        }
        let events: Vec<serde_json::Value> = (0..20)
            .map(|i| {
                serde_json::json!({"v": 1, "id": format!("full-{sent}-{i}"), "type": "count",
                    "ts": backhaul_tests::events::TS, "sku": "S", "qty": 1,
                    "location": format!("L-{}", sent % 50), "attrs": attrs})
            })
            .collect();
        if agent
            .post_events(&serde_json::Value::Array(events), None)
            .status()
            .is_success()
        {
            sent += 1;
        }
        None
    });
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let status = exited.unwrap_or_else(|| {
        panic!("the relay kept running with a full disk after {sent} posts of 20 events:\n{stderr}")
    });
    assert!(!status.success(), "exit status {status}:\n{stderr}");
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("the batch intake task failed"), "{stderr}");
    assert!(stderr.contains("not acknowledged"), "{stderr}");
    // Nothing feeds the watchdog any more: after the STOPPING=1 the exit sends, silence.
    receive(&mut messages);
    let stopping = messages
        .iter()
        .rposition(|m| m.contains("STOPPING=1"))
        .unwrap_or_else(|| panic!("no STOPPING=1 before the exit: {messages:?}"));
    assert!(
        messages[stopping..]
            .iter()
            .all(|m| !m.contains("WATCHDOG=1")),
        "{messages:?}"
    );
    eprintln!("the relay exited with {status} after {sent} posts of 20 events of ~15 kB");
}
