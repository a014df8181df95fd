//! `cargo xtask bench erp`: how fast the relay posts to a real Tryton, next to a plain batched
//! client calling the same Tryton in the same run.
//!
//! What it owns: a Tryton 8.0 server (from the virtualenv and seeded database that
//! `xtask/src/tryton.rs` makes) on its own copy of the seed under `<target dir>/bench/erp/`,
//! reset from the seed between the two runs; the plain client; the relay run; the check of
//! Tryton's books after each; the printed table and `<target dir>/bench/erp.json`.
//!
//! Both runs post the same `--erp-events` stock adjustments, each an internal shipment with
//! one move from the warehouse's lost-and-found to a storage location (`reference` = event id),
//! driven to done. The events cycle over 50 ordering keys (SKU-001..SKU-010 × no location and
//! the locations A1, MAIN, IN, OUT mapped to STO-A1, STO, IN, OUT), so the relay can fill its
//! batches of 50.
//!
//! - The plain client is what a minimal batched integrator does: log in, look up products and
//!   locations, then per 50 events one `stock.shipment.internal.create` with 50 records and
//!   `wait`, `assign_try`, `do` on the 50 ids — no idempotency search, no read-back.
//! - The relay run fills an agent with the same events while no relay runs, then starts the
//!   relay (embedded broker, `[sink.tryton]`, `[delivery]` rate limit far above Tryton's speed)
//!   and the agent, and times from the relay's start until its `events_delivered` reaches N;
//!   Tryton's count of done internal shipments is checked afterwards.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::{
    AgentAddrs, agent_config, cpus, fill, fmt_rate, get_json, push_table, quote, relay_config,
    spawn_agent, spawn_relay, stop_cleanly, toml_remove_section, toml_set, unix_time, wait_http_ok,
};
use super::{BenchOptions, binary};
use crate::procs::{
    ChildGuard, clock_ticks, cpu_seconds, free_addr, log_tail, machine_busy_seconds,
};
use crate::{tryton, workspace_root};

/// The issue's target: the relay posts at least this share of the plain client's rate.
const TARGET_RATIO: f64 = 0.8;
/// Events per ERP call, for the plain client and the relay alike.
const BATCH: usize = 50;
const COMPANY: i64 = 1;
const USERNAME: &str = "admin";
const PASSWORD: &str = "admin";
/// Event location → Tryton location code (None: the warehouse's storage location).
const LOCATIONS: [(Option<&str>, &str); 5] = [
    (None, "STO"),
    (Some("A1"), "STO-A1"),
    (Some("MAIN"), "STO"),
    (Some("IN"), "IN"),
    (Some("OUT"), "OUT"),
];
const SKUS: usize = 10;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const STALL_TIMEOUT: Duration = Duration::from_secs(120);
const SITE: &str = "bench-erp";

/// One stock adjustment of the bench: +1 of `sku` found at `location`.
struct Adjust {
    id: String,
    sku: String,
    location: Option<&'static str>,
    /// The Tryton location code it goes to.
    code: &'static str,
}

fn adjustments(prefix: &str, n: usize) -> Vec<Adjust> {
    (0..n)
        .map(|i| {
            let key = i % (SKUS * LOCATIONS.len());
            let (location, code) = LOCATIONS[key / SKUS];
            Adjust {
                id: format!("{prefix}-{i:06}"),
                sku: format!("SKU-{:03}", key % SKUS + 1),
                location,
                code,
            }
        })
        .collect()
}

impl Adjust {
    fn event_json(&self) -> String {
        let mut event = json!({
            "v": 1, "id": self.id, "type": "adjust", "ts": "2026-11-22T10:15:00.123Z",
            "device": "bench-wms", "sku": self.sku, "qty": "1", "uom": "EA", "reason": "found",
        });
        if let Some(location) = self.location {
            event["location"] = json!(location);
        }
        event.to_string()
    }
}

