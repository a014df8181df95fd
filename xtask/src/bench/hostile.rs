//! `cargo xtask bench hostile`: hostile clients against a real release agent, and whether
//! well-behaved producers still get through while they run.
//!
//! What it owns: the agent's configuration for the suite (the shipped `config/agent.toml` with
//! only `state_dir`, the three listen addresses and the uplink's address changed, so the
//! figures are those of the defaults), a fresh agent for each probe (so each row stands alone),
//! the probes (idle pre-CONNECT sockets, connect churn, garbage MQTT frames, violation-heavy
//! publishes, HTTP slowloris, big HTTP POSTs of refused events), the well-behaved clients that
//! run beside each probe (an MQTT 3.1.1 scanner connected before the probe, another that
//! connects during it, and a WMS posting one event at a time), what is read around each probe
//! (the agent's RSS and descriptors sampled every 100 ms, `/v1/status`, `/metrics`), the
//! printed table and `<target dir>/bench/hostile.json`.
//!
//! Every probe is bounded in connections, bytes and time, and speaks to loopback only. Probes
//! that model many devices bind their sockets to source addresses 127.0.0.10 and up (Linux
//! routes all of 127/8 to `lo`), because the agent budgets pre-CONNECT sockets per source
//! address; the scanners and the WMS use 127.0.0.1. The run fails when a well-behaved scanner
//! missed a PUBACK deadline (1 s) or could not connect during any probe.
//!
//! `BACKHAUL_HOSTILE_PROBES=key,key` runs only the probes with those keys (see [`probes`]),
//! to reproduce one finding without the rest of the suite.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::BytesMut;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, sleep_until, timeout, timeout_at};

use super::loadgen::event_json;
use super::openmetrics::http_get;
use super::{BenchOptions, binary};
use crate::procs::{
    ChildGuard, clock_ticks, cpu_seconds, free_addr, log_tail, machine_busy_seconds, memory_kib,
};
use crate::workspace_root;

/// A well-behaved scanner's PUBACK must come within this, whatever else happens.
const PUBACK_DEADLINE: Duration = Duration::from_secs(1);
/// A PUBACK not here by then counts as lost, and the scanner reconnects.
const PUBACK_GIVE_UP: Duration = Duration::from_secs(10);
/// A well-behaved scanner's CONNACK must come within this.
const CONNACK_WAIT: Duration = Duration::from_secs(5);
/// One publish per scanner this often (each waits for its PUBACK first).
const SCANNER_INTERVAL: Duration = Duration::from_millis(50);
/// The scanner that connects during a probe reconnects this often, so it connects several
/// times while the probe is at its worst.
const DURING_SESSION: Duration = Duration::from_secs(3);
/// A scanner that could not connect tries again after this.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// The WMS posts one event this often.
const WMS_INTERVAL: Duration = Duration::from_millis(500);
const WMS_TIMEOUT: Duration = Duration::from_secs(5);
/// After a probe's sockets are closed, before the "after" readings.
const SETTLE: Duration = Duration::from_secs(2);
/// RSS and descriptors are read this often during a probe.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A probe that has not returned this long after its planned end has hung.
const PROBE_GRACE: Duration = Duration::from_secs(20);
const STARTUP_TIMEOUT: Duration = Duration::from_secs(15);
/// A socket the agent closes sooner than this after it opened counts as refused at once.
const AT_ONCE: Duration = Duration::from_secs(1);
/// RSS growth over one probe (after minus before) beyond this is reported as a finding.
const RSS_GROWTH_LIMIT_KIB: u64 = 50 * 1024;
/// Other processes using more than this (percent of one core) make the table carry a warning.
const NOISY_OTHERS_PERCENT: f64 = 25.0;
/// The source address of the well-behaved clients.
const GOOD_SOURCE: Ipv4Addr = Ipv4Addr::LOCALHOST;
/// Hostile sockets come from 127.0.0.10 and up, at most this many addresses.
const MAX_SOURCES: usize = 200;
/// Violation-heavy events: just under the agent's 16 KiB event limit, and an oversized one
/// that still fits in one MQTT packet (`mqtt.max_packet_size` is 64 KiB).
const VIOLATION_EVENT_BYTES: usize = 16_300;
const OVERSIZED_EVENT_BYTES: usize = 61_000;
/// Body of one big POST of probe 6.
const BIG_POST_BYTES: usize = 2_500_000;
/// Most answer bytes kept (the rest are only counted).
const KEEP_ANSWER_BYTES: usize = 64 * 1024;

/// The probes, in the order they run.
fn probes() -> Vec<Probe> {
    vec![
        Probe {
            key: "idle-one-source",
            title: "1a idle pre-CONNECT sockets, one address",
            sources: 1,
            duration: Duration::from_secs(10),
            peak_after: Duration::from_secs(1),
            kind: Kind::Idle {
                total: 400,
                per_second: 200.0,
            },
        },
        Probe {
            key: "idle-many-sources",
            title: "1b idle pre-CONNECT sockets, 20 addresses",
            sources: 20,
            duration: Duration::from_secs(20),
            peak_after: Duration::from_secs(3),
            kind: Kind::Idle {
                total: 2000,
                per_second: 200.0,
            },
        },
        Probe {
            key: "connect-churn",
            title: "2 connect churn (CONNECT, then reset)",
            sources: 8,
            duration: Duration::from_secs(15),
            peak_after: Duration::from_secs(2),
            kind: Kind::Churn {
                workers: 32,
                per_second: 3000.0,
                max_cycles: 45_000,
            },
        },
        Probe {
            key: "garbage-frames",
            title: "3 garbage MQTT frames",
            sources: 10,
            duration: Duration::from_secs(9),
            peak_after: Duration::from_millis(500),
            kind: Kind::Garbage {
                repeats: 20,
                concurrency: 48,
            },
        },
        Probe {
            key: "violation-publishes",
            title: "4a refused 16 KiB / 60 KiB publishes, 8 clients × 1000 in flight",
            sources: 8,
            duration: Duration::from_secs(12),
            peak_after: Duration::from_secs(2),
            kind: Kind::Violations {
                readers: 8,
                non_readers: 0,
                window: 1000,
            },
        },
        Probe {
            key: "violation-publishes-unread",
            title: "4b refused 16 KiB publishes, 8 clients that never read",
            sources: 8,
            duration: Duration::from_secs(12),
            peak_after: Duration::from_secs(2),
            kind: Kind::Violations {
                readers: 0,
                non_readers: 8,
                window: 1000,
            },
        },
        Probe {
            key: "http-slowloris",
            title: "5 HTTP slowloris (headers and bodies)",
            sources: 8,
            duration: Duration::from_secs(34),
            peak_after: Duration::from_secs(4),
            kind: Kind::Slowloris {
                slow_bodies: 32,
                slow_headers: 288,
                max_opened: 4000,
            },
        },
        Probe {
            key: "http-big-posts",
            title: "6 HTTP 2.5 MB POSTs of refused events",
            sources: 4,
            duration: Duration::from_secs(15),
            peak_after: Duration::from_secs(2),
            kind: Kind::BigPosts {
                parallel: 4,
                max_posts: 200,
            },
        },
    ]
}

struct Probe {
    key: &'static str,
    title: &'static str,
    /// Hostile source addresses: 127.0.0.10 and the next ones.
    sources: usize,
    /// How long the probe runs; what it left open is closed at the end.
    duration: Duration,
    /// When the scanner that connects during the probe starts (the probe is at its worst).
    peak_after: Duration,
    kind: Kind,
}

enum Kind {
    /// TCP connections to the MQTT port that send nothing, opened at a steady rate.
    Idle { total: usize, per_second: f64 },
    /// Workers that connect, send CONNECT, and reset the connection, over and over, at most
    /// `per_second` connections a second.
    Churn {
        workers: usize,
        per_second: f64,
        max_cycles: u64,
    },
    /// Malformed or forbidden MQTT, each kind `repeats` times.
    Garbage { repeats: usize, concurrency: usize },
    /// Clients publishing 16 KiB events of unknown fields and 60 KiB events at QoS 1; the
    /// non-readers subscribe to their rejects topic and never read their socket.
    Violations {
        readers: usize,
        non_readers: usize,
        window: usize,
    },
    /// Connections that trickle a request's header (or its body) one byte every 2 s,
    /// re-opened when closed, up to `max_opened` in all.
    Slowloris {
        slow_bodies: usize,
        slow_headers: usize,
        max_opened: u64,
    },
    /// POSTs of ~2.5 MB arrays of violation-heavy events, some in parallel.
    BigPosts { parallel: usize, max_posts: u64 },
}

fn source(index: usize) -> Ipv4Addr {
    // MAX_SOURCES keeps this within 127.0.0.10..=127.0.0.209.
    Ipv4Addr::new(127, 0, 0, 10 + (index % MAX_SOURCES) as u8)
}

fn sources_label(n: usize) -> String {
    match n {
        0 => "-".into(),
        1 => source(0).to_string(),
        n => format!("{n} ({}–{})", source(0), source(n - 1)),
    }
}

/// A TCP connection from `from` (a loopback address) to `to`.
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0))?;
    socket.connect(to).await
}

/// `connect_from` with a time limit, for probes that must stay bounded.
async fn dial(from: Ipv4Addr, to: SocketAddr) -> Result<TcpStream, String> {
    match timeout(Duration::from_secs(3), connect_from(from, to)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("connect failed: {}", e.kind())),
        Err(_) => Err("connect timed out (3 s)".into()),
    }
}

/// "at once" or "after N s", for what the agent did to a socket.
fn when(elapsed: Duration) -> String {
    if elapsed < AT_ONCE {
        "at once".into()
    } else {
        format!("after {:.0} s", elapsed.as_secs_f64())
    }
}

/// A small xorshift generator for the garbage probe (reproducible per seed).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT bytes, written by hand: the probes need packets no client library would send.

fn put_remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

fn put_str(s: &str, out: &mut Vec<u8>) {
    let bytes = s.as_bytes();
    out.extend_from_slice(&(bytes.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    out.extend_from_slice(&bytes[..bytes.len().min(usize::from(u16::MAX))]);
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    put_remaining_length(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// CONNECT at protocol `level` (4 = 3.1.1, 5 = 5.0, anything else to test refusals).
fn connect_packet(level: u8, client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    connect_named("MQTT", level, client_id, clean, keep_alive)
}

fn connect_named(name: &str, level: u8, client_id: &str, clean: bool, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(name, &mut body);
    body.push(level);
    body.push(if clean { 0x02 } else { 0x00 });
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0); // no properties
    }
    put_str(client_id, &mut body);
    packet(0x10, &body)
}

fn publish_packet(v5: bool, topic: &str, qos: u8, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(payload.len() + topic.len() + 8);
    put_str(topic, &mut body);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if v5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1), &body)
}

