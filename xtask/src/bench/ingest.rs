//! `cargo xtask bench ingest`: durable MQTT ingest of the agent against Mosquitto.
//!
//! What it owns: the agent's and Mosquitto's benchmark configurations (in
//! `<target dir>/bench/ingest/`), starting and stopping both, the runs (N publishers against
//! the agent, then the same publishers against Mosquitto with one subscriber), what is read
//! around each run (flush histogram from `/metrics`, backlog from `/v1/status`, memory and CPU
//! from `/proc`), the correctness check, the printed table and `<target dir>/bench/ingest.json`.
//!
//! The agent's rate counts PUBACKs, each meaning "flushed to disk". Mosquitto's rate counts the
//! messages its one subscriber received (Mosquitto acknowledges publishes from memory).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::loadgen::{self, EVENT_BYTES, LoadResult, LoadSpec, Moment};
use super::openmetrics::{Histogram, http_get};
use super::{BenchOptions, MOSQUITTO_LOGGING, binary, mosquitto_version, start_mosquitto};
use crate::procs::{
    ChildGuard, clock_ticks, cpu_seconds, free_addr, log_tail, machine_busy_seconds, memory_kib,
    thread_cpu_seconds,
};

const FLUSH_HISTOGRAM: &str = "backhaul_agent_log_flush_duration_seconds";
/// The name of the agent's log writer thread, whose CPU the table shows apart.
const WRITER_THREAD: &str = "log-writer";
/// The issue's target: durable agent ingest at least this many times Mosquitto's rate.
const TARGET_RATIO: f64 = 1.5;
/// Other processes using more than this (percent of one core) during a window make the table
/// carry a warning.
const NOISY_OTHERS_PERCENT: f64 = 20.0;
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);

/// In-flight window per publisher unless `--window` is given: 1000 for one publisher, fewer
/// per publisher as there are more (at least 100), so the total stays a few thousand.
fn default_window(publishers: usize) -> usize {
    (2000 / publishers).clamp(100, 1000)
}

/// Readings around the measured window of one run.
#[derive(Default)]
struct Watch {
    pid: u32,
    ticks: f64,
    /// CPU seconds of (the process, this load generator) at the start of the window.
    cpu_start: Option<(f64, f64, f64)>,
    cpu_window: Option<(f64, f64, f64)>,
    /// Per thread name, when watched: CPU seconds at the start, then used in the window.
    threads: bool,
    threads_start: BTreeMap<String, f64>,
    threads_window: BTreeMap<String, f64>,
    /// Peak VmRSS seen during the run, KiB.
    rss_peak_kib: u64,
    error: Option<String>,
}

impl Watch {
    fn new(pid: u32, ticks: f64, threads: bool) -> Watch {
        Watch {
            pid,
            ticks,
            threads,
            ..Watch::default()
        }
    }

    fn observe(&mut self, moment: Moment) {
        if let Err(e) = self.try_observe(moment)
            && self.error.is_none()
        {
            self.error = Some(format!("{e:#}"));
        }
    }

