//! `cargo xtask bench drain`: how fast a large backlog leaves an agent that was offline.
//!
//! What it owns: filling an offline agent (its uplink points at a port where nothing listens)
//! with `--drain-events` events over `POST /v1/events`, keeping that log aside, and then one
//! drain per broker — Mosquitto (own config, persistence off) and the relay's embedded broker.
//! Each drain starts a relay with the ledger connector, then the agent again on a copy of the
//! filled log with its uplink pointing at the broker, and watches until the relay's outbox has
//! stored every event (`/v1/sites` → `events_stored`), the agent's backlog is 0 and the ledger
//! holds every event; then it counts the ledger's lines and ids. Memory (VmRSS, VmHWM) and CPU
//! come from `/proc`. The table goes to stdout, the figures to `<target dir>/bench/drain.json`.
//!
//! The agent runs with `config/agent.toml` as shipped (read at run time, so tuning of the
//! shipped defaults shows here), with only its site, paths, ports and — when `--window` or
//! `--batch-events` are given — `uplink.window` / `uplink.batch_max_events` changed.
//!
//! With `--outbox postgres` (and `--relays 1,3`, say) it compares outboxes instead, in one
//! run: every drain then goes through Mosquitto (the embedded broker is one relay's) to relays
//! that deliver over `[sink.http]` to an accept-everything HTTP/1.1 ERP served here (so each row
//! measures the relays and their outbox, with the same connector): a redb row when `redb` is
//! listed, and one row per relay count on PostgreSQL. The relays of a PostgreSQL row share one
//! outbox (a fresh database of a throwaway cluster, see `pg.rs`) and one
//! `broker.shared_group`; "stored" is then the shared site record's `events_stored` as the
//! relays show it, "delivered" its `events_delivered`, and the ERP's distinct
//! `Idempotency-Key`s are checked against the events as the ledger is otherwise.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::loadgen::{EVENT_BYTES, event_json};
use super::openmetrics::{Histogram, http_get, metric_by_label, metric_sum};
use super::pg::{self, BenchPostgres};
use super::{
    AgentAddrs, EVENTS_PER_POST, MOSQUITTO_LOGGING, agent_config, copy_dir, cpus, fill, fmt_rate,
    get_json, ledger_id, mosquitto_version, push_table, quote, relay_config, spawn_agent,
    spawn_relay, start_mosquitto, stop_cleanly, toml_get, toml_remove_section, toml_set, unix_time,
    unix_time_ms, wait_http_ok,
};
use super::{BenchOptions, binary};
use crate::procs::{
    ChildGuard, clock_ticks, cpu_seconds, free_addr, machine_busy_seconds, memory_kib,
    thread_cpu_seconds,
};
use crate::workspace_root;

/// The site of the drained agent.
const SITE: &str = "bench-drain";
/// The targets.
const TARGET_RATE: f64 = 200_000.0;
const TARGET_AGENT_RSS_MIB: f64 = 64.0;
/// The outbox comparison's targets: three relays on PostgreSQL store at least this share of
/// the redb rate, and no relay's resident memory exceeds this, whatever the backlog.
const TARGET_PG3_SHARE_OF_REDB: f64 = 0.5;
const TARGET_RELAY_RSS_MIB: f64 = 128.0;
/// The relay count the PostgreSQL target is about.
const TARGET_PG_RELAYS: usize = 3;
/// More relays than this on 2 cores measures the scheduler.
const MAX_RELAYS: usize = 16;
/// Concurrent `POST /v1/events` while filling, and events per request (the agent's maximum).
const POSTERS: usize = 4;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// A drain that makes no progress for this long is given up (and reported as incomplete).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(50);
/// Seconds between the readings kept in the report's timeline.
const TIMELINE_STEP: f64 = 0.25;
/// Other processes using more than this (percent of one core) during a drain make the table
/// carry a warning.
const NOISY_OTHERS_PERCENT: f64 = 20.0;

/// The broker between agent and relay in one drain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum BrokerKind {
    Mosquitto,
    Embedded,
}

impl BrokerKind {
    fn name(self) -> &'static str {
        match self {
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Embedded => "embedded (rumqttd)",
        }
    }
}

/// Where the relays of a drain keep their outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
enum OutboxKind {
    Redb,
    Postgres,
}

impl OutboxKind {
    fn name(self) -> &'static str {
        match self {
            OutboxKind::Redb => "redb",
            OutboxKind::Postgres => "postgres",
        }
    }
}

/// The connector of a drain's relays.
#[derive(Debug, Clone, Copy, PartialEq)]
enum SinkKind {
    /// `[sink.ledger]`, a JSONL file: one relay's.
    Ledger,
    /// `[sink.http]` to the accept-everything ERP of this module.
    Http,
}

/// One drain: its broker, outbox, number of relays and connector.
#[derive(Debug, Clone, Copy)]
struct Case {
    broker: BrokerKind,
    outbox: OutboxKind,
    relays: usize,
    sink: SinkKind,
}

impl Case {
    /// The drain's directory under `drain/` (and its database's name).
    fn tag(&self) -> String {
        match (self.sink, self.broker) {
            (SinkKind::Ledger, BrokerKind::Mosquitto) => "mosquitto".into(),
            (SinkKind::Ledger, BrokerKind::Embedded) => "embedded".into(),
            (SinkKind::Http, _) => format!("{}-{}", self.outbox.name(), self.relays),
        }
    }

    /// The drain's name in the tables.
    fn label(&self) -> String {
        match self.sink {
            SinkKind::Ledger => self.broker.name().to_string(),
            SinkKind::Http => format!("{} × {}", self.outbox.name(), self.relays),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} relay{} on {}, through {}, to the {}",
            self.relays,
            if self.relays == 1 { "" } else { "s" },
            self.outbox.name(),
            self.broker.name(),
            match self.sink {
                SinkKind::Ledger => "ledger",
                SinkKind::Http => "stand-in HTTP ERP",
            }
        )
    }
}

/// Which drains `--outbox` and `--relays` ask for; `None` for the broker comparison (the
/// default: one redb relay, no PostgreSQL).
fn outbox_cases(options: &BenchOptions) -> anyhow::Result<Option<Vec<Case>>> {
    if options.outbox.is_empty() {
        bail!("--outbox needs at least one of redb, postgres");
    }
    let mut redb = false;
    let mut postgres = false;
    for name in &options.outbox {
        match name.as_str() {
            "redb" => redb = true,
            "postgres" => postgres = true,
            other => bail!("--outbox {other:?}: expected redb or postgres"),
        }
    }
    if options.relays.is_empty() || options.relays.iter().any(|n| !(1..=MAX_RELAYS).contains(n)) {
        bail!("--relays needs counts from 1 to {MAX_RELAYS}, such as 1,3");
    }
    if !postgres {
        if options.relays.iter().any(|n| *n > 1) {
            bail!("--relays above 1 needs --outbox postgres: a redb outbox is one relay's file");
        }
        return Ok(None);
    }
    let mut cases = Vec::new();
    let http = |outbox, relays| Case {
        broker: BrokerKind::Mosquitto,
        outbox,
        relays,
        sink: SinkKind::Http,
    };
    if redb {
        cases.push(http(OutboxKind::Redb, 1));
    }
    let mut counts = options.relays.clone();
    counts.dedup();
    for n in counts {
        cases.push(http(OutboxKind::Postgres, n));
    }
    Ok(Some(cases))
}

/// Fails early, before anything is built, on `--outbox` / `--relays` the drain cannot run.
pub fn check_options(options: &BenchOptions) -> anyhow::Result<()> {
    outbox_cases(options).map(|_| ())
}

/// The agent's uplink settings a drain ran with.
#[derive(Debug, Clone)]
struct Uplink {
    protocol: String,
    window: usize,
    batch_max_events: usize,
    batch_max_bytes: String,
    linger_ms: String,
    /// Which of them came from flags rather than config/agent.toml.
    overridden: Vec<&'static str>,
}

/// Elapsed seconds since the agent was started again, when each milestone was first seen.
#[derive(Debug, Default, Clone)]
struct Milestones {
    agent_http: Option<f64>,
    link_up: Option<f64>,
    outbox_all: Option<f64>,
    backlog_zero: Option<f64>,
    /// The agent's first log compaction after its start-up (it compacts when the file is
    /// mostly free space).
    compaction: Option<f64>,
    ledger_all: Option<f64>,
}

struct Row {
    case: Case,
    events: u64,
    at: Milestones,
    /// Agent VmRSS when its link was first seen up (the drain's start), KiB.
    agent_rss_at_link_up_kib: Option<u64>,
    agent_rss_first_kib: Option<u64>,
    agent_rss_max_sampled_kib: u64,
    agent_hwm_kib: u64,
    relay_hwm_kib: u64,
    relay_rss_max_sampled_kib: u64,
    mosquitto_hwm_kib: Option<u64>,
    /// CPU seconds over the drain (agent start → last milestone).
    cpu_agent: f64,
    cpu_relay: f64,
    cpu_mosquitto: Option<f64>,
    cpu_others: f64,
    /// This process: the polling, and in the outbox comparison the stand-in ERP.
    cpu_own: f64,
    drain_secs: f64,
    agent_threads: Vec<(String, f64)>,
    relay_threads: Vec<(String, f64)>,
    stored_final: u64,
    delivered_final: u64,
    backlog_final: Option<u64>,
    batches_resent: Option<u64>,
    /// Log compactions the agent counted: at its first answer, and at the end.
    compactions: (Option<u64>, Option<u64>),
    ledger_lines: u64,
    ledger_distinct_ids: u64,
    per_relay: Vec<RelayStats>,
    postgres: Option<PgStats>,
    erp: Option<ErpCounts>,
    errors: Vec<String>,
    timeline: Vec<Sample>,
}