/// A trytond process on its own copy of the seed; killed when dropped.
struct TrytonServer {
    dir: PathBuf,
    venv: PathBuf,
    seed: PathBuf,
    port: u16,
    starts: u32,
    log: PathBuf,
    guard: Option<ChildGuard>,
}

impl TrytonServer {
    async fn start(venv: PathBuf, seed: PathBuf, dir: PathBuf) -> anyhow::Result<TrytonServer> {
        let mut server = TrytonServer {
            dir,
            venv,
            seed,
            port: 0,
            starts: 0,
            log: PathBuf::new(),
            guard: None,
        };
        server.restart_from_seed().await?;
        Ok(server)
    }

    /// Stops the server, puts the seed back and starts it again (Tryton forgets everything).
    async fn restart_from_seed(&mut self) -> anyhow::Result<()> {
        if let Some(mut guard) = self.guard.take() {
            let _ = tokio::task::block_in_place(|| guard.terminate(Duration::from_secs(10)));
        }
        let database = self.dir.join(format!("{}.sqlite", tryton::DATABASE));
        // trytond runs SQLite in WAL mode: a write-ahead log left by the last server would be
        // applied to the fresh copy and corrupt it ("database disk image is malformed").
        for suffix in ["-wal", "-shm", "-journal"] {
            let sidecar = self
                .dir
                .join(format!("{}.sqlite{suffix}", tryton::DATABASE));
            if sidecar.exists() {
                std::fs::remove_file(&sidecar)
                    .with_context(|| format!("cannot remove {}", sidecar.display()))?;
            }
        }
        std::fs::copy(&self.seed, &database).with_context(|| {
            format!(
                "cannot copy the seed {} to {}",
                self.seed.display(),
                database.display()
            )
        })?;
        // Another process may take the port between free_addr() and trytond's bind.
        let mut last = None;
        for _ in 0..3 {
            match self.spawn().await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("trytond did not start")))
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.port = free_addr()?.port();
        self.starts += 1;
        let config = self.dir.join("trytond.conf");
        std::fs::write(
            &config,
            format!(
                "[database]\nuri = sqlite://\npath = {}\n\n[web]\nlisten = 127.0.0.1:{}\n\n\
                 [session]\ntimeout = 3600\n",
                self.dir.display(),
                self.port
            ),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        self.log = self.dir.join(format!("trytond-{}.log", self.starts));
        let mut guard = ChildGuard::spawn(
            "trytond",
            Command::new(self.venv.join("bin/trytond"))
                .arg("-c")
                .arg(&config)
                .args(["-d", tryton::DATABASE]),
            &self.log,
        )?;
        // The log names the port once this server has bound it and loaded the database.
        let listening = format!("Running on http://127.0.0.1:{}", self.port);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            guard.check_running()?;
            if std::fs::read_to_string(&self.log).is_ok_and(|log| log.contains(&listening)) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "trytond did not listen on port {} within {STARTUP_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    log_tail(&self.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.guard = Some(guard);
        Ok(())
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn pid(&self) -> u32 {
        self.guard.as_ref().map(ChildGuard::pid).unwrap_or(0)
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        match self.guard.as_mut() {
            Some(guard) => guard.check_running(),
            None => bail!("trytond is not running"),
        }
    }

    /// JSON-RPC requests served so far by the current process (werkzeug logs each one).
    fn requests_served(&self) -> u64 {
        std::fs::read_to_string(&self.log)
            .map(|log| {
                log.lines()
                    .filter(|l| l.contains(&format!("POST /{}/rpc/", tryton::DATABASE)))
                    .count() as u64
            })
            .unwrap_or(0)
    }
}

/// A JSON-RPC session with Tryton.
struct Rpc {
    client: reqwest::Client,
    url: String,
    session: String,
    next_id: u64,
}

impl Rpc {
    async fn login(base: &str) -> anyhow::Result<Rpc> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .context("an HTTP client")?;
        let mut rpc = Rpc {
            client,
            url: format!("{base}/{}/rpc/", tryton::DATABASE),
            session: String::new(),
            next_id: 1,
        };
        let answer = rpc
            .post(
                "common.db.login",
                json!([USERNAME, {"password": PASSWORD}, "en"]),
            )
            .await?;
        let result = answer
            .get("result")
            .with_context(|| format!("login refused: {}", cut(&answer.to_string())))?;
        let (Some(user), Some(token)) = (
            result.get(0).and_then(Value::as_i64),
            result.get(1).and_then(Value::as_str),
        ) else {
            bail!("unexpected login answer {}", cut(&answer.to_string()));
        };
        rpc.session = format!("Session {}", base64(&format!("{USERNAME}:{user}:{token}")));
        Ok(rpc)
    }

