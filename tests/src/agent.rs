//! The real `backhaul-agent` as a child process: a configuration derived from the documented
//! `config/agent.toml`, its own state directory and free ports, and the HTTP calls a test makes
//! to it (ingest on its HTTP listener; health, status, the log, metrics on its admin API).

use std::fs::OpenOptions;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use reqwest::blocking::{Client, Response};
use serde_json::Value;
use tempfile::TempDir;
use toml_edit::{DocumentMut, InlineTable, Item, Table, value};

use crate::{ChildGuard, binary, example_config, free_ports, poll_until};

/// The site of the example configuration, which every stored event carries.
pub const SITE: &str = "wh-east";
/// How long the agent may take to answer `/healthz` after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What a test changes in the example configuration. Everything else stays as documented.
#[derive(Debug, Clone, Default)]
pub struct AgentOptions {
    /// `log.max_bytes`, like `"1 MiB"`.
    pub max_bytes: Option<String>,
    /// `[[mqtt.users]]`: username and password; each password goes to a file read through
    /// `$CREDENTIALS_DIRECTORY`, as systemd's `LoadCredential=` would provide it.
    pub users: Vec<(String, String)>,
    /// `http.token`, read from a file.
    pub token: Option<String>,
    /// `admin.read_token`, read from a file; the helpers that read the admin API send it.
    pub admin_token: Option<String>,
    /// `mqtt.own_device_topic_only`.
    pub own_device_topic_only: bool,
    /// The broker of `[uplink]` (host, port). Without it the section is left out, so the agent
    /// only keeps events locally and the log holds everything it acknowledged.
    pub uplink: Option<(String, u16)>,
    /// Any other key, by dotted path (`"mqtt.max_connections"`), set last.
    pub overrides: Vec<(String, Item)>,
}

impl AgentOptions {
    pub fn max_bytes(mut self, size: &str) -> Self {
        self.max_bytes = Some(size.to_string());
        self
    }

    pub fn user(mut self, username: &str, password: &str) -> Self {
        self.users
            .push((username.to_string(), password.to_string()));
        self
    }

    pub fn token(mut self, token: &str) -> Self {
        self.token = Some(token.to_string());
        self
    }

    pub fn admin_token(mut self, token: &str) -> Self {
        self.admin_token = Some(token.to_string());
        self
    }

    pub fn own_device_topic_only(mut self, on: bool) -> Self {
        self.own_device_topic_only = on;
        self
    }

    pub fn uplink(mut self, host: &str, port: u16) -> Self {
        self.uplink = Some((host.to_string(), port));
        self
    }

    /// Sets any key by its dotted path, like `.set("mqtt.max_connections", 2)`.
    pub fn set(mut self, path: &str, v: impl Into<toml_edit::Value>) -> Self {
        self.overrides.push((path.to_string(), value(v)));
        self
    }
}

/// A running agent with its own temporary directory (config, state, stderr, secrets).
pub struct AgentProcess {
    dir: TempDir,
    options: AgentOptions,
    mqtt_port: u16,
    http_port: u16,
    admin_port: u16,
    child: Option<ChildGuard>,
    http: Client,
    starts: u32,
}

impl AgentProcess {
    /// The example configuration with only state dir and ports changed.
    pub fn start_default() -> AgentProcess {
        AgentProcess::start(AgentOptions::default())
    }

    /// Writes the configuration, starts `backhaul-agent run` and waits for `/healthz`.
    pub fn start(options: AgentOptions) -> AgentProcess {
        let dir = tempfile::Builder::new()
            .prefix("backhaul-agent-test-")
            .tempdir()
            .expect("a temporary directory");
        let http = Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("an HTTP client");
        let [mqtt_port, http_port, admin_port] = free_ports();
        let mut agent = AgentProcess {
            dir,
            options,
            mqtt_port,
            http_port,
            admin_port,
            child: None,
            http,
            starts: 0,
        };
        // Another test may take a port between free_port() and the agent's bind: try new ones.
        for attempt in 1..=3 {
            agent.write_config();
            match agent.spawn_and_wait() {
                Ok(()) => return agent,
                Err(stderr) if attempt < 3 && stderr.contains("cannot listen") => {
                    [agent.mqtt_port, agent.http_port, agent.admin_port] = free_ports();
                }
                Err(stderr) => panic!("the agent did not start:\n{stderr}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("agent.stderr.log")
    }

    /// Where the secrets of the agent's configuration are, as `$CREDENTIALS_DIRECTORY`.
    pub fn credentials_dir(&self) -> PathBuf {
        self.dir.path().join("credentials")
    }

    pub fn mqtt_host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt_port))
    }

