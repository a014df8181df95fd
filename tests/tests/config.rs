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
        .replace("max_connections = ", "max_conections = ");
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