    async fn post(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = self
            .client
            .post(&self.url)
            .json(&json!({"id": id, "method": method, "params": params}));
        if !self.session.is_empty() {
            request = request.header(reqwest::header::AUTHORIZATION, &self.session);
        }
        let response = request.send().await.with_context(|| method.to_string())?;
        let status = response.status();
        let text = response
            .text()
            .await
            .with_context(|| format!("{method}: reading the answer"))?;
        if !status.is_success() {
            bail!("{method}: HTTP {status}: {}", cut(&text));
        }
        serde_json::from_str(&text).with_context(|| format!("{method}: not JSON: {}", cut(&text)))
    }

    /// Calls a model method with the company context appended; Tryton's `error` is an error.
    async fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let mut params = match params {
            Value::Array(params) => params,
            other => vec![other],
        };
        params.push(json!({"company": COMPANY, "language": "en"}));
        let answer = self.post(method, Value::Array(params)).await?;
        match answer.get("error") {
            Some(error) if !error.is_null() => {
                bail!("{method}: Tryton answered {}", cut(&error.to_string()))
            }
            _ => Ok(answer.get("result").cloned().unwrap_or(Value::Null)),
        }
    }

    /// Done internal shipments whose reference starts with `prefix`.
    async fn done_shipments(&mut self, prefix: &str) -> anyhow::Result<u64> {
        let found = self
            .call(
                "model.stock.shipment.internal.search_count",
                json!([[
                    ["state", "=", "done"],
                    ["reference", "like", format!("{prefix}-%")]
                ]]),
            )
            .await?;
        found
            .as_u64()
            .with_context(|| format!("search_count answered {found}"))
    }
}

fn base64(text: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn cut(text: &str) -> String {
    text.chars().take(400).collect()
}

/// Time and count of one kind of JSON-RPC call of the plain client.
#[derive(Default, Clone, Copy)]
struct Step {
    calls: u64,
    secs: f64,
}

/// What one run measured.
struct RunResult {
    events: usize,
    /// From the start (plain: before login; relay: its spawn) until every event was posted.
    secs: f64,
    /// Events posted when the first progress was seen, and when.
    first: Option<(u64, f64)>,
    tryton_cpu: f64,
    client_cpu: f64,
    others_cpu: f64,
    tryton_requests: u64,
    done_in_tryton: u64,
    steps: BTreeMap<&'static str, Step>,
    relay: Option<Value>,
    extra: Vec<(String, f64)>,
}

impl RunResult {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs.max(1e-9)
    }

    /// The rate after the first batch was posted: what remains once start-up is over.
    fn steady_rate(&self) -> Option<f64> {
        let (posted, at) = self.first?;
        let left = self.events as f64 - posted as f64;
        (left > 0.0 && self.secs > at).then(|| left / (self.secs - at))
    }
}

