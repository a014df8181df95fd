//! `cargo xtask bench compare`: Backhaul against what a site would build instead, on the same
//! machine, with the same load, in one run.
//!
//! - **Backhaul**: scanners → `backhaul-agent` → a cuttable link (the test harness's
//!   `TcpProxy`) → cloud Mosquitto → `backhaul-relay` → its JSONL ledger.
//! - **Bridge**: scanners → a local Mosquitto (persistence on, saved every second, a bridge with
//!   `cleansession false` and QoS 1) → the same kind of link → cloud Mosquitto → a subscriber
//!   (QoS 1, persistent session) that appends every message to a JSONL ledger, fsyncs each
//!   batch of messages it read together, and only then acknowledges them.
//!
//! What it owns: both pipelines (configs, processes, the link, the bridge's subscriber), the
//! five scenarios (steady load, peak acknowledged ingest, a WAN cut, SIGKILL of the edge process
//! during a cut, a large backlog), following each ledger as it grows, and counting every event
//! against the ids the scanners got a PUBACK for: lost, duplicated, latency from publish to the
//! ledger. Each scenario starts both pipelines afresh, Backhaul first; the table goes to stdout
//! and every figure, with the backlog over time during the cut, to
//! `<target dir>/bench/compare.json` (which `cargo xtask bench plots` draws).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backhaul_tests::proxy::TcpProxy;
use bytes::BytesMut;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Packet, PubAck};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::loadgen::{
    self, Connection, EVENT_BYTES, LoadSpec, MAX_PACKET, OnAck, StampedReport, StampedSpec,
    parse_stamped_id, read_packet, stamped, stamped_id, subscribe, unix_us,
};
use super::openmetrics::{http_get, metric_sum};
use super::{
    AgentAddrs, BenchOptions, MOSQUITTO_LOGGING, agent_config, binary, cpus, find_mosquitto,
    fmt_rate, ledger_id, push_table, quote, relay_config, spawn_agent, spawn_mosquitto,
    spawn_relay, start_mosquitto, toml_set, unix_time, wait_http_ok,
};
use crate::procs::{ChildGuard, clock_ticks, cpu_seconds, free_addr, memory_kib};
use crate::workspace_root;

/// The scenarios, in the order they run.
pub const SCENARIOS: &[&str] = &["steady", "peak", "cut", "kill", "backlog"];

/// The agent's site.
const SITE: &str = "bench-compare";
/// Mosquitto saves its in-memory store every this many seconds (`autosave_interval`, with
/// `autosave_on_changes false`): the shortest interval it takes. Saving on changes instead
/// writes the whole store after every N messages, which for a backlog of a million is a
/// rewrite of hundreds of MB per N messages.
const AUTOSAVE_SECONDS: u32 = 1;
/// The bridge's reconnect back-off (`restart_timeout base cap`): Mosquitto's default cap of
/// 30 s, which is also the agent's `reconnect_max_ms`, with a base of 1 s rather than 5.
const BRIDGE_RESTART: &str = "1 30";
/// Messages Mosquitto queues per client (the bridge, the subscriber): its default of 1000
/// would drop the rest of an outage silently, so a careful user raises it.
const MAX_QUEUED: u64 = 10_000_000;
/// QoS 1 messages in flight per client at each Mosquitto (default 20): the bridge's best case.
const MAX_INFLIGHT: u32 = 1000;
/// QoS 1 publishes the scanners keep in flight.
const SCANNER_WINDOW: usize = 1000;
/// Steady load before the link is cut.
const CUT_LEAD: Duration = Duration::from_secs(2);
/// The backlog is sampled this often during the cut scenarios.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// A drain that makes no progress for this long is over (what is missing then is lost):
/// longer than the reconnect back-off cap of either pipeline (30 s), so that a link that is
/// restored while a retry is far away still counts as draining.
const STALL: Duration = Duration::from_secs(45);
/// No drain waits longer than this in all.
const DRAIN_CAP: Duration = Duration::from_secs(1800);
/// How long the scanners wait for their last PUBACKs after they stop.
const ACK_WAIT: Duration = Duration::from_secs(30);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// The ledger is read again this soon after it had nothing new: the resolution of every
/// publish→ledger latency.
const TAIL_POLL: Duration = Duration::from_millis(1);
/// Lost or duplicated ids listed in the report, at most.
const EXAMPLES: usize = 20;

/// `bench compare`'s own options.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Scenario 1: how long the steady load runs, and its rate (events/s).
    pub steady: Duration,
    pub rate: f64,
    /// Scenario 2: the measured window and the publishers.
    pub peak: Duration,
    pub peak_publishers: usize,
    /// Scenarios 3 and 4: how long the link is cut.
    pub cut: Duration,
    /// Scenario 5: events built up while the link is cut.
    pub backlog_events: u64,
    /// Which scenarios run.
    pub scenarios: Vec<String>,
    /// Draw the plots under docs/bench/ afterwards.
    pub plots: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            steady: Duration::from_secs(20),
            rate: 1000.0,
            peak: Duration::from_secs(5),
            peak_publishers: 8,
            cut: Duration::from_secs(60),
            backlog_events: 1_000_000,
            scenarios: SCENARIOS.iter().map(|s| s.to_string()).collect(),
            plots: false,
        }
    }
}

/// Fails early, before anything is built, on options the comparison cannot run.
pub fn check_options(options: &BenchOptions) -> anyhow::Result<()> {
    let o = &options.compare;
    for name in &o.scenarios {
        if !SCENARIOS.contains(&name.as_str()) {
            bail!(
                "--scenarios {name:?}: expected some of {}",
                SCENARIOS.join(", ")
            );
        }
    }
    if o.scenarios.is_empty() {
        bail!("--scenarios needs at least one of {}", SCENARIOS.join(", "));
    }
    if !(o.rate.is_finite() && o.rate >= 1.0) {
        bail!("--steady-rate must be at least 1 event per second");
    }
    if o.peak_publishers == 0 {
        bail!("--peak-publishers must be at least 1");
    }
    if o.backlog_events == 0 || o.backlog_events > MAX_QUEUED / 2 {
        bail!(
            "--backlog-events must be between 1 and {}",
            fmt_rate((MAX_QUEUED / 2) as f64)
        );
    }
    if o.cut < Duration::from_secs(2) {
        bail!("--cut-seconds must be at least 2 (the kill scenario kills half-way through)");
    }
    Ok(())
}

// ----- the two pipelines ---------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Backhaul,
    Bridge,
}

impl Kind {
    const BOTH: [Kind; 2] = [Kind::Backhaul, Kind::Bridge];

    fn name(self) -> &'static str {
        match self {
            Kind::Backhaul => "backhaul",
            Kind::Bridge => "bridge",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Backhaul => "Backhaul (agent → relay)",
            Kind::Bridge => "Mosquitto bridge",
        }
    }

    fn edge(self) -> &'static str {
        match self {
            Kind::Backhaul => "backhaul-agent",
            Kind::Bridge => "local mosquitto",
        }
    }

    /// The id prefix of a scenario's events (`bh-steady`, `br-cut`).
    fn prefix(self, scenario: &str) -> String {
        let short = match self {
            Kind::Backhaul => "bh",
            Kind::Bridge => "br",
        };
        format!("{short}-{scenario}")
    }
}

/// What every pipeline of the run shares.
struct Setup {
    agent_bin: PathBuf,
    relay_bin: PathBuf,
    /// `config/agent.toml` as shipped.
    shipped_agent: String,
    dir: PathBuf,
}

/// One pipeline of one scenario: every process from the edge to the ledger, and the follower
/// of its ledger.
struct Pipeline {
    kind: Kind,
    dir: PathBuf,
    cloud: ChildGuard,
    proxy: TcpProxy,
    relay: Option<(ChildGuard, SocketAddr)>,
    writer: Option<LedgerWriter>,
    edge: Option<ChildGuard>,
    edge_mqtt: SocketAddr,
    /// The agent's admin API (Backhaul only).
    agent_admin: Option<SocketAddr>,
    edge_config: PathBuf,
    /// The edge's durable state: the agent's log, or Mosquitto's persistence directory.
    edge_state: PathBuf,
    edge_starts: u32,
    tracker: Arc<Tracker>,
    tailer: Option<Tailer>,
    probes: u32,
    agent_bin: PathBuf,
}

