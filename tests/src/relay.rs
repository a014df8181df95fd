//! The relay as a real process: its own config (from `config/relay.toml`), state directory and
//! ports; SIGKILL and restart on the same state; its ledger and admin API as a user reads them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::{ChildGuard, binary, example_config, free_port, poll_until};

pub struct RelayProcess {
    pub dir: PathBuf,
    config: PathBuf,
    pub admin_port: u16,
    pub broker_port: u16,
    child: Option<ChildGuard>,
}

impl RelayProcess {
    /// A relay taking batches from the broker at `broker_port`; with `embedded`, it runs that
    /// broker itself.
    pub fn start(dir: &Path, broker_port: u16, embedded: bool) -> RelayProcess {
        RelayProcess::start_with(dir, broker_port, embedded, None, &[])
    }

    /// Like [`RelayProcess::start`], with the `[sink.ledger]` section replaced by `sink` (TOML
    /// text of another connector) and keys set by dotted path (`("delivery.burst", 10)`).
    pub fn start_with(
        dir: &Path,
        broker_port: u16,
        embedded: bool,
        sink: Option<&str>,
        settings: &[(&str, toml_edit::Value)],
    ) -> RelayProcess {
        std::fs::create_dir_all(dir).expect("relay dir");
        // Never the broker's port, which the caller may have just been given.
        let admin_port = std::iter::repeat_with(free_port)
            .find(|port| *port != broker_port)
            .expect("a free port");
        let state = dir.join("state");
        let text = std::fs::read_to_string(example_config("relay.toml"))
            .expect("example relay config")
            .replace(
                "/var/lib/backhaul-relay/ledger.jsonl",
                &dir.join("ledger.jsonl").display().to_string(),
            )
            .replace("/var/lib/backhaul-relay", &state.display().to_string())
            .replace("port = 1883", &format!("port = {broker_port}"))
            .replace("embedded = false", &format!("embedded = {embedded}"))
            .replace("127.0.0.1:8788", &format!("127.0.0.1:{admin_port}"))
            .replace(
                "backhaul-relay-1",
                &format!("backhaul-relay-test-{admin_port}"),
            );
        let text = match sink {
            None => text,
            Some(sink) => {
                let ledger = format!(
                    "[sink.ledger]\npath = {:?}\n",
                    dir.join("ledger.jsonl").display().to_string()
                );
                assert!(
                    text.contains(&ledger),
                    "config/relay.toml no longer has the expected [sink.ledger] section"
                );
                text.replace(&ledger, sink)
            }
        };
        let mut doc: toml_edit::DocumentMut = text.parse().expect("relay config is TOML");
        if embedded {
            let mut password = toml_edit::InlineTable::new();
            password.insert("value", crate::BROKER_LOGIN.1.into());
            let mut login = toml_edit::InlineTable::new();
            login.insert("username", crate::BROKER_LOGIN.0.into());
            login.insert("password", toml_edit::Value::InlineTable(password));
            let mut users = toml_edit::Array::new();
            users.push(toml_edit::Value::InlineTable(login));
            doc["broker"]["users"] = toml_edit::value(users);
        }
        for (path, value) in settings {
            let mut item = doc.as_item_mut();
            for key in path.split('.') {
                item = &mut item[key];
            }
            *item = toml_edit::Item::Value(value.clone());
        }
        let config = dir.join("relay.toml");
        std::fs::write(&config, doc.to_string()).expect("write relay config");
        let mut relay = RelayProcess {
            dir: dir.to_path_buf(),
            config,
            admin_port,
            broker_port,
            child: None,
        };
        relay.restart();
        relay
    }

    /// Starts the process (again) on the same state and waits until it is subscribed.
    pub fn restart(&mut self) {
        self.child = None;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("relay.log"))
            .expect("relay log file");
        let child = ChildGuard::spawn(
            "backhaul-relay",
            Command::new(binary("backhaul-relay"))
                .args(["run", "--config", &self.config.to_string_lossy()])
                .env("BACKHAUL_LOG", "info,rumqttd=warn")
                .stdout(Stdio::null())
                .stderr(log),
        );
        self.child = Some(child);
        let ready = poll_until(Duration::from_secs(30), || {
            let status =
                reqwest::blocking::get(format!("http://127.0.0.1:{}/readyz", self.admin_port))
                    .ok()?;
            status.status().is_success().then_some(())
        });
        assert!(
            ready.is_some(),
            "the relay did not become ready:\n{}",
            self.log_tail()
        );
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
    }

    /// SIGTERM, and the exit status once the process is gone (`None` if it did not stop).
    pub fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        child.terminate(Duration::from_secs(30))
    }

    pub fn ledger_path(&self) -> PathBuf {
        self.dir.join("ledger.jsonl")
    }

    /// Every complete line of the ledger, parsed. A last line without its newline is being
    /// written right now (or was cut by a kill, and the relay drops it when it starts again).
    pub fn ledger(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.ledger_path()).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| panic!("ledger line {line:?}: {e}"))
            })
            .collect()
    }

    pub fn sites(&self) -> Value {
        reqwest::blocking::get(format!("http://127.0.0.1:{}/v1/sites", self.admin_port))
            .and_then(|r| r.json())
            .unwrap_or(Value::Null)
    }

    pub fn metrics(&self) -> String {
        reqwest::blocking::get(format!("http://127.0.0.1:{}/metrics", self.admin_port))
            .and_then(|r| r.text())
            .unwrap_or_default()
    }

    /// Runs `backhaul-relay ARGS --url <this relay>` and returns its stdout; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        let url = format!("http://127.0.0.1:{}", self.admin_port);
        let output = Command::new(binary("backhaul-relay"))
            .args(args)
            .args(["--url", &url])
            .output()
            .expect("run backhaul-relay");
        assert!(
            output.status.success(),
            "backhaul-relay {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The process id while the relay runs (it changes with every restart).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// The relay's `/v1/status`, as `backhaul-relay status --json` prints it.
    pub fn status(&self) -> Value {
        serde_json::from_str(&self.cli(&["status", "--json"])).expect("status --json is JSON")
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("relay.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}