pub async fn run(options: &BenchOptions, release: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let n = options.erp_events;
    if n == 0 {
        bail!("--erp-events must be at least 1");
    }
    let dir = out_dir.join("erp");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot clear the previous run's {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let venv = tokio::task::block_in_place(tryton::ensure_tryton)?;
    let seed = tryton::target_dir()
        .join("tryton-seed")
        .join(format!("{}.sqlite", tryton::DATABASE));
    let tryton_dir = dir.join("tryton");
    std::fs::create_dir_all(&tryton_dir)
        .with_context(|| format!("cannot create {}", tryton_dir.display()))?;
    let mut server = TrytonServer::start(venv, seed, tryton_dir).await?;
    let ticks = clock_ticks();

    eprintln!(
        "xtask: bench erp: plain batched client, {n} adjustments in calls of {BATCH}, Tryton (pid {}) {}",
        server.pid(),
        server.url()
    );
    let plain = plain_client(&mut server, &adjustments("plain", n), ticks).await?;
    eprintln!(
        "xtask: bench erp: plain client: {:.1} s, {:.1} events/s; resetting Tryton from the seed",
        plain.secs,
        plain.rate()
    );
    server.restart_from_seed().await?;
    eprintln!(
        "xtask: bench erp: relay, the same {n} adjustments through an agent, Tryton (pid {}) {}",
        server.pid(),
        server.url()
    );
    let relay = relay_run(&mut server, &adjustments("relay", n), release, &dir, ticks).await?;
    eprintln!(
        "xtask: bench erp: relay: {:.1} s, {:.1} events/s",
        relay.secs,
        relay.rate()
    );
    if let Some(mut guard) = server.guard.take() {
        let _ = tokio::task::block_in_place(|| guard.terminate(Duration::from_secs(10)));
    }

    let ratio = relay.rate() / plain.rate().max(1e-9);
    let elapsed = started.elapsed().as_secs_f64();
    println!("{}", render(&plain, &relay, ratio, elapsed));
    let report = json!({
        "bench": "erp",
        "unix_time": unix_time(),
        "cpus": cpus(),
        "settings": {
            "events": n,
            "event": "adjust, qty +1, lost-and-found → storage location, as a stock.shipment.internal driven to done",
            "ordering_keys": SKUS * LOCATIONS.len(),
            "batch": BATCH,
            "tryton": "8.0, SQLite, one trytond process (threaded werkzeug), reset from the seed before each run",
            "relay": {"broker": "embedded", "concurrency": 4, "max_batch": BATCH, "rate_per_sec": 10000, "burst": 10000},
        },
        "plain_client": run_json(&plain),
        "relay": run_json(&relay),
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "target_met": ratio >= TARGET_RATIO,
        "elapsed_seconds": elapsed,
    });
    let json_path = out_dir.join("erp.json");
    let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("results: {}", json_path.display());
    Ok(())
}

/// Ids of the records of `model` whose `field` is one of `values`, by that field.
async fn ids_by(
    rpc: &mut Rpc,
    model: &str,
    field: &str,
    values: &[&str],
    more: &[&str],
) -> anyhow::Result<BTreeMap<String, Value>> {
    let mut fields = vec![field, "id"];
    fields.extend_from_slice(more);
    let found = rpc
        .call(
            &format!("model.{model}.search_read"),
            json!([[[field, "in", values]], 0, null, null, fields]),
        )
        .await?;
    let mut out = BTreeMap::new();
    for record in found.as_array().into_iter().flatten() {
        if let Some(key) = record.get(field).and_then(Value::as_str) {
            out.insert(key.to_string(), record.clone());
        }
    }
    for value in values {
        if !out.contains_key(*value) {
            bail!("Tryton has no {model} with {field} {value:?}");
        }
    }
    Ok(out)
}

fn id_of(record: Option<&Value>, field: &str) -> anyhow::Result<i64> {
    record
        .and_then(|r| r.get(field))
        .and_then(Value::as_i64)
        .with_context(|| format!("no {field} in {record:?}"))
}

async fn timed(
    steps: &mut BTreeMap<&'static str, Step>,
    step: &'static str,
    rpc: &mut Rpc,
    method: &str,
    params: Value,
) -> anyhow::Result<Value> {
    let started = Instant::now();
    let result = rpc.call(method, params).await?;
    let entry = steps.entry(step).or_default();
    entry.calls += 1;
    entry.secs += started.elapsed().as_secs_f64();
    Ok(result)
}