/// One relay of a drain.
struct RelayStats {
    hwm_kib: u64,
    rss_max_sampled_kib: u64,
    /// CPU seconds over the drain.
    cpu: f64,
    intake: Intake,
}

/// A relay's intake, from its `/metrics` at the end of the drain.
#[derive(Debug, Clone, Default)]
struct Intake {
    batches_received: u64,
    events_received: u64,
    /// Bytes of batch frames as they came off the broker (compressed and signed).
    batch_bytes_received: u64,
    events_duplicate: u64,
    /// Batches refused, by reason (a `gap`: an earlier batch of the site was not stored yet).
    refused: BTreeMap<String, u64>,
    ack_latency_mean_s: Option<f64>,
    ack_latency_p99_s: Option<f64>,
}

impl Intake {
    fn read(text: &str) -> Intake {
        let latency = Histogram::parse(text, "backhaul_relay_ack_latency_seconds").ok();
        Intake {
            batches_received: metric_sum(text, "backhaul_relay_batches_received_total"),
            events_received: metric_sum(text, "backhaul_relay_events_received_total"),
            batch_bytes_received: metric_sum(text, "backhaul_relay_batch_bytes_received_total"),
            events_duplicate: metric_sum(text, "backhaul_relay_events_duplicate_total"),
            refused: metric_by_label(text, "backhaul_relay_batches_refused_total", "reason"),
            ack_latency_mean_s: latency.as_ref().and_then(Histogram::mean),
            ack_latency_p99_s: latency.as_ref().and_then(|h| h.quantile(0.99)),
        }
    }

    /// Bytes on the uplink per event received, re-sends included.
    fn wire_bytes_per_event(&self) -> Option<f64> {
        (self.events_received > 0)
            .then(|| self.batch_bytes_received as f64 / self.events_received as f64)
    }

    fn gaps(&self) -> u64 {
        self.refused.get("gap").copied().unwrap_or(0)
    }
}

/// The PostgreSQL server over a drain, and its database after it.
struct PgStats {
    /// CPU seconds of every server process over the drain.
    cpu: f64,
    /// Largest PSS of all server processes together, sampled.
    pss_max_kib: u64,
    event_ids: Option<u64>,
    /// Events left in `backhaul.events` and staged (0 when everything was delivered).
    events_left: Option<u64>,
    database_bytes: Option<u64>,
    /// WAL written during the drain (and the relays' start-up), bytes.
    wal_bytes: Option<u64>,
    commits: Option<u64>,
    rollbacks: Option<u64>,
    deadlocks: Option<u64>,
}

/// One reading of the drain's progress, for the JSON report.
struct Sample {
    t: f64,
    stored: u64,
    delivered: u64,
    backlog: Option<u64>,
    agent_rss_kib: Option<u64>,
    /// The largest relay's.
    relay_rss_kib: Option<u64>,
    pg_pss_kib: Option<u64>,
}

impl Row {
    fn rate_from_start(&self) -> Option<f64> {
        self.at.outbox_all.map(|t| self.events as f64 / t.max(1e-9))
    }

    fn rate_from_link_up(&self) -> Option<f64> {
        match (self.at.outbox_all, self.at.link_up) {
            (Some(all), Some(up)) => Some(self.events as f64 / (all - up).max(1e-9)),
            _ => None,
        }
    }

    /// Outbox rates over the first and the last quarter of the events (from the timeline):
    /// whether the drain slows down as the relay's outbox fills.
    fn quarter_rates(&self) -> Option<(f64, f64)> {
        let start = self.at.link_up?;
        let end = self.at.outbox_all?;
        let quarter = self.events / 4;
        let first = self.timeline.iter().find(|s| s.stored >= quarter)?;
        let last = self
            .timeline
            .iter()
            .find(|s| s.stored >= self.events - quarter)?;
        let early = first.stored as f64 / (first.t - start).max(1e-9);
        let late = (self.events - last.stored) as f64 / (end - last.t);
        (end > last.t).then_some((early, late))
    }

    fn delivered_rate_from_link_up(&self) -> Option<f64> {
        match (self.at.ledger_all, self.at.link_up) {
            (Some(all), Some(up)) => Some(self.events as f64 / (all - up).max(1e-9)),
            _ => None,
        }
    }

    fn complete(&self) -> bool {
        self.errors.is_empty()
    }
}

pub async fn run(options: &BenchOptions, release: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let events = options.drain_events;
    if events == 0 {
        bail!("--drain-events must be at least 1");
    }
    let outbox_cases = outbox_cases(options)?;
    let dir = out_dir.join("drain");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot clear the previous run's {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let shipped_path = workspace_root().join("config/agent.toml");
    let shipped = std::fs::read_to_string(&shipped_path)
        .with_context(|| format!("cannot read {}", shipped_path.display()))?;
    let uplink = uplink_settings(&shipped, options)?;
    let mut overrides = vec![("window", uplink.window.to_string())];
    overrides.push(("batch_max_events", uplink.batch_max_events.to_string()));
    overrides.push(("protocol", quote(&uplink.protocol)));
    let agent_bin = binary(release, "backhaul-agent")?;
    let relay_bin = binary(release, "backhaul-relay")?;
    eprintln!(
        "xtask: bench drain: {events} events of {EVENT_BYTES} bytes, uplink MQTT {}, window {} × batch_max_events {} (batch_max_bytes {}, linger_ms {}{})",
        uplink.protocol,
        uplink.window,
        uplink.batch_max_events,
        uplink.batch_max_bytes,
        uplink.linger_ms,
        if uplink.overridden.is_empty() {
            ", as in config/agent.toml".to_string()
        } else {
            format!(", {} from flags", uplink.overridden.join(" and "))
        }
    );

    // Fill an offline agent once; each drain runs on a copy of its log.
    let filled = dir.join("filled-state");
    let fill_secs = {
        let nowhere = free_addr()?; // nothing listens there
        let addrs = AgentAddrs::free()?;
        let http = addrs.http;
        let config = dir.join("agent-fill.toml");
        let text = agent_config(&shipped, SITE, &filled, addrs, nowhere.port(), &overrides)?;
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let log = dir.join("agent-fill.log");
        let mut agent = spawn_agent(&agent_bin, &config, &log)?;
        wait_http_ok(&mut agent, http, "/readyz", &log, STARTUP_TIMEOUT).await?;
        eprintln!(
            "xtask: bench drain: filling the offline agent (pid {}) over HTTP, {POSTERS} posters × {EVENTS_PER_POST} events per request",
            agent.pid()
        );
        let make: Arc<dyn Fn(u64) -> String + Send + Sync> =
            Arc::new(|i| event_json(&format!("drain-{i:08}"), "bench-wms", i));
        let fill_started = Instant::now();
        fill(http, events, POSTERS, make).await?;
        let fill_secs = fill_started.elapsed().as_secs_f64();
        let status = get_json(addrs.admin, "/v1/status").await?;
        let backlog = status["backlog"]["events"]
            .as_u64()
            .with_context(|| format!("/v1/status has no backlog.events: {status}"))?;
        if backlog != events {
            bail!("the filled agent's backlog holds {backlog} events, {events} were accepted");
        }
        stop_cleanly(&mut agent, "the filling agent", &log)?;
        eprintln!(
            "xtask: bench drain: filled in {fill_secs:.1} s ({:.0} events/s over HTTP)",
            events as f64 / fill_secs
        );
        fill_secs
    };

    let cases: Vec<Case> = match &outbox_cases {
        Some(cases) => cases.clone(),
        None => {
            let ledger = |broker| Case {
                broker,
                outbox: OutboxKind::Redb,
                relays: 1,
                sink: SinkKind::Ledger,
            };
            if uplink.protocol == "5" {
                eprintln!(
                    "xtask: bench drain: MQTT 5 drains through Mosquitto only: the relay's embedded broker speaks 3.1.1"
                );
                vec![ledger(BrokerKind::Mosquitto)]
            } else {
                vec![ledger(BrokerKind::Mosquitto), ledger(BrokerKind::Embedded)]
            }
        }
    };
    let mut pg = if cases.iter().any(|c| c.outbox == OutboxKind::Postgres) {
        let pg_dir = dir.join("postgres");
        let server = BenchPostgres::start(&pg_dir)
            .await
            .context("the benchmark's PostgreSQL")?;
        eprintln!(
            "xtask: bench drain: PostgreSQL {} (pid {}) in {}",
            pg::version(),
            server.pid(),
            pg_dir.display()
        );
        Some(server)
    } else {
        None
    };
    let pg_settings = pg.as_ref().map(|pg| {
        json!({
            "version": pg::version(),
            "fsync": pg.show("fsync"),
            "synchronous_commit": pg.show("synchronous_commit"),
            "full_page_writes": pg.show("full_page_writes"),
            "wal_level": pg.show("wal_level"),
            "shared_buffers": pg.show("shared_buffers"),
            "max_wal_size": pg.show("max_wal_size"),
            "checkpoint_timeout": pg.show("checkpoint_timeout"),
            "database": "a new one per drain, dropped after it",
        })
    });
    let setup = Setup {
        events,
        dir: &dir,
        filled: &filled,
        shipped: &shipped,
        overrides: &overrides,
        agent_bin: &agent_bin,
        relay_bin: &relay_bin,
    };
    let mut rows = Vec::new();
    for case in cases {
        let server = match case.outbox {
            OutboxKind::Postgres => pg.as_mut(),
            OutboxKind::Redb => None,
        };
        let row = drain_once(case, &setup, server)
            .await
            .with_context(|| format!("the drain of {}", case.describe()))?;
        rows.push(row);
    }
    let _ = std::fs::remove_dir_all(&filled);
    if let Some(server) = pg.take() {
        server.stop_and_remove()?;
    }

    let elapsed = started.elapsed().as_secs_f64();
    let table = match &outbox_cases {
        Some(_) => render_outboxes(
            &rows,
            &uplink,
            fill_secs,
            events,
            elapsed,
            pg_settings.as_ref(),
        ),
        None => render(&rows, &uplink, fill_secs, events, elapsed),
    };
    println!("{table}");
    let relay_setting = match &outbox_cases {
        Some(_) => json!(
            "config/relay.toml as shipped, [sink.http] to the bench's accept-everything HTTP/1.1 ERP in place of [sink.ledger], delivery.rate_per_sec and delivery.burst lifted to 1000000; on PostgreSQL outbox.backend = \"postgres\", outbox.url, broker.shared_group and a broker.client_id per relay; every drain through Mosquitto"
        ),
        None => json!("config/relay.toml as shipped, [sink.ledger]"),
    };
    let mut targets =
        json!({"outbox_events_per_second": TARGET_RATE, "agent_rss_mib": TARGET_AGENT_RSS_MIB});
    if outbox_cases.is_some() {
        targets["postgres_relays"] = json!(TARGET_PG_RELAYS);
        targets["postgres_share_of_redb_stored_rate"] = json!(TARGET_PG3_SHARE_OF_REDB);
        targets["relay_rss_mib"] = json!(TARGET_RELAY_RSS_MIB);
        targets["postgres_share_met"] = json!(pg_target(&rows).map(|(_, _, met)| met));
        targets["relay_rss_met"] = json!(rows.iter().all(relay_rss_met));
    }
    let report = json!({
        "bench": "drain",
        "unix_time": unix_time(),
        "cpus": cpus(),
        "settings": {
            "events": events,
            "event_bytes": EVENT_BYTES,
            "uplink": {
                "protocol": uplink.protocol,
                "window": uplink.window,
                "batch_max_events": uplink.batch_max_events,
                "batch_max_bytes": uplink.batch_max_bytes,
                "linger_ms": uplink.linger_ms,
                "from_flags": uplink.overridden,
                "config": "config/agent.toml as shipped otherwise",
            },
            "mosquitto": {"version": mosquitto_version(), "persistence": false, "max_inflight_messages": 1000, "max_queued_messages": 1_000_000, "message_size_limit": 0},
            "relay": relay_setting,
            "postgres": pg_settings,
        },
        "fill": {"seconds": fill_secs, "events_per_second": events as f64 / fill_secs, "posters": POSTERS, "events_per_request": EVENTS_PER_POST},
        "targets": targets,
        "runs": rows.iter().map(row_json).collect::<Vec<_>>(),
        "elapsed_seconds": elapsed,
        "ok": rows.iter().all(Row::complete),
    });
    let json_path = out_dir.join("drain.json");
    let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("results: {}", json_path.display());
    let errors: Vec<String> = rows
        .iter()
        .flat_map(|r| r.errors.iter().map(|e| format!("{}: {e}", r.case.label())))
        .collect();
    if !errors.is_empty() {
        bail!("the drain did not complete:\n  {}", errors.join("\n  "));
    }
    Ok(())
}