impl Pipeline {
    async fn start(kind: Kind, setup: &Setup, scenario: &str) -> anyhow::Result<Pipeline> {
        let dir = setup.dir.join(format!("{}-{scenario}", kind.name()));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let cloud_addr = free_addr()?;
        let cloud = start_mosquitto(
            &dir,
            "cloud-mosquitto",
            "compare",
            cloud_addr,
            &format!(
                "allow_anonymous true\n\
                 persistence false\n\
                 max_inflight_messages {MAX_INFLIGHT}\n\
                 max_queued_messages {MAX_QUEUED}\n\
                 message_size_limit 0\n\
                 {MOSQUITTO_LOGGING}"
            ),
        )
        .await
        .context("the cloud broker")?;
        let proxy = TcpProxy::start(cloud_addr);
        let ledger = dir.join("ledger.jsonl");
        let tracker = Arc::new(Tracker::new(kind.prefix(scenario)));
        let tailer = Tailer::start(&ledger, tracker.clone())?;
        let edge_mqtt = free_addr()?;
        let mut pipeline = Pipeline {
            kind,
            cloud,
            proxy,
            relay: None,
            writer: None,
            edge: None,
            edge_mqtt,
            agent_admin: None,
            edge_config: PathBuf::new(),
            edge_state: PathBuf::new(),
            edge_starts: 0,
            tracker,
            tailer: Some(tailer),
            probes: 0,
            agent_bin: setup.agent_bin.clone(),
            dir: dir.clone(),
        };
        match kind {
            Kind::Backhaul => {
                let admin = free_addr()?;
                let mut text = relay_config(&dir.join("relay-state"), cloud_addr, false, admin)?;
                text = toml_set(
                    &text,
                    "sink.ledger",
                    "path",
                    &quote(&ledger.display().to_string()),
                )?;
                let config = dir.join("relay.toml");
                std::fs::write(&config, text)
                    .with_context(|| format!("cannot write {}", config.display()))?;
                let log = dir.join("relay.log");
                let mut relay = spawn_relay(&setup.relay_bin, &config, &log)?;
                wait_http_ok(&mut relay, admin, "/readyz", &log, STARTUP_TIMEOUT)
                    .await
                    .context("the relay did not connect to the cloud broker")?;
                pipeline.relay = Some((relay, admin));

                let addrs = AgentAddrs {
                    mqtt: edge_mqtt,
                    http: free_addr()?,
                    admin: free_addr()?,
                };
                pipeline.edge_state = dir.join("agent-state");
                let text = agent_config(
                    &setup.shipped_agent,
                    SITE,
                    &pipeline.edge_state,
                    addrs,
                    pipeline.proxy.port(),
                    &[],
                )?;
                pipeline.edge_config = dir.join("agent.toml");
                std::fs::write(&pipeline.edge_config, text)
                    .with_context(|| format!("cannot write {}", pipeline.edge_config.display()))?;
                pipeline.agent_admin = Some(addrs.admin);
            }
            Kind::Bridge => {
                pipeline.writer = Some(LedgerWriter::start(cloud_addr, &ledger).await?);
                pipeline.edge_state = dir.join("edge-state");
                std::fs::create_dir_all(&pipeline.edge_state)
                    .with_context(|| format!("cannot create {}", pipeline.edge_state.display()))?;
                pipeline.edge_config = dir.join("edge-mosquitto.conf");
                let text = format!(
                    "# Written by `cargo xtask bench compare`: the site's broker, bridged to the cloud.\n\
                     listener {port} {host}\n{body}",
                    port = edge_mqtt.port(),
                    host = edge_mqtt.ip(),
                    body = bridge_config(&pipeline.edge_state, pipeline.proxy.port()),
                );
                std::fs::write(&pipeline.edge_config, text)
                    .with_context(|| format!("cannot write {}", pipeline.edge_config.display()))?;
            }
        }
        pipeline.start_edge().await?;
        Ok(pipeline)
    }

    /// Starts the edge process (again, after a kill) on its config and state, and waits until
    /// it takes scanners.
    async fn start_edge(&mut self) -> anyhow::Result<()> {
        self.edge_starts += 1;
        let log = self.dir.join(format!("edge-{}.log", self.edge_starts));
        let guard = match self.kind {
            Kind::Backhaul => {
                let mut guard = spawn_agent(&self.agent_bin, &self.edge_config, &log)?;
                let admin = self.agent_admin.context("the agent has no admin address")?;
                wait_http_ok(&mut guard, admin, "/readyz", &log, STARTUP_TIMEOUT).await?;
                guard
            }
            Kind::Bridge => spawn_mosquitto(&self.edge_config, self.edge_mqtt, &log)
                .await
                .context("the site's Mosquitto")?,
        };
        self.edge = Some(guard);
        Ok(())
    }

    fn kill_edge(&mut self) {
        if let Some(mut edge) = self.edge.take() {
            edge.kill9();
        }
    }

    fn edge_pid(&self) -> anyhow::Result<u32> {
        self.edge
            .as_ref()
            .map(ChildGuard::pid)
            .context("the edge process is not running")
    }

    /// Fails, with the end of its log, when a process of the pipeline has stopped.
    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(edge) = self.edge.as_mut() {
            edge.check_running()?;
        }
        if let Some((relay, _)) = self.relay.as_mut() {
            relay.check_running()?;
        }
        self.cloud.check_running()?;
        if let Some(writer) = &self.writer {
            writer.check_running()?;
        }
        if let Some(tailer) = &self.tailer {
            tailer.check_running()?;
        }
        Ok(())
    }

    /// Sends one event end to end and waits until it is in the ledger: every process is up and
    /// connected.
    async fn probe(&mut self) -> anyhow::Result<()> {
        self.probes += 1;
        let before = self.tracker.probes.load(Ordering::SeqCst);
        let (_keep, stop) = watch::channel(false);
        let spec = StampedSpec {
            addr: self.edge_mqtt,
            client_id: format!("probe-{}-{}", self.kind.name(), self.probes),
            device: "probe".into(),
            id_prefix: format!("probe{}", self.probes),
            first_seq: 1,
            rate: None,
            window: 1,
            limit: Some(1),
            ack_wait: PROBE_TIMEOUT,
        };
        let report = stamped(spec, stop, Arc::new(|_: &[(u64, u64)]| {})).await?;
        if report.acked != 1 {
            bail!(
                "the {} did not acknowledge a probe event ({:?})",
                self.kind.edge(),
                report.lost_connection
            );
        }
        let deadline = Instant::now() + PROBE_TIMEOUT;
        while self.tracker.probes.load(Ordering::SeqCst) == before {
            self.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "a probe event did not reach the {} ledger within {PROBE_TIMEOUT:?}; see the logs in {}",
                    self.kind.name(),
                    self.dir.display()
                );
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    /// A stamped scanner on the edge, at `rate` (or flat out), from sequence `first_seq`.
    fn scanner(
        &self,
        session: u32,
        first_seq: u64,
        rate: Option<f64>,
        limit: Option<u64>,
    ) -> StampedSpec {
        StampedSpec {
            addr: self.edge_mqtt,
            client_id: format!("scanner-{}-{session}", self.kind.name()),
            device: "scanner-001".into(),
            id_prefix: self.tracker.prefix.clone(),
            first_seq,
            rate,
            window: SCANNER_WINDOW,
            limit,
            ack_wait: ACK_WAIT,
        }
    }

    fn on_ack(&self) -> OnAck {
        let tracker = self.tracker.clone();
        Arc::new(move |run: &[(u64, u64)]| tracker.acked(run))
    }

    /// Bytes the edge's durable state takes on disk (allocated blocks) and its files' length.
    fn edge_disk(&self) -> anyhow::Result<(u64, u64)> {
        dir_bytes(&self.edge_state)
    }

    /// The relay's `backhaul_relay_batch_bytes_received_total`.
    async fn relay_batch_bytes(&self) -> anyhow::Result<u64> {
        let (_, admin) = self.relay.as_ref().context("no relay in this pipeline")?;
        let (status, text) = http_get(*admin, "/metrics").await?;
        if status != 200 {
            bail!("GET http://{admin}/metrics answered {status}");
        }
        Ok(metric_sum(
            &text,
            "backhaul_relay_batch_bytes_received_total",
        ))
    }

    /// Stops everything, the edge first; the edge must stop on SIGTERM. Removes the big files
    /// unless `keep` (a Backhaul run that lost or duplicated events is kept for a look).
    async fn stop(mut self, keep: bool) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if let Some(mut edge) = self.edge.take() {
            match tokio::task::block_in_place(|| edge.terminate(Duration::from_secs(60)))? {
                Some(status) if status.success() => {}
                other => problems.push(format!("the {} stopped with {other:?}", self.kind.edge())),
            }
        }
        if let Some((mut relay, _)) = self.relay.take() {
            let _ = tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(30)));
        }
        if let Some(writer) = self.writer.take() {
            writer.finish()?;
        }
        if let Some(tailer) = self.tailer.take() {
            tailer.finish()?;
        }
        let _ = tokio::task::block_in_place(|| self.cloud.terminate(Duration::from_secs(10)));
        if !keep {
            for name in ["agent-state", "relay-state", "edge-state", "ledger.jsonl"] {
                let path = self.dir.join(name);
                if path.is_dir() {
                    let _ = std::fs::remove_dir_all(&path);
                } else {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        if !problems.is_empty() {
            bail!("{}; see {}", problems.join("; "), self.dir.display());
        }
        Ok(())
    }
}

/// The site's Mosquitto as a careful user sets it up for a bridge that must not lose messages.
fn bridge_config(state: &Path, proxy_port: u16) -> String {
    // Started as root, Mosquitto drops to the `mosquitto` user, which cannot write a
    // persistence directory of ours: every autosave would fail ("Permission denied").
    let user = if runs_as_root() { "user root\n" } else { "" };
    format!(
        "{user}allow_anonymous true\n\
         persistence true\n\
         persistence_location {state}/\n\
         autosave_interval {AUTOSAVE_SECONDS}\n\
         autosave_on_changes false\n\
         max_inflight_messages {MAX_INFLIGHT}\n\
         max_queued_messages {MAX_QUEUED}\n\
         sys_interval 1\n\
         {MOSQUITTO_LOGGING}\n\
         connection cloud\n\
         address 127.0.0.1:{proxy_port}\n\
         bridge_protocol_version mqttv311\n\
         cleansession false\n\
         clientid bench-compare-bridge\n\
         topic scans/# out 1\n\
         restart_timeout {BRIDGE_RESTART}\n\
         keepalive_interval 30\n",
        state = state.display()
    )
}

/// Whether this process's real user is root (`Uid:` of `/proc/self/status`).
fn runs_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next().map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// Allocated bytes (blocks) and lengths of the files under a directory.
fn dir_bytes(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let mut allocated = 0;
    let mut length = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let meta = entry
            .metadata()
            .with_context(|| format!("cannot stat {}", entry.path().display()))?;
        if meta.is_dir() {
            let (a, l) = dir_bytes(&entry.path())?;
            allocated += a;
            length += l;
        } else {
            allocated += meta.blocks() * 512;
            length += meta.len();
        }
    }
    Ok((allocated, length))
}