async fn plain_client(
    server: &mut TrytonServer,
    events: &[Adjust],
    ticks: f64,
) -> anyhow::Result<RunResult> {
    let tryton_pid = server.pid();
    let requests_before = server.requests_served();
    let cpu = Cpu::start(tryton_pid, 0, ticks)?;
    let started = Instant::now();
    let mut steps = BTreeMap::new();
    let mut rpc = Rpc::login(&server.url()).await?;
    let skus: Vec<String> = (1..=SKUS).map(|k| format!("SKU-{k:03}")).collect();
    let sku_refs: Vec<&str> = skus.iter().map(String::as_str).collect();
    let products = ids_by(
        &mut rpc,
        "product.product",
        "code",
        &sku_refs,
        &["default_uom"],
    )
    .await?;
    let codes: Vec<&str> = LOCATIONS.iter().map(|(_, code)| *code).collect();
    let locations = ids_by(&mut rpc, "stock.location", "code", &codes, &[]).await?;
    let warehouse = rpc
        .call(
            "model.stock.location.search_read",
            json!([
                [["type", "=", "warehouse"], ["code", "=", "WH"]],
                0,
                1,
                null,
                ["lost_found_location"]
            ]),
        )
        .await?;
    let lost_found = id_of(warehouse.get(0), "lost_found_location")?;
    let mut first = None;
    let mut posted = 0u64;
    for batch in events.chunks(BATCH) {
        let mut records = Vec::with_capacity(batch.len());
        for event in batch {
            let product = products.get(&event.sku);
            let to = id_of(locations.get(event.code), "id")?;
            let moves = json!([["create", [{
                "product": id_of(product, "id")?,
                "unit": id_of(product, "default_uom")?,
                "quantity": 1.0,
                "from_location": lost_found,
                "to_location": to,
                "company": COMPANY,
            }]]]);
            records.push(json!({
                "reference": event.id,
                "company": COMPANY,
                "from_location": lost_found,
                "to_location": to,
                "moves": moves,
            }));
        }
        let ids = timed(
            &mut steps,
            "create",
            &mut rpc,
            "model.stock.shipment.internal.create",
            json!([records]),
        )
        .await?;
        if ids.as_array().map(Vec::len) != Some(batch.len()) {
            bail!(
                "create of {} internal shipments answered {}",
                batch.len(),
                cut(&ids.to_string())
            );
        }
        for (step, method) in [
            ("wait", "model.stock.shipment.internal.wait"),
            ("assign_try", "model.stock.shipment.internal.assign_try"),
            ("do", "model.stock.shipment.internal.do"),
        ] {
            timed(&mut steps, step, &mut rpc, method, json!([ids.clone()])).await?;
        }
        posted += batch.len() as u64;
        first.get_or_insert((posted, started.elapsed().as_secs_f64()));
    }
    let secs = started.elapsed().as_secs_f64();
    let (tryton_cpu, client_cpu, others_cpu) = cpu.end()?;
    server.check_running()?;
    let tryton_requests = server.requests_served().saturating_sub(requests_before);
    let done_in_tryton = rpc.done_shipments("plain").await?;
    if done_in_tryton != events.len() as u64 {
        bail!(
            "the plain client posted {} adjustments but Tryton has {done_in_tryton} done internal shipments",
            events.len()
        );
    }
    Ok(RunResult {
        events: events.len(),
        secs,
        first,
        tryton_cpu: tryton_cpu / secs,
        client_cpu: client_cpu / secs,
        others_cpu: others_cpu / secs,
        tryton_requests,
        done_in_tryton,
        steps,
        relay: None,
        extra: Vec::new(),
    })
}

/// CPU seconds of Tryton, a client and the rest of the machine over a window.
struct Cpu {
    tryton: u32,
    client: u32,
    ticks: f64,
    start: (f64, f64, f64, f64),
}

