//! Both binaries load the documented example configs, and refuse bad ones with the file, the
//! key and what was expected.

use backhaul_tests::{example_config, run_binary};

fn check_config(binary: &str, file: &std::path::Path) -> (bool, String, String) {
    let out = run_binary(
        binary,
        &["check-config", "--config", &file.to_string_lossy()],
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn example_configs_pass_check_config() {
    let (ok, stdout, stderr) = check_config("backhaul-agent", &example_config("agent.toml"));
    assert!(ok, "agent example refused: {stderr}");
    assert!(stdout.contains("agent.toml: OK"), "{stdout}");
    assert!(stdout.contains("wh-east"), "{stdout}");

    let (ok, stdout, stderr) = check_config("backhaul-relay", &example_config("relay.toml"));
    assert!(ok, "relay example refused: {stderr}");
    assert!(stdout.contains("relay.toml: OK"), "{stdout}");
}

#[test]
fn a_typo_names_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let text = std::fs::read_to_string(example_config("agent.toml"))
        .unwrap()
        // The first is in [mqtt]; other sections have the key too.
        .replacen("max_connections = ", "max_conections = ", 1);
    std::fs::write(&file, text).unwrap();
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(!ok);
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(stderr.contains("key `mqtt.max_conections`"), "{stderr}");
    assert!(
        stderr.contains("unknown field `max_conections`, expected one of"),
        "{stderr}"
    );
}

#[test]
fn a_bad_value_says_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    let text = std::fs::read_to_string(example_config("relay.toml"))
        .unwrap()
        .replace("port = 1883", "port = \"eighteen\"");
    std::fs::write(&file, text).unwrap();
    let (ok, _, stderr) = check_config("backhaul-relay", &file);
    assert!(!ok);
    assert!(stderr.contains("key `broker.port`"), "{stderr}");
    assert!(
        stderr.contains("u16") || stderr.contains("integer"),
        "{stderr}"
    );
}

#[test]
fn an_unknown_uplink_protocol_names_the_key_and_the_versions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let example = std::fs::read_to_string(example_config("agent.toml")).unwrap();
    assert!(example.contains("protocol = \"3.1.1\""));
    for wrong in ["\"4\"", "\"v5\"", "5"] {
        let text = example.replace("protocol = \"3.1.1\"", &format!("protocol = {wrong}"));
        std::fs::write(&file, text).unwrap();
        let (ok, _, stderr) = check_config("backhaul-agent", &file);
        assert!(!ok, "protocol = {wrong} accepted");
        assert!(stderr.contains(&file.display().to_string()), "{stderr}");
        assert!(stderr.contains("key `uplink.protocol`"), "{stderr}");
        assert!(stderr.contains("expected \"3.1.1\" or \"5\""), "{stderr}");
    }
    let text = example.replace("protocol = \"3.1.1\"", "protocol = \"5\"");
    std::fs::write(&file, text).unwrap();
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(ok, "protocol = \"5\" refused: {stderr}");
}

#[test]
fn secrets_are_read_but_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("token");
    std::fs::write(&secret_file, "very-secret-token\n").unwrap();
    let file = dir.path().join("agent.toml");
    let text = std::fs::read_to_string(example_config("agent.toml"))
        .unwrap()
        .replace(
            "# token = { env = \"BACKHAUL_HTTP_TOKEN\" }",
            &format!(
                "token = {{ file = {:?} }}",
                secret_file.display().to_string()
            ),
        );
    std::fs::write(&file, text).unwrap();
    let (ok, stdout, stderr) = check_config("backhaul-agent", &file);
    assert!(ok, "{stderr}");
    assert!(!stdout.contains("very-secret-token") && !stderr.contains("very-secret-token"));

    std::fs::remove_file(&secret_file).unwrap();
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(!ok);
    assert!(stderr.contains("key `http.token`"), "{stderr}");
    assert!(
        stderr.contains(&secret_file.display().to_string()),
        "{stderr}"
    );
}

#[test]
fn run_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let text = std::fs::read_to_string(example_config("agent.toml"))
        .unwrap()
        .replace(
            "/var/lib/backhaul-agent",
            &dir.path().join("state").display().to_string(),
        )
        .replace(
            "0.0.0.0:1883",
            &format!("127.0.0.1:{}", backhaul_tests::free_port()),
        )
        .replace(
            "127.0.0.1:8787",
            &format!("127.0.0.1:{}", backhaul_tests::free_port()),
        )
        .replace(
            "127.0.0.1:8789",
            &format!("127.0.0.1:{}", backhaul_tests::free_port()),
        );
    std::fs::write(&file, text).unwrap();
    let mut agent = backhaul_tests::ChildGuard::spawn(
        "agent",
        std::process::Command::new(backhaul_tests::binary("backhaul-agent")).args([
            "run",
            "--config",
            &file.to_string_lossy(),
        ]),
    );
    // Wait for the agent to be up before asking it to stop.
    let http = text_listen_addr(&file);
    let up = backhaul_tests::poll_until(std::time::Duration::from_secs(20), || {
        std::net::TcpStream::connect(&http).ok()
    });
    assert!(up.is_some(), "agent never listened on {http}");
    let status = agent
        .terminate(std::time::Duration::from_secs(20))
        .expect("agent exits on SIGTERM");
    assert!(status.success(), "agent exit status {status}");
}

