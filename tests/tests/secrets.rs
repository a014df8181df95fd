//! Secrets never leave the process: not in logs, not in `check-config`, not in metrics or the
//! admin API, not in the error text of a bad configuration. Every secret of both services is
//! set to a recognisable value and looked for everywhere an operator or a log shipper reads.

use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::events::{pick, unique_id};
use backhaul_tests::mqtt::{V4Client, v4_options};
use backhaul_tests::poll_until;
use backhaul_tests::relay::RelayProcess;
use serde_json::Value;

const HTTP_TOKEN: &str = "tok-SECRET-http-7d1c";
const SCANNER_PASSWORD: &str = "pw-SECRET-scanner-51ab";
const BROKER_PASSWORD: &str = "pw-SECRET-broker-09fe";
const SITE_KEY: &str = "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2";
const HTTP_SINK_TOKEN: &str = "tok-SECRET-erp-33aa";

fn value(text: &str) -> toml_edit::Value {
    format!("{{ value = {text:?} }}").parse().unwrap()
}

/// Every secret, and the parts of it a careless formatter might print.
fn assert_no_secret(place: &str, text: &str) {
    for secret in [
        HTTP_TOKEN,
        SCANNER_PASSWORD,
        BROKER_PASSWORD,
        SITE_KEY,
        &SITE_KEY[..16],
        HTTP_SINK_TOKEN,
        "SECRET",
    ] {
        assert!(
            !text.contains(secret),
            "{place} shows a secret ({secret}):\n{text}"
        );
    }
}

#[test]
fn no_secret_appears_in_logs_check_config_metrics_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("site-keys.toml");
    std::fs::write(&keys, format!("wh-s = \"{SITE_KEY}\"\n")).unwrap();
    let broker_port = backhaul_tests::free_port();
    let erp_port = backhaul_tests::free_port();
    let sink = format!(
        "[sink.http]\nurl = \"http://127.0.0.1:{erp_port}/events\"\ntimeout_ms = 500\n\
         auth = {{ bearer = {{ token = {{ value = \"{HTTP_SINK_TOKEN}\" }} }} }}\n"
    );
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker_port,
        true,
        Some(&sink),
        &[
            (
                "security.site_keys",
                format!("{{ file = {:?} }}", keys.display().to_string())
                    .parse()
                    .unwrap(),
            ),
            ("broker.username", "relay".into()),
            // The embedded broker takes only its logins: the site's is one of them.
            (
                "broker.users",
                format!(
                    "[{{ username = \"wh-s\", password = {{ value = \"{BROKER_PASSWORD}\" }} }}]"
                )
                .parse()
                .unwrap(),
            ),
            ("broker.password", value(BROKER_PASSWORD)),
            ("delivery.retry_min_ms", 100.into()),
        ],
    );
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", "wh-s")
            .set("uplink.client_id", format!("agent-wh-s-{broker_port}"))
            .set("uplink.username", "wh-s")
            .set("uplink.password", value(BROKER_PASSWORD))
            .set("uplink.site_key", value(SITE_KEY))
            .user("scanner-1", SCANNER_PASSWORD)
            .token(HTTP_TOKEN),
    );

    // Traffic that touches every secret: a scanner logs in, the WMS posts with the token, a
    // wrong password and a wrong token are refused, the relay tries the ERP with its token.
    let mut options = v4_options(agent.mqtt_addr(), "scanner-1");
    options.set_credentials("scanner-1", SCANNER_PASSWORD);
    let (mut scanner, _) = V4Client::connect(options).expect("the scanner logs in");
    let event = pick(&unique_id("secret"), "SO-1");
    scanner
        .publish("scans/scanner-1", 1, serde_json::to_vec(&event).unwrap())
        .unwrap();
    let mut wrong = v4_options(agent.mqtt_addr(), "scanner-2");
    wrong.set_credentials("scanner-1", format!("{SCANNER_PASSWORD}x"));
    assert!(V4Client::connect(wrong).is_err());
    let posted = agent.post_events(&pick(&unique_id("secret"), "SO-2"), Some(HTTP_TOKEN));
    assert_eq!(posted.status().as_u16(), 202);
    let refused = agent.post_events(&pick(&unique_id("secret"), "SO-3"), Some("wrong-SECRET"));
    assert_eq!(refused.status().as_u16(), 401);
    let forwarded = poll_until(Duration::from_secs(30), || {
        (agent.status()["backlog"]["events"] == 0).then_some(())
    });
    assert!(forwarded.is_some(), "{}", agent.status());
    let tried = poll_until(Duration::from_secs(30), || {
        let metrics = relay.metrics();
        metrics
            .contains("backhaul_relay_delivery_retries_total")
            .then_some(())
    });
    assert!(tried.is_some());

    // Everywhere an operator looks.
    let status: Value = agent.status();
    assert_no_secret("the agent's /v1/status", &status.to_string());
    assert_no_secret("the agent's /metrics", &agent.metrics());
    assert_no_secret("the relay's /metrics", &relay.metrics());
    assert_no_secret("the relay's /v1/sites", &relay.sites().to_string());
    assert_no_secret("the relay's status", &relay.cli(&["status", "--json"]));
    for (binary, config) in [
        ("backhaul-agent", agent.config_path()),
        ("backhaul-relay", relay.config_path().to_path_buf()),
    ] {
        let out = std::process::Command::new(backhaul_tests::binary(binary))
            .args(["check-config", "--config", &config.to_string_lossy()])
            .env("CREDENTIALS_DIRECTORY", agent.credentials_dir())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{binary} check-config: {text}");
        assert_no_secret(&format!("{binary} check-config"), &text);
    }
    assert_no_secret("the agent's log", &agent.stderr());
    assert_no_secret("the relay's log", &relay.log_tail());

    // A configuration error about a secret names the key, never the value.
    let bad = dir.path().join("bad-agent.toml");
    let text = std::fs::read_to_string(agent.config_path())
        .unwrap()
        .replace(SITE_KEY, "5ec2e7SECRET");
    std::fs::write(&bad, text).unwrap();
    let out = std::process::Command::new(backhaul_tests::binary("backhaul-agent"))
        .args(["check-config", "--config", &bad.to_string_lossy()])
        .env("CREDENTIALS_DIRECTORY", agent.credentials_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    assert!(text.contains("uplink.site_key"), "{text}");
    assert_no_secret("a configuration error", &text);
}