// ----- what reached the ledger, against what was acknowledged --------------------------------

/// Every event of a scenario, by sequence number: when its scanner got the PUBACK for it, and
/// when and how often it showed up in the ledger.
struct Tracker {
    prefix: String,
    state: Mutex<Track>,
    /// Ledger lines of probe events, and of other events (the peak scenario's load generator).
    probes: AtomicU64,
    foreign: AtomicU64,
}

#[derive(Default)]
struct Track {
    /// Publish time (µs since the epoch) of each acknowledged sequence number, 0 if none.
    acked_at: Vec<u64>,
    /// When each sequence number was first seen in the ledger (µs), 0 if not yet.
    seen_at: Vec<u64>,
    /// Ledger lines per sequence number.
    lines: Vec<u16>,
    acked: u64,
    seen: u64,
    lines_total: u64,
    /// Acknowledged and not in the ledger yet.
    backlog: u64,
    /// Publish → first ledger line, µs, in the order seen.
    latency_us: Vec<u32>,
}

impl Track {
    fn grow(&mut self, seq: u64) {
        let len = seq as usize + 1;
        if self.acked_at.len() < len {
            let new = len.max(self.acked_at.len() * 2).max(1024);
            self.acked_at.resize(new, 0);
            self.seen_at.resize(new, 0);
            self.lines.resize(new, 0);
        }
    }
}

/// Where a scenario's events ended up.
#[derive(Debug, Clone, Default)]
struct Tally {
    acked: u64,
    /// Distinct events of the scenario in the ledger, and its lines for them.
    seen: u64,
    lines: u64,
    /// Acknowledged, never in the ledger.
    lost: u64,
    lost_ids: Vec<String>,
    /// Events in the ledger more than once, and the lines beyond the first.
    duplicated: u64,
    extra_lines: u64,
    duplicated_ids: Vec<String>,
    /// In the ledger without a PUBACK (in flight when the edge was killed, say): not a loss.
    seen_unacked: u64,
    /// Publish → ledger of every event seen, µs, sorted.
    latency_us: Vec<u32>,
    /// With a restore time: when the last event acknowledged before it reached the ledger, and
    /// the first ledger line after it (µs since the epoch).
    drained_at: Option<u64>,
    first_after: Option<u64>,
}

impl Tally {
    fn latency_ms(&self, q: f64) -> Option<f64> {
        quantile_ms(&self.latency_us, q)
    }
}

/// A quantile of sorted µs samples, in ms.
fn quantile_ms(sorted: &[u32], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(f64::from(sorted[rank - 1]) / 1000.0)
}

impl Tracker {
    fn new(prefix: String) -> Tracker {
        Tracker {
            prefix,
            state: Mutex::new(Track::default()),
            probes: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Track> {
        // A panic while holding it leaves counts that are still counts.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn acked(&self, run: &[(u64, u64)]) {
        let mut t = self.lock();
        for &(seq, published) in run {
            t.grow(seq);
            let i = seq as usize;
            if t.acked_at[i] == 0 {
                t.acked_at[i] = published.max(1);
                t.acked += 1;
                if t.seen_at[i] == 0 {
                    t.backlog += 1;
                }
            }
        }
    }

    /// Ledger lines read together, at `now` (µs since the epoch).
    fn saw(&self, ids: &[&str], now: u64) {
        let mut t = self.lock();
        for id in ids {
            let Some((seq, published)) = parse_stamped_id(&self.prefix, id) else {
                if id.starts_with("probe") {
                    self.probes.fetch_add(1, Ordering::SeqCst);
                } else {
                    self.foreign.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            };
            t.grow(seq);
            let i = seq as usize;
            t.lines[i] = t.lines[i].saturating_add(1);
            t.lines_total += 1;
            if t.seen_at[i] == 0 {
                t.seen_at[i] = now;
                t.seen += 1;
                let latency = u32::try_from(now.saturating_sub(published)).unwrap_or(u32::MAX);
                t.latency_us.push(latency);
                if t.acked_at[i] != 0 {
                    t.backlog -= 1;
                }
            }
        }
    }

    /// Acknowledged events not in the ledger yet.
    fn backlog(&self) -> u64 {
        self.lock().backlog
    }

    fn acked_count(&self) -> u64 {
        self.lock().acked
    }

    /// Acknowledged events published before `us` not in the ledger yet.
    fn pending_before(&self, us: u64) -> u64 {
        let t = self.lock();
        t.acked_at
            .iter()
            .zip(&t.seen_at)
            .filter(|(acked, seen)| **acked != 0 && **acked < us && **seen == 0)
            .count() as u64
    }

    fn tally(&self, restore_us: Option<u64>) -> Tally {
        let t = self.lock();
        let mut tally = Tally {
            acked: t.acked,
            seen: t.seen,
            lines: t.lines_total,
            ..Tally::default()
        };
        for (seq, ((&acked, &seen), &lines)) in
            t.acked_at.iter().zip(&t.seen_at).zip(&t.lines).enumerate()
        {
            if acked != 0 && seen == 0 {
                tally.lost += 1;
                if tally.lost_ids.len() < EXAMPLES {
                    tally
                        .lost_ids
                        .push(stamped_id(&self.prefix, seq as u64, acked));
                }
            }
            if lines > 1 {
                tally.duplicated += 1;
                tally.extra_lines += u64::from(lines - 1);
                if tally.duplicated_ids.len() < EXAMPLES {
                    tally
                        .duplicated_ids
                        .push(format!("{}-{seq} ({lines} lines)", self.prefix));
                }
            }
            if acked == 0 && seen != 0 {
                tally.seen_unacked += 1;
            }
            if let Some(restore) = restore_us {
                if acked != 0 && acked < restore && seen != 0 {
                    tally.drained_at = Some(tally.drained_at.map_or(seen, |d: u64| d.max(seen)));
                }
                if seen >= restore {
                    tally.first_after = Some(tally.first_after.map_or(seen, |f: u64| f.min(seen)));
                }
            }
        }
        tally.latency_us = t.latency_us.clone();
        tally.latency_us.sort_unstable();
        tally
    }
}

/// Follows a ledger file as it grows, handing the ids of its complete lines to the tracker
/// with the time they were read.
struct Tailer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl Tailer {
    fn start(path: &Path, tracker: Arc<Tracker>) -> anyhow::Result<Tailer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (path, flag) = (path.to_path_buf(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("ledger-tail".into())
            .spawn(move || tail(&path, &tracker, &flag))
            .context("cannot start the ledger's follower thread")?;
        Ok(Tailer {
            stop,
            thread: Some(thread),
        })
    }

    fn check_running(&self) -> anyhow::Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            bail!("the ledger's follower stopped");
        }
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(outcome)) => outcome,
            Some(Err(_)) => bail!("the ledger's follower panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for Tailer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn tail(path: &Path, tracker: &Tracker, stop: &AtomicBool) -> anyhow::Result<()> {
    let mut file = loop {
        match File::open(path) {
            Ok(file) => break file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(());
                }
                std::thread::sleep(TAIL_POLL);
            }
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        }
    };
    let mut buf = vec![0u8; 1 << 20];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            std::thread::sleep(TAIL_POLL);
            continue;
        }
        let now = unix_us();
        carry.extend_from_slice(&buf[..n]);
        let Some(end) = carry.iter().rposition(|b| *b == b'\n') else {
            continue;
        };
        let complete = String::from_utf8_lossy(&carry[..end]);
        let ids: Vec<&str> = complete.lines().filter_map(ledger_id).collect();
        tracker.saw(&ids, now);
        drop(ids);
        carry.drain(..=end);
    }
}