fn text_listen_addr(file: &std::path::Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let start = text.find("[http]").unwrap();
    let line = text[start..]
        .lines()
        .find(|l| l.starts_with("listen"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

#[test]
fn a_broken_password_file_names_the_line_and_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let passwd = dir.path().join("scanners.passwd");
    std::fs::write(
        &passwd,
        "# scanners\nscanner-01:$7$101$MDEyMzQ1Njc4OWFi$AAAA\nscanner-02:hunter2\n",
    )
    .unwrap();
    let file = dir.path().join("agent.toml");
    let text = std::fs::read_to_string(example_config("agent.toml"))
        .unwrap()
        .replacen(
            "[mqtt]\n",
            &format!(
                "[mqtt]\npassword_file = {:?}\n",
                passwd.display().to_string()
            ),
            1,
        );
    std::fs::write(&file, text).unwrap();
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(!ok);
    assert!(stderr.contains("key `mqtt.password_file`"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "expected a Mosquitto password file: {}: line 3: user \"scanner-02\": expected a hash as mosquitto_passwd writes it: $7$ROUNDS$SALT$HASH or $6$SALT$HASH",
            passwd.display()
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn an_unknown_placeholder_in_an_http_body_mapping_names_the_key_and_the_known_ones() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    let ledger = "[sink.ledger]\npath = \"/var/lib/backhaul-relay/ledger.jsonl\"\n";
    let example = std::fs::read_to_string(example_config("relay.toml")).unwrap();
    assert!(example.contains(ledger));
    let text = example.replace(
        ledger,
        "[sink.http]\nurl = \"https://erp.example.com/api\"\n\n\
         [sink.http.body.pick]\n\"line.item\" = \"{sku}\"\n\"line.quantity\" = \"{quantity:number}\"\n",
    );
    std::fs::write(&file, text).unwrap();
    let (ok, _, stderr) = check_config("backhaul-relay", &file);
    assert!(!ok, "an unknown placeholder was accepted");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(
            "key `sink.http.body.pick.\"line.quantity\"`: expected a known placeholder instead \
             of {quantity:number}: one of v, id, type, ts, device, order, line, sku, qty, uom, \
             location, lot, serial, reason, carrier, tracking, po, attrs.NAME, site, epoch, \
             seq, received_at_ms"
        ),
        "{stderr}"
    );
}

/// The example agent configuration with `[uplink]` and a `[site_broker]` on one broker, and
/// the given client ids (`None`: left to the default).
fn uplink_and_site_broker(
    dir: &std::path::Path,
    uplink_id: Option<&str>,
    site_broker_id: Option<&str>,
    site_broker_port: u16,
) -> std::path::PathBuf {
    let text = std::fs::read_to_string(example_config("agent.toml")).unwrap();
    let mut doc: toml_edit::DocumentMut = text.parse().unwrap();
    assert_eq!(doc["uplink"]["host"].as_str(), Some("127.0.0.1"));
    assert_eq!(doc["uplink"]["port"].as_integer(), Some(1883));
    if let Some(id) = uplink_id {
        doc["uplink"]["client_id"] = toml_edit::value(id);
    }
    doc["site_broker"]["host"] = toml_edit::value("127.0.0.1");
    doc["site_broker"]["port"] = toml_edit::value(i64::from(site_broker_port));
    if let Some(id) = site_broker_id {
        doc["site_broker"]["client_id"] = toml_edit::value(id);
    }
    let file = dir.join("agent.toml");
    std::fs::write(&file, doc.to_string()).unwrap();
    file
}

#[test]
fn the_uplink_and_the_site_broker_may_not_share_a_client_id_on_one_broker() {
    let dir = tempfile::tempdir().unwrap();

    let file = uplink_and_site_broker(dir.path(), Some("agent-7"), Some("agent-7"), 1883);
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(!ok, "one client id for both on one broker was accepted");
    assert!(stderr.contains(&file.display().to_string()), "{stderr}");
    assert!(
        stderr.contains(
            "key `site_broker.client_id`: expected a client id other than uplink.client_id's: \
             uplink.client_id and site_broker.client_id are both \"agent-7\" on 127.0.0.1:1883"
        ),
        "{stderr}"
    );

    // One set to what the other is by default is the same clash.
    let file = uplink_and_site_broker(
        dir.path(),
        None,
        Some("backhaul-agent-wh-east-uplink"),
        1883,
    );
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(
        !ok,
        "the uplink's default id for the site broker was accepted"
    );
    assert!(
        stderr.contains(
            "uplink.client_id (by default) and site_broker.client_id are both \
             \"backhaul-agent-wh-east-uplink\" on 127.0.0.1:1883"
        ),
        "{stderr}"
    );

    // Both defaults on one broker, or one id on two brokers, are fine.
    let file = uplink_and_site_broker(dir.path(), None, None, 1883);
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(
        ok,
        "the default client ids on one broker were refused: {stderr}"
    );
    let file = uplink_and_site_broker(dir.path(), Some("agent-7"), Some("agent-7"), 1884);
    let (ok, _, stderr) = check_config("backhaul-agent", &file);
    assert!(ok, "one client id on two brokers was refused: {stderr}");
}

/// Accepts MQTT 3.1.1 connections like a broker would and records each CONNECT's client id.
fn record_client_ids(
    listener: std::net::TcpListener,
) -> std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>> {
    use std::io::{Read, Write};
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let record = record.clone();
            std::thread::spawn(move || {
                // Fixed header, remaining length, then protocol name, level, flags and
                // keep-alive (10 bytes) before the client id.
                let mut header = [0u8; 2];
                if stream.read_exact(&mut header).is_err() || header[0] != 0x10 {
                    return;
                }
                let mut remaining = usize::from(header[1] & 0x7F);
                let mut shift = 7;
                let mut byte = header[1];
                while byte & 0x80 != 0 {
                    let mut next = [0u8; 1];
                    if stream.read_exact(&mut next).is_err() {
                        return;
                    }
                    byte = next[0];
                    remaining |= usize::from(byte & 0x7F) << shift;
                    shift += 7;
                }
                let mut connect = vec![0u8; remaining];
                if stream.read_exact(&mut connect).is_err() || connect.len() < 12 {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([connect[10], connect[11]]));
                let Some(id) = connect.get(12..12 + len) else {
                    return;
                };
                record
                    .lock()
                    .unwrap()
                    .insert(String::from_utf8_lossy(id).into_owned());
                let _ = stream.write_all(&[0x20, 0x02, 0x00, 0x00]);
                // Keep the connection open; what follows is not this test's business.
                let _ = std::io::copy(&mut stream, &mut std::io::sink());
            });
        }
    });
    seen
}

