//! `cargo xtask bench [NAME]`: which benchmarks exist, building what they measure in release,
//! and where their results go (`<target dir>/bench/`); and what every benchmark shares: the
//! shipped configs edited for a run, the agent and relay started, filled and stopped, and the
//! tables. Each benchmark is a module of its own (`ingest`, `drain`, `erp`, `hostile`,
//! `compare`) that takes these from here and nothing from its siblings; `plots` draws from
//! the JSON they leave.
//!
//! `cargo xtask` itself is a debug build; a debug load generator would measure itself. So a
//! debug xtask builds the release binaries (its own release build included) and hands the run
//! to `<target dir>/release/xtask` with the same arguments.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use toml_edit::DocumentMut;

use self::loadgen::EVENT_BYTES;
use self::openmetrics::http_get;
use crate::procs::{ChildGuard, free_addr, log_tail};
use crate::{cargo, run, tryton, workspace_root};

mod compare;
mod drain;
mod erp;
mod hostile;
mod ingest;
mod loadgen;
mod openmetrics;
mod pg;
mod plots;

pub use self::compare::CompareOptions;

/// Every benchmark `cargo xtask bench` (= `all`) runs, in order.
pub const BENCHES: &[&str] = &["ingest", "drain", "erp"];
/// Benchmarks that run only when named: `hostile` measures the agent's defences against
/// hostile clients, not its speed; `compare` (Backhaul against a Mosquitto bridge) takes about
/// ten minutes with its defaults.
pub const NAMED_ONLY: &[&str] = &["hostile", "compare"];

/// Set in the environment of the release xtask a debug xtask hands the run to.
const HANDED_OVER: &str = "BACKHAUL_BENCH_HANDED_OVER";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub which: String,
    pub publishers: Vec<usize>,
    pub warmup: Duration,
    pub measure: Duration,
    pub window: Option<usize>,
    pub batch_events: Option<usize>,
    pub drain_events: u64,
    pub protocol: Option<String>,
    pub erp_events: usize,
    /// drain: the outboxes compared (`redb`, `postgres`).
    pub outbox: Vec<String>,
    /// drain: relay counts, one PostgreSQL drain each.
    pub relays: Vec<usize>,
    pub compare: CompareOptions,
}

/// The cargo target directory: `$CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                Ok(dir)
            } else {
                Ok(std::env::current_dir()
                    .context("the current directory")?
                    .join(dir))
            }
        }
        _ => Ok(workspace_root().join("target")),
    }
}