fn subscribe_packet(pkid: u16, filter: &str) -> Vec<u8> {
    let mut body = pkid.to_be_bytes().to_vec();
    put_str(filter, &mut body);
    body.push(1);
    packet(0x82, &body)
}

const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// One packet: its first byte, its body, and how many bytes of the buffer it took.
type Frame<'a> = (u8, &'a [u8], usize);

/// The packet at the front of `buf`: (first byte, body, bytes it takes), or `None` when
/// more bytes are needed.
fn next_packet(buf: &[u8]) -> Result<Option<Frame<'_>>, String> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut length = 0usize;
    let mut shift = 0;
    let mut at = 1;
    loop {
        let Some(&byte) = buf.get(at) else {
            return Ok(None);
        };
        length |= usize::from(byte & 0x7F) << shift;
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err("malformed remaining length".into());
        }
    }
    match buf.get(at..at + length) {
        Some(body) => Ok(Some((first, body, at + length))),
        None => Ok(None),
    }
}

/// Reads a variable byte integer at the front of `bytes`: (value, its length).
fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, byte) in bytes.iter().take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// What a packet from the agent says, in a few words ("CONNACK 0x01", "SUBACK 0x80").
fn describe_packet(first: u8, body: &[u8], v5: bool) -> String {
    let hex = |b: Option<&u8>| b.map_or("-".to_string(), |b| format!("0x{b:02x}"));
    match first >> 4 {
        2 => format!("CONNACK {}", hex(body.get(1))),
        4 => "PUBACK".into(),
        3 => "PUBLISH".into(),
        9 => {
            // pkid, then (v5) properties, then one code per filter.
            let mut codes = body.get(2..).unwrap_or(&[]);
            if v5 && let Some((len, n)) = varint(codes) {
                codes = codes.get(n + len..).unwrap_or(&[]);
            }
            let list: Vec<String> = codes.iter().map(|c| format!("0x{c:02x}")).collect();
            format!("SUBACK {}", list.join(","))
        }
        13 => "PINGRESP".into(),
        14 => match body.first() {
            Some(code) => format!("DISCONNECT 0x{code:02x}"),
            None => "DISCONNECT".into(),
        },
        other => format!("packet type {other}"),
    }
}

/// Every packet in `buf`, described; a trailing part is described as such.
fn describe_answer(buf: &[u8], v5: bool) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = buf;
    while !rest.is_empty() {
        match next_packet(rest) {
            Ok(Some((first, body, used))) => {
                out.push(describe_packet(first, body, v5));
                rest = &rest[used..];
            }
            Ok(None) => {
                out.push(format!("{} bytes of a partial packet", rest.len()));
                break;
            }
            Err(e) => {
                out.push(format!("unreadable bytes ({e})"));
                break;
            }
        }
    }
    out
}