#[test]
fn the_uplink_and_the_site_broker_have_distinct_default_client_ids() {
    use backhaul_tests::agent::{AgentOptions, AgentProcess, SITE};
    let broker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = broker.local_addr().unwrap().port();
    let seen = record_client_ids(broker);
    let _agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", port)
            .set("site_broker.host", "127.0.0.1")
            .set("site_broker.port", i64::from(port)),
    );
    let uplink = format!("backhaul-agent-{SITE}-uplink");
    let site_broker = format!("backhaul-agent-{SITE}");
    let ids = backhaul_tests::poll_until(std::time::Duration::from_secs(30), || {
        let ids = seen.lock().unwrap().clone();
        (ids.contains(&uplink) && ids.contains(&site_broker)).then_some(ids)
    });
    let ids = ids.unwrap_or_else(|| {
        panic!(
            "the broker did not see both {uplink:?} and {site_broker:?}: {:?}",
            seen.lock().unwrap()
        )
    });
    assert_eq!(ids.len(), 2, "{ids:?}");
}

#[test]
fn a_session_expiry_out_of_range_names_the_key_and_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    let example = std::fs::read_to_string(example_config("agent.toml")).unwrap();
    assert!(example.contains("max_session_expiry_secs = 604800\n"));
    for wrong in ["0", "4294967295"] {
        let text = example.replace(
            "max_session_expiry_secs = 604800\n",
            &format!("max_session_expiry_secs = {wrong}\n"),
        );
        std::fs::write(&file, text).unwrap();
        let (ok, _, stderr) = check_config("backhaul-agent", &file);
        assert!(!ok, "max_session_expiry_secs = {wrong} accepted");
        assert!(
            stderr.contains(&format!(
                "{}: key `mqtt.max_session_expiry_secs`: expected 1 to 4294967294 (seconds; \
                 604800 is a week)",
                file.display()
            )),
            "{stderr}"
        );
    }
}

#[test]
fn an_embedded_broker_without_logins_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("relay.toml");
    let text = std::fs::read_to_string(example_config("relay.toml"))
        .unwrap()
        .replace("embedded = false", "embedded = true");
    std::fs::write(&file, text).unwrap();
    let (ok, _, stderr) = check_config("backhaul-relay", &file);
    assert!(!ok, "an embedded broker without logins passed");
    assert!(stderr.contains("key `broker.users`"), "{stderr}");
    assert!(stderr.contains("no anonymous client"), "{stderr}");
}