pub fn bench(options: BenchOptions) -> anyhow::Result<()> {
    if options.which == "plots" {
        // Drawn from the JSON of earlier runs: nothing to build or start.
        return plots::draw(
            &target_dir()?.join("bench"),
            &workspace_root().join("docs/bench"),
        );
    }
    let selected: Vec<&str> = match options.which.as_str() {
        "all" => BENCHES.to_vec(),
        name => match BENCHES.iter().chain(NAMED_ONLY).find(|b| **b == name) {
            Some(b) => vec![*b],
            None => bail!(
                "no benchmark named {name:?}; there is: all ({}), {}, and plots (drawn from their JSON)",
                BENCHES.join(", "),
                NAMED_ONLY.join(", ")
            ),
        },
    };
    if options.publishers.is_empty() || options.publishers.contains(&0) {
        bail!("--publishers needs counts of at least 1, such as 1,10,100");
    }
    if options.window == Some(0) {
        bail!("--window must be at least 1");
    }
    if selected.contains(&"drain") {
        drain::check_options(&options)?;
    }
    if selected.contains(&"compare") {
        compare::check_options(&options)?;
    }
    if ["ingest", "drain", "compare"]
        .iter()
        .any(|b| selected.contains(b))
    {
        find_mosquitto()?;
    }
    if selected.contains(&"erp") {
        tryton::ensure_tryton()?;
    }
    let target = target_dir()?;
    let release = target.join("release");
    let handed_over = std::env::var_os(HANDED_OVER).is_some();
    if !handed_over {
        run(
            "cargo build --release (agent, relay and xtask)",
            cargo().args([
                "build",
                "--release",
                "-p",
                "backhaul-agent",
                "-p",
                "backhaul-relay",
                "-p",
                "xtask",
                "--bins",
            ]),
        )?;
        if cfg!(debug_assertions) {
            let xtask = release.join(format!("xtask{}", std::env::consts::EXE_SUFFIX));
            eprintln!(
                "xtask: running the benchmark in the release build {}",
                xtask.display()
            );
            let status = Command::new(&xtask)
                .args(std::env::args_os().skip(1))
                .env(HANDED_OVER, "1")
                .current_dir(workspace_root())
                .status()
                .with_context(|| format!("cannot start {}", xtask.display()))?;
            if !status.success() {
                bail!("the benchmark failed ({status})");
            }
            return Ok(());
        }
    }
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let result: anyhow::Result<()> = runtime.block_on(async {
        let work = async {
            for name in &selected {
                match *name {
                    "ingest" => ingest::run(&options, &release, &out_dir).await?,
                    "drain" => drain::run(&options, &release, &out_dir).await?,
                    "erp" => erp::run(&options, &release, &out_dir).await?,
                    "hostile" => hostile::run(&options, &release, &out_dir).await?,
                    "compare" => compare::run(&options, &release, &out_dir).await?,
                    other => bail!("benchmark {other:?} is listed but not wired up"),
                }
            }
            anyhow::Ok(())
        };
        // Ctrl-C ends the run through the normal error path, so every guard kills its child.
        tokio::select! {
            outcome = work => outcome,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    });
    // Do not wait for tasks still blocked on a socket of a killed broker.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result?;
    eprintln!(
        "xtask: benchmarks done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A binary of this workspace in `dir`, which must have been built.
pub fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p backhaul-agent -p backhaul-relay --bins`",
            path.display()
        );
    }
    Ok(path)
}

/// Mosquitto's path, or the error telling how to install it.
pub fn find_mosquitto() -> anyhow::Result<PathBuf> {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("mosquitto"))
        .find(|path| path.is_file())
        .context(
            "the benchmarks run Mosquitto, which is not installed: \
             install Debian's mosquitto package (sudo apt-get install mosquitto)",
        )
}

/// Mosquitto's version as `mosquitto -h` prints it on its first line ("2.0.11"), or "".
pub(crate) fn mosquitto_version() -> String {
    find_mosquitto()
        .ok()
        .and_then(|bin| Command::new(bin).arg("-h").output().ok())
        .and_then(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()
                .map(|l| {
                    l.trim_start_matches("mosquitto version ")
                        .trim()
                        .to_string()
                })
        })
        .unwrap_or_default()
}

/// How long a Mosquitto of a benchmark may take to listen.
const MOSQUITTO_STARTUP: Duration = Duration::from_secs(30);

/// Mosquitto's logging in every benchmark: what goes wrong, to its log file.
pub(crate) const MOSQUITTO_LOGGING: &str =
    "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n";

/// Writes `<dir>/<name>.conf` (a line saying which benchmark wrote it, a listener on `addr`,
/// then `body`) and starts Mosquitto on it, its output in `<dir>/<name>.log`.
pub(crate) async fn start_mosquitto(
    dir: &Path,
    name: &str,
    bench: &str,
    addr: SocketAddr,
    body: &str,
) -> anyhow::Result<ChildGuard> {
    let config = dir.join(format!("{name}.conf"));
    let text = format!(
        "# Written by `cargo xtask bench {bench}`.\nlistener {port} {host}\n{body}",
        port = addr.port(),
        host = addr.ip()
    );
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    spawn_mosquitto(&config, addr, &dir.join(format!("{name}.log"))).await
}

/// Starts Mosquitto on an existing config and waits until it listens on `addr`.
pub(crate) async fn spawn_mosquitto(
    config: &Path,
    addr: SocketAddr,
    log: &Path,
) -> anyhow::Result<ChildGuard> {
    let bin = find_mosquitto()?;
    let mut guard = ChildGuard::spawn("mosquitto", Command::new(&bin).arg("-c").arg(config), log)?;
    let deadline = Instant::now() + MOSQUITTO_STARTUP;
    loop {
        guard.check_running()?;
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(guard);
        }
        if Instant::now() > deadline {
            bail!(
                "Mosquitto ({}) did not listen on {addr} within {MOSQUITTO_STARTUP:?}; its log:\n{}",
                config.display(),
                log_tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The event id of a ledger line (the first `"id":"…"` in it: the relay writes the event's
/// own fields after site, epoch and sequence, none of which is called `id`).
pub(crate) fn ledger_id(line: &str) -> Option<&str> {
    let (_, rest) = line.split_once(r#""id":""#)?;
    rest.split_once('"').map(|(id, _)| id)
}

// ----- the processes under test, shared by the benchmarks ------------------------------------

/// Events per POST when an agent is filled over HTTP.
pub(crate) const EVENTS_PER_POST: u64 = 1000;

/// The login the benchmarks' agents use on the relay's embedded broker (Mosquitto in the
/// benchmarks takes anyone).
pub(crate) const BENCH_BROKER_LOGIN: (&str, &str) = ("bench-agents", "bench-broker-password");

/// `config/relay.toml` as shipped, with its state, broker and admin address set (the sink is
/// left as shipped: the ledger, whose path still needs setting).
pub(crate) fn relay_config(
    state: &Path,
    broker: SocketAddr,
    embedded: bool,
    admin: SocketAddr,
) -> anyhow::Result<String> {
    let path = workspace_root().join("config/relay.toml");
    let shipped = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut text = toml_set(
        &shipped,
        "",
        "state_dir",
        &quote(&state.display().to_string()),
    )?;
    text = toml_set(&text, "broker", "host", &quote(&broker.ip().to_string()))?;
    text = toml_set(&text, "broker", "port", &broker.port().to_string())?;
    text = toml_set(&text, "broker", "embedded", &embedded.to_string())?;
    if embedded {
        let (username, password) = BENCH_BROKER_LOGIN;
        let users = format!(
            "[{{ username = {}, password = {{ value = {} }} }}]",
            quote(username),
            quote(password)
        );
        text = toml_set(&text, "broker", "users", &users)?;
    }
    text = toml_set(&text, "admin", "listen", &quote(&admin.to_string()))?;
    Ok(format!(
        "# Written by `cargo xtask bench`: config/relay.toml with its paths, ports and sink changed.\n{text}"
    ))
}

/// The addresses an agent of a benchmark listens on, each free when chosen.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentAddrs {
    pub mqtt: SocketAddr,
    /// Ingest (`POST /v1/events`).
    pub http: SocketAddr,
    /// The admin API (`/v1/status`, `/metrics`).
    pub admin: SocketAddr,
}

impl AgentAddrs {
    pub(crate) fn free() -> anyhow::Result<AgentAddrs> {
        Ok(AgentAddrs {
            mqtt: free_addr()?,
            http: free_addr()?,
            admin: free_addr()?,
        })
    }
}

/// `config/agent.toml` as shipped (its text), with the site, paths, listeners and uplink port
/// set, and the given `[uplink]` keys changed.
pub(crate) fn agent_config(
    shipped: &str,
    site: &str,
    state: &Path,
    addrs: AgentAddrs,
    uplink_port: u16,
    uplink: &[(&str, String)],
) -> anyhow::Result<String> {
    let mut text = toml_set(shipped, "", "site", &quote(site))?;
    text = toml_set(&text, "", "state_dir", &quote(&state.display().to_string()))?;
    text = toml_set(&text, "mqtt", "listen", &quote(&addrs.mqtt.to_string()))?;
    text = toml_set(&text, "http", "listen", &quote(&addrs.http.to_string()))?;
    text = toml_set(&text, "admin", "listen", &quote(&addrs.admin.to_string()))?;
    text = toml_set(&text, "uplink", "host", &quote("127.0.0.1"))?;
    text = toml_set(&text, "uplink", "port", &uplink_port.to_string())?;
    let (username, password) = BENCH_BROKER_LOGIN;
    text = toml_set(&text, "uplink", "username", &quote(username))?;
    text = toml_set(
        &text,
        "uplink",
        "password",
        &format!("{{ value = {} }}", quote(password)),
    )?;
    for (key, value) in uplink {
        text = toml_set(&text, "uplink", key, value)?;
    }
    Ok(format!(
        "# Written by `cargo xtask bench`: config/agent.toml with its site, paths, ports and these uplink keys changed: {}.\n{text}",
        uplink
            .iter()
            .map(|(k, v)| format!("{k} = {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// A TOML basic string (JSON's escapes are TOML's).
pub(crate) fn quote(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// The table at the dotted `section` ("" = the top level).
fn table_mut<'a>(doc: &'a mut DocumentMut, section: &str) -> Option<&'a mut toml_edit::Table> {
    let mut table = doc.as_table_mut();
    if section.is_empty() {
        return Some(table);
    }
    for part in section.split('.') {
        table = table.get_mut(part)?.as_table_mut()?;
    }
    Some(table)
}

fn parse_toml(text: &str) -> anyhow::Result<DocumentMut> {
    text.parse().context("the config is not TOML")
}

/// Sets `key = value` (`value` in TOML, such as `16` or `"a"`) in `[section]` ("" = the top
/// level) of a TOML text, keeping its comments and layout.
pub(crate) fn toml_set(
    text: &str,
    section: &str,
    key: &str,
    value: &str,
) -> anyhow::Result<String> {
    let mut doc = parse_toml(text)?;
    let value: toml_edit::Value = value
        .parse()
        .with_context(|| format!("`{key} = {value}`: not a TOML value"))?;
    let table = table_mut(&mut doc, section)
        .with_context(|| format!("the config has no [{section}] section to set {key} in"))?;
    match table.get_mut(key).and_then(toml_edit::Item::as_value_mut) {
        // The key's own comment stays, next to the new value.
        Some(old) => {
            let decor = old.decor().clone();
            *old = value;
            *old.decor_mut() = decor;
        }
        None => {
            table.insert(key, toml_edit::Item::Value(value));
        }
    }
    Ok(doc.to_string())
}

/// The value of `key` in `[section]`, as TOML without its comment (`8`, `"1 GiB"`).
pub(crate) fn toml_get(text: &str, section: &str, key: &str) -> Option<String> {
    let mut doc = parse_toml(text).ok()?;
    let value = table_mut(&mut doc, section)?.get(key)?.as_value()?;
    let mut bare = value.clone();
    bare.decor_mut().clear();
    Some(bare.to_string())
}

/// Removes `[section]` with its keys from a TOML text.
pub(crate) fn toml_remove_section(text: &str, section: &str) -> anyhow::Result<String> {
    let mut doc = parse_toml(text)?;
    let (parent, name) = section.rsplit_once('.').unwrap_or(("", section));
    if let Some(table) = table_mut(&mut doc, parent) {
        table.remove(name);
    }
    Ok(doc.to_string())
}

pub(crate) fn spawn_agent(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<ChildGuard> {
    ChildGuard::spawn(
        "backhaul-agent",
        Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("BACKHAUL_LOG", "warn"),
        log,
    )
}

pub(crate) fn spawn_relay(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<ChildGuard> {
    ChildGuard::spawn(
        "backhaul-relay",
        Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("BACKHAUL_LOG", "warn"),
        log,
    )
}

/// Waits until `GET path` answers 200, failing early when the process exits.
pub(crate) async fn wait_http_ok(
    guard: &mut ChildGuard,
    addr: SocketAddr,
    path: &str,
    log: &Path,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        guard.check_running()?;
        if let Ok((200, _)) = http_get(addr, path).await {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "no 200 from http://{addr}{path} within {timeout:?}; the end of {}:\n{}",
                log.display(),
                log_tail(log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM and wait; fails when the process does not exit cleanly.
pub(crate) fn stop_cleanly(guard: &mut ChildGuard, what: &str, log: &Path) -> anyhow::Result<()> {
    let status = tokio::task::block_in_place(|| guard.terminate(Duration::from_secs(30)))?;
    match status {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!(
            "{what} exited with {status} on SIGTERM; the end of {}:\n{}",
            log.display(),
            log_tail(log, 20)
        ),
        None => bail!(
            "{what} did not exit within 30 s of SIGTERM and was killed; see {}",
            log.display()
        ),
    }
}

pub(crate) async fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<Value> {
    let (status, text) = http_get(addr, path).await?;
    if status != 200 {
        bail!("GET http://{addr}{path} answered {status}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("GET http://{addr}{path}: not JSON"))
}

/// Posts events `0..total` (made by `make`) to an agent's `POST /v1/events`, 1000 per request,
/// from `posters` concurrent clients; fails unless every event is accepted.
pub(crate) async fn fill(
    http: SocketAddr,
    total: u64,
    posters: usize,
    make: Arc<dyn Fn(u64) -> String + Send + Sync>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .context("an HTTP client")?;
    let next = Arc::new(AtomicU64::new(0));
    let url = format!("http://{http}/v1/events");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..posters.max(1) {
        let (client, next, url, make) = (client.clone(), next.clone(), url.clone(), make.clone());
        tasks.spawn(async move {
            loop {
                let start = next.fetch_add(EVENTS_PER_POST, Ordering::Relaxed);
                if start >= total {
                    return anyhow::Ok(());
                }
                let end = (start + EVENTS_PER_POST).min(total);
                let mut body = String::with_capacity((end - start) as usize * (EVENT_BYTES + 1) + 2);
                body.push('[');
                for i in start..end {
                    if i > start {
                        body.push(',');
                    }
                    body.push_str(&make(i));
                }
                body.push(']');
                let response = client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await
                    .with_context(|| format!("POST {url}"))?;
                let status = response.status();
                let text = response
                    .text()
                    .await
                    .with_context(|| format!("POST {url}: reading the answer"))?;
                let answer: Value = serde_json::from_str(&text).with_context(|| {
                    format!("POST {url} answered {status} with no JSON: {}", cut(&text))
                })?;
                let accepted = answer["accepted"].as_u64().unwrap_or(0);
                if status.as_u16() != 202 || accepted != end - start {
                    bail!(
                        "POST {url} of events {start}..{end} answered {status}, {accepted} accepted: {}",
                        cut(&text)
                    );
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.context("a poster panicked")??;
    }
    Ok(())
}

fn cut(text: &str) -> String {
    text.chars().take(400).collect()
}

/// Copies a directory tree (regular files and directories).
fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
    for entry in
        std::fs::read_dir(from).with_context(|| format!("cannot list {}", from.display()))?
    {
        let entry = entry.with_context(|| format!("cannot list {}", from.display()))?;
        let target: PathBuf = to.join(entry.file_name());
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", entry.path().display()))?;
        if kind.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target).with_context(|| {
                format!(
                    "cannot copy {} to {}",
                    entry.path().display(),
                    target.display()
                )
            })?;
        }
    }
    Ok(())
}

fn unix_time_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

/// A whole number with thousands separators.
pub(crate) fn fmt_rate(rate: f64) -> String {
    let digits = (rate.max(0.0).round() as u64).to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A table: the first line is the header; the first column left-aligned, the rest right.
pub(crate) fn push_table(out: &mut String, lines: &[Vec<String>]) {
    let columns = lines.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0usize; columns];
    for line in lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(col, (cell, w))| {
                let pad = " ".repeat(w - cell.chars().count());
                if col == 0 {
                    format!("{cell}{pad}")
                } else {
                    format!("{pad}{cell}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join(" | "));
        if i == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            let _ = writeln!(out, "{}", rule.join("-|-"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "site = \"x\"\n# c\n[log]\nmax_bytes = \"1 GiB\" # q\n\n[uplink]\nport = 1883\n# window = 3\nwindow = 8\n[sink.ledger]\npath = \"/p\"\n\n# other sinks\n[delivery]\nmax_batch = 50\n";

    #[test]
    fn toml_keys_are_read_and_set_per_section() {
        assert_eq!(toml_get(TEXT, "uplink", "window").as_deref(), Some("8"));
        assert_eq!(
            toml_get(TEXT, "log", "max_bytes").as_deref(),
            Some("\"1 GiB\"")
        );
        assert_eq!(toml_get(TEXT, "", "site").as_deref(), Some("\"x\""));
        let set = toml_set(TEXT, "uplink", "window", "16").expect("set");
        assert_eq!(toml_get(&set, "uplink", "window").as_deref(), Some("16"));
        assert!(set.contains("# window = 3"));
        let added = toml_set(TEXT, "uplink", "linger_ms", "5").expect("add");
        assert_eq!(
            toml_get(&added, "uplink", "linger_ms").as_deref(),
            Some("5")
        );
        assert_eq!(toml_get(&added, "uplink", "port").as_deref(), Some("1883"));
        assert!(toml_set(TEXT, "nope", "a", "1").is_err());
        let removed = toml_remove_section(TEXT, "sink.ledger").expect("remove");
        assert!(!removed.contains("sink.ledger") && !removed.contains("/p"));
        assert!(removed.contains("# other sinks"));
        assert_eq!(
            toml_get(&removed, "delivery", "max_batch").as_deref(),
            Some("50")
        );
    }
}