fn uplink_settings(shipped: &str, options: &BenchOptions) -> anyhow::Result<Uplink> {
    let read = |key: &str| {
        toml_get(shipped, "uplink", key)
            .with_context(|| format!("config/agent.toml has no uplink.{key}"))
    };
    let number = |key: &str| -> anyhow::Result<usize> {
        let text = read(key)?;
        text.parse()
            .with_context(|| format!("config/agent.toml: uplink.{key} = {text} is not a count"))
    };
    let mut overridden = Vec::new();
    let window = match options.window {
        Some(w) => {
            overridden.push("window");
            w
        }
        None => number("window")?,
    };
    let batch_max_events = match options.batch_events {
        Some(b) => {
            overridden.push("batch_max_events");
            b
        }
        None => number("batch_max_events")?,
    };
    let protocol = match &options.protocol {
        Some(p) => {
            overridden.push("protocol");
            p.clone()
        }
        None => read("protocol")?.trim_matches('"').to_string(),
    };
    Ok(Uplink {
        protocol,
        window,
        batch_max_events,
        batch_max_bytes: read("batch_max_bytes")?.trim_matches('"').to_string(),
        linger_ms: read("linger_ms")?,
        overridden,
    })
}

/// What every drain shares: the filled log, the shipped agent config and the binaries.
struct Setup<'a> {
    events: u64,
    dir: &'a Path,
    filled: &'a Path,
    shipped: &'a str,
    overrides: &'a [(&'a str, String)],
    agent_bin: &'a Path,
    relay_bin: &'a Path,
}

/// A relay of a drain.
struct RelayProc {
    guard: ChildGuard,
    admin: SocketAddr,
    log: PathBuf,
}

/// Where a drain's relays deliver.
enum SinkTarget {
    Ledger(PathBuf),
    Http(NullErp),
}

/// `relay.toml`, or `relay-2.toml` when a drain runs several relays.
fn numbered(base: &str, ext: &str, i: usize, of: usize) -> String {
    if of == 1 {
        format!("{base}{ext}")
    } else {
        format!("{base}-{i}{ext}")
    }
}

