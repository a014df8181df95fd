//! Who may read and change things through the admin APIs: the agent hands out no event on its
//! ingest listener, its admin API wants the read token, the relay's dead-letter changes want
//! the write token, and the operator commands send the token of the configuration, of a file or
//! of the environment. An admin API off loopback without a token does not start.

use std::process::Command;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::events::pick;
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::{binary, free_port};
use reqwest::blocking::Client;
use reqwest::header::WWW_AUTHENTICATE;
use serde_json::{Value, json};

const READ: &str = "read-0a1b2c3d4e5f";
const WRITE: &str = "write-9f8e7d6c5b4a";

fn secret(value: &str) -> toml_edit::Value {
    let mut table = toml_edit::InlineTable::new();
    table.insert("value", value.into());
    toml_edit::Value::InlineTable(table)
}

fn error_text(response: reqwest::blocking::Response) -> String {
    let body: Value = response.json().expect("a JSON error");
    body["error"].as_str().expect("an error text").to_string()
}

#[test]
fn the_agent_hands_out_events_only_on_its_admin_api_and_only_with_the_read_token() {
    let agent = AgentProcess::start(AgentOptions::default().admin_token(READ));
    let accepted = agent.post_events(&pick("adm-1", "SO-1"), None);
    assert_eq!(accepted.status(), 202, "{}", accepted.text().unwrap());
    let client = Client::new();

    // The ingest listener, which the WMS reaches, serves health but no event or state.
    for path in [
        "/v1/log",
        "/v1/tail",
        "/v1/rejects",
        "/v1/status",
        "/metrics",
    ] {
        let response = client
            .get(format!("{}{path}", agent.http_url()))
            .send()
            .unwrap();
        assert_eq!(response.status(), 404, "GET {path} on the ingest listener");
    }
    let health = client
        .get(format!("{}/healthz", agent.http_url()))
        .send()
        .unwrap();
    assert_eq!(health.status(), 200);

    // The admin API: health for anyone, the rest for the read token.
    let admin = agent.admin_url();
    for path in ["/healthz", "/readyz"] {
        let response = client.get(format!("{admin}{path}")).send().unwrap();
        assert_eq!(response.status(), 200, "GET {path} without a token");
    }
    for path in ["/v1/log", "/v1/rejects", "/v1/status", "/metrics"] {
        let response = client.get(format!("{admin}{path}")).send().unwrap();
        assert_eq!(response.status(), 401, "GET {path} without a token");
        assert_eq!(response.headers()[WWW_AUTHENTICATE], "Bearer");
        let text = error_text(response);
        assert!(text.contains("admin.read_token"), "{text}");
        let wrong = client
            .get(format!("{admin}{path}"))
            .bearer_auth("read-0a1b2c3d4e5e")
            .send()
            .unwrap();
        assert_eq!(wrong.status(), 401, "GET {path} with a wrong token");
    }
    let log = agent.get_json("/v1/log");
    assert_eq!(log["events"][0]["id"], "adm-1");

    // The operator commands: the token of --config, of --token-file, of the environment.
    let status = |args: &[&str], token_env: Option<&str>| {
        let mut command = Command::new(binary("backhaul-agent"));
        command
            .arg("status")
            .args(args)
            .env("CREDENTIALS_DIRECTORY", agent.credentials_dir())
            .env_remove("BACKHAUL_ADMIN_TOKEN");
        if let Some(token) = token_env {
            command.env("BACKHAUL_ADMIN_TOKEN", token);
        }
        let output = command.output().expect("backhaul-agent status runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let config = agent.config_path().display().to_string();
    let (ok, stdout, stderr) = status(&["--config", &config], None);
    assert!(ok, "status --config: {stderr}");
    assert!(stdout.contains("wh-east"), "{stdout}");
    let (ok, _, stderr) = status(&["--url", &admin], None);
    assert!(!ok, "status without a token succeeded");
    assert!(stderr.contains("401"), "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");
    let token_file = agent.dir().join("operator-token");
    std::fs::write(&token_file, format!("{READ}\n")).unwrap();
    let token_path = token_file.display().to_string();
    let (ok, _, stderr) = status(&["--url", &admin, "--token-file", &token_path], None);
    assert!(ok, "status --token-file: {stderr}");
    let (ok, _, stderr) = status(&["--url", &admin], Some(READ));
    assert!(ok, "status with BACKHAUL_ADMIN_TOKEN: {stderr}");
}

#[test]
fn dead_letter_replay_and_discard_want_the_relays_write_token() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start_with(
        dir.path(),
        free_port(),
        true,
        None,
        &[
            ("admin.read_token", secret(READ)),
            ("admin.write_token", secret(WRITE)),
        ],
    );
    let admin = format!("http://127.0.0.1:{}", relay.admin_port);
    let client = Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut request = client.get(format!("{admin}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().unwrap()
    };
    let post = |path: &str, token: Option<&str>| {
        let mut request = client
            .post(format!("{admin}{path}"))
            .json(&json!({"all": true}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().unwrap()
    };

    assert_eq!(get("/healthz", None).status(), 200);
    assert_eq!(get("/readyz", None).status(), 200);
    for path in ["/v1/dlq", "/v1/sites", "/v1/status", "/metrics"] {
        assert_eq!(get(path, None).status(), 401, "GET {path} without a token");
        assert_eq!(get(path, Some(READ)).status(), 200, "GET {path}, read");
        assert_eq!(get(path, Some(WRITE)).status(), 200, "GET {path}, write");
    }
    let discard = |token| {
        let mut request = client
            .post(format!("{admin}/v1/dlq/discard"))
            .json(&json!({"ids": [1]}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().unwrap()
    };
    assert_eq!(post("/v1/dlq/replay", None).status(), 401);
    assert_eq!(discard(None).status(), 401);
    let refused = post("/v1/dlq/replay", Some(READ));
    assert_eq!(refused.status(), 403);
    let text = error_text(refused);
    assert!(text.contains("admin.write_token"), "{text}");
    assert_eq!(discard(Some(READ)).status(), 403);
    let replayed = post("/v1/dlq/replay", Some(WRITE));
    assert_eq!(replayed.status(), 200, "{}", replayed.text().unwrap());

    // The command run with the relay's configuration sends its write token.
    let output = Command::new(binary("backhaul-relay"))
        .args(["dlq", "replay", "--all", "--config"])
        .arg(relay.config_path())
        .env_remove("BACKHAUL_ADMIN_TOKEN")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "dlq replay --config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // With the read token only, it is told which token it needs.
    let output = Command::new(binary("backhaul-relay"))
        .args(["dlq", "replay", "--all", "--url", &admin])
        .env("BACKHAUL_ADMIN_TOKEN", READ)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("403") && stderr.contains("admin.write_token"),
        "{stderr}"
    );
}

#[test]
fn an_admin_api_off_loopback_without_a_token_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let check = |name: &str, text: String| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let output = Command::new(binary(if name.starts_with("agent") {
            "backhaul-agent"
        } else {
            "backhaul-relay"
        }))
        .args(["check-config", "--config"])
        .arg(&file)
        .output()
        .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let agent = std::fs::read_to_string(backhaul_tests::example_config("agent.toml")).unwrap();
    let relay = std::fs::read_to_string(backhaul_tests::example_config("relay.toml")).unwrap();

    let (ok, stderr) = check(
        "agent-open.toml",
        agent.replace("127.0.0.1:8789", "0.0.0.0:8789"),
    );
    assert!(!ok, "an agent admin API on 0.0.0.0 without a token passed");
    assert!(stderr.contains("admin.read_token"), "{stderr}");
    assert!(stderr.contains("not a loopback address"), "{stderr}");

    let (ok, stderr) = check(
        "relay-open.toml",
        relay.replace("127.0.0.1:8788", "0.0.0.0:8788"),
    );
    assert!(!ok, "a relay admin API on 0.0.0.0 without a token passed");
    assert!(stderr.contains("admin.read_token"), "{stderr}");

    let (ok, stderr) = check(
        "relay-token.toml",
        relay.replace("127.0.0.1:8788", "0.0.0.0:8788").replace(
            "# read_token = { file = \"$CREDENTIALS_DIRECTORY/admin-read-token\" }",
            "read_token = { value = \"a-read-token\" }",
        ),
    );
    assert!(ok, "a relay admin API on 0.0.0.0 with a token: {stderr}");

    let (ok, stderr) = check(
        "agent-same.toml",
        agent.replace("127.0.0.1:8789", "127.0.0.1:8787"),
    );
    assert!(!ok, "the admin API on the ingest address passed");
    assert!(stderr.contains("admin.listen"), "{stderr}");
    assert!(stderr.contains("an address of its own"), "{stderr}");
}