    pub fn http_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The admin API's base URL (`admin.listen`).
    pub fn admin_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin_port)
    }

    /// The HTTP client the helpers use (60 s timeout).
    pub fn http(&self) -> &Client {
        &self.http
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// How many times the process was started (1 after `start`).
    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Everything the agent wrote to stderr, over all its runs.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    /// SIGKILL, like a power cut to the process; returns once it is gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
    }

    /// SIGTERM; returns the exit status once the process is gone.
    pub fn terminate(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the agent is running");
        let status = child.terminate(Duration::from_secs(30));
        status.unwrap_or_else(|| panic!("the agent did not exit on SIGTERM:\n{}", self.stderr()))
    }

    /// Starts the agent again on the same configuration and state directory (killing it
    /// first if it still runs), and waits for `/healthz`.
    pub fn restart(&mut self) {
        self.kill9();
        if let Err(stderr) = self.spawn_and_wait() {
            panic!("the agent did not restart:\n{stderr}");
        }
    }

    /// Changes the options, rewrites the configuration and restarts on the same state
    /// directory and ports.
    pub fn restart_with(&mut self, change: impl FnOnce(&mut AgentOptions)) {
        self.kill9();
        change(&mut self.options);
        self.write_config();
        self.restart();
    }

    fn write_config(&self) {
        let text =
            std::fs::read_to_string(example_config("agent.toml")).expect("config/agent.toml");
        let mut doc: DocumentMut = text.parse().expect("config/agent.toml is TOML");
        doc["state_dir"] = value(self.state_dir().display().to_string());
        doc["mqtt"]["listen"] = value(format!("127.0.0.1:{}", self.mqtt_port));
        doc["http"]["listen"] = value(format!("127.0.0.1:{}", self.http_port));
        doc["admin"]["listen"] = value(format!("127.0.0.1:{}", self.admin_port));
        doc["mqtt"]["own_device_topic_only"] = value(self.options.own_device_topic_only);
        if let Some(size) = &self.options.max_bytes {
            doc["log"]["max_bytes"] = value(size.as_str());
        }
        let credentials = self.credentials_dir();
        std::fs::create_dir_all(&credentials).expect("credentials directory");
        if !self.options.users.is_empty() {
            let mut users = toml_edit::ArrayOfTables::new();
            for (username, password) in &self.options.users {
                let file = format!("mqtt-{username}");
                std::fs::write(credentials.join(&file), format!("{password}\n"))
                    .expect("password file");
                let mut user = Table::new();
                user["username"] = value(username.as_str());
                user["password"] = value(secret_file(&format!("$CREDENTIALS_DIRECTORY/{file}")));
                users.push(user);
            }
            doc["mqtt"]["users"] = Item::ArrayOfTables(users);
        }
        if let Some(token) = &self.options.token {
            std::fs::write(credentials.join("http-token"), format!("{token}\n"))
                .expect("token file");
            doc["http"]["token"] = value(secret_file("$CREDENTIALS_DIRECTORY/http-token"));
        }
        if let Some(token) = &self.options.admin_token {
            std::fs::write(credentials.join("admin-read-token"), format!("{token}\n"))
                .expect("token file");
            doc["admin"]["read_token"] =
                value(secret_file("$CREDENTIALS_DIRECTORY/admin-read-token"));
        }
        match &self.options.uplink {
            None => {
                doc.remove("uplink");
            }
            Some((host, port)) => {
                assert!(
                    doc.contains_key("uplink"),
                    "config/agent.toml has no [uplink] section to point at a broker"
                );
                doc["uplink"]["host"] = value(host.as_str());
                doc["uplink"]["port"] = value(i64::from(*port));
                // What a relay's embedded broker wants; Mosquitto in the tests takes anyone.
                let (username, password) = crate::BROKER_LOGIN;
                doc["uplink"]["username"] = value(username);
                let mut secret = InlineTable::new();
                secret.insert("value", password.into());
                doc["uplink"]["password"] = value(secret);
            }
        }
        for (path, item) in &self.options.overrides {
            let mut slot = doc.as_item_mut();
            for key in path.split('.') {
                slot = &mut slot[key];
            }
            *slot = item.clone();
        }
        std::fs::write(self.config_path(), doc.to_string()).expect("write the agent config");
    }

    /// Starts the process and waits until `/healthz` answers; on failure returns its stderr.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .expect("agent stderr file");
        let stdout = stderr.try_clone().expect("agent stderr file");
        let mut command = Command::new(binary("backhaul-agent"));
        command
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .env("CREDENTIALS_DIRECTORY", self.credentials_dir())
            .env("BACKHAUL_LOG", "info")
            .env_remove("BACKHAUL_LOG_FORMAT")
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        let mut child = ChildGuard::spawn("backhaul-agent", &mut command);
        self.starts += 1;
        let url = format!("{}/healthz", self.http_url());
        // The agent binds its MQTT listener before it serves HTTP, so a healthy agent also
        // takes MQTT connections.
        let outcome = poll_until(START_TIMEOUT, || {
            if let Ok(Some(status)) = child.child.try_wait() {
                return Some(Err(format!("the agent exited with {status}")));
            }
            match self.http.get(&url).timeout(Duration::from_secs(2)).send() {
                Ok(response) if response.status().is_success() => Some(Ok(())),
                _ => None,
            }
        });
        match outcome {
            Some(Ok(())) => {
                self.child = Some(child);
                Ok(())
            }
            Some(Err(exited)) => Err(format!("{exited}; stderr:\n{}", self.stderr())),
            None => {
                child.kill9();
                Err(format!(
                    "no answer on {url} within {START_TIMEOUT:?}; stderr:\n{}",
                    self.stderr()
                ))
            }
        }
    }

    /// GET a path of the agent's admin API, like `/v1/status`, with the admin token when the
    /// agent has one.
    pub fn get(&self, path: &str) -> Response {
        // A GET is idempotent: a kept-alive connection the agent closed just as it was reused
        // is tried again on a new one, as any HTTP client would.
        let mut failure = None;
        for _ in 0..3 {
            let mut request = self.http.get(format!("{}{path}", self.admin_url()));
            if let Some(token) = &self.options.admin_token {
                request = request.bearer_auth(token);
            }
            match request.send() {
                Ok(response) => return response,
                Err(e) if e.is_request() || e.is_connect() => failure = Some(e),
                Err(e) => panic!("GET {path}: {e}"),
            }
        }
        panic!("GET {path}: {failure:?}")
    }

    /// GET a path and parse the JSON answer, asserting a 200.
    pub fn get_json(&self, path: &str) -> Value {
        let response = self.get(path);
        let status = response.status();
        let text = response.text().expect("response body");
        assert_eq!(status, 200, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("GET {path}: {e}: {text}"))
    }

    /// POST a JSON body to `/v1/events`, with a bearer token when one is given.
    pub fn post_events(&self, body: &Value, token: Option<&str>) -> Response {
        self.post_events_raw(serde_json::to_vec(body).expect("JSON"), token)
    }

    /// POST bytes as they are to `/v1/events` (for bodies `serde_json` cannot make, like an
    /// object with a key twice).
    pub fn post_events_raw(&self, body: Vec<u8>, token: Option<&str>) -> Response {
        let mut request = self
            .http
            .post(format!("{}/v1/events", self.http_url()))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().expect("POST /v1/events")
    }

    pub fn status(&self) -> Value {
        self.get_json("/v1/status")
    }

    /// The text of `/metrics`.
    pub fn metrics(&self) -> String {
        let response = self.get("/metrics");
        assert_eq!(response.status(), 200);
        response.text().expect("metrics text")
    }

    /// The value of one sample of `/metrics`, named with its labels as in the text
    /// (`backhaul_agent_events_accepted_total{transport="mqtt"}`).
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric_value(&self.metrics(), sample)
    }

    /// The most recent rejects, newest first.
    pub fn rejects(&self) -> Vec<Value> {
        let body = self.get_json("/v1/rejects?limit=10000");
        body["rejects"].as_array().cloned().unwrap_or_default()
    }

    /// Every event in the log, in sequence order, paging through `/v1/log`.
    pub fn log_events(&self) -> Vec<Value> {
        let mut events = Vec::new();
        let mut from = 0u64;
        loop {
            let page = self.get_json(&format!("/v1/log?from={from}&limit=1000"));
            let page = page["events"].as_array().cloned().expect("an events array");
            let Some(last) = page.last() else {
                return events;
            };
            from = last["seq"].as_u64().expect("a seq") + 1;
            events.extend(page);
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let stderr = self.stderr();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- backhaul-agent stderr (last {} lines of {}) ----\n{}\n----",
                tail.len(),
                self.stderr_path().display(),
                tail.join("\n")
            );
        }
    }
}

fn secret_file(path: &str) -> InlineTable {
    let mut table = InlineTable::new();
    table.insert("file", path.into());
    table
}

/// Finds `sample value` in Prometheus/OpenMetrics text.
pub fn metric_value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(sample)?;
            let rest = rest.strip_prefix(' ')?;
            rest.split_whitespace().next()?.parse().ok()
        })
}