async fn drain_once(
    case: Case,
    setup: &Setup<'_>,
    mut pg: Option<&mut BenchPostgres>,
) -> anyhow::Result<Row> {
    let events = setup.events;
    let run_dir = setup.dir.join(case.tag());
    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("cannot create {}", run_dir.display()))?;
    let agent_state = run_dir.join("agent-state");
    copy_dir(setup.filled, &agent_state)?;
    let ticks = clock_ticks();

    // The broker.
    let broker_addr = free_addr()?;
    let mut mosquitto = match case.broker {
        BrokerKind::Mosquitto => Some(
            start_mosquitto(
                &run_dir,
                "mosquitto",
                "drain",
                broker_addr,
                &format!(
                    "allow_anonymous true\n\
                     persistence false\n\
                     max_inflight_messages 1000\n\
                     max_queued_messages 1000000\n\
                     message_size_limit 0\n\
                     {MOSQUITTO_LOGGING}"
                ),
            )
            .await?,
        ),
        BrokerKind::Embedded => None,
    };

    // Where the relays deliver, and where they keep the outbox.
    let sink = match case.sink {
        SinkKind::Ledger => SinkTarget::Ledger(run_dir.join("ledger.jsonl")),
        SinkKind::Http => SinkTarget::Http(NullErp::start(events).await?),
    };
    let database = format!("backhaul_{}", case.tag().replace('-', "_"));
    let outbox_url = match (case.outbox, pg.as_deref_mut()) {
        (OutboxKind::Redb, _) => None,
        (OutboxKind::Postgres, Some(pg)) => {
            pg.check_running()?;
            pg.psql("postgres", &format!("CREATE DATABASE {database}"))?;
            Some(pg.url(&database))
        }
        (OutboxKind::Postgres, None) => bail!("a PostgreSQL drain without its server"),
    };

    // The relays, one after the other, so that only the first applies the schema.
    let mut relays = Vec::with_capacity(case.relays);
    for i in 1..=case.relays {
        let admin = free_addr()?;
        let state = run_dir.join(numbered("relay", "-state", i, case.relays));
        let mut text = relay_config(
            &state,
            broker_addr,
            case.broker == BrokerKind::Embedded,
            admin,
        )?;
        text = match &sink {
            SinkTarget::Ledger(path) => toml_set(
                &text,
                "sink.ledger",
                "path",
                &quote(&path.display().to_string()),
            )?,
            SinkTarget::Http(erp) => {
                let mut text = toml_remove_section(&text, "sink.ledger")?;
                text.push_str(&format!("\n[sink.http]\nurl = {}\n", quote(&erp.url())));
                // The stand-in ERP answers at once; the shipped rate limit (sized for a real
                // ERP) would measure itself rather than the outbox.
                text = toml_set(&text, "delivery", "rate_per_sec", "1000000.0")?;
                toml_set(&text, "delivery", "burst", "1000000")?
            }
        };
        if let Some(url) = &outbox_url {
            text = toml_set(&text, "outbox", "backend", &quote("postgres"))?;
            text = toml_set(&text, "outbox", "url", &quote(url))?;
            text = toml_set(&text, "broker", "shared_group", &quote("bench-drain"))?;
            text = toml_set(
                &text,
                "broker",
                "client_id",
                &quote(&format!("bench-relay-{i}")),
            )?;
        }
        let config = run_dir.join(numbered("relay", ".toml", i, case.relays));
        std::fs::write(&config, text)
            .with_context(|| format!("cannot write {}", config.display()))?;
        let log = run_dir.join(numbered("relay", ".log", i, case.relays));
        let mut guard = spawn_relay(setup.relay_bin, &config, &log)?;
        wait_http_ok(&mut guard, admin, "/readyz", &log, STARTUP_TIMEOUT)
            .await
            .with_context(|| format!("relay {i} did not connect to its broker and outbox"))?;
        relays.push(RelayProc { guard, admin, log });
    }

    // The agent again, on a copy of the filled log, its link now restored.
    let addrs = AgentAddrs::free()?;
    let agent_config_path = run_dir.join("agent.toml");
    let text = agent_config(
        setup.shipped,
        SITE,
        &agent_state,
        addrs,
        broker_addr.port(),
        setup.overrides,
    )?;
    std::fs::write(&agent_config_path, text)
        .with_context(|| format!("cannot write {}", agent_config_path.display()))?;
    let agent_log = run_dir.join("agent.log");
    let relay_pids: Vec<u32> = relays.iter().map(|r| r.guard.pid()).collect();
    eprintln!(
        "xtask: bench drain: draining {events} events, {} (relay pids {relay_pids:?})",
        case.describe(),
    );
    let pg_wal_start = match pg.as_deref() {
        Some(pg) => wal_bytes(pg),
        None => None,
    };
    let machine_start = machine_busy_seconds(ticks)?;
    let relay_cpu_start: Vec<f64> = relay_pids
        .iter()
        .map(|pid| cpu_seconds(*pid, ticks))
        .collect::<anyhow::Result<_>>()?;
    let relay_threads_start = summed_threads(&relay_pids, ticks)?;
    let mosquitto_cpu_start = match &mosquitto {
        Some(m) => Some(cpu_seconds(m.pid(), ticks)?),
        None => None,
    };
    let pg_cpu_start = match pg.as_deref() {
        Some(pg) => Some(pg.cpu_seconds(ticks)?),
        None => None,
    };
    let own_start = cpu_seconds(0, ticks)?;
    let t0 = Instant::now();
    let t0_unix_ms = unix_time_ms();
    let mut agent = spawn_agent(setup.agent_bin, &agent_config_path, &agent_log)?;
    let agent_pid = agent.pid();

    let mut at = Milestones::default();
    let mut agent_rss_first = None;
    let mut agent_rss_at_link_up = None;
    let mut agent_rss_max = 0u64;
    let mut relay_rss_max = vec![0u64; relays.len()];
    let mut pg_pss_max = 0u64;
    let mut stored = 0u64;
    let mut delivered = 0u64;
    let mut backlog: Option<u64> = None;
    let mut batches_resent = None;
    let mut compactions: (Option<u64>, Option<u64>) = (None, None);
    let mut progress = (0u64, 0u64, u64::MAX);
    let mut progressed_at = Instant::now();
    let mut errors = Vec::new();
    let mut timeline: Vec<Sample> = Vec::new();
    // Agent CPU is read on every poll, so that the last reading before it stops counts.
    let mut cpu_agent = 0.0;
    let mut agent_threads_last = BTreeMap::new();
    let admins: Vec<SocketAddr> = relays.iter().map(|r| r.admin).collect();
    loop {
        agent.check_running()?;
        for relay in &mut relays {
            relay.guard.check_running()?;
        }
        if let Some(m) = mosquitto.as_mut() {
            m.check_running()?;
        }
        if let Some(pg) = pg.as_deref_mut() {
            pg.check_running()?;
        }
        let now = t0.elapsed().as_secs_f64();
        let (agent_status, relay_sites) = tokio::join!(
            get_json(addrs.admin, "/v1/status"),
            get_json_all(&admins, "/v1/sites")
        );
        let agent_rss = memory_kib(agent_pid).ok().map(|(rss, _)| rss);
        if let Some(rss) = agent_rss {
            agent_rss_max = agent_rss_max.max(rss);
            if agent_status.is_ok() && agent_rss_first.is_none() {
                agent_rss_first = Some(rss);
            }
        }
        let mut relay_rss = None;
        for (max, pid) in relay_rss_max.iter_mut().zip(&relay_pids) {
            if let Ok((rss, _)) = memory_kib(*pid) {
                *max = (*max).max(rss);
                relay_rss = Some(relay_rss.unwrap_or(0).max(rss));
            }
        }
        if let Ok(cpu) = cpu_seconds(agent_pid, ticks) {
            cpu_agent = cpu;
        }
        if let Ok(threads) = thread_cpu_seconds(agent_pid, ticks) {
            agent_threads_last = threads;
        }
        if let Ok(status) = &agent_status {
            at.agent_http.get_or_insert(now);
            backlog = status["backlog"]["events"].as_u64();
            batches_resent = status["link"]["batches_resent"].as_u64();
            if let Some(count) = status["log"]["compactions"].as_u64() {
                let first = *compactions.0.get_or_insert(count);
                if count > first {
                    at.compaction.get_or_insert(now);
                }
                compactions.1 = Some(count);
            }
            if status["link"]["state"].as_str() == Some("up") && at.link_up.is_none() {
                // The agent stamps the change (Unix ms): finer than this poll.
                let since = status["link"]["since_ms"]
                    .as_i64()
                    .map(|ms| (ms - t0_unix_ms) as f64 / 1000.0)
                    .filter(|t| (0.0..=now).contains(t));
                at.link_up = Some(since.unwrap_or(now));
                agent_rss_at_link_up = memory_kib(agent_pid).ok().map(|(rss, _)| rss);
            }
        }
        // PostgreSQL relays all show the shared site record, each from its own snapshot of
        // it: the furthest one is the newest.
        for sites in relay_sites.iter().flatten() {
            if let Some(site) = sites["sites"]
                .as_array()
                .and_then(|list| list.iter().find(|s| s["site"].as_str() == Some(SITE)))
            {
                stored = stored.max(site["events_stored"].as_u64().unwrap_or(0));
                delivered = delivered.max(site["events_delivered"].as_u64().unwrap_or(0));
            }
        }
        if timeline
            .last()
            .is_none_or(|last: &Sample| now - last.t >= TIMELINE_STEP)
        {
            // Read at the timeline's pace only: it walks the page tables of every backend.
            let pg_pss = pg.as_deref().and_then(|pg| pg.pss_kib().ok());
            if let Some(pss) = pg_pss {
                pg_pss_max = pg_pss_max.max(pss);
            }
            timeline.push(Sample {
                t: now,
                stored,
                delivered,
                backlog,
                agent_rss_kib: agent_rss,
                relay_rss_kib: relay_rss,
                pg_pss_kib: pg_pss,
            });
        }
        if stored >= events {
            at.outbox_all.get_or_insert(now);
        }
        if backlog == Some(0) {
            at.backlog_zero.get_or_insert(now);
        }
        if delivered >= events {
            at.ledger_all.get_or_insert(now);
        }
        if at.outbox_all.is_some() && at.backlog_zero.is_some() && at.ledger_all.is_some() {
            break;
        }
        let seen = (stored, delivered, backlog.unwrap_or(u64::MAX));
        if seen != progress {
            progress = seen;
            progressed_at = Instant::now();
        } else if progressed_at.elapsed() > STALL_TIMEOUT {
            errors.push(format!(
                "no progress for {STALL_TIMEOUT:?}: outbox stored {stored}, delivered {delivered}, agent backlog {backlog:?} of {events}"
            ));
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    let drain_secs = t0.elapsed().as_secs_f64();
    let mut per_relay = Vec::with_capacity(relays.len());
    for ((pid, start), sampled) in relay_pids.iter().zip(&relay_cpu_start).zip(&relay_rss_max) {
        let cpu = cpu_seconds(*pid, ticks)? - start;
        let (rss_now, hwm_kib) = memory_kib(*pid)?;
        per_relay.push(RelayStats {
            hwm_kib,
            rss_max_sampled_kib: (*sampled).max(rss_now),
            cpu,
            intake: Intake::default(),
        });
    }
    let relay_threads_end = summed_threads(&relay_pids, ticks)?;
    let cpu_mosquitto = match (&mosquitto, mosquitto_cpu_start) {
        (Some(m), Some(start)) => Some(cpu_seconds(m.pid(), ticks)? - start),
        _ => None,
    };
    let cpu_pg = match (pg.as_deref(), pg_cpu_start) {
        (Some(pg), Some(start)) => Some(pg.cpu_seconds(ticks)? - start),
        _ => None,
    };
    let cpu_own = cpu_seconds(0, ticks)? - own_start;
    let machine = machine_busy_seconds(ticks)? - machine_start;
    let (_, agent_hwm_kib) = memory_kib(agent_pid)?;
    let mosquitto_hwm_kib = match &mosquitto {
        Some(m) => Some(memory_kib(m.pid())?.1),
        None => None,
    };
    let cpu_relay: f64 = per_relay.iter().map(|r| r.cpu).sum();
    let cpu_others = (machine
        - cpu_agent
        - cpu_relay
        - cpu_mosquitto.unwrap_or(0.0)
        - cpu_pg.unwrap_or(0.0)
        - cpu_own)
        .max(0.0);
    // What each relay's intake went through: refusals (gaps) explain a slow shared intake.
    for (stats, admin) in per_relay.iter_mut().zip(&admins) {
        if let Ok((200, text)) = http_get(*admin, "/metrics").await {
            stats.intake = Intake::read(&text);
        }
    }

    stop_cleanly(&mut agent, "the agent", &agent_log)?;
    for (i, relay) in relays.iter_mut().enumerate() {
        stop_cleanly(&mut relay.guard, &format!("relay {}", i + 1), &relay.log)?;
    }
    if let Some(m) = mosquitto.as_mut() {
        let _ = tokio::task::block_in_place(|| m.terminate(Duration::from_secs(5)));
    }

    let mut ledger = None;
    let mut erp = None;
    match &sink {
        SinkTarget::Ledger(path) => {
            let (lines, ids) = tokio::task::block_in_place(|| read_ledger(path))?;
            if errors.is_empty() && (lines != events || ids != events) {
                errors.push(format!(
                    "the ledger holds {lines} lines with {ids} distinct ids; expected {events} of each"
                ));
            }
            ledger = Some((lines, ids));
        }
        SinkTarget::Http(server) => {
            let counts = server.counts();
            if errors.is_empty() && (counts.distinct != events || counts.unknown != 0) {
                errors.push(format!(
                    "the ERP was posted {} distinct event ids of {events} (and {} requests without a known id)",
                    counts.distinct, counts.unknown
                ));
            }
            erp = Some(counts);
        }
    }
    let postgres = match pg.as_deref() {
        Some(pg) => {
            let stats = pg_stats(
                pg,
                &database,
                cpu_pg.unwrap_or(0.0),
                pg_pss_max,
                pg_wal_start,
            );
            if errors.is_empty() && stats.event_ids.is_some_and(|n| n != events) {
                errors.push(format!(
                    "backhaul.event_ids holds {:?} ids; expected {events}",
                    stats.event_ids
                ));
            }
            // The next drain starts on a database server with no other work: no autovacuum
            // of this run's deleted rows, no checkpoint of its writes still due.
            if let Err(e) = pg
                .psql("postgres", &format!("DROP DATABASE {database}"))
                .and_then(|_| pg.psql("postgres", "CHECKPOINT"))
            {
                eprintln!("xtask: bench drain: cleaning up after the drain: {e:#}");
            }
            Some(stats)
        }
        None => None,
    };
    // Keep the configs and process logs; the logs of events are big and of no further use.
    let mut big = vec![agent_state];
    big.extend(
        (1..=case.relays).map(|i| run_dir.join(numbered("relay", "-state", i, case.relays))),
    );
    if let SinkTarget::Ledger(path) = &sink {
        big.push(path.clone());
    }
    for path in big {
        if path.is_dir() {
            let _ = std::fs::remove_dir_all(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(Row {
        case,
        events,
        at,
        agent_rss_at_link_up_kib: agent_rss_at_link_up,
        agent_rss_first_kib: agent_rss_first,
        agent_rss_max_sampled_kib: agent_rss_max,
        agent_hwm_kib,
        relay_hwm_kib: per_relay.iter().map(|r| r.hwm_kib).max().unwrap_or(0),
        relay_rss_max_sampled_kib: per_relay
            .iter()
            .map(|r| r.rss_max_sampled_kib)
            .max()
            .unwrap_or(0),
        mosquitto_hwm_kib,
        cpu_agent,
        cpu_relay,
        cpu_mosquitto,
        cpu_others,
        cpu_own,
        drain_secs,
        agent_threads: top_threads(&BTreeMap::new(), &agent_threads_last, drain_secs),
        relay_threads: top_threads(&relay_threads_start, &relay_threads_end, drain_secs),
        stored_final: stored,
        delivered_final: delivered,
        backlog_final: backlog,
        batches_resent,
        compactions,
        ledger_lines: ledger.map_or(0, |l| l.0),
        ledger_distinct_ids: ledger.map_or(0, |l| l.1),
        per_relay,
        postgres,
        erp,
        errors,
        timeline,
    })
}

/// `GET path` from every address at once, in their order.
async fn get_json_all(addrs: &[SocketAddr], path: &'static str) -> Vec<anyhow::Result<Value>> {
    let tasks: Vec<_> = addrs
        .iter()
        .map(|addr| tokio::spawn(get_json(*addr, path)))
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.unwrap_or_else(|e| Err(anyhow::anyhow!("{e}"))));
    }
    out
}

/// CPU seconds per thread name, summed over processes.
fn summed_threads(pids: &[u32], ticks: f64) -> anyhow::Result<BTreeMap<String, f64>> {
    let mut sum = BTreeMap::new();
    for pid in pids {
        for (name, secs) in thread_cpu_seconds(*pid, ticks)? {
            *sum.entry(name).or_insert(0.0) += secs;
        }
    }
    Ok(sum)
}

/// WAL written by the server since it was made, in bytes.
fn wal_bytes(pg: &BenchPostgres) -> Option<u64> {
    pg.psql(
        "postgres",
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint",
    )
    .ok()
    .and_then(|text| text.parse().ok())
}

/// What the database holds and did after a drain (its relays stopped).
fn pg_stats(
    pg: &BenchPostgres,
    database: &str,
    cpu: f64,
    pss_max_kib: u64,
    wal_start: Option<u64>,
) -> PgStats {
    let number = |sql: &str| -> Option<u64> {
        pg.psql(database, sql)
            .ok()
            .and_then(|text| text.parse().ok())
    };
    PgStats {
        cpu,
        pss_max_kib,
        event_ids: number("SELECT count(*) FROM backhaul.event_ids"),
        events_left: number(
            "SELECT (SELECT count(*) FROM backhaul.events)
                  + (SELECT coalesce(sum(events), 0) FROM backhaul.staged)",
        ),
        database_bytes: number("SELECT pg_database_size(current_database())"),
        wal_bytes: wal_bytes(pg)
            .zip(wal_start)
            .map(|(end, start)| end.saturating_sub(start)),
        commits: number(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        ),
        rollbacks: number(
            "SELECT xact_rollback FROM pg_stat_database WHERE datname = current_database()",
        ),
        deadlocks: number(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()",
        ),
    }
}

/// The busiest thread names over a window, in percent of one core, busiest first.
fn top_threads(
    start: &BTreeMap<String, f64>,
    end: &BTreeMap<String, f64>,
    secs: f64,
) -> Vec<(String, f64)> {
    let mut list: Vec<(String, f64)> = end
        .iter()
        .map(|(name, used)| {
            let before = start.get(name).copied().unwrap_or(0.0);
            (name.clone(), 100.0 * (used - before) / secs.max(1e-9))
        })
        .filter(|(_, p)| *p >= 1.0)
        .collect();
    list.sort_by(|a, b| b.1.total_cmp(&a.1));
    list.truncate(6);
    list
}

/// Lines of the ledger and distinct event ids among them.
fn read_ledger(path: &Path) -> anyhow::Result<(u64, u64)> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut lines = 0u64;
    let mut ids: HashSet<String> = HashSet::new();
    for line in std::io::BufReader::with_capacity(1 << 20, file).lines() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        lines += 1;
        if let Some(id) = ledger_id(&line) {
            ids.insert(id.to_string());
        }
    }
    Ok((lines, ids.len() as u64))
}