/// A v1 event padded to about `size` bytes with fields the v1 event does not have, so the
/// agent finds a violation per field (and lists 20 of them).
fn violation_event(id: &str, size: usize) -> String {
    let mut event = format!(r#"{{"v":1,"id":"{id}","type":"pick""#);
    let mut n = 0u32;
    while event.len() + 13 < size {
        let _ = write!(event, r#","u{n:06}":0"#);
        n += 1;
    }
    event.push('}');
    event
}

// ---------------------------------------------------------------------------------------------
// What a probe counts.

/// Counters the tasks of one probe share.
#[derive(Default)]
struct Conns {
    attempted: AtomicU64,
    connect_errors: AtomicU64,
    open: AtomicU64,
    peak: AtomicU64,
    /// Closed or refused by the agent within [`AT_ONCE`] of opening.
    refused: AtomicU64,
    /// Closed by the agent later (its deadlines).
    closed_later: AtomicU64,
    /// What happened, counted by description.
    answers: Mutex<BTreeMap<String, u64>>,
    /// Probe-specific figures.
    counters: Mutex<BTreeMap<&'static str, u64>>,
}

/// Holds one place in [`Conns::open`] while a socket is open.
struct OpenGuard(Arc<Conns>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Conns {
    fn opened(self: &Arc<Self>) -> OpenGuard {
        let now = self.open.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        OpenGuard(self.clone())
    }

    fn attempt(&self) {
        self.attempted.fetch_add(1, Ordering::Relaxed);
    }

    fn connect_error(&self, what: &str) {
        self.connect_errors.fetch_add(1, Ordering::Relaxed);
        self.tally(format!("hostile side: {what}"));
    }

    fn tally(&self, what: impl Into<String>) {
        if let Ok(mut answers) = self.answers.lock() {
            *answers.entry(what.into()).or_insert(0) += 1;
        }
    }

    fn add(&self, counter: &'static str, n: u64) {
        if let Ok(mut counters) = self.counters.lock() {
            *counters.entry(counter).or_insert(0) += n;
        }
    }

    /// Counts a socket the agent closed (or refused), by how soon it did.
    fn closed(&self, elapsed: Duration) {
        if elapsed < AT_ONCE {
            self.refused.fetch_add(1, Ordering::Relaxed);
        } else {
            self.closed_later.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn figures(&self) -> Figures {
        Figures {
            attempted: self.attempted.load(Ordering::SeqCst),
            connect_errors: self.connect_errors.load(Ordering::SeqCst),
            peak_open: self.peak.load(Ordering::SeqCst),
            refused: self.refused.load(Ordering::SeqCst),
            closed_later: self.closed_later.load(Ordering::SeqCst),
            answers: self.answers.lock().map(|a| a.clone()).unwrap_or_default(),
            counters: self
                .counters
                .lock()
                .map(|c| c.iter().map(|(k, v)| (k.to_string(), *v)).collect())
                .unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Figures {
    attempted: u64,
    connect_errors: u64,
    peak_open: u64,
    refused: u64,
    closed_later: u64,
    answers: BTreeMap<String, u64>,
    counters: BTreeMap<String, u64>,
}

/// What every probe task needs.
#[derive(Clone)]
struct Ctx {
    mqtt: SocketAddr,
    http: SocketAddr,
    sources: usize,
    end: Instant,
    conns: Arc<Conns>,
    peak: Arc<watch::Sender<bool>>,
}

impl Ctx {
    fn source(&self, i: usize) -> Ipv4Addr {
        source(i % self.sources.max(1))
    }

    fn at_peak(&self) {
        self.peak.send_replace(true);
    }
}

async fn run_kind(kind: &Kind, ctx: &Ctx) -> anyhow::Result<()> {
    match *kind {
        Kind::Idle { total, per_second } => probe_idle(ctx, total, per_second).await,
        Kind::Churn {
            workers,
            per_second,
            max_cycles,
        } => probe_churn(ctx, workers, per_second, max_cycles).await,
        Kind::Garbage {
            repeats,
            concurrency,
        } => probe_garbage(ctx, repeats, concurrency).await,
        Kind::Violations {
            readers,
            non_readers,
            window,
        } => probe_violations(ctx, readers, non_readers, window).await,
        Kind::Slowloris {
            slow_bodies,
            slow_headers,
            max_opened,
        } => probe_slowloris(ctx, slow_bodies, slow_headers, max_opened).await,
        Kind::BigPosts {
            parallel,
            max_posts,
        } => probe_big_posts(ctx, parallel, max_posts).await,
    }
}

/// Waits for the tasks until the probe's end, then aborts what is left (closing its sockets).
async fn join_until(tasks: &mut JoinSet<()>, end: Instant) {
    while let Ok(Some(_)) = timeout_at(end, tasks.join_next()).await {}
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

// ---------------------------------------------------------------------------------------------
// Probe 1: idle sockets.

async fn probe_idle(ctx: &Ctx, total: usize, per_second: f64) -> anyhow::Result<()> {
    let started = Instant::now();
    let spacing = Duration::from_secs_f64(1.0 / per_second.max(1.0));
    // Opening stops at half the probe, so the agent's CONNECT deadline shows in the rest.
    let open_until = started + (ctx.end - started) / 2;
    let mut tasks = JoinSet::new();
    for i in 0..total {
        let at = started + spacing * i as u32;
        if at >= open_until {
            break;
        }
        sleep_until(at).await;
        let ctx = ctx.clone();
        let from = ctx.source(i);
        ctx.conns.attempt();
        tasks.spawn(async move {
            let stream = match dial(from, ctx.mqtt).await {
                Ok(stream) => stream,
                Err(e) => return ctx.conns.connect_error(&e),
            };
            let opened = Instant::now();
            let guard = ctx.conns.opened();
            let mut stream = stream;
            let mut buf = [0u8; 256];
            match timeout_at(ctx.end, stream.read(&mut buf)).await {
                Err(_) => ctx.conns.tally("still open at the probe's end"),
                Ok(Ok(n)) if n > 0 => ctx.conns.tally(format!("the agent sent {n} bytes")),
                Ok(ended) => {
                    let took = opened.elapsed();
                    ctx.conns.closed(took);
                    let how = if ended.is_ok() { "closed" } else { "reset" };
                    ctx.conns
                        .tally(format!("{how} by the agent {}", when(took)));
                }
            }
            drop(guard);
        });
    }
    join_until(&mut tasks, ctx.end).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Probe 2: connect churn.

async fn probe_churn(
    ctx: &Ctx,
    workers: usize,
    per_second: f64,
    max_cycles: u64,
) -> anyhow::Result<()> {
    let cycles = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let spacing = Duration::from_secs_f64(1.0 / per_second.max(1.0));
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let ctx = ctx.clone();
        let cycles = cycles.clone();
        tasks.spawn(async move {
            while Instant::now() < ctx.end {
                let n = cycles.fetch_add(1, Ordering::SeqCst);
                if n >= max_cycles {
                    return;
                }
                let at = started + spacing.mul_f64(n as f64);
                if at >= ctx.end {
                    return;
                }
                sleep_until(at).await;
                churn_once(&ctx, ctx.source(w), n).await;
            }
        });
    }
    join_until(&mut tasks, ctx.end).await;
    Ok(())
}

/// One connect: a third take over one of 4 shared client ids, a third are new clean
/// sessions, a third new persistent sessions (which the agent keeps for
/// `mqtt.max_session_expiry_secs` after the reset); half wait for the CONNACK first.
async fn churn_once(ctx: &Ctx, from: Ipv4Addr, n: u64) {
    ctx.conns.attempt();
    let mut stream = match dial(from, ctx.mqtt).await {
        Ok(stream) => stream,
        Err(e) => return ctx.conns.connect_error(&e),
    };
    let opened = Instant::now();
    let _guard = ctx.conns.opened();
    let (client_id, clean) = match n % 3 {
        0 => (format!("churn-shared-{}", n % 4), true),
        1 => (format!("churn-clean-{n}"), true),
        _ => {
            ctx.conns.add("persistent sessions asked for", 1);
            (format!("churn-persistent-{n}"), false)
        }
    };
    if stream
        .write_all(&connect_packet(4, &client_id, clean, 30))
        .await
        .is_err()
    {
        ctx.conns.closed(opened.elapsed());
        return ctx.conns.tally("reset before the CONNECT went out");
    }
    if n.is_multiple_of(2) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 64];
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            if let Ok(Some((first, body, _))) = next_packet(&buf) {
                ctx.conns.tally(describe_packet(first, body, false));
                break;
            }
            match timeout_at(deadline, stream.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                Ok(_) => {
                    ctx.conns.closed(opened.elapsed());
                    ctx.conns
                        .tally(format!("closed before CONNACK {}", when(opened.elapsed())));
                    break;
                }
                Err(_) => {
                    ctx.conns.tally("no CONNACK within 3 s");
                    break;
                }
            }
        }
    } else {
        ctx.conns.tally("reset right after CONNECT");
    }
    // An abortive close: RST, no FIN, no TIME_WAIT.
    let _ = stream.set_zero_linger();
}

// ---------------------------------------------------------------------------------------------
// Probe 3: garbage frames.

#[derive(Debug, Clone, Copy)]
enum Garbage {
    RandomBytes,
    BadRemainingLength,
    HugeRemainingLength,
    PartialConnect,
    ProtocolLevel9,
    Mqtt31,
    HttpRequest,
    PublishFirst,
    PublishWildcard311,
    PublishWildcard5,
    PublishQos3,
    SubscribeAll,
    SecondConnect,
    OversizedPacket,
    ReservedType,
    EmptyIdPersistent,
}

const GARBAGE: [Garbage; 16] = [
    Garbage::RandomBytes,
    Garbage::BadRemainingLength,
    Garbage::HugeRemainingLength,
    Garbage::PartialConnect,
    Garbage::ProtocolLevel9,
    Garbage::Mqtt31,
    Garbage::HttpRequest,
    Garbage::PublishFirst,
    Garbage::PublishWildcard311,
    Garbage::PublishWildcard5,
    Garbage::PublishQos3,
    Garbage::SubscribeAll,
    Garbage::SecondConnect,
    Garbage::OversizedPacket,
    Garbage::ReservedType,
    Garbage::EmptyIdPersistent,
];

impl Garbage {
    fn label(self) -> &'static str {
        match self {
            Garbage::RandomBytes => "512 random bytes",
            Garbage::BadRemainingLength => "CONNECT, 5-byte remaining length",
            Garbage::HugeRemainingLength => "CONNECT announcing 256 MiB",
            Garbage::PartialConnect => "CONNECT cut short (10 of 64 bytes)",
            Garbage::ProtocolLevel9 => "CONNECT protocol level 9",
            Garbage::Mqtt31 => "CONNECT MQIsdp level 3 (MQTT 3.1)",
            Garbage::HttpRequest => "GET / HTTP/1.1",
            Garbage::PublishFirst => "PUBLISH before CONNECT",
            Garbage::PublishWildcard311 => "3.1.1 PUBLISH to scans/#",
            Garbage::PublishWildcard5 => "5.0 PUBLISH to scans/#",
            Garbage::PublishQos3 => "3.1.1 PUBLISH with QoS 3",
            Garbage::SubscribeAll => "3.1.1 SUBSCRIBE #",
            Garbage::SecondConnect => "a second CONNECT",
            Garbage::OversizedPacket => "3.1.1 PUBLISH of 100 KiB",
            Garbage::ReservedType => "3.1.1 packet type 15",
            Garbage::EmptyIdPersistent => "3.1.1 empty client id, clean session 0",
        }
    }

    fn v5(self) -> bool {
        matches!(self, Garbage::PublishWildcard5)
    }

    fn bytes(self, rng: &mut Rng, n: usize) -> Vec<u8> {
        let id = format!("garbage-{n}");
        let hello = || connect_packet(4, &id, true, 30);
        let then = |mut first: Vec<u8>, second: &[u8]| {
            first.extend_from_slice(second);
            first
        };
        match self {
            Garbage::RandomBytes => rng.bytes(512),
            Garbage::BadRemainingLength => vec![0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01, 0x00],
            Garbage::HugeRemainingLength => {
                let mut bytes = vec![0x10, 0xFF, 0xFF, 0xFF, 0x7F];
                bytes.extend(hello().into_iter().skip(2).cycle().take(100));
                bytes
            }
            Garbage::PartialConnect => {
                let mut bytes = vec![0x10, 64];
                bytes.extend(hello().into_iter().skip(2).take(10));
                bytes
            }
            Garbage::ProtocolLevel9 => connect_packet(9, &id, true, 30),
            Garbage::Mqtt31 => connect_named("MQIsdp", 3, &id, true, 30),
            Garbage::HttpRequest => b"GET / HTTP/1.1\r\nHost: backhaul\r\n\r\n".to_vec(),
            Garbage::PublishFirst => publish_packet(false, "scans/x", 1, 1, b"{}"),
            Garbage::PublishWildcard311 => then(
                hello(),
                &publish_packet(false, "scans/#", 1, 1, b"{\"v\":1}"),
            ),
            Garbage::PublishWildcard5 => then(
                connect_packet(5, &id, true, 30),
                &publish_packet(true, "scans/#", 1, 1, b"{\"v\":1}"),
            ),
            Garbage::PublishQos3 => {
                let mut publish = publish_packet(false, "scans/x", 1, 1, b"{}");
                publish[0] = 0x36;
                then(hello(), &publish)
            }
            Garbage::SubscribeAll => then(hello(), &subscribe_packet(1, "#")),
            Garbage::SecondConnect => then(hello(), &hello()),
            Garbage::OversizedPacket => then(
                hello(),
                &publish_packet(false, "scans/x", 1, 1, &vec![b'x'; 100 * 1024]),
            ),
            Garbage::ReservedType => then(hello(), &[0xF0, 0x00]),
            Garbage::EmptyIdPersistent => connect_packet(4, "", false, 30),
        }
    }
}

async fn probe_garbage(ctx: &Ctx, repeats: usize, concurrency: usize) -> anyhow::Result<()> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0x9E37_79B9_7F4A_7C15);
    let mut rng = Rng::new(seed);
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = JoinSet::new();
    // How long the agent is watched after each send: past its 5 s CONNECT deadline.
    let watch_for = Duration::from_secs(7);
    let mut n = 0;
    for _ in 0..repeats {
        for kind in GARBAGE {
            n += 1;
            let bytes = kind.bytes(&mut rng, n);
            let permit = gate.clone().acquire_owned().await;
            let ctx = ctx.clone();
            let from = ctx.source(n);
            ctx.conns.attempt();
            tasks.spawn(async move {
                let _permit = permit;
                let mut stream = match dial(from, ctx.mqtt).await {
                    Ok(stream) => stream,
                    Err(e) => return ctx.conns.connect_error(&e),
                };
                let opened = Instant::now();
                let _guard = ctx.conns.opened();
                let sent = stream.write_all(&bytes).await.is_ok();
                let mut answer = Vec::new();
                let mut chunk = [0u8; 4096];
                let ending = loop {
                    match timeout(watch_for, stream.read(&mut chunk)).await {
                        Err(_) => break None,
                        Ok(Ok(0)) => break Some("closed"),
                        Ok(Ok(got)) => {
                            if answer.len() < KEEP_ANSWER_BYTES {
                                answer.extend_from_slice(&chunk[..got]);
                            }
                        }
                        Ok(Err(_)) => break Some("reset"),
                    }
                };
                let mut said = describe_answer(&answer, kind.v5());
                if !sent {
                    said.insert(0, "(send cut short)".into());
                }
                let ending = match ending {
                    Some(how) => {
                        ctx.conns.closed(opened.elapsed());
                        format!("{how} {}", when(opened.elapsed()))
                    }
                    None => format!("still open after {} s", watch_for.as_secs()),
                };
                let said = if said.is_empty() {
                    "no answer".to_string()
                } else {
                    said.join(", ")
                };
                ctx.conns
                    .tally(format!("{}: {said}; {ending}", kind.label()));
            });
        }
    }
    // Every connection is bounded by watch_for; the probe's end bounds the whole.
    let end = ctx
        .end
        .max(Instant::now() + watch_for + Duration::from_secs(1));
    join_until(&mut tasks, end).await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Probe 4: violation-heavy publishes.

/// A 3.1.1 connection from `from` with its CONNACK read; errors say what went wrong.
async fn mqtt_connect(
    from: Ipv4Addr,
    to: SocketAddr,
    client_id: &str,
) -> Result<(TcpStream, BytesMut), String> {
    let mut stream = connect_from(from, to)
        .await
        .map_err(|e| format!("connect failed: {}", e.kind()))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(&connect_packet(4, client_id, true, 60))
        .await
        .map_err(|e| format!("CONNECT could not be sent: {}", e.kind()))?;
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        match next_packet(&buf) {
            Ok(Some((first, body, used))) => {
                let said = describe_packet(first, body, false);
                if first >> 4 != 2 {
                    return Err(format!("expected CONNACK, got {said}"));
                }
                if body.get(1) != Some(&0) {
                    return Err(format!("refused: {said}"));
                }
                let _ = buf.split_to(used);
                return Ok((stream, buf));
            }
            Ok(None) => {}
            Err(e) => return Err(e),
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err("closed by the agent before CONNACK".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("{} before CONNACK", e.kind())),
        }
    }
}

async fn probe_violations(
    ctx: &Ctx,
    readers: usize,
    non_readers: usize,
    window: usize,
) -> anyhow::Result<()> {
    let normal: Arc<[u8]> = violation_event("hostile-16k", VIOLATION_EVENT_BYTES)
        .into_bytes()
        .into();
    let oversized: Arc<[u8]> = violation_event("hostile-60k", OVERSIZED_EVENT_BYTES)
        .into_bytes()
        .into();
    let mut tasks = JoinSet::new();
    for i in 0..readers {
        let ctx = ctx.clone();
        let (normal, oversized) = (normal.clone(), oversized.clone());
        tasks.spawn(async move {
            if let Err(e) = violator(&ctx, i, window, &normal, &oversized).await {
                ctx.conns.tally(format!("publisher: {e}"));
            }
        });
    }
    for i in 0..non_readers {
        let ctx = ctx.clone();
        let normal = normal.clone();
        tasks.spawn(async move {
            if let Err(e) = non_reader(&ctx, readers + i, &normal).await {
                ctx.conns.tally(format!("non-reader: {e}"));
            }
        });
    }
    // Publishers stop at the end and wait up to 5 s for their last PUBACKs.
    join_until(&mut tasks, ctx.end + Duration::from_secs(6)).await;
    Ok(())
}

/// Publishes 16 KiB and 60 KiB refused events in turn, `window` in flight, until the end.
async fn violator(
    ctx: &Ctx,
    index: usize,
    window: usize,
    normal: &[u8],
    oversized: &[u8],
) -> Result<(), String> {
    ctx.conns.attempt();
    let client_id = format!("hostile-violator-{index}");
    let (stream, buf) = mqtt_connect(ctx.source(index), ctx.mqtt, &client_id).await?;
    let _guard = ctx.conns.opened();
    let (mut reader, mut writer) = stream.into_split();
    let window = Arc::new(Semaphore::new(window));
    let acked = Arc::new(AtomicU64::new(0));
    let reading = {
        let (window, acked, conns) = (window.clone(), acked.clone(), ctx.conns.clone());
        tokio::spawn(async move {
            let mut buf = buf;
            loop {
                while let Ok(Some((first, body, used))) = next_packet(&buf) {
                    if first >> 4 == 4 {
                        acked.fetch_add(1, Ordering::SeqCst);
                        conns.add("PUBACKs to refused events", 1);
                        window.add_permits(1);
                    } else {
                        conns.tally(format!(
                            "publisher got {}",
                            describe_packet(first, body, false)
                        ));
                    }
                    let _ = buf.split_to(used);
                }
                match reader.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
    };
    let topic = format!("scans/{client_id}");
    let mut sent = 0u64;
    let mut pkid = 0u16;
    let outcome = loop {
        let permit = tokio::select! {
            permit = window.acquire() => match permit {
                Ok(permit) => permit,
                Err(_) => break Ok(()),
            },
            _ = sleep_until(ctx.end) => break Ok(()),
        };
        permit.forget();
        pkid = pkid % u16::MAX + 1;
        let payload = if sent.is_multiple_of(2) {
            normal
        } else {
            oversized
        };
        let bytes = publish_packet(false, &topic, 1, pkid, payload);
        match timeout_at(ctx.end, writer.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break Err(format!("publish failed: {}", e.kind())),
            Err(_) => break Ok(()),
        }
        sent += 1;
        ctx.conns.add("refused events published", 1);
        ctx.conns.add(
            if payload.len() > 20_000 {
                "60 KiB events published"
            } else {
                "16 KiB events published"
            },
            1,
        );
    };
    let drained = Instant::now() + Duration::from_secs(5);
    while acked.load(Ordering::SeqCst) < sent && Instant::now() < drained {
        sleep(Duration::from_millis(20)).await;
    }
    let missing = sent.saturating_sub(acked.load(Ordering::SeqCst));
    if missing > 0 {
        ctx.conns
            .add("publishes without PUBACK 5 s after the end", missing);
    }
    reading.abort();
    let _ = writer.write_all(&DISCONNECT).await;
    outcome
}

/// Subscribes to its rejects topic, then publishes refused events and never reads again, so
/// the agent's answers and notices pile up on its side of the socket.
async fn non_reader(ctx: &Ctx, index: usize, payload: &[u8]) -> Result<(), String> {
    ctx.conns.attempt();
    let client_id = format!("hostile-deaf-{index}");
    let (mut stream, mut buf) = mqtt_connect(ctx.source(index), ctx.mqtt, &client_id).await?;
    let _guard = ctx.conns.opened();
    stream
        .write_all(&subscribe_packet(1, &format!("rejects/{client_id}")))
        .await
        .map_err(|e| format!("SUBSCRIBE failed: {}", e.kind()))?;
    let granted = timeout(Duration::from_secs(3), async {
        loop {
            if let Ok(Some((first, body, _))) = next_packet(&buf) {
                return Some(describe_packet(first, body, false));
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    })
    .await;
    ctx.conns.tally(format!(
        "non-reader SUBSCRIBE rejects/{{id}}: {}",
        match granted {
            Ok(Some(said)) => said,
            Ok(None) => "closed".into(),
            Err(_) => "no answer in 3 s".into(),
        }
    ));
    let topic = format!("scans/{client_id}");
    let mut pkid = 1u16;
    loop {
        pkid = pkid % u16::MAX + 1;
        let bytes = publish_packet(false, &topic, 1, pkid, payload);
        match timeout_at(ctx.end, stream.write_all(&bytes)).await {
            Ok(Ok(())) => ctx.conns.add("non-reader publishes written", 1),
            Ok(Err(e)) => return Err(format!("publish failed: {}", e.kind())),
            Err(_) => return Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP.

/// A status line's code, once the answer holds one.
fn http_status(answer: &[u8]) -> Option<u16> {
    let line_end = answer.windows(2).position(|w| w == b"\r\n")?;
    let line = std::str::from_utf8(&answer[..line_end]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

struct HttpAnswer {
    status: Option<u16>,
    /// Bytes after the header's end.
    body_bytes: usize,
    took: Duration,
}

/// Sends a whole request on a fresh connection and reads the answer to its end (the request
/// says `Connection: close`). An answer that comes before the request is all sent is read too.
async fn http_exchange(
    mut stream: TcpStream,
    request: &[u8],
    deadline: Instant,
) -> Result<HttpAnswer, String> {
    let started = Instant::now();
    let sent = timeout_at(deadline, stream.write_all(request)).await;
    if sent.is_err() {
        return Err("the request could not be sent before the deadline".into());
    }
    let mut kept = Vec::new();
    let mut total = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => {
                return Err(format!(
                    "no complete answer within {:?}",
                    deadline - started
                ));
            }
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => {
                total += n;
                if kept.len() < KEEP_ANSWER_BYTES {
                    kept.extend_from_slice(&chunk[..n]);
                }
            }
            // A reset after a whole answer is still an answer.
            Ok(Err(e)) if kept.is_empty() => return Err(format!("{} without an answer", e.kind())),
            Ok(Err(_)) => break,
        }
    }
    let header_end = kept
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4);
    Ok(HttpAnswer {
        status: http_status(&kept),
        body_bytes: header_end.map_or(0, |end| total.saturating_sub(end)),
        took: started.elapsed(),
    })
}

fn post_request(http: SocketAddr, body: &[u8]) -> Vec<u8> {
    let mut request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {http}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    request
}

// Probe 5: slowloris.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Slow {
    /// One byte of the request line and headers every 2 s.
    Header,
    /// Whole headers announcing 100 kB, then one byte of body every 2 s.
    Body,
}

async fn probe_slowloris(
    ctx: &Ctx,
    slow_bodies: usize,
    slow_headers: usize,
    max_opened: u64,
) -> anyhow::Result<()> {
    let budget = Arc::new(AtomicU64::new(max_opened));
    let mut tasks = JoinSet::new();
    // Bodies first, so they are among the connections the listener takes.
    for i in 0..slow_bodies + slow_headers {
        let kind = if i < slow_bodies {
            Slow::Body
        } else {
            Slow::Header
        };
        if i == slow_bodies {
            sleep(Duration::from_millis(300)).await;
        }
        let ctx = ctx.clone();
        let budget = budget.clone();
        tasks.spawn(async move { slow_client(&ctx, i, kind, &budget).await });
        // About 100 new connections a second.
        sleep(Duration::from_millis(10)).await;
    }
    join_until(&mut tasks, ctx.end).await;
    Ok(())
}

/// Opens a slow connection, records what the agent did with it, and opens another while the
/// budget and the time last (so the listener stays under pressure).
async fn slow_client(ctx: &Ctx, index: usize, kind: Slow, budget: &AtomicU64) {
    let request_head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n",
        ctx.http
    );
    loop {
        if Instant::now() + Duration::from_secs(1) >= ctx.end
            || budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_err()
        {
            return;
        }
        ctx.conns.attempt();
        let mut stream = match dial(ctx.source(index), ctx.http).await {
            Ok(stream) => stream,
            Err(e) => {
                ctx.conns.connect_error(&e);
                sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let opened = Instant::now();
        let guard = ctx.conns.opened();
        let what = match kind {
            Slow::Header => "slow header",
            Slow::Body => "slow body",
        };
        // What goes out: the head (at once for a slow body), then one byte every 2 s.
        let mut pending: Vec<u8> = Vec::new();
        if kind == Slow::Body {
            let head = format!("{request_head}Content-Length: 100000\r\n\r\n[");
            if stream.write_all(head.as_bytes()).await.is_err() {
                ctx.conns
                    .tally(format!("{what}: reset before the headers went out"));
                ctx.conns.closed(opened.elapsed());
                continue;
            }
        } else {
            pending = request_head.clone().into_bytes();
            pending.extend_from_slice(b"X-Slow: ");
        }
        let mut sent = 0usize;
        let mut answer = Vec::new();
        let mut chunk = [0u8; 1024];
        // Waits 500 ms before the first trickled byte, so a refusal is read cleanly.
        let mut next_byte = opened + Duration::from_millis(500);
        let mut writable = true;
        let ending = loop {
            tokio::select! {
                read = stream.read(&mut chunk) => match read {
                    Ok(0) => break "closed",
                    Ok(n) => {
                        answer.extend_from_slice(&chunk[..n.min(KEEP_ANSWER_BYTES)]);
                        if http_status(&answer).is_some() {
                            break "answered";
                        }
                    }
                    Err(_) => break "reset",
                },
                _ = sleep_until(next_byte), if writable => {
                    let byte = match kind {
                        Slow::Header => pending.get(sent).copied().unwrap_or(b'a'),
                        Slow::Body => b' ',
                    };
                    if stream.write_all(&[byte]).await.is_err() {
                        writable = false;
                    }
                    sent += 1;
                    next_byte += Duration::from_secs(2);
                }
                _ = sleep_until(ctx.end) => break "open",
            }
        };
        let took = opened.elapsed();
        match (ending, http_status(&answer)) {
            ("open", _) => {
                ctx.conns
                    .tally(format!("{what}: still open at the probe's end"));
                return;
            }
            (_, Some(status)) => {
                ctx.conns.closed(took);
                ctx.conns
                    .tally(format!("{what}: answered {status} {}", when(took)));
            }
            (how, None) => {
                ctx.conns.closed(took);
                ctx.conns
                    .tally(format!("{what}: {how} without an answer {}", when(took)));
            }
        }
        drop(guard);
        // Refused: try again a second later, as a client honouring `Retry-After: 1` would.
        if took < AT_ONCE {
            sleep(Duration::from_secs(1)).await;
        }
    }
}

// Probe 6: big POSTs.

async fn probe_big_posts(ctx: &Ctx, parallel: usize, max_posts: u64) -> anyhow::Result<()> {
    let event_count = BIG_POST_BYTES / (VIOLATION_EVENT_BYTES + 1);
    let mut body = String::with_capacity(BIG_POST_BYTES + 1024);
    body.push('[');
    for i in 0..event_count {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&violation_event(
            &format!("hostile-post-{i}"),
            VIOLATION_EVENT_BYTES,
        ));
    }
    body.push(']');
    let request: Arc<[u8]> = post_request(ctx.http, body.as_bytes()).into();
    ctx.conns.add("events per POST", event_count as u64);
    ctx.conns.add("bytes per POST body", body.len() as u64);
    let posts = Arc::new(AtomicU64::new(0));
    let answer_max = Arc::new(AtomicU64::new(0));
    let took_max_ms = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for w in 0..parallel {
        let ctx = ctx.clone();
        let (request, posts) = (request.clone(), posts.clone());
        let (answer_max, took_max_ms) = (answer_max.clone(), took_max_ms.clone());
        tasks.spawn(async move {
            while Instant::now() < ctx.end && posts.fetch_add(1, Ordering::SeqCst) < max_posts {
                ctx.conns.attempt();
                let stream = match dial(ctx.source(w), ctx.http).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        ctx.conns.connect_error(&e);
                        continue;
                    }
                };
                let _guard = ctx.conns.opened();
                let deadline = Instant::now() + Duration::from_secs(60);
                match http_exchange(stream, &request, deadline).await {
                    Ok(answer) => {
                        ctx.conns.add("POSTs answered", 1);
                        answer_max.fetch_max(answer.body_bytes as u64, Ordering::SeqCst);
                        took_max_ms.fetch_max(answer.took.as_millis() as u64, Ordering::SeqCst);
                        ctx.conns.tally(match answer.status {
                            Some(code) => format!("answered {code}"),
                            None => "answered without a status line".into(),
                        });
                    }
                    Err(e) => ctx.conns.tally(e),
                }
            }
        });
    }
    // A POST started before the end may take its time; the exchange has its own deadline.
    join_until(&mut tasks, ctx.end + Duration::from_secs(15)).await;
    ctx.conns.add(
        "largest answer body bytes",
        answer_max.load(Ordering::SeqCst),
    );
    ctx.conns
        .add("slowest POST ms", took_max_ms.load(Ordering::SeqCst));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The well-behaved clients: two scanners and a WMS, on their own thread and runtime so the
// probe's own work cannot delay them.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Before,
    During,
}

#[derive(Debug, Clone, Default)]
struct ScannerReport {
    connects_tried: u64,
    connects_ok: u64,
    connect_ms_max: f64,
    connect_failures: u64,
    publishes: u64,
    acked: u64,
    latencies_us: Vec<u32>,
    late: u64,
    lost: u64,
    /// The first few incidents (failed connects, late or lost PUBACKs), with when they
    /// happened (seconds since the probe started).
    incidents: Vec<String>,
}

impl ScannerReport {
    fn incident(&mut self, at: f64, what: String) {
        if self.incidents.len() < 10 {
            self.incidents.push(format!("t+{at:.1} s: {what}"));
        }
    }

    fn ok(&self) -> bool {
        self.connects_ok > 0 && self.connect_failures == 0 && self.late == 0 && self.lost == 0
    }

    fn latency_ms(&self, q: f64) -> Option<f64> {
        quantile_ms(&self.latencies_us, q)
    }
}

fn quantile_ms(sorted_us: &[u32], q: f64) -> Option<f64> {
    if sorted_us.is_empty() {
        return None;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    Some(f64::from(sorted_us[rank - 1]) / 1000.0)
}

#[derive(Debug, Clone, Default)]
struct WmsReport {
    sent: u64,
    accepted: u64,
    answers: BTreeMap<String, u64>,
    max_ms: f64,
}

struct WellBehavedReport {
    before: ScannerReport,
    during: ScannerReport,
    wms: WmsReport,
}

struct WellBehaved {
    thread: std::thread::JoinHandle<anyhow::Result<WellBehavedReport>>,
}

impl WellBehaved {
    /// Starts the clients; returns once the "before" scanner has its CONNACK (or gave up on
    /// its first try, which the report shows).
    async fn start(
        mqtt: SocketAddr,
        http: SocketAddr,
        tag: &str,
        t0: Arc<Mutex<Option<Instant>>>,
        peak: watch::Receiver<bool>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<WellBehaved> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the scanners' runtime")?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let tag = tag.to_string();
        let thread = std::thread::Builder::new()
            .name("hostile-scanners".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let clock = Clock(t0);
                    let before = scanner(
                        Role::Before,
                        mqtt,
                        format!("scanner-before-{tag}"),
                        clock.clone(),
                        peak.clone(),
                        stop.clone(),
                        Some(ready_tx),
                    );
                    let during = scanner(
                        Role::During,
                        mqtt,
                        format!("scanner-during-{tag}"),
                        clock.clone(),
                        peak,
                        stop.clone(),
                        None,
                    );
                    let wms = wms(http, format!("wms-{tag}"), stop);
                    let (before, during, wms) = tokio::join!(before, during, wms);
                    Ok(WellBehavedReport {
                        before,
                        during,
                        wms,
                    })
                })
            })
            .context("cannot start the scanners' thread")?;
        let _ = timeout(CONNACK_WAIT + Duration::from_secs(1), ready_rx).await;
        Ok(WellBehaved { thread })
    }

    async fn finish(self) -> anyhow::Result<WellBehavedReport> {
        let joined = tokio::task::spawn_blocking(move || self.thread.join())
            .await
            .context("waiting for the scanners' thread")?;
        match joined {
            Ok(report) => report,
            Err(_) => bail!("the scanners' thread panicked"),
        }
    }
}

/// Seconds since the probe started (negative before it does), for incident reports.
#[derive(Clone)]
struct Clock(Arc<Mutex<Option<Instant>>>);

impl Clock {
    fn now(&self) -> f64 {
        let started = self.0.lock().ok().and_then(|t| *t);
        match started {
            Some(t0) => {
                let now = Instant::now();
                if now >= t0 {
                    (now - t0).as_secs_f64()
                } else {
                    -(t0 - now).as_secs_f64()
                }
            }
            None => 0.0,
        }
    }
}

/// Waits for `stop` to turn true, or for `until`; true when stopped.
async fn stopped_or(stop: &mut watch::Receiver<bool>, until: Instant) -> bool {
    if *stop.borrow() {
        return true;
    }
    let ended = tokio::select! {
        waited = stop.wait_for(|s| *s) => waited.is_err(),
        _ = sleep_until(until) => false,
    };
    if ended {
        // The sender is gone: keep the pace, then stop.
        sleep_until(until).await;
        return true;
    }
    *stop.borrow()
}

/// A well-behaved scanner: MQTT 3.1.1, clean session, one valid event every 50 ms at QoS 1,
/// each waiting for its PUBACK. `Before` connects at once and stays; `During` waits for the
/// probe's peak, then reconnects every [`DURING_SESSION`].
async fn scanner(
    role: Role,
    mqtt: SocketAddr,
    client_id: String,
    clock: Clock,
    mut peak: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    mut ready: Option<oneshot::Sender<()>>,
) -> ScannerReport {
    let mut report = ScannerReport::default();
    if role == Role::During {
        tokio::select! {
            _ = peak.wait_for(|p| *p) => {}
            _ = stop.wait_for(|s| *s) => return report,
        }
    }
    let topic = format!("scans/{client_id}");
    let mut seq = 0u64;
    'connect: while !*stop.borrow() {
        report.connects_tried += 1;
        let started = Instant::now();
        let connected = timeout(CONNACK_WAIT, mqtt_connect(GOOD_SOURCE, mqtt, &client_id))
            .await
            .unwrap_or_else(|_| Err(format!("no CONNACK within {} s", CONNACK_WAIT.as_secs())));
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
        let (mut stream, mut buf) = match connected {
            Ok(session) => session,
            Err(e) => {
                report.connect_failures += 1;
                report.incident(clock.now(), format!("could not connect: {e}"));
                if stopped_or(&mut stop, Instant::now() + RECONNECT_AFTER).await {
                    break;
                }
                continue;
            }
        };
        report.connects_ok += 1;
        report.connect_ms_max = report
            .connect_ms_max
            .max(started.elapsed().as_secs_f64() * 1000.0);
        let session_end = (role == Role::During).then(|| Instant::now() + DURING_SESSION);
        let mut next = Instant::now();
        loop {
            next = (next + SCANNER_INTERVAL).max(Instant::now());
            let stopping = stopped_or(&mut stop, next).await;
            if stopping || session_end.is_some_and(|end| Instant::now() >= end) {
                let _ = stream.write_all(&DISCONNECT).await;
                if stopping {
                    break 'connect;
                }
                continue 'connect;
            }
            seq += 1;
            let pkid = (seq % u64::from(u16::MAX)) as u16 + 1;
            let payload = event_json(&format!("{client_id}-{seq}"), &client_id, seq);
            let publish = publish_packet(false, &topic, 1, pkid, payload.as_bytes());
            report.publishes += 1;
            let sent = Instant::now();
            let at = clock.now();
            if let Err(e) = stream.write_all(&publish).await {
                report.lost += 1;
                report.incident(at, format!("publish {seq} could not be sent: {}", e.kind()));
                continue 'connect;
            }
            match wait_puback(&mut stream, &mut buf, pkid, sent + PUBACK_GIVE_UP).await {
                Ok(()) => {
                    let took = sent.elapsed();
                    report.acked += 1;
                    report
                        .latencies_us
                        .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                    if took > PUBACK_DEADLINE {
                        report.late += 1;
                        report.incident(
                            at,
                            format!("PUBACK after {:.0} ms", took.as_secs_f64() * 1000.0),
                        );
                    }
                }
                Err(e) => {
                    report.lost += 1;
                    report.incident(at, format!("publish {seq}: {e}"));
                    continue 'connect;
                }
            }
        }
    }
    if let Some(tx) = ready.take() {
        let _ = tx.send(());
    }
    report.latencies_us.sort_unstable();
    report
}

async fn wait_puback(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    pkid: u16,
    deadline: Instant,
) -> Result<(), String> {
    loop {
        while let Some((first, body, used)) = next_packet(buf)? {
            let matches = first >> 4 == 4 && body.get(..2) == Some(&pkid.to_be_bytes()[..]);
            let _ = buf.split_to(used);
            if matches {
                return Ok(());
            }
        }
        match timeout_at(deadline, stream.read_buf(buf)).await {
            Err(_) => return Err(format!("no PUBACK within {} s", PUBACK_GIVE_UP.as_secs())),
            Ok(Ok(0)) => return Err("the agent closed the connection before the PUBACK".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("{} while waiting for the PUBACK", e.kind())),
        }
    }
}

/// A WMS posting one valid event every [`WMS_INTERVAL`] on a fresh connection.
async fn wms(http: SocketAddr, tag: String, mut stop: watch::Receiver<bool>) -> WmsReport {
    let mut report = WmsReport::default();
    let mut next = Instant::now();
    let mut seq = 0u64;
    while !stopped_or(&mut stop, next).await {
        next += WMS_INTERVAL;
        seq += 1;
        report.sent += 1;
        let event = event_json(&format!("{tag}-{seq}"), "wms", seq);
        let request = post_request(http, event.as_bytes());
        let deadline = Instant::now() + WMS_TIMEOUT;
        let answer = match timeout_at(deadline, connect_from(GOOD_SOURCE, http)).await {
            Ok(Ok(stream)) => http_exchange(stream, &request, deadline).await,
            Ok(Err(e)) => Err(format!("connect failed: {}", e.kind())),
            Err(_) => Err("connect timed out".into()),
        };
        let said = match answer {
            Ok(answer) => {
                report.max_ms = report.max_ms.max(answer.took.as_secs_f64() * 1000.0);
                if answer.status == Some(202) {
                    report.accepted += 1;
                }
                answer
                    .status
                    .map_or("no status line".to_string(), |s| s.to_string())
            }
            Err(e) => e,
        };
        *report.answers.entry(said).or_insert(0) += 1;
    }
    report
}

// ---------------------------------------------------------------------------------------------
// The agent, and what is read around each probe.

struct Agent {
    guard: ChildGuard,
    mqtt: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    log: std::path::PathBuf,
}

/// The shipped configuration with only `state_dir`, the `listen` of `[mqtt]`, `[http]` and
/// `[admin]`, and `[uplink]`'s address changed.
fn suite_config(
    shipped: &str,
    state_dir: &Path,
    mqtt: SocketAddr,
    http: SocketAddr,
    admin: SocketAddr,
    uplink: SocketAddr,
) -> anyhow::Result<String> {
    let state = serde_json::to_string(&state_dir.display().to_string())
        .context("encoding the state directory")?;
    let mut out = String::from(
        "# config/agent.toml as shipped; `cargo xtask bench hostile` changed only state_dir, the\n\
         # listen addresses and the uplink's address (a closed loopback port: the WAN is down).\n",
    );
    let mut section = String::new();
    let mut changed: Vec<&str> = Vec::new();
    for line in shipped.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        let key = if trimmed.starts_with('#') {
            None
        } else {
            trimmed.split_once('=').map(|(k, _)| k.trim())
        };
        let replacement = match (section.as_str(), key) {
            ("", Some("state_dir")) => Some(("state_dir", format!("state_dir = {state}"))),
            ("mqtt", Some("listen")) => Some(("mqtt.listen", format!("listen = \"{mqtt}\""))),
            ("http", Some("listen")) => Some(("http.listen", format!("listen = \"{http}\""))),
            ("admin", Some("listen")) => Some(("admin.listen", format!("listen = \"{admin}\""))),
            ("uplink", Some("host")) => {
                Some(("uplink.host", format!("host = \"{}\"", uplink.ip())))
            }
            ("uplink", Some("port")) => Some(("uplink.port", format!("port = {}", uplink.port()))),
            _ => None,
        };
        match replacement {
            Some((name, text)) => {
                changed.push(name);
                out.push_str(&text);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    for wanted in [
        "state_dir",
        "mqtt.listen",
        "http.listen",
        "admin.listen",
        "uplink.host",
        "uplink.port",
    ] {
        if !changed.contains(&wanted) {
            bail!("config/agent.toml has no {wanted} line to point at this run");
        }
    }
    Ok(out)
}

async fn start_agent(release: &Path, dir: &Path) -> anyhow::Result<Agent> {
    let bin = binary(release, "backhaul-agent")?;
    let shipped_path = workspace_root().join("config").join("agent.toml");
    let shipped = std::fs::read_to_string(&shipped_path)
        .with_context(|| format!("cannot read {}", shipped_path.display()))?;
    let (mqtt, http, admin, uplink) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let text = suite_config(&shipped, &dir.join("state"), mqtt, http, admin, uplink)?;
    let config = dir.join("agent.toml");
    std::fs::write(&config, text).with_context(|| format!("cannot write {}", config.display()))?;
    let log = dir.join("agent.log");
    // As the systemd unit runs it: JSON lines at the default level.
    let mut guard = ChildGuard::spawn(
        "backhaul-agent",
        Command::new(&bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("BACKHAUL_LOG")
            .env("BACKHAUL_LOG_FORMAT", "json"),
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
        sleep(Duration::from_millis(50)).await;
    }
    Ok(Agent {
        guard,
        mqtt,
        http,
        admin,
        log,
    })
}

async fn agent_status(agent: &Agent) -> anyhow::Result<Value> {
    let (status, text) = http_get(agent.admin, "/v1/status").await?;
    if status != 200 {
        bail!("GET /v1/status answered {status}: {text}");
    }
    serde_json::from_str(&text).context("/v1/status is not JSON")
}

/// A counter or gauge of `/metrics` (summed over its label sets).
async fn metric(agent: &Agent, name: &str) -> Option<f64> {
    let (status, text) = http_get(agent.admin, "/metrics").await.ok()?;
    if status != 200 {
        return None;
    }
    let values: Vec<f64> = text
        .lines()
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Time the machine spent in interrupts and soft interrupts so far, in seconds: on loopback
/// that is mostly this suite's own traffic, not other processes.
fn machine_irq_seconds(ticks_per_second: f64) -> f64 {
    let Ok(text) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = text.lines().find(|l| l.starts_with("cpu ")) else {
        return 0.0;
    };
    // user nice system idle iowait irq softirq ...
    let ticks: u64 = line
        .split_whitespace()
        .skip(6)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / ticks_per_second
}

fn fd_count(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count() as u64)
        .unwrap_or(0)
}

/// The agent's RSS and descriptors, read every [`SAMPLE_EVERY`] until stopped.
struct Sampler {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Samples>,
}

#[derive(Default)]
struct Samples {
    rss_peak_kib: u64,
    fds_peak: u64,
    /// VmRSS once a second, KiB.
    rss_by_second: Vec<u64>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            let mut samples = Samples::default();
            let started = Instant::now();
            loop {
                if let Ok((rss, _)) = memory_kib(pid) {
                    samples.rss_peak_kib = samples.rss_peak_kib.max(rss);
                    if started.elapsed().as_secs() >= samples.rss_by_second.len() as u64 {
                        samples.rss_by_second.push(rss);
                    }
                }
                samples.fds_peak = samples.fds_peak.max(fd_count(pid));
                tokio::select! {
                    _ = sleep(SAMPLE_EVERY) => {}
                    _ = stopped.wait_for(|s| *s) => return samples,
                }
            }
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Samples {
        self.stop.send_replace(true);
        self.task.await.unwrap_or_default()
    }
}

struct Row {
    key: &'static str,
    title: &'static str,
    sources: usize,
    seconds: f64,
    figures: Figures,
    rss_before_kib: u64,
    rss_after_kib: u64,
    rss_peak_kib: u64,
    rss_by_second: Vec<u64>,
    fds_before: u64,
    fds_peak: u64,
    fds_after: u64,
    status_before: Value,
    status_after: Value,
    protocol_errors: Option<f64>,
    log_bytes: u64,
    cpu_agent: f64,
    cpu_others: f64,
    before: ScannerReport,
    during: ScannerReport,
    wms: WmsReport,
    probe_error: Option<String>,
    /// How the agent stopped after the probe, when not cleanly.
    agent_exit: Option<String>,
    agent_log: std::path::PathBuf,
}

impl Row {
    fn rss_growth_kib(&self) -> i64 {
        self.rss_after_kib as i64 - self.rss_before_kib as i64
    }

    fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, s) in [("before", &self.before), ("during", &self.during)] {
            if s.connects_ok == 0 {
                out.push(format!("scanner ({name}) never connected"));
            }
            if s.connect_failures > 0 {
                out.push(format!(
                    "scanner ({name}) failed {} of {} connects",
                    s.connect_failures, s.connects_tried
                ));
            }
            if s.late > 0 {
                out.push(format!("scanner ({name}) had {} PUBACKs over 1 s", s.late));
            }
            if s.lost > 0 {
                out.push(format!(
                    "scanner ({name}) had {} publishes without PUBACK",
                    s.lost
                ));
            }
        }
        if let Some(e) = &self.probe_error {
            out.push(format!("probe: {e}"));
        }
        out
    }

    fn findings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.rss_growth_kib() > RSS_GROWTH_LIMIT_KIB as i64 {
            out.push(format!(
                "agent RSS grew {:.1} MiB over the probe",
                self.rss_growth_kib() as f64 / 1024.0
            ));
        }
        if self.rss_peak_kib.saturating_sub(self.rss_before_kib) > RSS_GROWTH_LIMIT_KIB {
            out.push(format!(
                "agent RSS peaked {:.1} MiB above its start",
                (self.rss_peak_kib - self.rss_before_kib) as f64 / 1024.0
            ));
        }
        if let Some(exit) = &self.agent_exit {
            out.push(format!("the agent {exit}"));
        }
        out
    }
}

async fn run_probe(agent: &mut Agent, probe: &Probe, ticks: f64) -> anyhow::Result<Row> {
    let pid = agent.guard.pid();
    let status_before = agent_status(agent).await?;
    let protocol_errors_before = metric(agent, "backhaul_agent_mqtt_protocol_errors_total").await;
    let log_before = std::fs::metadata(&agent.log).map(|m| m.len()).unwrap_or(0);
    let (rss_before_kib, _) = memory_kib(pid)?;
    let fds_before = fd_count(pid);
    let sampler = Sampler::start(pid);

    let (peak_tx, peak_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Arc::new(Mutex::new(None));
    let clients = WellBehaved::start(
        agent.mqtt,
        agent.http,
        probe.key,
        t0.clone(),
        peak_rx,
        stop_rx,
    )
    .await?;

    let cpu_start = (
        cpu_seconds(pid, ticks)?,
        cpu_seconds(0, ticks)?,
        machine_busy_seconds(ticks)? - machine_irq_seconds(ticks),
    );
    let started = Instant::now();
    if let Ok(mut t) = t0.lock() {
        *t = Some(started);
    }
    let ctx = Ctx {
        mqtt: agent.mqtt,
        http: agent.http,
        sources: probe.sources.clamp(1, MAX_SOURCES),
        end: started + probe.duration,
        conns: Arc::new(Conns::default()),
        peak: Arc::new(peak_tx),
    };
    let peak_timer = {
        let (peak, at) = (ctx.peak.clone(), started + probe.peak_after);
        tokio::spawn(async move {
            sleep_until(at).await;
            peak.send_replace(true);
        })
    };
    let outcome = timeout(probe.duration + PROBE_GRACE, run_kind(&probe.kind, &ctx)).await;
    let probe_error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some(format!(
            "did not finish within {:?} of its planned end",
            PROBE_GRACE
        )),
    };
    // The well-behaved clients run for the probe's whole time, even when it was done sooner.
    sleep_until(ctx.end).await;
    ctx.at_peak();
    peak_timer.abort();
    let seconds = started.elapsed().as_secs_f64();
    stop_tx.send_replace(true);
    let cpu_end = (
        cpu_seconds(pid, ticks)?,
        cpu_seconds(0, ticks)?,
        machine_busy_seconds(ticks)? - machine_irq_seconds(ticks),
    );
    let clients = clients.finish().await?;
    sleep(SETTLE).await;
    agent.guard.check_running()?;
    let samples = sampler.finish().await;
    let (rss_after_kib, _) = memory_kib(pid)?;
    let fds_after = fd_count(pid);
    let status_after = agent_status(agent).await?;
    let protocol_errors = match (
        protocol_errors_before,
        metric(agent, "backhaul_agent_mqtt_protocol_errors_total").await,
    ) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    let log_after = std::fs::metadata(&agent.log).map(|m| m.len()).unwrap_or(0);
    let elapsed = seconds.max(1e-9);
    let agent_cpu = cpu_end.0 - cpu_start.0;
    let own_cpu = cpu_end.1 - cpu_start.1;
    let machine = cpu_end.2 - cpu_start.2;
    Ok(Row {
        key: probe.key,
        title: probe.title,
        sources: probe.sources,
        seconds,
        figures: ctx.conns.figures(),
        rss_before_kib,
        rss_after_kib,
        rss_peak_kib: samples.rss_peak_kib.max(rss_after_kib).max(rss_before_kib),
        rss_by_second: samples.rss_by_second,
        fds_before,
        fds_peak: samples.fds_peak.max(fds_after),
        fds_after,
        status_before,
        status_after,
        protocol_errors,
        log_bytes: log_after.saturating_sub(log_before),
        cpu_agent: 100.0 * agent_cpu / elapsed,
        cpu_others: (100.0 * (machine - agent_cpu - own_cpu) / elapsed).max(0.0),
        before: clients.before,
        during: clients.during,
        wms: clients.wms,
        probe_error,
        agent_exit: None,
        agent_log: agent.log.clone(),
    })
}

/// The probes to run: all of them, or those `BACKHAUL_HOSTILE_PROBES` names.
fn selected_probes() -> anyhow::Result<Vec<Probe>> {
    let all = probes();
    let Ok(wanted) = std::env::var("BACKHAUL_HOSTILE_PROBES") else {
        return Ok(all);
    };
    let keys: Vec<&str> = wanted
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    if let Some(unknown) = keys.iter().find(|k| all.iter().all(|p| p.key != **k)) {
        let known: Vec<&str> = all.iter().map(|p| p.key).collect();
        bail!(
            "BACKHAUL_HOSTILE_PROBES: no probe {unknown:?}; there is: {}",
            known.join(", ")
        );
    }
    Ok(all.into_iter().filter(|p| keys.contains(&p.key)).collect())
}

pub async fn run(_options: &BenchOptions, release: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let dir = out_dir.join("hostile");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot clear the previous run's {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let ticks = clock_ticks();
    let selected = selected_probes()?;
    let mut rows = Vec::new();
    let mut fatal = None;
    // A fresh agent (and log) for each probe, so each row stands alone and can be reproduced
    // alone.
    for probe in selected {
        let probe_dir = dir.join(probe.key);
        std::fs::create_dir_all(&probe_dir)
            .with_context(|| format!("cannot create {}", probe_dir.display()))?;
        let mut agent = match start_agent(release, &probe_dir).await {
            Ok(agent) => agent,
            Err(e) => {
                fatal = Some(format!("{}: {e:#}", probe.title));
                break;
            }
        };
        eprintln!(
            "xtask: bench hostile: {} ({} s; agent pid {}, MQTT {}, HTTP {})",
            probe.title,
            probe.duration.as_secs(),
            agent.guard.pid(),
            agent.mqtt,
            agent.http,
        );
        let outcome = run_probe(&mut agent, &probe, ticks).await;
        let exit = tokio::task::block_in_place(|| agent.guard.terminate(Duration::from_secs(15)));
        let _ = std::fs::remove_dir_all(probe_dir.join("state"));
        match outcome {
            Ok(mut row) => {
                row.agent_exit = match exit {
                    Ok(Some(status)) if status.success() => None,
                    Ok(Some(status)) => Some(format!("exited {status} on SIGTERM")),
                    Ok(None) => Some("did not exit within 15 s of SIGTERM (killed)".into()),
                    Err(e) => Some(format!("could not be stopped: {e:#}")),
                };
                for line in row.failures().iter().chain(&row.findings()) {
                    eprintln!("xtask: bench hostile:   {line}");
                }
                rows.push(row);
            }
            Err(e) => {
                fatal = Some(format!(
                    "{}: {e:#} (agent log: {})",
                    probe.title,
                    agent.log.display()
                ));
                break;
            }
        }
    }
    let agent_hwm_kib = rows.iter().map(|r| r.rss_peak_kib).max().unwrap_or(0);
    let elapsed = started.elapsed().as_secs_f64();

    println!("{}", render(&rows, agent_hwm_kib, elapsed));
    let report = json!({
        "bench": "hostile",
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "settings": {
            "config": "config/agent.toml as shipped; state_dir, mqtt/http/admin listen and the uplink address changed (uplink on a closed port)",
            "puback_deadline_ms": PUBACK_DEADLINE.as_millis() as u64,
            "scanner_interval_ms": SCANNER_INTERVAL.as_millis() as u64,
            "scanner_during_reconnect_every_s": DURING_SESSION.as_secs(),
            "wms_interval_ms": WMS_INTERVAL.as_millis() as u64,
            "good_source": GOOD_SOURCE.to_string(),
            "hostile_sources_from": source(0).to_string(),
        },
        "probes": rows.iter().map(row_json).collect::<Vec<_>>(),
        "agent_peak_rss_kib": agent_hwm_kib,
        "error": fatal,
        "elapsed_seconds": elapsed,
        "ok": fatal.is_none() && rows.iter().all(|r| r.failures().is_empty()),
    });
    let json_path = out_dir.join("hostile.json");
    let text = serde_json::to_string_pretty(&report).context("encoding the report")?;
    std::fs::write(&json_path, text + "\n")
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("results: {}", json_path.display());

    if let Some(e) = fatal {
        bail!("the hostile suite stopped: {e}");
    }
    let failures: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.failures()
                .into_iter()
                .map(move |f| format!("{}: {f}", r.title))
        })
        .collect();
    if !failures.is_empty() {
        bail!(
            "well-behaved clients were hurt by hostile ones:\n  {}",
            failures.join("\n  ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Output.

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.0}"),
        None => "-".into(),
    }
}

fn scanner_cell(s: &ScannerReport, role: Role) -> String {
    let connects = match role {
        Role::Before => String::new(),
        Role::During => format!("{}/{} connects, ", s.connects_ok, s.connects_tried),
    };
    let mut cell = format!(
        "{connects}{} pubs, max {} / p99 {} ms",
        s.publishes,
        fmt_ms(s.latency_ms(1.0)),
        fmt_ms(s.latency_ms(0.99)),
    );
    if s.late > 0 {
        let _ = write!(cell, ", **{} > 1 s**", s.late);
    }
    if s.lost > 0 {
        let _ = write!(cell, ", **{} lost**", s.lost);
    }
    if s.connect_failures > 0 {
        let _ = write!(cell, ", **{} connects failed**", s.connect_failures);
    }
    cell
}

fn status_u64(status: &Value, path: &[&str]) -> u64 {
    path.iter()
        .fold(status, |v, key| &v[*key])
        .as_u64()
        .unwrap_or(0)
}

fn render(rows: &[Row], agent_hwm_kib: u64, elapsed: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nhostile clients vs. backhaul-agent (config/agent.toml defaults); well-behaved: two MQTT 3.1.1 \
         scanners from {GOOD_SOURCE} (one connected before the probe, one connecting during it, every \
         {} s), one event per 50 ms each at QoS 1, PUBACK deadline 1 s; a WMS POSTing one event per 500 ms\n",
        DURING_SESSION.as_secs()
    );
    let header = [
        "probe",
        "hostile sources",
        "conns tried / peak held",
        "agent refused at once / closed later",
        "agent RSS MiB before → after (peak)",
        "agent fds peak → after",
        "scanner connected before",
        "scanner connecting during",
        "WMS 202/sent",
        "verdict",
    ];
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(
        out,
        "|{}",
        header.iter().map(|_| "---|").collect::<String>()
    );
    for r in rows {
        let f = &r.figures;
        let failures = r.failures();
        let findings = r.findings();
        let verdict = if failures.is_empty() && findings.is_empty() {
            "ok".to_string()
        } else {
            let mut all = failures.clone();
            all.extend(findings);
            format!(
                "**{}**: {}",
                if failures.is_empty() {
                    "finding"
                } else {
                    "FAIL"
                },
                all.join("; ")
            )
        };
        let cells = [
            r.title.to_string(),
            sources_label(r.sources),
            format!("{} / {}", f.attempted, f.peak_open),
            format!("{} / {}", f.refused, f.closed_later),
            format!(
                "{} → {} ({})",
                mib(r.rss_before_kib),
                mib(r.rss_after_kib),
                mib(r.rss_peak_kib)
            ),
            format!("{} → {}", r.fds_peak, r.fds_after),
            scanner_cell(&r.before, Role::Before),
            scanner_cell(&r.during, Role::During),
            format!("{}/{}", r.wms.accepted, r.wms.sent),
            verdict,
        ];
        let _ = writeln!(out, "| {} |", cells.join(" | "));
    }
    let _ = writeln!(
        out,
        "\n(conns tried: connections the probe opened; peak held: open at once at the probe's peak; \
         refused at once: closed or refused by the agent within 1 s of opening; closed later: by its \
         deadlines. fds: the agent's open descriptors at the peak → after the probe.)\n"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{} — {:.0} s, agent CPU {:.0}% of a core, other processes {:.0}%:",
            r.title, r.seconds, r.cpu_agent, r.cpu_others
        );
        for (what, n) in &r.figures.answers {
            let _ = writeln!(out, "  - {n} × {what}");
        }
        for (what, n) in &r.figures.counters {
            let _ = writeln!(out, "  - {what}: {n}");
        }
        let rejects = (
            status_u64(&r.status_before, &["rejects_stored"]),
            status_u64(&r.status_after, &["rejects_stored"]),
        );
        let reject_bytes = (
            status_u64(&r.status_before, &["quota", "rejects_bytes"]),
            status_u64(&r.status_after, &["quota", "rejects_bytes"]),
        );
        let _ = writeln!(
            out,
            "  - agent: reject store {} → {} ({:.1} → {:.1} MiB), MQTT protocol errors +{}, agent log +{:.1} MiB, MQTT clients after {}",
            rejects.0,
            rejects.1,
            reject_bytes.0 as f64 / (1 << 20) as f64,
            reject_bytes.1 as f64 / (1 << 20) as f64,
            r.protocol_errors.map_or("?".into(), |n| format!("{n:.0}")),
            r.log_bytes as f64 / (1 << 20) as f64,
            status_u64(&r.status_after, &["mqtt", "connected_clients"]),
        );
        if r.rss_peak_kib.saturating_sub(r.rss_before_kib) > 5 * 1024 {
            let series: Vec<String> = r.rss_by_second.iter().map(|kib| mib(*kib)).collect();
            let _ = writeln!(
                out,
                "  - agent RSS MiB, once a second: {}",
                series.join(" ")
            );
        }
        let wms: Vec<String> = r
            .wms
            .answers
            .iter()
            .map(|(what, n)| format!("{n} × {what}"))
            .collect();
        let _ = writeln!(
            out,
            "  - WMS POSTs: {} (slowest {:.0} ms)",
            wms.join(", "),
            r.wms.max_ms
        );
        for (name, s) in [("before", &r.before), ("during", &r.during)] {
            for incident in &s.incidents {
                let _ = writeln!(out, "  - scanner ({name}): {incident}");
            }
        }
        if let Some(e) = &r.probe_error {
            let _ = writeln!(out, "  - probe error: {e}");
        }
    }
    let busiest = rows.iter().map(|r| r.cpu_others).fold(0.0, f64::max);
    if busiest > NOISY_OTHERS_PERCENT {
        let _ = writeln!(
            out,
            "\nWARNING: other processes used up to {busiest:.0}% of a core during the probes; \
             latencies are disturbed, run again on a quiet machine"
        );
    }
    let ok = rows.iter().filter(|r| r.failures().is_empty()).count();
    let _ = writeln!(
        out,
        "\nhighest agent RSS sampled {} MiB (a fresh agent per probe); scanners unharmed in {ok} of {} probes; suite took {elapsed:.0} s",
        mib(agent_hwm_kib),
        rows.len()
    );
    out
}

fn scanner_json(s: &ScannerReport) -> Value {
    json!({
        "ok": s.ok(),
        "connects_tried": s.connects_tried,
        "connects_ok": s.connects_ok,
        "connect_failures": s.connect_failures,
        "connect_ms_max": s.connect_ms_max,
        "publishes": s.publishes,
        "pubacks": s.acked,
        "puback_ms": {
            "p50": s.latency_ms(0.5),
            "p99": s.latency_ms(0.99),
            "max": s.latency_ms(1.0),
        },
        "over_1s": s.late,
        "lost": s.lost,
        "incidents": s.incidents,
    })
}

fn row_json(r: &Row) -> Value {
    let f = &r.figures;
    json!({
        "probe": r.key,
        "title": r.title,
        "hostile_sources": r.sources,
        "hostile_source_from": source(0).to_string(),
        "seconds": r.seconds,
        "connections": {
            "attempted": f.attempted,
            "connect_errors": f.connect_errors,
            "peak_open": f.peak_open,
            "refused_at_once": f.refused,
            "closed_later": f.closed_later,
        },
        "answers": f.answers,
        "counters": f.counters,
        "agent": {
            "rss_kib": {"before": r.rss_before_kib, "after": r.rss_after_kib, "peak": r.rss_peak_kib, "by_second": r.rss_by_second},
            "fds": {"before": r.fds_before, "peak": r.fds_peak, "after": r.fds_after},
            "cpu_percent": r.cpu_agent,
            "mqtt_protocol_errors": r.protocol_errors,
            "log_bytes_written": r.log_bytes,
            "status_before": r.status_before,
            "status_after": r.status_after,
        },
        "other_processes_cpu_percent": r.cpu_others,
        "scanner_connected_before": scanner_json(&r.before),
        "scanner_connecting_during": scanner_json(&r.during),
        "wms": {
            "sent": r.wms.sent,
            "accepted": r.wms.accepted,
            "answers": r.wms.answers,
            "max_ms": r.wms.max_ms,
        },
        "probe_error": r.probe_error,
        "agent_exit": r.agent_exit,
        "agent_log": r.agent_log.display().to_string(),
        "failures": r.failures(),
        "findings": r.findings(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remaining_lengths_round_trip() {
        for n in [0usize, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455] {
            let mut bytes = vec![0x30];
            put_remaining_length(n, &mut bytes);
            bytes.resize(bytes.len() + n.min(200_000), 0);
            let parsed = next_packet(&bytes).expect("well formed");
            if n <= 200_000 {
                let (first, body, used) = parsed.expect("whole");
                assert_eq!((first, body.len(), used), (0x30, n, bytes.len()));
            } else {
                assert!(parsed.is_none());
            }
        }
        assert!(next_packet(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
    }

    #[test]
    fn answers_are_described() {
        let answer = [0x20, 0x02, 0x00, 0x01, 0x90, 0x03, 0x00, 0x01, 0x80];
        assert_eq!(
            describe_answer(&answer, false),
            ["CONNACK 0x01", "SUBACK 0x80"]
        );
        assert_eq!(
            describe_answer(&[0xE0, 0x01, 0x90], true),
            ["DISCONNECT 0x90"]
        );
        assert_eq!(
            describe_answer(&[0x20, 0x02, 0x00], false),
            ["3 bytes of a partial packet"]
        );
    }

    #[test]
    fn violation_events_are_json_of_the_asked_size() {
        let event = violation_event("x-1", VIOLATION_EVENT_BYTES);
        assert!(event.len() <= VIOLATION_EVENT_BYTES && event.len() > VIOLATION_EVENT_BYTES - 20);
        let value: Value = serde_json::from_str(&event).expect("JSON");
        assert!(value.as_object().is_some_and(|o| o.len() > 1000));
    }

    #[test]
    fn the_shipped_config_is_pointed_at_this_run() {
        let shipped = std::fs::read_to_string(workspace_root().join("config/agent.toml"))
            .expect("config/agent.toml");
        let addr = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let text = suite_config(
            &shipped,
            Path::new("/tmp/state"),
            addr(1),
            addr(2),
            addr(3),
            addr(4),
        )
        .expect("rewritten");
        assert!(text.contains("state_dir = \"/tmp/state\""));
        assert!(text.contains("listen = \"127.0.0.1:1\""));
        assert!(text.contains("listen = \"127.0.0.1:2\""));
        assert!(text.contains("listen = \"127.0.0.1:3\""));
        assert!(text.contains("port = 4"));
        // Nothing else changes: the same number of lines plus the two-line header.
        assert_eq!(text.lines().count(), shipped.lines().count() + 2);
    }

    #[test]
    fn hostile_sources_stay_in_loopback() {
        assert_eq!(source(0), Ipv4Addr::new(127, 0, 0, 10));
        assert_eq!(source(MAX_SOURCES - 1), Ipv4Addr::new(127, 0, 0, 209));
        assert!(source(MAX_SOURCES).is_loopback());
    }

    #[test]
    fn quantiles_pick_ranks() {
        let samples: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        assert_eq!(quantile_ms(&samples, 0.99), Some(99.0));
        assert_eq!(quantile_ms(&samples, 1.0), Some(100.0));
        assert_eq!(quantile_ms(&[], 0.5), None);
    }
}