    fn try_observe(&mut self, moment: Moment) -> anyhow::Result<()> {
        let (rss, _) = memory_kib(self.pid)?;
        self.rss_peak_kib = self.rss_peak_kib.max(rss);
        match moment {
            Moment::MeasureStart => {
                self.cpu_start = Some((
                    cpu_seconds(self.pid, self.ticks)?,
                    cpu_seconds(0, self.ticks)?,
                    machine_busy_seconds(self.ticks)?,
                ));
                if self.threads {
                    self.threads_start = thread_cpu_seconds(self.pid, self.ticks)?;
                }
            }
            Moment::MeasureEnd => {
                if let Some((process, own, machine)) = self.cpu_start {
                    self.cpu_window = Some((
                        cpu_seconds(self.pid, self.ticks)? - process,
                        cpu_seconds(0, self.ticks)? - own,
                        machine_busy_seconds(self.ticks)? - machine,
                    ));
                }
                if self.threads {
                    let now = thread_cpu_seconds(self.pid, self.ticks)?;
                    self.threads_window = now
                        .into_iter()
                        .map(|(name, secs)| {
                            let before = self.threads_start.get(&name).copied().unwrap_or(0.0);
                            (name, secs - before)
                        })
                        .collect();
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// CPU use of each thread name in percent of one core over the measured window.
    fn thread_percent(&self, secs: f64) -> BTreeMap<String, f64> {
        self.threads_window
            .iter()
            .map(|(name, used)| (name.clone(), 100.0 * used / secs))
            .collect()
    }

    /// CPU use over the measured window in percent of one core: (the process, this load
    /// generator, everything else on the machine).
    fn cpu_percent(&self, secs: f64) -> Cpu {
        match self.cpu_window {
            Some((p, own, machine)) => Cpu {
                process: 100.0 * p / secs,
                loadgen: 100.0 * own / secs,
                others: (100.0 * (machine - p - own) / secs).max(0.0),
            },
            None => Cpu {
                process: f64::NAN,
                loadgen: f64::NAN,
                others: f64::NAN,
            },
        }
    }
}

/// CPU use over a measured window, percent of one core.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    process: f64,
    loadgen: f64,
    /// Every other process of the machine: other work here makes the numbers noisy.
    others: f64,
}

impl Cpu {
    fn json(&self, process: &str) -> serde_json::Map<String, Value> {
        let mut map = serde_json::Map::new();
        map.insert(process.into(), json!(finite(self.process)));
        map.insert("loadgen".into(), json!(finite(self.loadgen)));
        map.insert("other_processes".into(), json!(finite(self.others)));
        map
    }
}

struct Row {
    publishers: usize,
    window: usize,
    agent: LoadResult,
    mosquitto: LoadResult,
    flush: Histogram,
    agent_cpu: Cpu,
    /// The agent's CPU by thread name, percent of one core.
    agent_threads: BTreeMap<String, f64>,
    mosquitto_cpu: Cpu,
    agent_rss_peak_kib: u64,
    mosquitto_rss_peak_kib: u64,
    backlog_after: u64,
    expected_backlog: u64,
    check_errors: Vec<String>,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.agent.ack_rate() / self.mosquitto.receive_rate().max(1e-9)
    }
}

struct Agent {
    guard: ChildGuard,
    mqtt: SocketAddr,
    /// The admin API (`/readyz`, `/metrics`, `/v1/status`).
    admin: SocketAddr,
}

async fn start_agent(release: &Path, dir: &Path) -> anyhow::Result<Agent> {
    let bin = binary(release, "backhaul-agent")?;
    let mqtt = free_addr()?;
    let http = free_addr()?;
    let admin = free_addr()?;
    let state = dir.join("state");
    let config = dir.join("agent.toml");
    let text = format!(
        r#"# Written by `cargo xtask bench ingest`; the log's settings are the shipped defaults.
site = "bench"
state_dir = "{state}"

[log]
max_bytes = "64 GiB"
group_commit_delay_ms = 2
group_commit_max_events = 4096
cache_size = "32 MiB"

[mqtt]
listen = "{mqtt}"
max_connections = 1000

[http]
listen = "{http}"

[admin]
listen = "{admin}"
"#,
        state = state.display()
    );
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    let log = dir.join("agent.log");
    let mut guard = ChildGuard::spawn(
        "backhaul-agent",
        Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("BACKHAUL_LOG", "warn"),
        &log,
    )?;
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        guard.check_running()?;
        if let Ok((200, _)) = http_get(admin, "/readyz").await {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not answer /readyz on {admin} within {STARTUP_TIMEOUT:?}; its log:\n{}",
                log_tail(&log, 20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Agent { guard, mqtt, admin })
}

async fn start_ingest_mosquitto(dir: &Path) -> anyhow::Result<(ChildGuard, SocketAddr)> {
    let addr = free_addr()?;
    let body = format!(
        "allow_anonymous true\n\
         persistence false\n\
         max_inflight_messages 1000\n\
         max_queued_messages 1000000\n\
         {MOSQUITTO_LOGGING}"
    );
    let guard = start_mosquitto(dir, "mosquitto", "ingest", addr, &body).await?;
    Ok((guard, addr))
}

async fn flush_histogram(agent: &Agent) -> anyhow::Result<Histogram> {
    let (status, text) = http_get(agent.admin, "/metrics").await?;
    if status != 200 {
        bail!("GET /metrics answered {status}");
    }
    Histogram::parse(&text, FLUSH_HISTOGRAM)
}

async fn agent_status(agent: &Agent) -> anyhow::Result<Value> {
    let (status, text) = http_get(agent.admin, "/v1/status").await?;
    if status != 200 {
        bail!("GET /v1/status answered {status}: {text}");
    }
    serde_json::from_str(&text).context("/v1/status is not JSON")
}

pub async fn run(options: &BenchOptions, release: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = out_dir.join("ingest");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot clear the previous run's {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ticks = clock_ticks();
    let mut agent = start_agent(release, &dir).await?;
    let (mut mosquitto, mosquitto_addr) = start_ingest_mosquitto(&dir).await?;
    eprintln!(
        "xtask: bench ingest: agent (pid {}) MQTT {} admin {}, Mosquitto (pid {}) {}, {} s warm-up + {} s per run, {EVENT_BYTES}-byte events",
        agent.guard.pid(),
        agent.mqtt,
        agent.admin,
        mosquitto.pid(),
        mosquitto_addr,
        options.warmup.as_secs_f64(),
        options.measure.as_secs_f64(),
    );

    let mut rows = Vec::new();
    let mut acked_so_far = 0u64;
    for (index, &publishers) in options.publishers.iter().enumerate() {
        let window = options.window.unwrap_or_else(|| default_window(publishers));
        let spec = |tag: String, addr: SocketAddr, subscriber: bool| LoadSpec {
            addr,
            tag,
            publishers,
            window,
            warmup: options.warmup,
            measure: options.measure,
            subscriber,
        };

        // The agent, with Mosquitto idle.
        eprintln!("xtask: bench ingest: {publishers} publishers × window {window} → agent");
        let before = flush_histogram(&agent).await?;
        let mut watch = Watch::new(agent.guard.pid(), ticks, true);
        let agent_result = loadgen::run(&spec(format!("a{index}"), agent.mqtt, false), |moment| {
            watch.observe(moment)
        })
        .await
        .with_context(|| format!("agent run with {publishers} publishers"))?;
        agent.guard.check_running()?;
        if let Some(e) = watch.error.take() {
            bail!("reading the agent's /proc: {e}");
        }
        let flush = flush_histogram(&agent).await?.since(&before)?;
        acked_so_far += agent_result.acked_total;
        let status = agent_status(&agent).await?;
        let mut check_errors = Vec::new();
        let backlog_after = status["backlog"]["events"]
            .as_u64()
            .with_context(|| format!("/v1/status has no backlog.events: {status}"))?;
        if backlog_after != acked_so_far {
            check_errors.push(format!(
                "after {publishers} publishers: the agent's backlog holds {backlog_after} events, but it PUBACKed {acked_so_far}"
            ));
        }
        if agent_result.sent_total != agent_result.acked_total {
            check_errors.push(format!(
                "after {publishers} publishers: {} publishes sent, {} PUBACKed",
                agent_result.sent_total, agent_result.acked_total
            ));
        }
        for (what, counter) in [("rejected", "rejected"), ("duplicates", "duplicates")] {
            let n = status["ingest"][counter]["mqtt"].as_u64().unwrap_or(0);
            if n != 0 {
                check_errors.push(format!(
                    "after {publishers} publishers: the agent counted {n} {what} MQTT events; every bench event is valid and unique"
                ));
            }
        }
        let agent_cpu = watch.cpu_percent(agent_result.measured_secs);
        let agent_threads = watch.thread_percent(agent_result.measured_secs);
        let agent_rss_peak_kib = watch.rss_peak_kib;

        // Mosquitto, with the agent idle.
        eprintln!(
            "xtask: bench ingest: {publishers} publishers × window {window} → Mosquitto → 1 subscriber"
        );
        let mut watch = Watch::new(mosquitto.pid(), ticks, false);
        let mosquitto_result =
            loadgen::run(&spec(format!("m{index}"), mosquitto_addr, true), |moment| {
                watch.observe(moment)
            })
            .await
            .with_context(|| format!("Mosquitto run with {publishers} publishers"))?;
        mosquitto.check_running()?;
        if let Some(e) = watch.error.take() {
            bail!("reading Mosquitto's /proc: {e}");
        }
        rows.push(Row {
            publishers,
            window,
            mosquitto_cpu: watch.cpu_percent(mosquitto_result.measured_secs),
            mosquitto_rss_peak_kib: watch.rss_peak_kib,
            agent: agent_result,
            mosquitto: mosquitto_result,
            flush,
            agent_cpu,
            agent_threads,
            agent_rss_peak_kib,
            backlog_after,
            expected_backlog: acked_so_far,
            check_errors,
        });
    }

    let (_, agent_hwm_kib) = memory_kib(agent.guard.pid())?;
    let final_status = agent_status(&agent).await?;
    let agent_exit =
        tokio::task::block_in_place(|| agent.guard.terminate(Duration::from_secs(15)))?;
    let _ = tokio::task::block_in_place(|| mosquitto.terminate(Duration::from_secs(5)))?;
    let log_file_bytes = final_status["log"]["file_bytes"].as_u64().unwrap_or(0);
    // The log of this run is big and of no further use; keep the configs and process logs.
    let _ = std::fs::remove_dir_all(dir.join("state"));

    let elapsed = started.elapsed().as_secs_f64();
    let table = render_table(&rows, agent_hwm_kib, log_file_bytes, elapsed);
    println!("{table}");
    let report = json!({
        "bench": "ingest",
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "settings": {
            "warmup_seconds": options.warmup.as_secs_f64(),
            "measure_seconds": options.measure.as_secs_f64(),
            "event_bytes": EVENT_BYTES,
            "qos": 1,
            "mqtt": "3.1.1",
            "agent": {"group_commit_delay_ms": 2, "group_commit_max_events": 4096, "cache_size": "32 MiB"},
            "mosquitto": {"version": mosquitto_version(), "persistence": false, "max_inflight_messages": 1000, "max_queued_messages": 1_000_000},
        },
        "target_ratio": TARGET_RATIO,
        "runs": rows.iter().map(row_json).collect::<Vec<_>>(),
        "agent_peak_rss_kib": agent_hwm_kib,
        "agent_log_file_bytes": log_file_bytes,
        "agent_events_logged": rows.last().map(|r| r.expected_backlog).unwrap_or(0),
        "agent_exit": match agent_exit {
            Some(status) => status.to_string(),
            None => "killed after 15 s without exiting on SIGTERM".to_string(),
        },
        "elapsed_seconds": elapsed,
        "ok": rows.iter().all(|r| r.check_errors.is_empty()),
    });
    let json_path = out_dir.join("ingest.json");
    let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("results: {}", json_path.display());

    let errors: Vec<&String> = rows.iter().flat_map(|r| &r.check_errors).collect();
    if !errors.is_empty() {
        let list: Vec<&str> = errors.iter().map(|e| e.as_str()).collect();
        bail!(
            "the agent's backlog does not match what it acknowledged:\n  {}",
            list.join("\n  ")
        );
    }
    if agent_exit.is_none_or(|status| !status.success()) {
        bail!(
            "the agent did not stop cleanly on SIGTERM ({}); see {}",
            agent_exit
                .map(|s| s.to_string())
                .unwrap_or_else(|| "killed".into()),
            dir.join("agent.log").display()
        );
    }
    Ok(())
}

fn ms(seconds: Option<f64>) -> Option<f64> {
    seconds.map(|s| s * 1000.0)
}

fn fmt_ms(value: Option<f64>) -> String {
    match value {
        Some(v) if v < 10.0 => format!("{v:.2}"),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn fmt_rate(rate: f64) -> String {
    let digits = (rate.round() as u64).to_string();
    let groups: Vec<&str> = digits
        .as_bytes()
        .rchunks(3)
        .rev()
        .map(|group| std::str::from_utf8(group).unwrap_or("?"))
        .collect();
    groups.join(",")
}

fn render_table(rows: &[Row], agent_hwm_kib: u64, log_file_bytes: u64, elapsed: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ningest: {EVENT_BYTES}-byte v1 events, MQTT 3.1.1 QoS 1; agent = PUBACKs/s (each flushed to disk), \
         Mosquitto = messages/s received by one QoS 1 subscriber (persistence off)\n"
    );
    let header = [
        "publishers",
        "agent ev/s (durable)",
        "mosquitto ev/s",
        "ratio",
        "flush p50/p99 ms",
        "ack latency p50/p99 ms",
    ];
    let mut lines: Vec<[String; 6]> = vec![header.map(String::from)];
    for r in rows {
        lines.push([
            format!("{} ×{}", r.publishers, r.window),
            fmt_rate(r.agent.ack_rate()),
            fmt_rate(r.mosquitto.receive_rate()),
            format!("{:.2}x", r.ratio()),
            format!(
                "{} / {}",
                fmt_ms(ms(r.flush.quantile(0.5))),
                fmt_ms(ms(r.flush.quantile(0.99)))
            ),
            format!(
                "{} / {}",
                fmt_ms(r.agent.ack_latency_ms(0.5)),
                fmt_ms(r.agent.ack_latency_ms(0.99))
            ),
        ]);
    }
    push_table(&mut out, &lines);
    let _ = writeln!(
        out,
        "\n(publishers ×window: QoS 1 publishes each keeps in flight; flush quantiles are interpolated \
         in the agent's histogram buckets 0.2·2^k ms; ack latency is publish→PUBACK at the client)\n"
    );
    let header = [
        "publishers",
        "events/flush",
        "flush mean ms",
        "agent CPU % (log-writer)",
        "loadgen CPU %",
        "mosquitto CPU %",
        "loadgen CPU %",
        "others CPU %",
        "mosq. delivered/acked",
        "mosq. PUBACK p50/p99 ms",
    ];
    let mut lines: Vec<[String; 10]> = vec![header.map(String::from)];
    for r in rows {
        lines.push([
            r.publishers.to_string(),
            if r.flush.count > 0 {
                format!(
                    "{:.0}",
                    r.agent.acked_in_window as f64 / r.flush.count as f64
                )
            } else {
                "-".into()
            },
            fmt_ms(ms(r.flush.mean())),
            match r.agent_threads.get(WRITER_THREAD) {
                Some(writer) => format!("{:.0} ({writer:.0})", r.agent_cpu.process),
                None => format!("{:.0}", r.agent_cpu.process),
            },
            format!("{:.0}", r.agent_cpu.loadgen),
            format!("{:.0}", r.mosquitto_cpu.process),
            format!("{:.0}", r.mosquitto_cpu.loadgen),
            format!("{:.0} / {:.0}", r.agent_cpu.others, r.mosquitto_cpu.others),
            format!("{}/{}", r.mosquitto.received_total, r.mosquitto.acked_total),
            format!(
                "{} / {}",
                fmt_ms(r.mosquitto.ack_latency_ms(0.5)),
                fmt_ms(r.mosquitto.ack_latency_ms(0.99))
            ),
        ]);
    }
    push_table(&mut out, &lines);
    let _ = writeln!(
        out,
        "\n(CPU % of one core over the measured window; {} cores; others = every other process on the machine, agent run / Mosquitto run; events/flush = events of the run / flushes of the run)",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let busiest = rows
        .iter()
        .flat_map(|r| [r.agent_cpu.others, r.mosquitto_cpu.others])
        .filter(|p| p.is_finite())
        .fold(0.0, f64::max);
    if busiest > NOISY_OTHERS_PERCENT {
        let _ = writeln!(
            out,
            "WARNING: other processes used up to {busiest:.0}% of a core during the measured windows; \
             these numbers are disturbed, run again on a quiet machine"
        );
    }
    let peak_run = rows.iter().map(|r| r.agent_rss_peak_kib).max().unwrap_or(0);
    let mosq_peak = rows
        .iter()
        .map(|r| r.mosquitto_rss_peak_kib)
        .max()
        .unwrap_or(0);
    let _ = writeln!(
        out,
        "agent peak RSS: {:.1} MiB (VmHWM; highest VmRSS sampled during runs {:.1} MiB); Mosquitto peak RSS sampled: {:.1} MiB",
        agent_hwm_kib as f64 / 1024.0,
        peak_run as f64 / 1024.0,
        mosq_peak as f64 / 1024.0
    );
    let logged = rows.last().map(|r| r.expected_backlog).unwrap_or(0);
    let _ = writeln!(
        out,
        "agent log: {} events, file {:.0} MiB; backlog check: {}",
        logged,
        log_file_bytes as f64 / (1 << 20) as f64,
        if rows.iter().all(|r| r.check_errors.is_empty()) {
            "backlog = PUBACKs after every run"
        } else {
            "MISMATCH (see below)"
        }
    );
    let met = rows.iter().filter(|r| r.ratio() >= TARGET_RATIO).count();
    let _ = writeln!(
        out,
        "target agent ≥ {TARGET_RATIO}x Mosquitto: met in {met} of {} runs; bench took {elapsed:.0} s",
        rows.len()
    );
    out
}

fn push_table<const N: usize>(out: &mut String, lines: &[[String; N]]) {
    let mut widths = [0usize; N];
    for line in lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (i, line) in lines.iter().enumerate() {
        let cells: Vec<String> = line
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(col, (cell, w))| {
                let pad = w - cell.chars().count();
                if col == 0 {
                    format!("{cell}{}", " ".repeat(pad))
                } else {
                    format!("{}{cell}", " ".repeat(pad))
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

fn quantiles_ms(p50: Option<f64>, p99: Option<f64>) -> Value {
    json!({"p50": p50, "p99": p99})
}

fn row_json(r: &Row) -> Value {
    let mut agent_cpu = r.agent_cpu.json("agent");
    agent_cpu.insert(
        "agent_threads".into(),
        r.agent_threads
            .iter()
            .map(|(name, p)| (name.clone(), json!(finite(*p))))
            .collect::<serde_json::Map<_, _>>()
            .into(),
    );
    json!({
        "publishers": r.publishers,
        "window_per_publisher": r.window,
        "ratio": r.ratio(),
        "target_met": r.ratio() >= TARGET_RATIO,
        "agent": {
            "events_per_second": r.agent.ack_rate(),
            "measured_seconds": r.agent.measured_secs,
            "acked_in_window": r.agent.acked_in_window,
            "sent_total": r.agent.sent_total,
            "acked_total": r.agent.acked_total,
            "drain_seconds": r.agent.drain_secs,
            "ack_latency_ms": quantiles_ms(r.agent.ack_latency_ms(0.5), r.agent.ack_latency_ms(0.99)),
            "flush_ms": {
                "p50": ms(r.flush.quantile(0.5)),
                "p99": ms(r.flush.quantile(0.99)),
                "mean": ms(r.flush.mean()),
                "flushes": r.flush.count,
                "buckets": r.flush.buckets.iter().map(|(le, n)| json!([if le.is_finite() { json!(le) } else { json!("+Inf") }, n])).collect::<Vec<_>>(),
            },
            "cpu_percent": agent_cpu,
            "rss_peak_kib": r.agent_rss_peak_kib,
            "backlog_events_after": r.backlog_after,
            "backlog_expected": r.expected_backlog,
            "check_errors": r.check_errors,
        },
        "mosquitto": {
            "events_per_second": r.mosquitto.receive_rate(),
            "publish_acks_per_second": r.mosquitto.ack_rate(),
            "measured_seconds": r.mosquitto.measured_secs,
            "received_in_window": r.mosquitto.received_in_window,
            "acked_total": r.mosquitto.acked_total,
            "received_total": r.mosquitto.received_total,
            "ack_latency_ms": quantiles_ms(r.mosquitto.ack_latency_ms(0.5), r.mosquitto.ack_latency_ms(0.99)),
            "cpu_percent": r.mosquitto_cpu.json("mosquitto"),
            "rss_peak_kib": r.mosquitto_rss_peak_kib,
        },
    })
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_shrink_with_more_publishers() {
        assert_eq!(default_window(1), 1000);
        assert_eq!(default_window(10), 200);
        assert_eq!(default_window(100), 100);
    }

    #[test]
    fn rates_are_grouped() {
        assert_eq!(fmt_rate(1234567.4), "1,234,567");
        assert_eq!(fmt_rate(999.0), "999");
    }
}