impl Cpu {
    /// `client` 0 means this process.
    fn start(tryton: u32, client: u32, ticks: f64) -> anyhow::Result<Cpu> {
        let mut cpu = Cpu {
            tryton,
            client,
            ticks,
            start: (0.0, 0.0, 0.0, 0.0),
        };
        cpu.start = cpu.read()?;
        Ok(cpu)
    }

    fn read(&self) -> anyhow::Result<(f64, f64, f64, f64)> {
        Ok((
            cpu_seconds(self.tryton, self.ticks)?,
            cpu_seconds(self.client, self.ticks)?,
            cpu_seconds(0, self.ticks)?,
            machine_busy_seconds(self.ticks)?,
        ))
    }

    /// (Tryton, client, others) CPU seconds since the start.
    fn end(&self) -> anyhow::Result<(f64, f64, f64)> {
        let now = self.read()?;
        let tryton = now.0 - self.start.0;
        let client = now.1 - self.start.1;
        let own = now.2 - self.start.2;
        let machine = now.3 - self.start.3;
        let own_extra = if self.client == 0 { 0.0 } else { own };
        Ok((
            tryton,
            client,
            (machine - tryton - client - own_extra).max(0.0),
        ))
    }
}

async fn relay_run(
    server: &mut TrytonServer,
    events: &[Adjust],
    release: &Path,
    dir: &Path,
    ticks: f64,
) -> anyhow::Result<RunResult> {
    let n = events.len() as u64;
    let agent_bin = binary(release, "backhaul-agent")?;
    let relay_bin = binary(release, "backhaul-relay")?;
    let shipped_path = workspace_root().join("config/agent.toml");
    let shipped = std::fs::read_to_string(&shipped_path)
        .with_context(|| format!("cannot read {}", shipped_path.display()))?;
    let broker = free_addr()?;
    let admin = free_addr()?;
    let addrs = AgentAddrs::free()?;
    let http = addrs.http;

    // An agent holding the events while no relay runs.
    let agent_config_path = dir.join("agent.toml");
    let text = agent_config(
        &shipped,
        SITE,
        &dir.join("agent-state"),
        addrs,
        broker.port(),
        &[],
    )?;
    std::fs::write(&agent_config_path, text)
        .with_context(|| format!("cannot write {}", agent_config_path.display()))?;
    let fill_log = dir.join("agent-fill.log");
    let mut agent = spawn_agent(&agent_bin, &agent_config_path, &fill_log)?;
    wait_http_ok(&mut agent, http, "/readyz", &fill_log, STARTUP_TIMEOUT).await?;
    let bodies: Arc<Vec<String>> = Arc::new(events.iter().map(Adjust::event_json).collect());
    let make = {
        let bodies = bodies.clone();
        Arc::new(move |i: u64| bodies.get(i as usize).cloned().unwrap_or_default())
    };
    fill(http, n, 1, make).await?;
    stop_cleanly(&mut agent, "the filling agent", &fill_log)?;

    // The relay: embedded broker, Tryton sink, a rate limit that does not bind.
    let mut config = relay_config(&dir.join("relay-state"), broker, true, admin)?;
    config = toml_remove_section(&config, "sink.ledger")?;
    for (key, value) in [
        ("concurrency", "4"),
        ("max_batch", "50"),
        ("rate_per_sec", "10000.0"),
        ("burst", "10000"),
    ] {
        config = toml_set(&config, "delivery", key, value)?;
    }
    let locations: Vec<String> = LOCATIONS
        .iter()
        .filter_map(|(location, code)| {
            Some(format!("{} = {}", quote(location.as_ref()?), quote(code)))
        })
        .collect();
    config.push_str(&format!(
        "\n[sink.tryton]\nurl = {url}\ndatabase = {db}\nusername = {user}\npassword = {{ value = {password} }}\n\
         warehouse = \"WH\"\ncompany = {COMPANY}\ncustomer_party = \"CUST-A\"\nsupplier_party = \"SUPP-B\"\n\
         locations = {{ {locations} }}\ntimeout_ms = 30000\nmax_batch = {BATCH}\n",
        url = quote(&server.url()),
        db = quote(tryton::DATABASE),
        user = quote(USERNAME),
        password = quote(PASSWORD),
        locations = locations.join(", "),
    ));
    let relay_config_path = dir.join("relay.toml");
    std::fs::write(&relay_config_path, config)
        .with_context(|| format!("cannot write {}", relay_config_path.display()))?;
    let relay_log = dir.join("relay.log");
    let requests_before = server.requests_served();

    let started = Instant::now();
    let mut relay = spawn_relay(&relay_bin, &relay_config_path, &relay_log)?;
    let cpu = Cpu::start(server.pid(), relay.pid(), ticks)?;
    wait_http_ok(&mut relay, admin, "/readyz", &relay_log, STARTUP_TIMEOUT).await?;
    let relay_ready = started.elapsed().as_secs_f64();
    let agent_log = dir.join("agent.log");
    let mut agent = spawn_agent(&agent_bin, &agent_config_path, &agent_log)?;
    let mut first = None;
    let mut stored_all = None;
    let mut last = (0u64, Instant::now());
    let status = loop {
        agent.check_running()?;
        relay.check_running()?;
        server.check_running()?;
        let now = started.elapsed().as_secs_f64();
        let status = get_json(admin, "/v1/status").await?;
        let delivered = status["events_delivered"].as_u64().unwrap_or(0);
        let received = status["events_received"].as_u64().unwrap_or(0);
        if received >= n {
            stored_all.get_or_insert(now);
        }
        if delivered > 0 {
            first.get_or_insert((delivered, now));
        }
        if status["dlq_events"].as_u64().unwrap_or(0) > 0 {
            let dlq = get_json(admin, "/v1/dlq").await.unwrap_or(Value::Null);
            bail!("the relay dead-lettered events: {}", cut(&dlq.to_string()));
        }
        if delivered >= n {
            break status;
        }
        if delivered != last.0 {
            last = (delivered, Instant::now());
        } else if last.1.elapsed() > STALL_TIMEOUT {
            bail!(
                "the relay posted nothing for {STALL_TIMEOUT:?} ({delivered} of {n} posted); the end of {}:\n{}",
                relay_log.display(),
                log_tail(&relay_log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    let (tryton_cpu, relay_cpu, others_cpu) = cpu.end()?;
    stop_cleanly(&mut agent, "the agent", &agent_log)?;
    stop_cleanly(&mut relay, "the relay", &relay_log)?;
    let mut rpc = Rpc::login(&server.url()).await?;
    let done_in_tryton = rpc.done_shipments("relay").await?;
    if done_in_tryton != n {
        bail!(
            "the relay posted {n} adjustments but Tryton has {done_in_tryton} done internal shipments"
        );
    }
    let _ = std::fs::remove_dir_all(dir.join("agent-state"));
    let mut extra = vec![("relay_ready_seconds".to_string(), relay_ready)];
    if let Some(at) = stored_all {
        extra.push(("outbox_all_stored_seconds".to_string(), at));
    }
    Ok(RunResult {
        events: events.len(),
        secs,
        first,
        tryton_cpu: tryton_cpu / secs,
        client_cpu: relay_cpu / secs,
        others_cpu: others_cpu / secs,
        // Less the login of the check above.
        tryton_requests: server
            .requests_served()
            .saturating_sub(requests_before)
            .saturating_sub(2),
        done_in_tryton,
        steps: BTreeMap::new(),
        relay: Some(status),
        extra,
    })
}

fn render(plain: &RunResult, relay: &RunResult, ratio: f64, elapsed: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nerp: {} stock adjustments (internal shipments driven to done) posted to one Tryton 8.0 (SQLite), reset from the seed before each run; batches of {BATCH}\n",
        plain.events
    );
    let mut lines = vec![
        [
            "client",
            "seconds",
            "events/s",
            "events/s after the first batch",
            "Tryton requests",
            "Tryton CPU %",
            "client CPU %",
            "others CPU %",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for (name, r) in [
        ("plain batched client", plain),
        ("relay (agent → embedded broker → relay → Tryton)", relay),
    ] {
        lines.push(vec![
            name.to_string(),
            format!("{:.2}", r.secs),
            format!("{:.1}", r.rate()),
            r.steady_rate()
                .map_or_else(|| "-".into(), |rate| format!("{rate:.1}")),
            r.tryton_requests.to_string(),
            format!("{:.0}", 100.0 * r.tryton_cpu),
            format!("{:.0}", 100.0 * r.client_cpu),
            format!("{:.0}", 100.0 * r.others_cpu),
        ]);
    }
    push_table(&mut out, &lines);
    let steps: Vec<String> = plain
        .steps
        .iter()
        .map(|(name, s)| format!("{name} {:.0} ms", 1000.0 * s.secs / (s.calls.max(1) as f64)))
        .collect();
    let _ = writeln!(
        out,
        "\n(plain client's mean call time per batch of {BATCH}: {}; the relay's seconds run from its start, {}; CPU % of one core; {} cores)",
        steps.join(", "),
        relay
            .extra
            .iter()
            .map(|(k, v)| format!(
                "{} at {v:.2} s",
                k.replace('_', " ").replace(" seconds", "")
            ))
            .collect::<Vec<_>>()
            .join(", "),
        cpus()
    );
    if let Some(status) = &relay.relay {
        let _ = writeln!(
            out,
            "relay: {} delivered, {} retries, {} dead-lettered; Tryton holds {} done internal shipments after each run (plain {}, relay {})",
            status["events_delivered"],
            status["delivery_retries"],
            status["events_dead_lettered"],
            relay.events,
            plain.done_in_tryton,
            relay.done_in_tryton
        );
    }
    let _ = writeln!(
        out,
        "relay / plain client = {ratio:.2} (target ≥ {TARGET_RATIO}: {}); rates {} vs {} events/s; bench took {elapsed:.0} s",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "NOT met"
        },
        fmt_rate(relay.rate()),
        fmt_rate(plain.rate()),
    );
    out
}

fn run_json(r: &RunResult) -> Value {
    let mut value = json!({
        "events": r.events,
        "seconds": r.secs,
        "events_per_second": r.rate(),
        "events_per_second_after_first_batch": r.steady_rate(),
        "first_progress": r.first.map(|(posted, at)| json!({"posted": posted, "seconds": at})),
        "tryton_requests": r.tryton_requests,
        "cpu_percent_of_one_core": {
            "tryton": 100.0 * r.tryton_cpu,
            "client": 100.0 * r.client_cpu,
            "other_processes": 100.0 * r.others_cpu,
        },
        "done_internal_shipments_in_tryton": r.done_in_tryton,
    });
    if !r.steps.is_empty() {
        value["calls"] = r
            .steps
            .iter()
            .map(|(name, s)| {
                (
                    name.to_string(),
                    json!({"calls": s.calls, "seconds": s.secs, "mean_ms": 1000.0 * s.secs / s.calls.max(1) as f64}),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
    }
    if let Some(status) = &r.relay {
        value["relay_status"] = status.clone();
    }
    for (key, v) in &r.extra {
        value[key.as_str()] = json!(v);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjustments_cycle_over_fifty_keys() {
        let list = adjustments("t", 100);
        let keys: std::collections::HashSet<(String, Option<&str>)> = list[..50]
            .iter()
            .map(|a| (a.sku.clone(), a.location))
            .collect();
        assert_eq!(keys.len(), 50);
        assert_eq!(list[0].sku, "SKU-001");
        assert_eq!(list[10].location, Some("A1"));
        assert_eq!(list[50].sku, list[0].sku);
        assert!(list[3].event_json().contains(r#""type":"adjust""#));
    }

    #[test]
    fn base64_matches_known_values() {
        assert_eq!(base64("admin:1:ab"), "YWRtaW46MTphYg==");
        assert_eq!(base64("abc"), "YWJj");
    }
}
