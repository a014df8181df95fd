//! `backhaul-sim`: a scanner simulator for commissioning a site and for the demo. It publishes
//! a realistic mix of warehouse events over MQTT 3.1.1 or 5 at QoS 0, 1 or 2 from many
//! devices, records every acknowledged event id to a file, and can check a ledger against that
//! file for loss and duplicates.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use clap::{Parser, Subcommand, ValueEnum};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser)]
#[command(
    name = "backhaul-sim",
    version,
    about = "Simulated warehouse scanners for Backhaul"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish events to an agent and record the acknowledged ids.
    Run(RunArgs),
    /// Check a ledger (JSONL) against recorded acknowledged ids: lost and duplicated events.
    Check {
        /// File of acknowledged ids, one per line (from `run --acked-file`).
        #[arg(long)]
        acked: PathBuf,
        /// The relay's ledger file.
        #[arg(long)]
        ledger: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum MqttVersion {
    #[value(name = "3.1.1")]
    V311,
    #[value(name = "5")]
    V5,
}

#[derive(clap::Args, Clone)]
struct RunArgs {
    /// The agent's MQTT address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    agent: SocketAddr,
    /// Number of scanners, each its own MQTT connection and device id.
    #[arg(long, default_value_t = 4)]
    devices: u32,
    /// Events per second, all devices together.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Stop after this many seconds (default: until Ctrl-C, or --count).
    #[arg(long)]
    duration: Option<f64>,
    /// Stop after this many events in all.
    #[arg(long)]
    count: Option<u64>,
    #[arg(long, value_enum, default_value = "3.1.1")]
    mqtt_version: MqttVersion,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    qos: u8,
    /// Mix of event types, as weights: pick=50,ship=15,receive=15,adjust=10,count=10.
    #[arg(long, default_value = "pick=50,ship=15,receive=15,adjust=10,count=10")]
    mix: String,
    /// Share of events made invalid on purpose (0.0 to 1.0), to see rejects.
    #[arg(long, default_value_t = 0.0)]
    invalid_ratio: f64,
    /// Device ids are PREFIX-1, PREFIX-2, ...
    #[arg(long, default_value = "scanner")]
    device_prefix: String,
    /// Topic to publish to; {device} is replaced by the device id.
    #[arg(long, default_value = "scans/{device}")]
    topic: String,
    #[arg(long)]
    username: Option<String>,
    /// Password for --username (or set BACKHAUL_SIM_PASSWORD, which stays out of `ps`).
    #[arg(long)]
    password: Option<String>,
    /// Append every acknowledged event id to this file (one per line).
    #[arg(long)]
    acked_file: Option<PathBuf>,
    /// Events in flight per device before waiting for acknowledgements.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Print a progress line every second.
    #[arg(long)]
    progress: bool,
}

#[derive(Default)]
struct Counters {
    published: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    /// Events the agent refused for a full disk quota, kept and sent again.
    quota_retries: AtomicU64,
    reconnects: AtomicU64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::Check { acked, ledger } => check(&acked, &ledger),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_mix(text: &str) -> anyhow::Result<Vec<(&'static str, u32)>> {
    let mut mix = Vec::new();
    for part in text.split(',').filter(|p| !p.trim().is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .with_context(|| format!("--mix: {part:?} is not TYPE=WEIGHT"))?;
        let kind = ["pick", "ship", "receive", "adjust", "count"]
            .into_iter()
            .find(|k| *k == name.trim())
            .with_context(|| {
                format!("--mix: {name:?} is not pick, ship, receive, adjust or count")
            })?;
        let weight: u32 = weight
            .trim()
            .parse()
            .with_context(|| format!("--mix: weight {weight:?} of {kind} is not a whole number"))?;
        mix.push((kind, weight));
    }
    if mix.iter().map(|(_, w)| w).sum::<u32>() == 0 {
        bail!("--mix: the weights add up to 0");
    }
    Ok(mix)
}

/// Makes realistic events: orders picked line by line then shipped, receipts against POs,
/// adjustments with reasons, cycle counts at locations.
struct EventMaker {
    device: String,
    mix: Vec<(&'static str, u32)>,
    invalid_ratio: f64,
    n: u64,
}

impl EventMaker {
    fn next(&mut self) -> (String, Vec<u8>) {
        self.n += 1;
        let n = self.n;
        let id = format!("{}-{:x}-{n}", self.device, std::process::id());
        let total: u32 = self.mix.iter().map(|(_, w)| w).sum();
        let mut pick = rand::random_range(0..total);
        let kind = self
            .mix
            .iter()
            .find(|(_, w)| {
                if pick < *w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .map(|(k, _)| *k)
            .unwrap_or("pick");
        let sku = format!("SKU-{:03}", rand::random_range(1..=10));
        let location = format!(
            "A-{:02}-{:02}",
            rand::random_range(1..=4),
            rand::random_range(1..=8)
        );
        let ts = humantime_now();
        let order = format!("SO-{}-{}", self.device, n / 4);
        let mut event = match kind {
            "pick" => serde_json::json!({"type": "pick", "order": order, "line": n % 4 + 1,
                "qty": rand::random_range(1..=5).to_string(), "location": location}),
            "ship" => serde_json::json!({"type": "ship", "order": order, "qty": "1",
                "carrier": "DHL", "tracking": format!("TRK{n:08}")}),
            "receive" => serde_json::json!({"type": "receive", "po": format!("PO-{}", n / 10),
                "qty": rand::random_range(5..=50).to_string(), "location": location}),
            "adjust" => serde_json::json!({"type": "adjust", "reason": "damaged",
                "qty": format!("-{}", rand::random_range(1..=3)), "location": location}),
            _ => {
                serde_json::json!({"type": "count", "qty": rand::random_range(0..=100).to_string(),
                "location": location})
            }
        };
        event["v"] = 1.into();
        event["id"] = id.clone().into();
        event["ts"] = ts.into();
        event["sku"] = sku.into();
        event["device"] = self.device.clone().into();
        if rand::random::<f64>() < self.invalid_ratio {
            // A typical scanner bug: a zero quantity and a missing order.
            event["type"] = "pick".into();
            event["qty"] = "0".into();
            if let Some(map) = event.as_object_mut() {
                map.remove("order");
            }
        }
        (id, event.to_string().into_bytes())
    }
}

fn humantime_now() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "2026-11-22T00:00:00Z".into())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mix = parse_mix(&args.mix)?;
    if !(0.0..=1.0).contains(&args.invalid_ratio) {
        bail!("--invalid-ratio must be between 0.0 and 1.0");
    }
    if args.rate <= 0.0 {
        bail!("--rate must be above 0");
    }
    let acked_file = match &args.acked_file {
        Some(path) => Some(Arc::new(std::sync::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open {}", path.display()))?,
        ))),
        None => None,
    };
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let per_device_rate = args.rate / f64::from(args.devices.max(1));
    let per_device_count = args
        .count
        .map(|c| c.div_ceil(u64::from(args.devices.max(1))));
    let mut tasks = Vec::new();
    for i in 1..=args.devices.max(1) {
        let device = format!("{}-{i}", args.device_prefix);
        let maker = EventMaker {
            device: device.clone(),
            mix: mix.clone(),
            invalid_ratio: args.invalid_ratio,
            n: 0,
        };
        let args = args.clone();
        let (counters, stop, acked_file) = (counters.clone(), stop.clone(), acked_file.clone());
        tasks.push(tokio::spawn(async move {
            device_loop(
                args,
                device,
                maker,
                per_device_rate,
                per_device_count,
                counters,
                stop,
                acked_file,
            )
            .await
        }));
    }
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    let mut last_print = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        if deadline.is_some_and(|d| Instant::now() >= d) || tasks.iter().all(|t| t.is_finished()) {
            break;
        }
        if args.progress && last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "{:>6.1}s  published {}  acknowledged {}  refused {}",
                started.elapsed().as_secs_f64(),
                counters.published.load(Ordering::Relaxed),
                counters.acked.load(Ordering::Relaxed),
                counters.refused.load(Ordering::Relaxed)
            );
        }
    }
    stop.store(true, Ordering::SeqCst);
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let secs = started.elapsed().as_secs_f64();
    let acked = counters.acked.load(Ordering::Relaxed);
    println!(
        "published {}  acknowledged {}  refused {}  retried-for-quota {}  reconnects {}  in {secs:.1}s ({:.0} acknowledged/s)",
        counters.published.load(Ordering::Relaxed),
        acked,
        counters.refused.load(Ordering::Relaxed),
        counters.quota_retries.load(Ordering::Relaxed),
        counters.reconnects.load(Ordering::Relaxed),
        acked as f64 / secs.max(0.001)
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn device_loop(
    args: RunArgs,
    device: String,
    mut maker: EventMaker,
    rate: f64,
    count: Option<u64>,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    acked_file: Option<Arc<std::sync::Mutex<std::fs::File>>>,
) {
    let topic = args.topic.replace("{device}", &device);
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let mut next_send = Instant::now();
    let mut sent = 0u64;
    // Events published but not yet acknowledged, re-sent after a reconnect.
    let mut unacked: VecDeque<(String, Vec<u8>)> = VecDeque::new();
    while !stop.load(Ordering::SeqCst) {
        let mut link = match Link::connect(&args, &device).await {
            Ok(link) => link,
            Err(e) => {
                tracing_like(&format!(
                    "{device}: cannot connect to {}: {e:#}",
                    args.agent
                ));
                tokio::time::sleep(Duration::from_millis(500)).await;
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        let mut in_flight: HashMap<u16, (String, Vec<u8>)> = HashMap::new();
        let mut pkid: u16 = 0;
        let mut resend: VecDeque<(String, Vec<u8>)> = std::mem::take(&mut unacked);
        let result: anyhow::Result<()> = async {
            loop {
                let finished = stop.load(Ordering::SeqCst) || count.is_some_and(|c| sent >= c);
                if finished && in_flight.is_empty() && resend.is_empty() {
                    return Ok(());
                }
                while in_flight.len() < args.window
                    && (!resend.is_empty() || (!finished && Instant::now() >= next_send))
                {
                    let (id, payload) = match resend.pop_front() {
                        Some(item) => item,
                        None => {
                            next_send += interval;
                            sent += 1;
                            maker.next()
                        }
                    };
                    counters.published.fetch_add(1, Ordering::Relaxed);
                    if args.qos == 0 {
                        link.publish(&topic, 0, 0, &payload).await?;
                        continue;
                    }
                    pkid = pkid % u16::MAX + 1;
                    while in_flight.contains_key(&pkid) {
                        pkid = pkid % u16::MAX + 1;
                    }
                    link.publish(&topic, args.qos, pkid, &payload).await?;
                    in_flight.insert(pkid, (id, payload));
                }
                let wait = next_send
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(50));
                match tokio::time::timeout(wait.max(Duration::from_millis(1)), link.read()).await {
                    Err(_) => continue,
                    Ok(answer) => match answer? {
                        Answer::Acked { pkid, refused } => {
                            if let Some((id, payload)) = in_flight.remove(&pkid) {
                                if refused.as_deref().is_some_and(|r| r.starts_with("QuotaExceeded")) {
                                    // Back-pressure: a scanner keeps the event and tries again.
                                    counters.quota_retries.fetch_add(1, Ordering::Relaxed);
                                    if let Some(reason) = &refused {
                                        tracing_like(&format!("{device}: event {id} refused: {reason}; keeping it to send again"));
                                    }
                                    resend.push_back((id, payload));
                                    tokio::time::sleep(Duration::from_millis(200)).await;
                                } else if let Some(reason) = refused {
                                    counters.refused.fetch_add(1, Ordering::Relaxed);
                                    tracing_like(&format!(
                                        "{device}: event {id} refused: {reason}"
                                    ));
                                } else {
                                    counters.acked.fetch_add(1, Ordering::Relaxed);
                                    if let Some(file) = &acked_file
                                        && let Ok(mut file) = file.lock()
                                    {
                                        let _ = writeln!(file, "{id}");
                                    }
                                }
                                if args.qos == 2 {
                                    link.release(pkid).await?;
                                }
                            }
                        }
                        Answer::Other => {}
                    },
                }
            }
        }
        .await;
        match result {
            Ok(()) => return,
            Err(e) => {
                counters.reconnects.fetch_add(1, Ordering::Relaxed);
                tracing_like(&format!(
                    "{device}: connection lost ({e:#}); reconnecting and re-sending {} events",
                    in_flight.len() + resend.len()
                ));
                let mut pending: Vec<(u16, (String, Vec<u8>))> = in_flight.into_iter().collect();
                pending.sort_by_key(|(pkid, _)| *pkid);
                unacked = pending
                    .into_iter()
                    .map(|(_, item)| item)
                    .chain(resend)
                    .collect();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

fn tracing_like(line: &str) {
    eprintln!("{line}");
}

enum Answer {
    /// PUBACK (QoS 1) or PUBREC (QoS 2); `refused` holds an MQTT 5 reason when it is not success.
    Acked {
        pkid: u16,
        refused: Option<String>,
    },
    Other,
}

/// One MQTT connection, 3.1.1 or 5, on rumqttc's packet codec.
struct Link {
    stream: TcpStream,
    version: MqttVersion,
    buf: BytesMut,
    out: BytesMut,
}

const MAX_PACKET: usize = 1 << 20;

impl Link {
    async fn connect(args: &RunArgs, device: &str) -> anyhow::Result<Link> {
        let stream =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(args.agent)).await??;
        stream.set_nodelay(true)?;
        let mut link = Link {
            stream,
            version: args.mqtt_version,
            buf: BytesMut::with_capacity(8192),
            out: BytesMut::with_capacity(8192),
        };
        let password = args
            .password
            .clone()
            .or_else(|| std::env::var("BACKHAUL_SIM_PASSWORD").ok())
            .unwrap_or_default();
        let login = args.username.clone().map(|u| (u, password));
        match link.version {
            MqttVersion::V311 => {
                let mut connect = v4::Connect::new(device);
                connect.keep_alive = 60;
                connect.clean_session = true;
                connect.login = login.map(|(u, p)| v4::Login::new(u, p));
                v4::Packet::Connect(connect).write(&mut link.out, MAX_PACKET)?;
            }
            MqttVersion::V5 => {
                let mut connect = v5::Connect {
                    keep_alive: 60,
                    client_id: device.to_string(),
                    clean_start: true,
                    properties: None,
                };
                connect.keep_alive = 60;
                let login = login.map(|(u, p)| v5::Login::new(u, p));
                v5::Packet::Connect(connect, None, login)
                    .write(&mut link.out, Some(MAX_PACKET as u32))?;
            }
        }
        link.flush().await?;
        let connack = tokio::time::timeout(Duration::from_secs(5), link.next_packet()).await??;
        match connack {
            Packet::V4(v4::Packet::ConnAck(ack)) if ack.code == v4::ConnectReturnCode::Success => {
                Ok(link)
            }
            Packet::V5(v5::Packet::ConnAck(ack)) if ack.code == v5::ConnectReturnCode::Success => {
                Ok(link)
            }
            Packet::V4(v4::Packet::ConnAck(ack)) => bail!("connection refused: {:?}", ack.code),
            Packet::V5(v5::Packet::ConnAck(ack)) => bail!("connection refused: {:?}", ack.code),
            _ => bail!("the agent did not answer CONNACK"),
        }
    }

    async fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        pkid: u16,
        payload: &[u8],
    ) -> anyhow::Result<()> {
        match self.version {
            MqttVersion::V311 => {
                let qos = m4::qos(qos)?;
                let mut publish =
                    v4::Publish::from_bytes(topic, qos, Bytes::copy_from_slice(payload));
                publish.pkid = pkid;
                v4::Packet::Publish(publish).write(&mut self.out, MAX_PACKET)?;
            }
            MqttVersion::V5 => {
                let qos = m5::qos(qos).context("bad QoS")?;
                let mut publish =
                    v5::Publish::new(topic, qos, Bytes::copy_from_slice(payload), None);
                publish.pkid = pkid;
                v5::Packet::Publish(publish).write(&mut self.out, Some(MAX_PACKET as u32))?;
            }
        }
        self.flush().await
    }

    async fn release(&mut self, pkid: u16) -> anyhow::Result<()> {
        match self.version {
            MqttVersion::V311 => {
                v4::Packet::PubRel(v4::PubRel::new(pkid)).write(&mut self.out, MAX_PACKET)?
            }
            MqttVersion::V5 => v5::Packet::PubRel(v5::PubRel::new(pkid, None))
                .write(&mut self.out, Some(MAX_PACKET as u32))?,
        };
        self.flush().await
    }

    async fn flush(&mut self) -> anyhow::Result<()> {
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    async fn read(&mut self) -> anyhow::Result<Answer> {
        Ok(match self.next_packet().await? {
            Packet::V4(v4::Packet::PubAck(ack)) => Answer::Acked {
                pkid: ack.pkid,
                refused: None,
            },
            Packet::V4(v4::Packet::PubRec(rec)) => Answer::Acked {
                pkid: rec.pkid,
                refused: None,
            },
            Packet::V5(v5::Packet::PubAck(ack)) => Answer::Acked {
                pkid: ack.pkid,
                refused: (ack.reason != v5::PubAckReason::Success).then(|| {
                    let text = ack
                        .properties
                        .and_then(|p| p.reason_string)
                        .unwrap_or_default();
                    format!("{:?}: {text}", ack.reason)
                }),
            },
            Packet::V5(v5::Packet::PubRec(rec)) => Answer::Acked {
                pkid: rec.pkid,
                refused: (rec.reason != v5::PubRecReason::Success).then(|| {
                    let text = rec
                        .properties
                        .and_then(|p| p.reason_string)
                        .unwrap_or_default();
                    format!("{:?}: {text}", rec.reason)
                }),
            },
            _ => Answer::Other,
        })
    }

    async fn next_packet(&mut self) -> anyhow::Result<Packet> {
        loop {
            match self.version {
                MqttVersion::V311 => match v4::Packet::read(&mut self.buf, MAX_PACKET) {
                    Ok(packet) => return Ok(Packet::V4(packet)),
                    Err(m4::Error::InsufficientBytes(_)) => {}
                    Err(e) => bail!("bad packet from the agent: {e}"),
                },
                MqttVersion::V5 => {
                    if self.buf.len() >= 2 && self.buf[0] == 0xE0 && self.buf[1] == 0 {
                        bail!("the agent disconnected");
                    }
                    match v5::Packet::read(&mut self.buf, Some(MAX_PACKET as u32)) {
                        Ok(packet) => return Ok(Packet::V5(packet)),
                        Err(m5::Error::InsufficientBytes(_)) => {}
                        Err(e) => bail!("bad packet from the agent: {e}"),
                    }
                }
            }
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                bail!("the agent closed the connection");
            }
        }
    }
}

// One packet lives at a time; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Packet {
    V4(v4::Packet),
    V5(v5::Packet),
}

fn check(acked: &PathBuf, ledger: &PathBuf) -> anyhow::Result<()> {
    let acked_text = std::fs::read_to_string(acked)
        .with_context(|| format!("cannot read {}", acked.display()))?;
    let ledger_text = std::fs::read_to_string(ledger)
        .with_context(|| format!("cannot read {}", ledger.display()))?;
    let mut in_ledger: HashMap<String, u32> = HashMap::new();
    for (n, line) in ledger_text.lines().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", ledger.display(), n + 1))?;
        if let Some(id) = value["id"].as_str() {
            *in_ledger.entry(id.to_string()).or_default() += 1;
        }
    }
    let acked: Vec<&str> = acked_text.lines().filter(|l| !l.is_empty()).collect();
    let lost: Vec<&&str> = acked
        .iter()
        .filter(|id| !in_ledger.contains_key(**id))
        .collect();
    let duplicated: Vec<(&String, &u32)> = in_ledger.iter().filter(|(_, n)| **n > 1).collect();
    println!(
        "acknowledged {}  in ledger {}  lost {}  duplicated {}",
        acked.len(),
        in_ledger.len(),
        lost.len(),
        duplicated.len()
    );
    for id in lost.iter().take(10) {
        println!("lost: {id}");
    }
    for (id, n) in duplicated.iter().take(10) {
        println!("duplicated {n} times: {id}");
    }
    if !lost.is_empty() || !duplicated.is_empty() {
        bail!("the ledger does not hold every acknowledged event exactly once");
    }
    Ok(())
}