// ----- the accept-everything ERP of the outbox comparison ------------------------------------

/// Longest request line or header line the stand-in ERP reads.
const ERP_MAX_LINE: u64 = 16 * 1024;
/// Largest request body it takes (an event is a few hundred bytes).
const ERP_MAX_BODY: usize = 1 << 20;

/// What the stand-in ERP was sent.
#[derive(Debug, Clone, Copy, Default)]
struct ErpCounts {
    requests: u64,
    /// Distinct `Idempotency-Key`s among this drain's event ids.
    distinct: u64,
    /// Requests without an `Idempotency-Key` that names one of this drain's events.
    unknown: u64,
}

/// The ids seen, as one bit per event of the drain (`drain-{i:08}`): exact, and small even
/// for millions of events.
struct ErpCounters {
    requests: AtomicU64,
    distinct: AtomicU64,
    unknown: AtomicU64,
    seen: std::sync::Mutex<Vec<u64>>,
    events: u64,
}

impl ErpCounters {
    fn record(&self, key: Option<&str>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let index = key
            .and_then(|k| k.strip_prefix("drain-"))
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|n| *n < self.events);
        let Some(index) = index else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        let (word, bit) = ((index / 64) as usize, 1u64 << (index % 64));
        if let Some(w) = seen.get_mut(word)
            && *w & bit == 0
        {
            *w |= bit;
            self.distinct.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A minimal HTTP/1.1 server that answers every request `200` with an empty body, keeping
/// connections alive, and counts what it was sent: an ERP that costs next to nothing, so
/// that a drain measures the relays and their outbox. Stops when dropped.
struct NullErp {
    addr: SocketAddr,
    counters: Arc<ErpCounters>,
    task: tokio::task::JoinHandle<()>,
}

impl NullErp {
    async fn start(events: u64) -> anyhow::Result<NullErp> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the stand-in ERP")?;
        let addr = listener
            .local_addr()
            .context("the stand-in ERP's address")?;
        let counters = Arc::new(ErpCounters {
            requests: AtomicU64::new(0),
            distinct: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            seen: std::sync::Mutex::new(vec![0; events.div_ceil(64) as usize]),
            events,
        });
        let shared = counters.clone();
        let task = tokio::spawn(async move {
            // Owned here, so that aborting this task ends every connection too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let counters = shared.clone();
                            connections.spawn(async move {
                                // A connection that breaks is the client's business.
                                let _ = serve_erp(stream, &counters).await;
                            });
                        }
                        // Out of descriptors, say: the relays retry, so wait rather than spin.
                        Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Ok(NullErp {
            addr,
            counters,
            task,
        })
    }

    fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    fn counts(&self) -> ErpCounts {
        ErpCounts {
            requests: self.counters.requests.load(Ordering::Relaxed),
            distinct: self.counters.distinct.load(Ordering::Relaxed),
            unknown: self.counters.unknown.load(Ordering::Relaxed),
        }
    }
}

impl Drop for NullErp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves one connection: request line, headers, a `Content-Length` body, answer; again
/// until the client closes.
async fn serve_erp(stream: tokio::net::TcpStream, counters: &ErpCounters) -> anyhow::Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        line.clear();
        if (&mut reader)
            .take(ERP_MAX_LINE)
            .read_line(&mut line)
            .await
            .context("reading a request line")?
            == 0
        {
            return Ok(());
        }
        if line.trim().is_empty() {
            continue;
        }
        let mut length = 0usize;
        let mut key = None;
        let mut close = false;
        loop {
            line.clear();
            if (&mut reader)
                .take(ERP_MAX_LINE)
                .read_line(&mut line)
                .await
                .context("reading a header")?
                == 0
            {
                bail!("the connection closed inside a request's headers");
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                bail!("not a header: {header:?}");
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value
                    .parse()
                    .with_context(|| format!("Content-Length {value:?}"))?;
            } else if name.eq_ignore_ascii_case("idempotency-key") {
                key = Some(value.to_string());
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                bail!("a chunked body: the relay sends Content-Length");
            }
        }
        if length > ERP_MAX_BODY {
            bail!("a body of {length} bytes");
        }
        body.resize(length, 0);
        reader
            .read_exact(&mut body)
            .await
            .context("reading a body")?;
        counters.record(key.as_deref());
        write
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .context("answering")?;
        if close {
            return Ok(());
        }
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn secs(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |s| format!("{s:.2}"))
}

fn render(rows: &[Row], uplink: &Uplink, fill_secs: f64, events: u64, elapsed: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ndrain: {events} events of {EVENT_BYTES} bytes logged by an offline agent, then its link restored: agent → broker → relay outbox → ledger\n\
         uplink MQTT {}, window {} × batch_max_events {} (batch_max_bytes {}, linger_ms {}); times are seconds since the agent was started again (link up: the agent's own stamp; the rest: first seen in 50 ms polls)\n",
        uplink.protocol,
        uplink.window,
        uplink.batch_max_events,
        uplink.batch_max_bytes,
        uplink.linger_ms
    );
    let mut lines = vec![
        [
            "broker",
            "link up s",
            "outbox all s",
            "outbox ev/s (from link up)",
            "outbox ev/s (from start)",
            "first / last quarter ev/s",
            "agent backlog 0 s",
            "ledger all s",
            "agent log compacted s",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        lines.push(vec![
            r.case.label().to_string(),
            secs(r.at.link_up),
            secs(r.at.outbox_all),
            r.rate_from_link_up().map_or_else(|| "-".into(), fmt_rate),
            r.rate_from_start().map_or_else(|| "-".into(), fmt_rate),
            r.quarter_rates().map_or_else(
                || "-".into(),
                |(early, late)| format!("{} / {}", fmt_rate(early), fmt_rate(late)),
            ),
            secs(r.at.backlog_zero),
            secs(r.at.ledger_all),
            secs(r.at.compaction),
        ]);
    }
    push_table(&mut out, &lines);
    let _ = writeln!(out);
    let mut lines = vec![
        [
            "broker",
            "agent RSS at link up MiB",
            "agent peak RSS MiB",
            "relay peak RSS MiB",
            "broker peak RSS MiB",
            "agent CPU %",
            "relay CPU %",
            "broker CPU %",
            "others CPU %",
            "agent / relay CPU µs per event",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        let pct = |cpu: f64| format!("{:.0}", 100.0 * cpu / r.drain_secs.max(1e-9));
        lines.push(vec![
            r.case.label().to_string(),
            r.agent_rss_at_link_up_kib.map_or_else(|| "-".into(), mib),
            mib(r.agent_hwm_kib),
            mib(r.relay_hwm_kib),
            match r.case.broker {
                BrokerKind::Mosquitto => r.mosquitto_hwm_kib.map_or_else(|| "-".into(), mib),
                BrokerKind::Embedded => "(in relay)".into(),
            },
            pct(r.cpu_agent),
            pct(r.cpu_relay),
            match r.cpu_mosquitto {
                Some(cpu) => pct(cpu),
                None => "(in relay)".into(),
            },
            pct(r.cpu_others),
            format!(
                "{:.1} / {:.1}",
                1e6 * r.cpu_agent / r.events.max(1) as f64,
                1e6 * r.cpu_relay / r.events.max(1) as f64
            ),
        ]);
    }
    push_table(&mut out, &lines);
    let _ = writeln!(
        out,
        "\n(peak RSS = VmHWM of the process over its life, which for the agent and relay is this drain; CPU % of one core over the drain; {} cores)",
        cpus()
    );
    for r in rows {
        let threads = |list: &[(String, f64)]| {
            list.iter()
                .map(|(name, p)| format!("{name} {p:.0}%"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "{}: busiest threads — agent: {}; relay: {}",
            r.case.label(),
            threads(&r.agent_threads),
            threads(&r.relay_threads)
        );
    }
    let busiest = rows
        .iter()
        .map(|r| 100.0 * r.cpu_others / r.drain_secs.max(1e-9))
        .fold(0.0, f64::max);
    if busiest > NOISY_OTHERS_PERCENT {
        let _ = writeln!(
            out,
            "WARNING: other processes used up to {busiest:.0}% of a core during the drains; these numbers are disturbed"
        );
    }
    for r in rows {
        let rate = r.rate_from_link_up().unwrap_or(0.0);
        let rss = r.agent_hwm_kib as f64 / 1024.0;
        let _ = writeln!(
            out,
            "{}: outbox ≥ {} ev/s: {}; agent RSS < {TARGET_AGENT_RSS_MIB} MiB: {}; ledger {} lines, {} distinct ids{}",
            r.case.label(),
            fmt_rate(TARGET_RATE),
            if rate >= TARGET_RATE {
                "met"
            } else {
                "NOT met"
            },
            if rss < TARGET_AGENT_RSS_MIB {
                "met"
            } else {
                "NOT met"
            },
            r.ledger_lines,
            r.ledger_distinct_ids,
            if r.errors.is_empty() {
                String::new()
            } else {
                format!("; INCOMPLETE: {}", r.errors.join("; "))
            }
        );
    }
    let _ = writeln!(
        out,
        "fill: {events} events over HTTP in {fill_secs:.1} s ({} ev/s); bench took {elapsed:.0} s",
        fmt_rate(events as f64 / fill_secs.max(1e-9))
    );
    out
}

fn row_json(r: &Row) -> Value {
    let threads = |list: &[(String, f64)]| {
        list.iter()
            .map(|(name, p)| json!({"thread": name, "cpu_percent": p}))
            .collect::<Vec<_>>()
    };
    let pct = |cpu: f64| 100.0 * cpu / r.drain_secs.max(1e-9);
    let mut row = json!({
        "broker": match r.case.broker {
            BrokerKind::Mosquitto => "mosquitto",
            BrokerKind::Embedded => "embedded",
        },
        "events": r.events,
        "seconds_since_agent_start": {
            "agent_http_up": r.at.agent_http,
            "link_up": r.at.link_up,
            "outbox_all_stored": r.at.outbox_all,
            "agent_backlog_zero": r.at.backlog_zero,
            "agent_log_compacted": r.at.compaction,
            "ledger_all": r.at.ledger_all,
        },
        "outbox_events_per_second_from_link_up": r.rate_from_link_up(),
        "outbox_events_per_second_from_agent_start": r.rate_from_start(),
        "outbox_events_per_second_first_and_last_quarter": r.quarter_rates().map(|(a, b)| [a, b]),
        "ledger_events_per_second_from_link_up": match (r.at.ledger_all, r.at.link_up) {
            (Some(all), Some(up)) => Some(r.events as f64 / (all - up).max(1e-9)),
            _ => None,
        },
        "target_rate_met": r.rate_from_link_up().is_some_and(|rate| rate >= TARGET_RATE),
        "memory_kib": {
            "agent_rss_first_sample": r.agent_rss_first_kib,
            "agent_rss_at_link_up": r.agent_rss_at_link_up_kib,
            "agent_rss_max_sampled": r.agent_rss_max_sampled_kib,
            "agent_vmhwm": r.agent_hwm_kib,
            "relay_rss_max_sampled": r.relay_rss_max_sampled_kib,
            "relay_vmhwm": r.relay_hwm_kib,
            "mosquitto_vmhwm": r.mosquitto_hwm_kib,
        },
        "target_agent_rss_met": (r.agent_hwm_kib as f64 / 1024.0) < TARGET_AGENT_RSS_MIB,
        "cpu_microseconds_per_event": {
            "agent": 1e6 * r.cpu_agent / r.events.max(1) as f64,
            "relay": 1e6 * r.cpu_relay / r.events.max(1) as f64,
            "mosquitto": r.cpu_mosquitto.map(|cpu| 1e6 * cpu / r.events.max(1) as f64),
        },
        "cpu_percent_of_one_core": {
            "agent": pct(r.cpu_agent),
            "relay": pct(r.cpu_relay),
            "mosquitto": r.cpu_mosquitto.map(pct),
            "other_processes": pct(r.cpu_others),
            "agent_threads": threads(&r.agent_threads),
            "relay_threads": threads(&r.relay_threads),
        },
        "drain_seconds": r.drain_secs,
        "final": {
            "outbox_events_stored": r.stored_final,
            "ledger_events_delivered": r.delivered_final,
            "agent_backlog": r.backlog_final,
            "agent_batches_resent": r.batches_resent,
            "agent_log_compactions_at_start_and_end": [r.compactions.0, r.compactions.1],
            "ledger_lines": r.ledger_lines,
            "ledger_distinct_ids": r.ledger_distinct_ids,
        },
        "errors": r.errors,
        "timeline": r.timeline.iter().map(|s| json!([s.t, s.stored, s.delivered, s.backlog, s.agent_rss_kib, s.relay_rss_kib])).collect::<Vec<_>>(),
        "timeline_columns": ["seconds", "outbox_stored", "ledger_delivered", "agent_backlog", "agent_rss_kib", "relay_rss_kib"],
        "complete": r.complete(),
    });
    if r.case.sink == SinkKind::Http {
        let per_event = |cpu: f64| 1e6 * cpu / r.events.max(1) as f64;
        row["outbox"] = json!(r.case.outbox.name());
        row["relays"] = json!(r.case.relays);
        row["sink"] = json!("http (the bench's accept-everything ERP)");
        row["delivered_events_per_second_from_link_up"] = json!(r.delivered_rate_from_link_up());
        row["target_relay_rss_met"] = json!(relay_rss_met(r));
        row["per_relay"] = r
            .per_relay
            .iter()
            .enumerate()
            .map(|(i, relay)| {
                json!({
                    "relay": i + 1,
                    "vmhwm_kib": relay.hwm_kib,
                    "rss_max_sampled_kib": relay.rss_max_sampled_kib,
                    "cpu_percent_of_one_core": pct(relay.cpu),
                    "batches_received": relay.intake.batches_received,
                    "events_received": relay.intake.events_received,
                    "batch_bytes_received": relay.intake.batch_bytes_received,
                    "wire_bytes_per_event": relay.intake.wire_bytes_per_event(),
                    "events_duplicate": relay.intake.events_duplicate,
                    "batches_refused": relay.intake.refused,
                    "ack_latency_seconds_mean": relay.intake.ack_latency_mean_s,
                    "ack_latency_seconds_p99": relay.intake.ack_latency_p99_s,
                })
            })
            .collect();
        row["cpu_percent_of_one_core"]["relays_summed"] = json!(pct(r.cpu_relay));
        row["cpu_percent_of_one_core"]["this_process_with_the_stand_in_erp"] =
            json!(pct(r.cpu_own));
        row["cpu_microseconds_per_event"]["this_process_with_the_stand_in_erp"] =
            json!(per_event(r.cpu_own));
        if let Some(pg) = &r.postgres {
            row["cpu_percent_of_one_core"]["postgres"] = json!(pct(pg.cpu));
            row["cpu_microseconds_per_event"]["postgres"] = json!(per_event(pg.cpu));
            row["postgres"] = json!({
                "pss_max_sampled_kib": pg.pss_max_kib,
                "cpu_seconds": pg.cpu,
                "event_ids_after": pg.event_ids,
                "events_rows_left_after": pg.events_left,
                "database_bytes_after": pg.database_bytes,
                "wal_bytes": pg.wal_bytes,
                "wal_bytes_per_event": pg.wal_bytes.map(|w| w as f64 / r.events.max(1) as f64),
                "transactions_committed": pg.commits,
                "transactions_rolled_back": pg.rollbacks,
                "deadlocks": pg.deadlocks,
            });
        }
        if let Some(erp) = &r.erp {
            row["erp"] = json!({
                "requests": erp.requests,
                "distinct_idempotency_keys": erp.distinct,
                "requests_without_a_known_key": erp.unknown,
            });
        }
        row["final"]["delivered_events"] = json!(r.delivered_final);
        row["timeline"] = r
            .timeline
            .iter()
            .map(|s| {
                json!([
                    s.t,
                    s.stored,
                    s.delivered,
                    s.backlog,
                    s.agent_rss_kib,
                    s.relay_rss_kib,
                    s.pg_pss_kib
                ])
            })
            .collect();
        row["timeline_columns"] = json!([
            "seconds",
            "outbox_stored",
            "delivered",
            "agent_backlog",
            "agent_rss_kib",
            "largest_relay_rss_kib",
            "postgres_pss_kib"
        ]);
    }
    row
}

/// Whether every relay of a drain stayed within the relay memory target.
fn relay_rss_met(r: &Row) -> bool {
    (r.relay_hwm_kib as f64 / 1024.0) <= TARGET_RELAY_RSS_MIB
}

/// The PostgreSQL target: the stored rate of the drain with [`TARGET_PG_RELAYS`] relays on
/// PostgreSQL, redb's, and whether the first is at least the target share of the second.
fn pg_target(rows: &[Row]) -> Option<(f64, f64, bool)> {
    let rate = |outbox, relays| {
        rows.iter()
            .find(|r| {
                r.case.outbox == outbox && r.case.relays == relays && r.case.sink == SinkKind::Http
            })
            .and_then(Row::rate_from_link_up)
    };
    let pg = rate(OutboxKind::Postgres, TARGET_PG_RELAYS)?;
    let redb = rate(OutboxKind::Redb, 1)?;
    Some((pg, redb, pg >= TARGET_PG3_SHARE_OF_REDB * redb))
}

fn render_outboxes(
    rows: &[Row],
    uplink: &Uplink,
    fill_secs: f64,
    events: u64,
    elapsed: f64,
    pg_settings: Option<&Value>,
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ndrain by outbox: {events} events of {EVENT_BYTES} bytes logged by an offline agent, then its link restored: agent → Mosquitto → relays → outbox → stand-in HTTP ERP ([sink.http], answers 200 at once; delivery rate limit lifted)\n\
         uplink MQTT {}, window {} × batch_max_events {} (batch_max_bytes {}, linger_ms {}); several relays share one PostgreSQL outbox and one broker.shared_group; times are seconds since the agent was started again",
        uplink.protocol,
        uplink.window,
        uplink.batch_max_events,
        uplink.batch_max_bytes,
        uplink.linger_ms
    );
    if let Some(settings) = pg_settings {
        let field = |key: &str| settings[key].as_str().unwrap_or("?").to_string();
        let _ = writeln!(
            out,
            "PostgreSQL {}: fsync {}, synchronous_commit {}, shared_buffers {}, max_wal_size {}; a new database per drain",
            field("version"),
            field("fsync"),
            field("synchronous_commit"),
            field("shared_buffers"),
            field("max_wal_size"),
        );
    }
    let _ = writeln!(out);
    let mut lines = vec![
        [
            "outbox × relays",
            "sink",
            "link up s",
            "stored all s",
            "stored ev/s (from link up)",
            "first / last quarter ev/s",
            "agent backlog 0 s",
            "delivered all s",
            "delivered ev/s (from link up)",
            "gap refusals",
            "batches re-sent",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        lines.push(vec![
            r.case.label(),
            "http".into(),
            secs(r.at.link_up),
            secs(r.at.outbox_all),
            r.rate_from_link_up().map_or_else(|| "-".into(), fmt_rate),
            r.quarter_rates().map_or_else(
                || "-".into(),
                |(early, late)| format!("{} / {}", fmt_rate(early), fmt_rate(late)),
            ),
            secs(r.at.backlog_zero),
            secs(r.at.ledger_all),
            r.delivered_rate_from_link_up()
                .map_or_else(|| "-".into(), fmt_rate),
            r.per_relay
                .iter()
                .map(|p| p.intake.gaps())
                .sum::<u64>()
                .to_string(),
            r.batches_resent
                .map_or_else(|| "-".into(), |n| n.to_string()),
        ]);
    }
    push_table(&mut out, &lines);
    let _ = writeln!(out);
    let mut lines = vec![
        [
            "outbox × relays",
            "relay peak RSS MiB",
            "each relay's peak RSS MiB",
            "agent peak RSS MiB",
            "PostgreSQL peak PSS MiB",
            "agent CPU %",
            "relays CPU %",
            "PostgreSQL CPU %",
            "Mosquitto CPU %",
            "ERP + bench CPU %",
            "others CPU %",
            "relays / PostgreSQL CPU µs per event",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for r in rows {
        let pct = |cpu: f64| format!("{:.0}", 100.0 * cpu / r.drain_secs.max(1e-9));
        let per_event = |cpu: f64| format!("{:.1}", 1e6 * cpu / r.events.max(1) as f64);
        lines.push(vec![
            r.case.label(),
            mib(r.relay_hwm_kib),
            r.per_relay
                .iter()
                .map(|p| mib(p.hwm_kib))
                .collect::<Vec<_>>()
                .join(" / "),
            mib(r.agent_hwm_kib),
            r.postgres
                .as_ref()
                .map_or_else(|| "-".into(), |pg| mib(pg.pss_max_kib)),
            pct(r.cpu_agent),
            pct(r.cpu_relay),
            r.postgres
                .as_ref()
                .map_or_else(|| "-".into(), |pg| pct(pg.cpu)),
            r.cpu_mosquitto.map_or_else(|| "-".into(), pct),
            pct(r.cpu_own),
            pct(r.cpu_others),
            format!(
                "{} / {}",
                per_event(r.cpu_relay),
                r.postgres
                    .as_ref()
                    .map_or_else(|| "-".into(), |pg| per_event(pg.cpu))
            ),
        ]);
    }
    push_table(&mut out, &lines);
    let _ = writeln!(
        out,
        "\n(relay peak RSS = the largest VmHWM among the drain's relays, each over its life, which is this drain; PostgreSQL PSS = all its processes together, sampled every {TIMELINE_STEP} s; CPU % of one core over the drain, relays summed; {} cores)",
        cpus()
    );
    for r in rows {
        if let Some(pg) = &r.postgres {
            let _ = writeln!(
                out,
                "{}: PostgreSQL committed {} transactions ({} rolled back, {} deadlocks), wrote {} of WAL ({} bytes per event); the database held {} ids and {} undelivered rows after the drain",
                r.case.label(),
                pg.commits.map_or_else(|| "?".into(), |n| n.to_string()),
                pg.rollbacks.map_or_else(|| "?".into(), |n| n.to_string()),
                pg.deadlocks.map_or_else(|| "?".into(), |n| n.to_string()),
                pg.wal_bytes
                    .map_or_else(|| "?".into(), |b| format!("{} MiB", mib(b / 1024))),
                pg.wal_bytes.map_or_else(
                    || "?".into(),
                    |b| fmt_rate(b as f64 / r.events.max(1) as f64)
                ),
                pg.event_ids.map_or_else(|| "?".into(), |n| n.to_string()),
                pg.events_left.map_or_else(|| "?".into(), |n| n.to_string()),
            );
        }
        let acks: Vec<String> = r
            .per_relay
            .iter()
            .map(|p| {
                format!(
                    "{} batches, {} B per event on the wire, ack mean {} / p99 {} ms",
                    p.intake.batches_received,
                    p.intake
                        .wire_bytes_per_event()
                        .map_or_else(|| "-".into(), |b| format!("{b:.1}")),
                    p.intake
                        .ack_latency_mean_s
                        .map_or_else(|| "-".into(), |s| format!("{:.0}", 1000.0 * s)),
                    p.intake
                        .ack_latency_p99_s
                        .map_or_else(|| "-".into(), |s| format!("{:.0}", 1000.0 * s)),
                )
            })
            .collect();
        let threads = r
            .relay_threads
            .iter()
            .map(|(name, p)| format!("{name} {p:.0}%"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "{}: intake per relay: {}; busiest relay threads (summed over relays): {threads}",
            r.case.label(),
            acks.join("; ")
        );
    }
    let busiest = rows
        .iter()
        .map(|r| 100.0 * r.cpu_others / r.drain_secs.max(1e-9))
        .fold(0.0, f64::max);
    if busiest > NOISY_OTHERS_PERCENT {
        let _ = writeln!(
            out,
            "WARNING: other processes used up to {busiest:.0}% of a core during the drains; these numbers are disturbed"
        );
    }
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    match pg_target(rows) {
        Some((pg, redb, ok)) => {
            let _ = writeln!(
                out,
                "target: postgres × {TARGET_PG_RELAYS} stores ≥ {TARGET_PG3_SHARE_OF_REDB} × redb: {} vs {} ev/s ({:.2} ×): {}",
                fmt_rate(pg),
                fmt_rate(redb),
                pg / redb.max(1e-9),
                met(ok)
            );
        }
        None => {
            let _ = writeln!(
                out,
                "target: postgres × {TARGET_PG_RELAYS} stores ≥ {TARGET_PG3_SHARE_OF_REDB} × redb: not measured (needs --outbox redb,postgres --relays {TARGET_PG_RELAYS} and complete drains)"
            );
        }
    }
    let _ = writeln!(
        out,
        "target: relay RSS ≤ {TARGET_RELAY_RSS_MIB} MiB: {}",
        rows.iter()
            .map(|r| format!(
                "{} {} MiB {}",
                r.case.label(),
                mib(r.relay_hwm_kib),
                met(relay_rss_met(r))
            ))
            .collect::<Vec<_>>()
            .join("; ")
    );
    for r in rows {
        if let Some(erp) = &r.erp {
            let _ = writeln!(
                out,
                "{}: the ERP got {} requests, {} distinct event ids{}",
                r.case.label(),
                erp.requests,
                erp.distinct,
                if r.errors.is_empty() {
                    String::new()
                } else {
                    format!("; INCOMPLETE: {}", r.errors.join("; "))
                }
            );
        }
    }
    let _ = writeln!(
        out,
        "fill: {events} events over HTTP in {fill_secs:.1} s ({} ev/s); bench took {elapsed:.0} s",
        fmt_rate(events as f64 / fill_secs.max(1e-9))
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(outbox: &[&str], relays: &[usize]) -> BenchOptions {
        BenchOptions {
            which: "drain".into(),
            publishers: vec![1],
            warmup: Duration::ZERO,
            measure: Duration::from_secs(1),
            window: None,
            batch_events: None,
            drain_events: 10,
            protocol: None,
            erp_events: 1,
            outbox: outbox.iter().map(|s| s.to_string()).collect(),
            relays: relays.to_vec(),
            compare: Default::default(),
        }
    }

    #[test]
    fn outbox_flags_choose_the_drains() {
        assert!(
            outbox_cases(&options(&["redb"], &[1]))
                .expect("default")
                .is_none()
        );
        let cases = outbox_cases(&options(&["redb", "postgres"], &[1, 3]))
            .expect("valid")
            .expect("a comparison");
        let labels: Vec<String> = cases.iter().map(Case::label).collect();
        assert_eq!(labels, ["redb × 1", "postgres × 1", "postgres × 3"]);
        assert!(cases.iter().all(|c| c.sink == SinkKind::Http));
        assert!(outbox_cases(&options(&["redb"], &[3])).is_err());
        assert!(outbox_cases(&options(&["postgres"], &[0])).is_err());
        assert!(outbox_cases(&options(&[], &[1])).is_err());
    }

    #[test]
    fn relay_metrics_are_read_by_label() {
        let text = "# TYPE backhaul_relay_batches_refused counter\n\
                    backhaul_relay_batches_refused_total{reason=\"gap\"} 7\n\
                    backhaul_relay_batches_refused_total{reason=\"outbox_full\"} 2\n\
                    backhaul_relay_batches_received_total 41\n\
                    backhaul_relay_batches_received_totally 5\n";
        let intake = Intake::read(text);
        assert_eq!(intake.batches_received, 41);
        assert_eq!(intake.gaps(), 7);
        assert_eq!(intake.refused.get("outbox_full"), Some(&2));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stand_in_erp_counts_distinct_keys_over_kept_alive_connections() {
        let erp = NullErp::start(100).await.expect("start");
        let client = reqwest::Client::new();
        for key in [
            "drain-00000001",
            "drain-00000002",
            "drain-00000001",
            "other",
        ] {
            let answer = client
                .post(erp.url())
                .header("Idempotency-Key", key)
                .body("{\"v\":1}")
                .send()
                .await
                .expect("post");
            assert_eq!(answer.status().as_u16(), 200);
        }
        let counts = erp.counts();
        assert_eq!(
            (counts.requests, counts.distinct, counts.unknown),
            (4, 2, 1)
        );
    }

    #[test]
    fn rates_are_grouped() {
        assert_eq!(fmt_rate(1_234_567.4), "1,234,567");
        assert_eq!(fmt_rate(999.0), "999");
        assert_eq!(fmt_rate(1000.0), "1,000");
    }
}