// ----- the bridge's cloud side: a subscriber writing the ledger ------------------------------

/// The subscriber a bridge's user writes: a persistent QoS 1 session on the cloud broker that
/// appends each message to the ledger, fsyncs each batch it read together, and then
/// acknowledges them. Redeliveries are appended again: deduplicating is what it does not do.
struct LedgerWriter {
    done: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<WriterStats>>>,
}

#[derive(Debug, Clone, Copy, Default)]
struct WriterStats {
    messages: u64,
    fsyncs: u64,
}

/// How often an idle subscriber pings its broker (its keep-alive is 120 s).
const PING_EVERY: Duration = Duration::from_secs(30);

impl LedgerWriter {
    async fn start(cloud: SocketAddr, path: &Path) -> anyhow::Result<LedgerWriter> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the ledger writer's runtime")?;
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("bridge-ledger".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let connection = match subscribe(
                        cloud,
                        "bench-compare-ledger",
                        "scans/#",
                        QoS::AtLeastOnce,
                        false,
                    )
                    .await
                    {
                        Ok(connection) => {
                            let _ = ready_tx.send(Ok(()));
                            connection
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return Ok(WriterStats::default());
                        }
                    };
                    write_ledger(connection, file, &path, &flag).await
                })
            })
            .context("cannot start the ledger writer's thread")?;
        ready_rx
            .await
            .context("the ledger writer's thread ended before subscribing")??;
        Ok(LedgerWriter {
            done,
            thread: Some(thread),
        })
    }

    fn check_running(&self) -> anyhow::Result<()> {
        if self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            bail!("the bridge's ledger writer stopped");
        }
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<WriterStats> {
        self.done.store(true, Ordering::SeqCst);
        let joined = tokio::task::block_in_place(|| self.thread.take().map(|t| t.join()));
        match joined {
            Some(Ok(outcome)) => outcome.context("the bridge's ledger writer"),
            Some(Err(_)) => bail!("the bridge's ledger writer panicked"),
            None => Ok(WriterStats::default()),
        }
    }
}

impl Drop for LedgerWriter {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

async fn write_ledger(
    (mut reader, mut writer, mut buf): Connection,
    mut file: File,
    path: &Path,
    done: &AtomicBool,
) -> anyhow::Result<WriterStats> {
    let mut stats = WriterStats::default();
    let mut lines = Vec::with_capacity(1 << 20);
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut last_sent = Instant::now();
    loop {
        while let Some(packet) = read_packet(&mut buf)? {
            match packet {
                Packet::Publish(publish) => {
                    lines.extend_from_slice(&publish.payload);
                    lines.push(b'\n');
                    stats.messages += 1;
                    if publish.qos != QoS::AtMostOnce {
                        Packet::PubAck(PubAck::new(publish.pkid))
                            .write(&mut out, MAX_PACKET)
                            .context("encoding PUBACK")?;
                    }
                }
                Packet::PingResp => {}
                other => bail!("unexpected packet from the cloud broker: {other:?}"),
            }
        }
        if !lines.is_empty() {
            file.write_all(&lines)
                .and_then(|()| file.sync_data())
                .with_context(|| format!("cannot write {}", path.display()))?;
            stats.fsyncs += 1;
            lines.clear();
        }
        if out.is_empty() && last_sent.elapsed() > PING_EVERY {
            Packet::PingReq
                .write(&mut out, MAX_PACKET)
                .context("encoding PINGREQ")?;
        }
        if !out.is_empty() {
            writer
                .write_all(&out)
                .await
                .context("sending PUBACKs to the cloud broker")?;
            out.clear();
            last_sent = Instant::now();
        }
        if done.load(Ordering::SeqCst) {
            return Ok(stats);
        }
        match tokio::time::timeout(Duration::from_millis(100), reader.read_buf(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => bail!("the cloud broker closed the ledger writer's connection"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("reading from the cloud broker"),
        }
    }
}

/// A counter Mosquitto publishes under `$SYS` (every `sys_interval`), followed.
struct SysCounter {
    latest: Arc<AtomicU64>,
    updates: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    topic: String,
}

impl SysCounter {
    async fn start(addr: SocketAddr, topic: &str) -> anyhow::Result<SysCounter> {
        let connection = subscribe(addr, "bench-compare-sys", topic, QoS::AtMostOnce, true)
            .await
            .with_context(|| format!("subscribing to {topic} on {addr}"))?;
        let latest = Arc::new(AtomicU64::new(0));
        let updates = Arc::new(AtomicU64::new(0));
        let (l, u) = (latest.clone(), updates.clone());
        let task = tokio::spawn(async move {
            let (mut reader, mut writer, mut buf) = connection;
            let mut last_sent = Instant::now();
            loop {
                while let Some(packet) = read_packet(&mut buf)? {
                    if let Packet::Publish(publish) = packet
                        && let Some(value) = std::str::from_utf8(&publish.payload)
                            .ok()
                            .and_then(|text| text.trim().parse::<u64>().ok())
                    {
                        l.store(value, Ordering::SeqCst);
                        u.fetch_add(1, Ordering::SeqCst);
                    }
                }
                if last_sent.elapsed() > PING_EVERY {
                    let mut out = BytesMut::new();
                    Packet::PingReq
                        .write(&mut out, MAX_PACKET)
                        .context("encoding PINGREQ")?;
                    writer.write_all(&out).await.context("sending PINGREQ")?;
                    last_sent = Instant::now();
                }
                match tokio::time::timeout(Duration::from_secs(1), reader.read_buf(&mut buf)).await
                {
                    Err(_) => {}
                    Ok(Ok(0)) => bail!("the broker closed the $SYS subscription"),
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e).context("reading $SYS"),
                }
            }
        });
        Ok(SysCounter {
            latest,
            updates,
            task,
            topic: topic.to_string(),
        })
    }

    /// The counter as published after this call: waits for two updates, so that the second was
    /// taken after the call.
    async fn fresh(&self) -> anyhow::Result<u64> {
        let start = self.updates.load(Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.updates.load(Ordering::SeqCst) < start + 2 {
            if self.task.is_finished() {
                bail!("the subscription to {} ended", self.topic);
            }
            if Instant::now() > deadline {
                bail!("no update of {} within 10 s", self.topic);
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(self.latest.load(Ordering::SeqCst))
    }
}

impl Drop for SysCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ----- the scenarios -------------------------------------------------------------------------

/// Seconds from `origin` to `at`, negative before it.
fn signed_secs(at: Instant, origin: Instant) -> f64 {
    if at >= origin {
        (at - origin).as_secs_f64()
    } else {
        -(origin - at).as_secs_f64()
    }
}

/// Lets `duration` pass under load, failing early when a process of the pipeline stopped.
async fn hold(p: &mut Pipeline, duration: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + duration;
    while Instant::now() < end {
        p.check_running()?;
        tokio::time::sleep(POLL.min(end.saturating_duration_since(Instant::now()))).await;
    }
    Ok(())
}

/// Waits until `remaining()` is 0; gives up when it has not changed for [`STALL`]. Returns
/// whether it reached 0.
async fn wait_drained(
    p: &mut Pipeline,
    mut remaining: impl FnMut() -> u64,
) -> anyhow::Result<bool> {
    let started = Instant::now();
    let mut last = remaining();
    let mut changed = Instant::now();
    loop {
        p.check_running()?;
        let now = remaining();
        if now == 0 {
            return Ok(true);
        }
        if now != last {
            last = now;
            changed = Instant::now();
        }
        if changed.elapsed() > STALL || started.elapsed() > DRAIN_CAP {
            return Ok(false);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Awaits a scanner that was told to stop.
async fn scanner_done(
    task: tokio::task::JoinHandle<anyhow::Result<StampedReport>>,
) -> anyhow::Result<StampedReport> {
    tokio::time::timeout(ACK_WAIT + Duration::from_secs(10), task)
        .await
        .context("a scanner did not stop")?
        .context("a scanner panicked")?
}

struct Steady {
    seconds: f64,
    sent: u64,
    tally: Tally,
    ack_latency_us: Vec<u32>,
    edge_cpu_seconds: f64,
    edge_rss_peak_kib: u64,
}

async fn steady(kind: Kind, setup: &Setup, o: &CompareOptions) -> anyhow::Result<Steady> {
    let mut p = Pipeline::start(kind, setup, "steady").await?;
    p.probe().await?;
    let ticks = clock_ticks();
    let pid = p.edge_pid()?;
    let cpu_start = cpu_seconds(pid, ticks)?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let scanner = tokio::spawn(stamped(
        p.scanner(1, 1, Some(o.rate), None),
        stop_rx,
        p.on_ack(),
    ));
    hold(&mut p, o.steady).await?;
    stop_tx.send_replace(true);
    let report = scanner_done(scanner).await?;
    let seconds = started.elapsed().as_secs_f64();
    let edge_cpu_seconds = cpu_seconds(pid, ticks)? - cpu_start;
    let tracker = p.tracker.clone();
    wait_drained(&mut p, || tracker.backlog()).await?;
    let (_, edge_rss_peak_kib) = memory_kib(pid)?;
    let tally = p.tracker.tally(None);
    p.stop(kind == Kind::Backhaul && (tally.lost > 0 || tally.duplicated > 0))
        .await?;
    Ok(Steady {
        seconds,
        sent: report.sent,
        tally,
        ack_latency_us: report.ack_latency_us,
        edge_cpu_seconds,
        edge_rss_peak_kib,
    })
}

struct Peak {
    publishers: usize,
    window: usize,
    result: loadgen::LoadResult,
    edge_cpu_seconds: f64,
    edge_rss_peak_kib: u64,
}

async fn peak(kind: Kind, setup: &Setup, o: &CompareOptions) -> anyhow::Result<Peak> {
    let mut p = Pipeline::start(kind, setup, "peak").await?;
    p.probe().await?;
    let ticks = clock_ticks();
    let pid = p.edge_pid()?;
    let window = (2000 / o.peak_publishers).clamp(100, 1000);
    let spec = LoadSpec {
        addr: p.edge_mqtt,
        tag: kind.prefix("peak"),
        publishers: o.peak_publishers,
        window,
        warmup: Duration::from_secs(1),
        measure: o.peak,
        subscriber: false,
    };
    let mut cpu = (None, None);
    let result = loadgen::run(&spec, |moment| match moment {
        loadgen::Moment::MeasureStart => cpu.0 = cpu_seconds(pid, ticks).ok(),
        loadgen::Moment::MeasureEnd => cpu.1 = cpu_seconds(pid, ticks).ok(),
        _ => {}
    })
    .await
    .with_context(|| format!("peak ingest into the {}", kind.edge()))?;
    p.check_running()?;
    let (_, edge_rss_peak_kib) = memory_kib(pid)?;
    p.stop(false).await?;
    Ok(Peak {
        publishers: o.peak_publishers,
        window,
        edge_cpu_seconds: match cpu {
            (Some(a), Some(b)) => b - a,
            _ => f64::NAN,
        },
        result,
        edge_rss_peak_kib,
    })
}

struct Cut {
    cut_seconds: f64,
    sent: u64,
    tally: Tally,
    /// Seconds from the restore until every event acknowledged before it was in the ledger,
    /// and until the first ledger line after it.
    drain_seconds: Option<f64>,
    first_line_seconds: Option<f64>,
    /// (seconds since the cut, acknowledged events not in the ledger).
    series: Vec<(f64, u64)>,
    peak_backlog: u64,
    /// The kill scenario: seconds into the cut of the SIGKILL, and the restart's duration.
    killed_at: Option<f64>,
    restart_seconds: Option<f64>,
    /// Why the scanners' connections ended early (the kill).
    scanner_losses: Vec<String>,
}

async fn cut(kind: Kind, setup: &Setup, o: &CompareOptions, kill: bool) -> anyhow::Result<Cut> {
    let scenario = if kill { "kill" } else { "cut" };
    let mut p = Pipeline::start(kind, setup, scenario).await?;
    p.probe().await?;
    let tracker = p.tracker.clone();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (tracker, sampling) = (tracker.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            while sampling.load(Ordering::SeqCst) {
                tick.tick().await;
                samples.push((Instant::now(), tracker.backlog()));
            }
            samples
        })
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut scanner = tokio::spawn(stamped(
        p.scanner(1, 1, Some(o.rate), None),
        stop_rx.clone(),
        p.on_ack(),
    ));
    hold(&mut p, CUT_LEAD).await?;
    p.proxy.cut();
    let cut_started = Instant::now();
    let mut killed_at = None;
    let mut restart_seconds = None;
    let mut scanner_losses = Vec::new();
    let mut sent_before_kill = 0;
    if kill {
        hold(&mut p, o.cut / 2).await?;
        killed_at = Some(cut_started.elapsed().as_secs_f64());
        p.kill_edge();
        let first = scanner_done(scanner).await?;
        sent_before_kill = first.sent;
        if let Some(why) = &first.lost_connection {
            scanner_losses.push(why.clone());
        }
        let restart = Instant::now();
        p.start_edge().await?;
        restart_seconds = Some(restart.elapsed().as_secs_f64());
        scanner = tokio::spawn(stamped(
            p.scanner(2, first.next_seq, Some(o.rate), None),
            stop_rx.clone(),
            p.on_ack(),
        ));
        hold(&mut p, o.cut.saturating_sub(cut_started.elapsed())).await?;
    } else {
        hold(&mut p, o.cut).await?;
    }
    p.proxy.restore();
    let restore_us = unix_us();
    let cut_seconds = cut_started.elapsed().as_secs_f64();
    // The scanners go on while the backlog drains, as they would at a site.
    wait_drained(&mut p, || tracker.pending_before(restore_us)).await?;
    stop_tx.send_replace(true);
    let report = scanner_done(scanner).await?;
    if let Some(why) = &report.lost_connection {
        scanner_losses.push(why.clone());
    }
    let left_before = tracker.pending_before(restore_us);
    wait_drained(&mut p, || tracker.backlog().saturating_sub(left_before)).await?;
    // One more sample after the end, so that the series ends where the drain did.
    tokio::time::sleep(SAMPLE_EVERY).await;
    sampling.store(false, Ordering::SeqCst);
    let series: Vec<(f64, u64)> = sampler
        .await
        .context("the backlog sampler panicked")?
        .into_iter()
        .map(|(at, backlog)| (signed_secs(at, cut_started), backlog))
        .collect();
    let tally = tracker.tally(Some(restore_us));
    let sent = sent_before_kill + report.sent;
    p.stop(kind == Kind::Backhaul && (tally.lost > 0 || tally.duplicated > 0))
        .await?;
    let since_restore = |us: Option<u64>| us.map(|us| us.saturating_sub(restore_us) as f64 / 1e6);
    Ok(Cut {
        cut_seconds,
        sent,
        drain_seconds: since_restore(tally.drained_at),
        first_line_seconds: since_restore(tally.first_after),
        peak_backlog: series.iter().map(|s| s.1).max().unwrap_or(0),
        series,
        tally,
        killed_at,
        restart_seconds,
        scanner_losses,
    })
}

struct Backlog {
    events: u64,
    fill_seconds: f64,
    tally: Tally,
    edge_rss_after_fill_kib: u64,
    edge_rss_peak_kib: u64,
    disk_allocated: u64,
    disk_length: u64,
    /// Seconds from the restore to the first ledger line, and to the last event.
    first_line_seconds: Option<f64>,
    drain_seconds: Option<f64>,
    wire_bytes: Option<u64>,
    wire_source: &'static str,
    /// Backhaul: the agent's own count of bytes of batches it published.
    agent_uplink_bytes: Option<u64>,
}

impl Backlog {
    /// Events per second from the first ledger line after the restore to the last.
    fn drain_rate(&self) -> Option<f64> {
        match (self.first_line_seconds, self.drain_seconds) {
            (Some(first), Some(all)) if all > first => Some(self.tally.seen as f64 / (all - first)),
            _ => None,
        }
    }
}

async fn backlog(kind: Kind, setup: &Setup, o: &CompareOptions) -> anyhow::Result<Backlog> {
    let mut p = Pipeline::start(kind, setup, "backlog").await?;
    p.probe().await?;
    let pid = p.edge_pid()?;
    p.proxy.cut();
    let (_keep, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let fill = tokio::spawn(stamped(
        p.scanner(1, 1, None, Some(o.backlog_events)),
        stop_rx,
        p.on_ack(),
    ));
    let mut every = Instant::now();
    while !fill.is_finished() {
        p.check_running()?;
        if every.elapsed() > Duration::from_secs(10) {
            every = Instant::now();
            eprintln!(
                "xtask: bench compare: {}: {} of {} events acknowledged",
                kind.name(),
                p.tracker.acked_count(),
                o.backlog_events
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let report = fill.await.context("the filling scanner panicked")??;
    let fill_seconds = started.elapsed().as_secs_f64();
    let filled = std::time::SystemTime::now();
    if let Some(why) = report.lost_connection {
        bail!("the {} dropped the filling scanner: {why}", kind.edge());
    }
    let (edge_rss_after_fill_kib, _) = memory_kib(pid)?;
    if kind == Kind::Bridge {
        wait_autosaved(&mut p, filled).await?;
    }
    let (disk_allocated, disk_length) = p.edge_disk()?;

    // What crossed the link while it drained: the relay's count of the batch frames it got
    // (compressed and signed), or the site Mosquitto's count of bytes it sent (no scanner is
    // connected then: that is the bridge's traffic).
    let sys = match kind {
        Kind::Bridge => Some(SysCounter::start(p.edge_mqtt, "$SYS/broker/bytes/sent").await?),
        Kind::Backhaul => None,
    };
    let wire_start = match &sys {
        Some(sys) => sys.fresh().await?,
        None => p.relay_batch_bytes().await?,
    };
    let agent_uplink_start = agent_uplink_bytes(&p).await;
    p.proxy.restore();
    let restore_us = unix_us();
    let tracker = p.tracker.clone();
    let mut rss_peak = edge_rss_after_fill_kib;
    wait_drained(&mut p, || {
        if let Ok((rss, _)) = memory_kib(pid) {
            rss_peak = rss_peak.max(rss);
        }
        tracker.backlog()
    })
    .await?;
    let wire_end = match &sys {
        Some(sys) => sys.fresh().await.ok(),
        None => p.relay_batch_bytes().await.ok(),
    };
    let agent_uplink_end = agent_uplink_bytes(&p).await;
    drop(sys);
    let (_, hwm) = memory_kib(pid)?;
    let tally = tracker.tally(Some(restore_us));
    p.stop(kind == Kind::Backhaul && (tally.lost > 0 || tally.duplicated > 0))
        .await?;
    let since_restore = |us: Option<u64>| us.map(|us| us.saturating_sub(restore_us) as f64 / 1e6);
    Ok(Backlog {
        events: report.acked,
        fill_seconds,
        first_line_seconds: since_restore(tally.first_after),
        drain_seconds: since_restore(tally.drained_at),
        tally,
        edge_rss_after_fill_kib,
        edge_rss_peak_kib: hwm.max(rss_peak),
        disk_allocated,
        disk_length,
        wire_bytes: wire_end.map(|end| end.saturating_sub(wire_start)),
        wire_source: match kind {
            Kind::Backhaul => "relay: backhaul_relay_batch_bytes_received_total",
            Kind::Bridge => "site Mosquitto: $SYS/broker/bytes/sent",
        },
        agent_uplink_bytes: agent_uplink_start
            .zip(agent_uplink_end)
            .map(|(a, b)| b.saturating_sub(a)),
    })
}

/// The agent's `backhaul_agent_uplink_bytes_total`, when it is the edge.
async fn agent_uplink_bytes(p: &Pipeline) -> Option<u64> {
    let admin = p.agent_admin?;
    match http_get(admin, "/metrics").await {
        Ok((200, text)) => Some(metric_sum(&text, "backhaul_agent_uplink_bytes_total")),
        _ => None,
    }
}

/// Waits until Mosquitto has saved its store twice since `since` (the end of the fill): the
/// second save began after the fill ended, so it holds the whole backlog. Mosquitto writes
/// `mosquitto.db.new` and renames it, so each save is a new modification time.
async fn wait_autosaved(p: &mut Pipeline, since: std::time::SystemTime) -> anyhow::Result<()> {
    let db = p.edge_state.join("mosquitto.db");
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = None;
    let mut saves = 0;
    loop {
        p.check_running()?;
        if let Ok(modified) = std::fs::metadata(&db).and_then(|m| m.modified())
            && modified > since
            && Some(modified) != last
        {
            last = Some(modified);
            saves += 1;
            if saves >= 2 {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!(
                "Mosquitto did not save {} twice within 300 s of the fill; see {}",
                db.display(),
                p.dir.join("edge-1.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ----- the run, the table and the report -----------------------------------------------------

#[derive(Default)]
struct Results {
    steady: Vec<(Kind, Steady)>,
    peak: Vec<(Kind, Peak)>,
    cut: Vec<(Kind, Cut)>,
    kill: Vec<(Kind, Cut)>,
    backlog: Vec<(Kind, Backlog)>,
}

pub async fn run(options: &BenchOptions, release: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let o = &options.compare;
    let started = Instant::now();
    let dir = out_dir.join("compare");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot clear the previous run's {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    find_mosquitto()?;
    let shipped_path = workspace_root().join("config/agent.toml");
    let setup = Setup {
        agent_bin: binary(release, "backhaul-agent")?,
        relay_bin: binary(release, "backhaul-relay")?,
        shipped_agent: std::fs::read_to_string(&shipped_path)
            .with_context(|| format!("cannot read {}", shipped_path.display()))?,
        dir: dir.clone(),
    };
    let versions = versions(&setup.agent_bin);
    eprintln!(
        "xtask: bench compare: {} against a bridge of {}; scenarios {}",
        versions["backhaul"].as_str().unwrap_or("?"),
        versions["mosquitto"].as_str().unwrap_or("?"),
        o.scenarios.join(", ")
    );
    let mut results = Results::default();
    let wants = |name: &str| o.scenarios.iter().any(|s| s == name);
    for kind in Kind::BOTH {
        if wants("steady") {
            eprintln!(
                "xtask: bench compare: {}: steady {} events/s for {} s",
                kind.name(),
                o.rate,
                o.steady.as_secs_f64()
            );
            let r = steady(kind, &setup, o)
                .await
                .with_context(|| format!("{}: steady load", kind.name()))?;
            results.steady.push((kind, r));
        }
    }
    for kind in Kind::BOTH {
        if wants("peak") {
            eprintln!(
                "xtask: bench compare: {}: peak ingest, {} publishers for {} s",
                kind.name(),
                o.peak_publishers,
                o.peak.as_secs_f64()
            );
            let r = peak(kind, &setup, o)
                .await
                .with_context(|| format!("{}: peak ingest", kind.name()))?;
            results.peak.push((kind, r));
        }
    }
    for kind in Kind::BOTH {
        if wants("cut") {
            eprintln!(
                "xtask: bench compare: {}: link cut for {} s under {} events/s",
                kind.name(),
                o.cut.as_secs_f64(),
                o.rate
            );
            let r = cut(kind, &setup, o, false)
                .await
                .with_context(|| format!("{}: WAN cut", kind.name()))?;
            results.cut.push((kind, r));
        }
    }
    for kind in Kind::BOTH {
        if wants("kill") {
            eprintln!(
                "xtask: bench compare: {}: link cut for {} s, the {} SIGKILLed half-way and restarted",
                kind.name(),
                o.cut.as_secs_f64(),
                kind.edge()
            );
            let r = cut(kind, &setup, o, true)
                .await
                .with_context(|| format!("{}: SIGKILL during a cut", kind.name()))?;
            results.kill.push((kind, r));
        }
    }
    for kind in Kind::BOTH {
        if wants("backlog") {
            eprintln!(
                "xtask: bench compare: {}: a backlog of {} events while cut, then restored",
                kind.name(),
                fmt_rate(o.backlog_events as f64)
            );
            let r = backlog(kind, &setup, o)
                .await
                .with_context(|| format!("{}: backlog", kind.name()))?;
            results.backlog.push((kind, r));
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!("{}", render(&results, o, &versions, elapsed));
    let report = report_json(&results, o, versions, elapsed);
    let json_path = out_dir.join("compare.json");
    let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("results: {}", json_path.display());
    if o.plots {
        super::plots::draw(out_dir, &workspace_root().join("docs/bench"))?;
    }
    let problems = backhaul_problems(&results);
    if !problems.is_empty() {
        bail!(
            "Backhaul lost or duplicated events (its state is kept under {}):\n  {}",
            dir.display(),
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Every loss or duplicate of Backhaul's: each one breaks its promise.
fn backhaul_problems(r: &Results) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |scenario: &str, t: &Tally| {
        if t.lost > 0 {
            out.push(format!(
                "{scenario}: {} acknowledged events not in the ledger, such as {}",
                t.lost,
                t.lost_ids.join(", ")
            ));
        }
        if t.duplicated > 0 {
            out.push(format!(
                "{scenario}: {} events in the ledger more than once, such as {}",
                t.duplicated,
                t.duplicated_ids.join(", ")
            ));
        }
    };
    for (kind, s) in &r.steady {
        if *kind == Kind::Backhaul {
            check("steady", &s.tally);
        }
    }
    for (name, list) in [("cut", &r.cut), ("kill", &r.kill)] {
        for (kind, c) in list {
            if *kind == Kind::Backhaul {
                check(name, &c.tally);
            }
        }
    }
    for (kind, b) in &r.backlog {
        if *kind == Kind::Backhaul {
            check("backlog", &b.tally);
        }
    }
    out
}

/// The versions of what ran: Backhaul, Mosquitto (`mosquitto -h`'s first line), rustc; and the
/// commit, when this is a git checkout.
fn versions(agent: &Path) -> Value {
    let first_line = |command: &mut Command| -> Option<String> {
        let out = command.output().ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
    };
    let backhaul = first_line(Command::new(agent).arg("--version"));
    let mosquitto = find_mosquitto()
        .ok()
        .and_then(|bin| first_line(Command::new(bin).arg("-h")));
    let rustc = first_line(
        Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into())).arg("--version"),
    );
    let commit = first_line(
        Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .current_dir(workspace_root()),
    );
    json!({
        "backhaul": backhaul,
        "mosquitto": mosquitto,
        "rustc": rustc,
        "commit": commit,
    })
}

fn ms(value: Option<f64>) -> String {
    match value {
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn secs(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.1}"))
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn lost_dup(t: &Tally) -> [String; 2] {
    [
        t.lost.to_string(),
        if t.duplicated == 0 {
            "0".into()
        } else {
            format!(
                "{} ({} extra line{})",
                t.duplicated,
                t.extra_lines,
                if t.extra_lines == 1 { "" } else { "s" }
            )
        },
    ]
}

fn render(r: &Results, o: &CompareOptions, versions: &Value, elapsed: f64) -> String {
    let mut out = String::new();
    let v = |key: &str| versions[key].as_str().unwrap_or("?").to_string();
    let _ = writeln!(
        out,
        "\ncompare: {} against a Mosquitto bridge ({}), {} cores, {EVENT_BYTES}-byte v1 pick events \
         (the same events, by sequence number, for both), MQTT 3.1.1 QoS 1 scanners with {SCANNER_WINDOW} in flight",
        v("backhaul"),
        v("mosquitto"),
        cpus()
    );
    let _ = writeln!(
        out,
        "Backhaul: scanners → agent (config/agent.toml as shipped) → link → Mosquitto → relay (config/relay.toml as shipped) → ledger (JSONL, fsynced per delivery)\n\
         Bridge: scanners → site Mosquitto (persistence true, autosave_interval {AUTOSAVE_SECONDS} s, autosave_on_changes false, max_queued_messages {MAX_QUEUED}, max_inflight_messages {MAX_INFLIGHT}; \
         bridge cleansession false, QoS 1, mqttv311, restart_timeout {BRIDGE_RESTART}) → link → Mosquitto → subscriber (QoS 1, persistent session; appends each message, fsyncs each batch read together, then PUBACKs) → ledger\n\
         Every lost or duplicated count is against the ids the scanners got a PUBACK for; the link is a TCP proxy that closes every connection and refuses new ones while cut\n"
    );

    if !r.steady.is_empty() {
        let _ = writeln!(
            out,
            "1. steady {} events/s for {} s\n",
            fmt_rate(o.rate),
            o.steady.as_secs_f64()
        );
        let mut lines = vec![
            [
                "pipeline",
                "events acked",
                "publish → ledger p50 / p99 / max ms",
                "publish → PUBACK p50 / p99 ms",
                "edge CPU s",
                "edge peak RSS MiB",
                "lost",
                "duplicated",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for (kind, s) in &r.steady {
            let [lost, dup] = lost_dup(&s.tally);
            lines.push(vec![
                kind.label().into(),
                s.tally.acked.to_string(),
                format!(
                    "{} / {} / {}",
                    ms(s.tally.latency_ms(0.5)),
                    ms(s.tally.latency_ms(0.99)),
                    ms(s.tally.latency_ms(1.0))
                ),
                format!(
                    "{} / {}",
                    ms(quantile_ms(&s.ack_latency_us, 0.5)),
                    ms(quantile_ms(&s.ack_latency_us, 0.99))
                ),
                format!("{:.2}", s.edge_cpu_seconds),
                mib(s.edge_rss_peak_kib),
                lost,
                dup,
            ]);
        }
        push_table(&mut out, &lines);
        let _ = writeln!(
            out,
            "(publish → ledger: from the publish time each event's id carries to when the ledger follower, polling every {} ms, read its line; edge = {} / {}; CPU over the {} s of load)\n",
            TAIL_POLL.as_millis(),
            Kind::Backhaul.edge(),
            Kind::Bridge.edge(),
            o.steady.as_secs_f64()
        );
    }

    if !r.peak.is_empty() {
        let _ = writeln!(
            out,
            "2. peak acknowledged ingest, {} s after 1 s of warm-up\n",
            o.peak.as_secs_f64()
        );
        let mut lines = vec![
            [
                "pipeline",
                "publishers × in flight",
                "PUBACKs/s",
                "publish → PUBACK p50 / p99 ms",
                "edge CPU %",
                "edge peak RSS MiB",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for (kind, p) in &r.peak {
            lines.push(vec![
                kind.label().into(),
                format!("{} × {}", p.publishers, p.window),
                fmt_rate(p.result.ack_rate()),
                format!(
                    "{} / {}",
                    ms(p.result.ack_latency_ms(0.5)),
                    ms(p.result.ack_latency_ms(0.99))
                ),
                format!(
                    "{:.0}",
                    100.0 * p.edge_cpu_seconds / p.result.measured_secs.max(1e-9)
                ),
                mib(p.edge_rss_peak_kib),
            ]);
        }
        push_table(&mut out, &lines);
        let _ = writeln!(
            out,
            "(a PUBACK from the agent means flushed to disk; from Mosquitto, in its memory, saved within {AUTOSAVE_SECONDS} s)\n"
        );
    }

    for (title, list, kill) in [
        (
            format!(
                "3. link cut for {} s under {} events/s, then restored",
                o.cut.as_secs_f64(),
                fmt_rate(o.rate)
            ),
            &r.cut,
            false,
        ),
        (
            format!(
                "4. link cut for {} s under {} events/s, the edge process SIGKILLed half-way and restarted, then the link restored",
                o.cut.as_secs_f64(),
                fmt_rate(o.rate)
            ),
            &r.kill,
            true,
        ),
    ] {
        if list.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{title}\n");
        let mut header = vec![
            "pipeline",
            "events acked",
            "peak backlog",
            "restore → first line s",
            "restore → drained s",
        ];
        if kill {
            header.extend(["edge restart s", "in ledger, never acked"]);
        }
        header.extend(["lost", "duplicated"]);
        let mut lines = vec![header.into_iter().map(String::from).collect::<Vec<_>>()];
        for (kind, c) in list {
            let [lost, dup] = lost_dup(&c.tally);
            let mut line = vec![
                kind.label().to_string(),
                c.tally.acked.to_string(),
                c.peak_backlog.to_string(),
                secs(c.first_line_seconds),
                if c.tally.lost > 0 {
                    format!("{} (of what arrived)", secs(c.drain_seconds))
                } else {
                    secs(c.drain_seconds)
                },
            ];
            if kill {
                line.push(secs(c.restart_seconds));
                line.push(c.tally.seen_unacked.to_string());
            }
            line.extend([lost, dup]);
            lines.push(line);
        }
        push_table(&mut out, &lines);
        let _ = writeln!(
            out,
            "(backlog = events acknowledged to a scanner and not yet in the ledger, sampled every {} ms; drained = the last event acknowledged before the restore is in the ledger; the scanners keep publishing until then; the first line after the restore waits for each side's reconnect back-off)\n",
            SAMPLE_EVERY.as_millis()
        );
    }

    if !r.backlog.is_empty() {
        let _ = writeln!(
            out,
            "5. a backlog of {} events built while the link is cut, then restored\n",
            fmt_rate(o.backlog_events as f64)
        );
        let mut lines = vec![
            [
                "pipeline",
                "events acked",
                "fill ev/s",
                "restore → first line s",
                "drain ev/s",
                "restore → drained s",
                "edge RSS full / peak MiB",
                "edge disk B/event",
                "uplink B/event",
                "lost",
                "duplicated",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for (kind, b) in &r.backlog {
            let [lost, dup] = lost_dup(&b.tally);
            lines.push(vec![
                kind.label().into(),
                b.events.to_string(),
                fmt_rate(b.events as f64 / b.fill_seconds.max(1e-9)),
                secs(b.first_line_seconds),
                b.drain_rate().map_or_else(|| "-".into(), fmt_rate),
                secs(b.drain_seconds),
                format!(
                    "{} / {}",
                    mib(b.edge_rss_after_fill_kib),
                    mib(b.edge_rss_peak_kib)
                ),
                format!("{:.0}", b.disk_allocated as f64 / b.events.max(1) as f64),
                b.wire_bytes.map_or_else(
                    || "-".into(),
                    |w| format!("{:.0}", w as f64 / b.events.max(1) as f64),
                ),
                lost,
                dup,
            ]);
        }
        push_table(&mut out, &lines);
        let _ = writeln!(
            out,
            "(drain ev/s: from the first ledger line after the restore to the last; edge disk: blocks allocated to the agent's log directory / to Mosquitto's persistence directory once its autosave settled; \
             uplink bytes, during the drain: {}; the agent's frames are compressed batches of events, the bridge's one MQTT PUBLISH per event; acknowledgements coming back are not counted)\n",
            r.backlog
                .iter()
                .map(|(k, b)| format!("{}: {}", k.name(), b.wire_source))
                .collect::<Vec<_>>()
                .join("; "),
        );
    }
    // Without a kill, nothing should have ended a scanner's connection to the agent.
    for (kind, c) in &r.cut {
        if *kind == Kind::Backhaul && !c.scanner_losses.is_empty() {
            let _ = writeln!(
                out,
                "NOTE: {}: the scanner's connection ended during the cut: {}",
                kind.name(),
                c.scanner_losses.join("; ")
            );
        }
    }
    let problems = backhaul_problems(r);
    if problems.is_empty() {
        let _ = writeln!(
            out,
            "Backhaul: nothing acknowledged was lost, nothing duplicated, in any scenario run"
        );
    } else {
        let _ = writeln!(
            out,
            "BACKHAUL BROKE ITS PROMISE:\n  {}",
            problems.join("\n  ")
        );
    }
    let _ = writeln!(out, "bench took {elapsed:.0} s");
    out
}

fn tally_json(t: &Tally) -> Value {
    json!({
        "acked": t.acked,
        "in_ledger": t.seen,
        "ledger_lines": t.lines,
        "lost": t.lost,
        "lost_ids": t.lost_ids,
        "duplicated": t.duplicated,
        "duplicate_extra_lines": t.extra_lines,
        "duplicated_ids": t.duplicated_ids,
        "in_ledger_never_acked": t.seen_unacked,
    })
}

fn latency_json(sorted: &[u32]) -> Value {
    json!({
        "p50": quantile_ms(sorted, 0.5),
        "p99": quantile_ms(sorted, 0.99),
        "max": quantile_ms(sorted, 1.0),
        "samples": sorted.len(),
    })
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

fn report_json(r: &Results, o: &CompareOptions, versions: Value, elapsed: f64) -> Value {
    let by_kind = |rows: Vec<(Kind, Value)>| -> Value {
        rows.into_iter()
            .map(|(k, v)| (k.name().to_string(), v))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let steady = by_kind(
        r.steady
            .iter()
            .map(|(k, s)| {
                (
                    *k,
                    json!({
                        "seconds": s.seconds,
                        "published": s.sent,
                        "events": tally_json(&s.tally),
                        "publish_to_ledger_ms": latency_json(&s.tally.latency_us),
                        "publish_to_puback_ms": latency_json(&s.ack_latency_us),
                        "edge_cpu_seconds": finite(s.edge_cpu_seconds),
                        "edge_peak_rss_kib": s.edge_rss_peak_kib,
                    }),
                )
            })
            .collect(),
    );
    let peak = by_kind(
        r.peak
            .iter()
            .map(|(k, p)| {
                (
                    *k,
                    json!({
                        "publishers": p.publishers,
                        "window_per_publisher": p.window,
                        "acked_per_second": p.result.ack_rate(),
                        "measured_seconds": p.result.measured_secs,
                        "acked_in_window": p.result.acked_in_window,
                        "sent_total": p.result.sent_total,
                        "acked_total": p.result.acked_total,
                        "publish_to_puback_ms": {"p50": p.result.ack_latency_ms(0.5), "p99": p.result.ack_latency_ms(0.99)},
                        "edge_cpu_seconds": finite(p.edge_cpu_seconds),
                        "edge_peak_rss_kib": p.edge_rss_peak_kib,
                    }),
                )
            })
            .collect(),
    );
    let cut_json = |c: &Cut| {
        json!({
            "cut_seconds": c.cut_seconds,
            "published": c.sent,
            "events": tally_json(&c.tally),
            "peak_backlog": c.peak_backlog,
            "restore_to_first_line_seconds": c.first_line_seconds,
            "restore_to_drained_seconds": c.drain_seconds,
            "killed_seconds_into_cut": c.killed_at,
            "edge_restart_seconds": c.restart_seconds,
            "scanner_connection_ended": c.scanner_losses,
            "restore_at_seconds": c.cut_seconds,
            "backlog_series_columns": ["seconds_since_cut", "acked_not_in_ledger"],
            "backlog_series": c.series.iter().map(|(t, b)| json!([(t * 1000.0).round() / 1000.0 + 0.0, b])).collect::<Vec<_>>(),
        })
    };
    let cut = by_kind(r.cut.iter().map(|(k, c)| (*k, cut_json(c))).collect());
    let kill = by_kind(r.kill.iter().map(|(k, c)| (*k, cut_json(c))).collect());
    let backlog = by_kind(
        r.backlog
            .iter()
            .map(|(k, b)| {
                (
                    *k,
                    json!({
                        "events_acked": b.events,
                        "fill_seconds": b.fill_seconds,
                        "fill_events_per_second": b.events as f64 / b.fill_seconds.max(1e-9),
                        "events": tally_json(&b.tally),
                        "restore_to_first_line_seconds": b.first_line_seconds,
                        "restore_to_drained_seconds": b.drain_seconds,
                        "drain_events_per_second": b.drain_rate(),
                        "edge_rss_after_fill_kib": b.edge_rss_after_fill_kib,
                        "edge_peak_rss_kib": b.edge_rss_peak_kib,
                        "edge_disk_allocated_bytes": b.disk_allocated,
                        "edge_disk_file_bytes": b.disk_length,
                        "edge_disk_bytes_per_event": b.disk_allocated as f64 / b.events.max(1) as f64,
                        "uplink_bytes": b.wire_bytes,
                        "uplink_bytes_per_event": b.wire_bytes.map(|w| w as f64 / b.events.max(1) as f64),
                        "uplink_bytes_source": b.wire_source,
                        "agent_uplink_bytes": b.agent_uplink_bytes,
                    }),
                )
            })
            .collect(),
    );
    json!({
        "bench": "compare",
        "unix_time": unix_time(),
        "cpus": cpus(),
        "versions": versions,
        "settings": {
            "event_bytes": EVENT_BYTES,
            "mqtt": "3.1.1",
            "qos": 1,
            "scanner_window": SCANNER_WINDOW,
            "steady_seconds": o.steady.as_secs_f64(),
            "steady_rate": o.rate,
            "peak_seconds": o.peak.as_secs_f64(),
            "peak_publishers": o.peak_publishers,
            "cut_seconds": o.cut.as_secs_f64(),
            "cut_lead_seconds": CUT_LEAD.as_secs_f64(),
            "backlog_events": o.backlog_events,
            "scenarios": o.scenarios,
            "sample_seconds": SAMPLE_EVERY.as_secs_f64(),
            "stall_seconds": STALL.as_secs_f64(),
            "ledger_poll_ms": TAIL_POLL.as_secs_f64() * 1000.0,
            "backhaul": "config/agent.toml and config/relay.toml as shipped (site, paths, ports and the uplink's broker changed), [sink.ledger]",
            "bridge": {
                "persistence": true,
                "autosave_interval_seconds": AUTOSAVE_SECONDS,
                "autosave_on_changes": false,
                "max_queued_messages": MAX_QUEUED,
                "max_inflight_messages": MAX_INFLIGHT,
                "cleansession": false,
                "qos": 1,
                "bridge_protocol_version": "mqttv311",
                "restart_timeout": BRIDGE_RESTART,
                "subscriber": "QoS 1, clean session false; appends each message to the ledger, fsyncs each batch of messages read together, then sends their PUBACKs; no deduplication",
            },
            "cloud_mosquitto": {"persistence": false, "max_queued_messages": MAX_QUEUED, "max_inflight_messages": MAX_INFLIGHT},
        },
        "steady": steady,
        "peak": peak,
        "cut": cut,
        "kill": kill,
        "backlog": backlog,
        "backhaul_problems": backhaul_problems(r),
        "elapsed_seconds": elapsed,
    })
}
