//! The ingest benchmark's load generator: pipelined MQTT 3.1.1 QoS 1 publishers and a counting
//! subscriber, written on rumqttc's public codec (`rumqttc::mqttbytes::v4`) over plain tokio
//! TCP streams, so that the client side stays cheap next to the broker it measures.
//!
//! What it owns: the v1 events it publishes (valid, unique ids, ~300 bytes), the in-flight
//! window of each publisher, the warm-up / measure / stop phases of one run, and what is
//! counted in them (PUBACKs, publish→PUBACK latency, messages the subscriber received); and the
//! stamped publisher of `bench compare`, whose ids carry their publish time and sequence number
//! so that the ledger at the far end tells latency, losses and duplicates, at a steady rate or
//! flat out, surviving a broker killed under it. Connecting and subscribing are shared with
//! the other benchmarks' own MQTT clients.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::BytesMut;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe,
};
use rumqttc::mqttbytes::{Error as CodecError, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Semaphore, watch};

/// Length every generated event is padded to.
pub const EVENT_BYTES: usize = 300;
/// Largest packet the generator accepts from a broker.
pub(crate) const MAX_PACKET: usize = 1 << 20;
/// Most publishes encoded into one socket write.
const MAX_WRITE_BATCH: usize = 128;
/// How long publishers may take to get their last PUBACKs once the run stops.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The subscriber gives up waiting for the rest when nothing arrived for this long.
const SUBSCRIBER_IDLE: Duration = Duration::from_secs(3);
/// The subscriber waits at most this long for the broker's queue to drain after a run.
const SUBSCRIBER_DRAIN_MAX: Duration = Duration::from_secs(20);

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// One load run against one broker.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub addr: std::net::SocketAddr,
    /// Distinguishes the event ids and client ids of this run from every other run.
    pub tag: String,
    pub publishers: usize,
    /// QoS 1 publishes each publisher keeps in flight at most.
    pub window: usize,
    pub warmup: Duration,
    pub measure: Duration,
    /// Also run one QoS 1 subscriber on `scans/+` and count what it receives.
    pub subscriber: bool,
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct LoadResult {
    /// The measured window, from the end of warm-up to the stop.
    pub measured_secs: f64,
    /// PUBACKs received in the measured window.
    pub acked_in_window: u64,
    /// Publishes sent and PUBACKs received over the whole run (warm-up and drain included).
    pub sent_total: u64,
    pub acked_total: u64,
    /// Publish→PUBACK latencies of the acks received in the measured window, sorted, in µs.
    pub ack_latency_us: Vec<u32>,
    /// Messages the subscriber received in the measured window and over the whole run.
    pub received_in_window: u64,
    pub received_total: u64,
    /// Wall time from the stop until every publisher had its last PUBACK.
    pub drain_secs: f64,
}

impl LoadResult {
    pub fn ack_rate(&self) -> f64 {
        self.acked_in_window as f64 / self.measured_secs.max(1e-9)
    }

    pub fn receive_rate(&self) -> f64 {
        self.received_in_window as f64 / self.measured_secs.max(1e-9)
    }

    /// A latency quantile in milliseconds, or `None` without samples.
    pub fn ack_latency_ms(&self, q: f64) -> Option<f64> {
        let samples = &self.ack_latency_us;
        if samples.is_empty() {
            return None;
        }
        let rank = ((q * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        Some(f64::from(samples[rank - 1]) / 1000.0)
    }
}

/// When [`run`] calls its observer: every 50 ms of warm-up and of the measured window, right
/// at the start and at the end of the measured window, and once every PUBACK is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moment {
    Warmup,
    MeasureStart,
    Measuring,
    MeasureEnd,
    Drained,
}

/// The phase of a run, shared by every task in it.
struct Control {
    phase: AtomicU8,
    changed: watch::Sender<u8>,
    started: Instant,
}

impl Control {
    fn phase(&self) -> u8 {
        self.phase.load(Ordering::Relaxed)
    }

    fn set(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
        self.changed.send_replace(phase);
    }

    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }
}

/// Runs publishers (and the subscriber) for warm-up plus the measured window, then stops them
/// and waits for their last acknowledgements, calling `observe` at the [`Moment`]s of the run.
pub async fn run(spec: &LoadSpec, mut observe: impl FnMut(Moment)) -> anyhow::Result<LoadResult> {
    let (changed, _) = watch::channel(WARMUP);
    let control = Arc::new(Control {
        phase: AtomicU8::new(WARMUP),
        changed,
        started: Instant::now(),
    });
    let subscriber = if spec.subscriber {
        Some(Subscriber::start(spec.addr, &spec.tag, control.clone()).await?)
    } else {
        None
    };
    let mut publishers = Vec::with_capacity(spec.publishers);
    for index in 0..spec.publishers {
        let config = PublisherConfig {
            addr: spec.addr,
            client_id: format!("bench-{}-{index:03}", spec.tag),
            device: format!("scanner-{index:03}"),
            id_prefix: format!("bench-{}-{index:03}", spec.tag),
            window: spec.window,
        };
        publishers.push(tokio::spawn(publisher(config, control.clone())));
    }

    let tick = Duration::from_millis(50);
    let warmup_end = Instant::now() + spec.warmup;
    while Instant::now() < warmup_end {
        fail_early(&mut publishers).await?;
        observe(Moment::Warmup);
        tokio::time::sleep(tick.min(warmup_end.saturating_duration_since(Instant::now()))).await;
    }
    control.set(MEASURE);
    let measure_start = Instant::now();
    observe(Moment::MeasureStart);
    let measure_end = measure_start + spec.measure;
    while Instant::now() < measure_end {
        fail_early(&mut publishers).await?;
        observe(Moment::Measuring);
        tokio::time::sleep(tick.min(measure_end.saturating_duration_since(Instant::now()))).await;
    }
    control.set(STOP);
    let stopped = Instant::now();
    observe(Moment::MeasureEnd);
    let measured_secs = (stopped - measure_start).as_secs_f64();

    let mut result = LoadResult {
        measured_secs,
        ..LoadResult::default()
    };
    let mut all_latencies = Vec::new();
    for (index, task) in publishers.into_iter().enumerate() {
        let report = tokio::time::timeout(DRAIN_TIMEOUT, task)
            .await
            .with_context(|| {
                format!(
                    "publisher {index} did not get all its PUBACKs within {DRAIN_TIMEOUT:?} after the stop"
                )
            })?
            .with_context(|| format!("publisher {index} panicked"))?
            .with_context(|| format!("publisher {index} of run {}", spec.tag))?;
        result.sent_total += report.sent;
        result.acked_total += report.acked;
        result.acked_in_window += report.acked_in_window;
        all_latencies.extend(report.latencies_us);
    }
    result.drain_secs = stopped.elapsed().as_secs_f64();
    all_latencies.sort_unstable();
    result.ack_latency_us = all_latencies;
    observe(Moment::Drained);

    if let Some(subscriber) = subscriber {
        let (received_total, received_in_window) = subscriber.finish(result.acked_total).await?;
        result.received_total = received_total;
        result.received_in_window = received_in_window;
    }
    Ok(result)
}

/// Fails the run as soon as a publisher has stopped, with its error, instead of after the
/// whole duration.
async fn fail_early(
    publishers: &mut [tokio::task::JoinHandle<anyhow::Result<PublisherReport>>],
) -> anyhow::Result<()> {
    if let Some(index) = publishers.iter().position(|task| task.is_finished()) {
        let outcome = (&mut publishers[index])
            .await
            .with_context(|| format!("publisher {index} panicked"))?;
        match outcome {
            Err(e) => return Err(e.context(format!("publisher {index} failed during the run"))),
            Ok(_) => bail!("publisher {index} stopped before the end of the run"),
        }
    }
    Ok(())
}

/// A v1 pick event with a unique id, padded to exactly [`EVENT_BYTES`] through its `serial`.
pub fn event_json(id: &str, device: &str, seq: u64) -> String {
    let order = 1000 + seq % 9000;
    let line = 1 + seq % 20;
    let sku = seq % 500;
    let aisle = seq % 40;
    let base = format!(
        r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T10:15:00.123Z","device":"{device}","order":"SO-{order}","line":{line},"sku":"SKU-{sku:04}","qty":"2","uom":"EA","location":"A-{aisle:02}-03","lot":"LOT-2026-47","serial":"SN-"#
    );
    let pad = EVENT_BYTES.saturating_sub(base.len() + 2);
    let mut event = base;
    event.extend(std::iter::repeat_n('0', pad));
    event.push_str(r#""}"#);
    event
}

struct PublisherConfig {
    addr: std::net::SocketAddr,
    client_id: String,
    device: String,
    id_prefix: String,
    window: usize,
}

struct PublisherReport {
    sent: u64,
    acked: u64,
    acked_in_window: u64,
    latencies_us: Vec<u32>,
}

/// State a publisher's writer and reader share.
struct InFlight {
    window: Semaphore,
    /// When each packet id was written, in ns since the run started.
    sent_at: Box<[AtomicU64]>,
    sent: AtomicU64,
    writer_done: AtomicBool,
}

/// An MQTT 3.1.1 connection, after the broker's CONNACK: its halves and the bytes read past it.
pub(crate) type Connection = (OwnedReadHalf, OwnedWriteHalf, BytesMut);

/// Connects and waits for the broker's CONNACK; `clean_session` false asks the broker to keep
/// the session (subscriptions and queued messages) while the client is away.
pub(crate) async fn connect(
    addr: std::net::SocketAddr,
    client_id: &str,
    clean_session: bool,
) -> anyhow::Result<Connection> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_nodelay(true).context("TCP_NODELAY")?;
    let (mut reader, mut writer) = stream.into_split();
    let mut connect = Connect::new(client_id);
    connect.keep_alive = 120;
    connect.clean_session = clean_session;
    let mut out = BytesMut::new();
    Packet::Connect(connect)
        .write(&mut out, MAX_PACKET)
        .context("encoding CONNECT")?;
    writer.write_all(&out).await.context("sending CONNECT")?;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        match read_packet(&mut buf)? {
            Some(Packet::ConnAck(ConnAck { code, .. })) => {
                if code != ConnectReturnCode::Success {
                    bail!("{addr} refused the connection of {client_id}: {code:?}");
                }
                return Ok((reader, writer, buf));
            }
            Some(other) => bail!("expected CONNACK from {addr}, got {other:?}"),
            None => {
                if reader.read_buf(&mut buf).await.context("reading CONNACK")? == 0 {
                    bail!("{addr} closed the connection before CONNACK");
                }
            }
        }
    }
}

/// The next whole packet in `buf`, or `None` when more bytes are needed.
pub(crate) fn read_packet(buf: &mut BytesMut) -> anyhow::Result<Option<Packet>> {
    match Packet::read(buf, MAX_PACKET) {
        Ok(packet) => Ok(Some(packet)),
        Err(CodecError::InsufficientBytes(_)) => Ok(None),
        Err(e) => Err(anyhow::anyhow!(
            "malformed MQTT packet from the broker: {e}"
        )),
    }
}

async fn publisher(
    config: PublisherConfig,
    control: Arc<Control>,
) -> anyhow::Result<PublisherReport> {
    let (reader, mut writer, buf) = connect(config.addr, &config.client_id, true).await?;
    let state = Arc::new(InFlight {
        window: Semaphore::new(config.window),
        sent_at: (0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect(),
        sent: AtomicU64::new(0),
        writer_done: AtomicBool::new(false),
    });
    let acks = tokio::spawn(read_acks(reader, buf, state.clone(), control.clone()));

    let topic = format!("scans/{}", config.device);
    let mut changed = control.changed.subscribe();
    let mut out = BytesMut::with_capacity(MAX_WRITE_BATCH * (EVENT_BYTES + 64));
    let mut seq: u64 = 0;
    let mut pkid: u16 = 0;
    let written: anyhow::Result<()> = async {
        loop {
            if control.phase() == STOP {
                return Ok(());
            }
            let permit = tokio::select! {
                permit = state.window.acquire() => permit.context("window closed")?,
                _ = changed.changed() => continue,
            };
            permit.forget();
            let mut batch = 1;
            while batch < MAX_WRITE_BATCH {
                match state.window.try_acquire() {
                    Ok(permit) => {
                        permit.forget();
                        batch += 1;
                    }
                    Err(_) => break,
                }
            }
            let now = control.now_ns();
            for _ in 0..batch {
                seq += 1;
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                let id = format!("{}-{seq}", config.id_prefix);
                let payload = event_json(&id, &config.device, seq);
                let mut publish =
                    Publish::from_bytes(topic.as_str(), QoS::AtLeastOnce, payload.into());
                publish.pkid = pkid;
                state.sent_at[usize::from(pkid)].store(now, Ordering::Relaxed);
                Packet::Publish(publish)
                    .write(&mut out, MAX_PACKET)
                    .context("encoding PUBLISH")?;
            }
            state.sent.fetch_add(batch as u64, Ordering::SeqCst);
            writer.write_all(&out).await.context("sending PUBLISH")?;
            out.clear();
        }
    }
    .await;
    state.writer_done.store(true, Ordering::SeqCst);
    if let Err(e) = written {
        acks.abort();
        return Err(e);
    }
    let (acked, acked_in_window, latencies_us) =
        acks.await.context("the ack reader panicked")??;
    // Leave cleanly, so the broker does not log a lost client.
    let mut bye = BytesMut::new();
    if Packet::Disconnect.write(&mut bye, MAX_PACKET).is_ok() {
        let _ = writer.write_all(&bye).await;
    }
    Ok(PublisherReport {
        sent: state.sent.load(Ordering::SeqCst),
        acked,
        acked_in_window,
        latencies_us,
    })
}

/// Reads PUBACKs until the writer stopped and every publish it sent is acknowledged; returns
/// (acks, acks in the measured window, their latencies in µs).
async fn read_acks(
    mut reader: OwnedReadHalf,
    mut buf: BytesMut,
    state: Arc<InFlight>,
    control: Arc<Control>,
) -> anyhow::Result<(u64, u64, Vec<u32>)> {
    let mut acked = 0u64;
    let mut in_window = 0u64;
    let mut latencies = Vec::with_capacity(1 << 16);
    loop {
        let mut released = 0;
        while let Some(packet) = read_packet(&mut buf)? {
            match packet {
                Packet::PubAck(PubAck { pkid }) => {
                    acked += 1;
                    released += 1;
                    if control.phase() == MEASURE {
                        let sent = state.sent_at[usize::from(pkid)].load(Ordering::Relaxed);
                        let took = control.now_ns().saturating_sub(sent) / 1000;
                        latencies.push(u32::try_from(took).unwrap_or(u32::MAX));
                        in_window += 1;
                    }
                }
                Packet::PingResp => {}
                Packet::Disconnect => bail!("the broker sent DISCONNECT"),
                other => bail!("unexpected packet from the broker: {other:?}"),
            }
        }
        if released > 0 {
            state.window.add_permits(released);
        }
        if state.writer_done.load(Ordering::SeqCst) && acked >= state.sent.load(Ordering::SeqCst) {
            return Ok((acked, in_window, latencies));
        }
        // A writer that just stopped may be waiting for nothing: poll its flag now and then.
        let read =
            tokio::time::timeout(Duration::from_millis(100), reader.read_buf(&mut buf)).await;
        match read {
            Err(_) => continue,
            Ok(Ok(0)) => bail!(
                "the broker closed the connection with {} of {} publishes unacknowledged",
                state.sent.load(Ordering::SeqCst).saturating_sub(acked),
                state.sent.load(Ordering::SeqCst)
            ),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("reading PUBACKs"),
        }
    }
}

#[derive(Default)]
struct SubscriberCounters {
    received: AtomicU64,
    received_in_window: AtomicU64,
    done: AtomicBool,
}

/// The one subscriber of a broker run. It runs on its own thread and runtime, so that a hundred
/// busy publisher tasks cannot starve it and make the broker look slow.
struct Subscriber {
    counters: Arc<SubscriberCounters>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl Subscriber {
    /// Connects and subscribes; returns once the broker granted the subscription.
    async fn start(
        addr: std::net::SocketAddr,
        tag: &str,
        control: Arc<Control>,
    ) -> anyhow::Result<Subscriber> {
        let counters = Arc::new(SubscriberCounters::default());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the subscriber's runtime")?;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let client_id = format!("bench-sub-{tag}");
        let thread_counters = counters.clone();
        let thread =
            std::thread::Builder::new()
                .name("bench-subscriber".into())
                .spawn(move || {
                    runtime.block_on(async move {
                        let stream =
                            match subscribe(addr, &client_id, "scans/+", QoS::AtLeastOnce, true)
                                .await
                            {
                                Ok(stream) => {
                                    let _ = ready_tx.send(Ok(()));
                                    stream
                                }
                                Err(e) => {
                                    let _ = ready_tx.send(Err(e));
                                    return Ok(());
                                }
                            };
                        subscriber_loop(stream, control, thread_counters).await
                    })
                })
                .context("cannot start the subscriber's thread")?;
        ready_rx
            .await
            .context("the subscriber's thread ended before subscribing")??;
        Ok(Subscriber { counters, thread })
    }

    /// Waits, within limits, for the broker to deliver the `expected` messages it acknowledged
    /// (a broker that dropped some never will), then stops. Returns (received, received in
    /// the measured window).
    async fn finish(self, expected: u64) -> anyhow::Result<(u64, u64)> {
        let counters = &self.counters;
        let deadline = Instant::now() + SUBSCRIBER_DRAIN_MAX;
        let mut last = counters.received.load(Ordering::Relaxed);
        let mut last_change = Instant::now();
        loop {
            let now = counters.received.load(Ordering::Relaxed);
            if now >= expected || self.thread.is_finished() {
                break;
            }
            if now != last {
                last = now;
                last_change = Instant::now();
            }
            if last_change.elapsed() > SUBSCRIBER_IDLE || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        counters.done.store(true, Ordering::SeqCst);
        let joined = tokio::task::spawn_blocking(move || self.thread.join())
            .await
            .context("waiting for the subscriber's thread")?;
        match joined {
            Ok(outcome) => outcome.context("the subscriber failed")?,
            Err(_) => bail!("the subscriber's thread panicked"),
        }
        Ok((
            counters.received.load(Ordering::Relaxed),
            counters.received_in_window.load(Ordering::Relaxed),
        ))
    }
}

/// Connects and subscribes to `filter`; returns once the broker granted the subscription.
pub(crate) async fn subscribe(
    addr: std::net::SocketAddr,
    client_id: &str,
    filter: &str,
    qos: QoS,
    clean_session: bool,
) -> anyhow::Result<Connection> {
    let (mut reader, mut writer, mut buf) = connect(addr, client_id, clean_session).await?;
    let mut subscribe = Subscribe::new(filter, qos);
    subscribe.pkid = 1;
    let mut out = BytesMut::new();
    Packet::Subscribe(subscribe)
        .write(&mut out, MAX_PACKET)
        .context("encoding SUBSCRIBE")?;
    writer.write_all(&out).await.context("sending SUBSCRIBE")?;
    loop {
        match read_packet(&mut buf)? {
            Some(Packet::SubAck(ack)) => {
                let granted = ack.return_codes.iter().all(|code| {
                    matches!(
                        code,
                        rumqttc::mqttbytes::v4::SubscribeReasonCode::Success(_)
                    )
                });
                if !granted {
                    bail!("{addr} refused the subscription: {:?}", ack.return_codes);
                }
                return Ok((reader, writer, buf));
            }
            Some(other) => bail!("expected SUBACK from {addr}, got {other:?}"),
            None => {
                if reader.read_buf(&mut buf).await.context("reading SUBACK")? == 0 {
                    bail!("{addr} closed the connection before SUBACK");
                }
            }
        }
    }
}

/// Counts publishes and acknowledges each, until told it is done.
async fn subscriber_loop(
    (mut reader, mut writer, mut buf): Connection,
    control: Arc<Control>,
    counters: Arc<SubscriberCounters>,
) -> anyhow::Result<()> {
    let mut out = BytesMut::with_capacity(16 * 1024);
    loop {
        let mut received = 0u64;
        let mut in_window = 0u64;
        while let Some(packet) = read_packet(&mut buf)? {
            match packet {
                Packet::Publish(publish) => {
                    received += 1;
                    if control.phase() == MEASURE {
                        in_window += 1;
                    }
                    if publish.qos != QoS::AtMostOnce {
                        Packet::PubAck(PubAck::new(publish.pkid))
                            .write(&mut out, MAX_PACKET)
                            .context("encoding PUBACK")?;
                    }
                }
                Packet::PingResp => {}
                other => bail!("unexpected packet from the broker: {other:?}"),
            }
        }
        counters.received.fetch_add(received, Ordering::Relaxed);
        counters
            .received_in_window
            .fetch_add(in_window, Ordering::Relaxed);
        if !out.is_empty() {
            writer.write_all(&out).await.context("sending PUBACK")?;
            out.clear();
        }
        if counters.done.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Wake now and then to see whether the run is over.
        match tokio::time::timeout(Duration::from_millis(100), reader.read_buf(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => bail!("the broker closed the subscriber's connection"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e).context("reading publishes"),
        }
    }
}

// ----- stamped publishing: every id carries its publish time ---------------------------------

/// One connection of a stamped publisher: events whose ids carry their publish time, so that
/// whoever finds them further down the pipeline knows how long they took, at a steady rate or
/// as fast as the window allows, with every acknowledged sequence number reported.
#[derive(Debug, Clone)]
pub struct StampedSpec {
    pub addr: std::net::SocketAddr,
    pub client_id: String,
    pub device: String,
    /// Ids are [`stamped_id`]`(id_prefix, seq, µs)`.
    pub id_prefix: String,
    /// The sequence number of the first publish; a later connection continues where the last
    /// one stopped, so no id is used twice.
    pub first_seq: u64,
    /// Publishes per second, evenly spaced; `None`: as fast as the window allows.
    pub rate: Option<f64>,
    /// QoS 1 publishes in flight at most.
    pub window: usize,
    /// Stop after this many publishes.
    pub limit: Option<u64>,
    /// How long to wait for the last PUBACKs after the stop.
    pub ack_wait: Duration,
}

/// What one stamped connection did.
#[derive(Debug, Clone, Default)]
pub struct StampedReport {
    pub sent: u64,
    pub acked: u64,
    /// The first sequence number not used.
    pub next_seq: u64,
    /// Publish→PUBACK of every acknowledged publish, µs, sorted.
    pub ack_latency_us: Vec<u32>,
    /// Why the connection ended before the stop, when it did (the broker was killed, say).
    pub lost_connection: Option<String>,
}

/// `{prefix}-{seq}-{µs since the Unix epoch}`: at most 64 characters for a prefix of up to 20.
pub fn stamped_id(prefix: &str, seq: u64, unix_us: u64) -> String {
    format!("{prefix}-{seq}-{unix_us}")
}

/// The sequence number and publish time of a [`stamped_id`] with this prefix.
pub fn parse_stamped_id(prefix: &str, id: &str) -> Option<(u64, u64)> {
    let rest = id.strip_prefix(prefix)?.strip_prefix('-')?;
    let (seq, us) = rest.split_once('-')?;
    Some((seq.parse().ok()?, us.parse().ok()?))
}

/// Microseconds since the Unix epoch: the clock the ids carry, read the same way by whoever
/// compares with them.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Called with the (sequence number, publish µs) of each run of PUBACKs read together.
pub type OnAck = Arc<dyn Fn(&[(u64, u64)]) + Send + Sync>;

/// State the writer and reader of a stamped connection share.
struct StampedInFlight {
    window: Semaphore,
    /// Per packet id: the sequence number and publish time (µs since the epoch) it carries.
    seq: Box<[AtomicU64]>,
    sent_us: Box<[AtomicU64]>,
    sent: AtomicU64,
    writer_done: AtomicBool,
}

/// Publishes stamped events until `stop` turns true, the limit is reached or the broker goes
/// away; then waits (up to `ack_wait`) for the last PUBACKs. A connection the broker closes is
/// not an error: the report says so, and counts only what was acknowledged before.
pub async fn stamped(
    spec: StampedSpec,
    mut stop: watch::Receiver<bool>,
    on_ack: OnAck,
) -> anyhow::Result<StampedReport> {
    let (reader, mut writer, buf) = connect(spec.addr, &spec.client_id, true)
        .await
        .with_context(|| format!("publisher {} connecting to {}", spec.client_id, spec.addr))?;
    let window = spec.window.clamp(1, usize::from(u16::MAX) - 1);
    let state = Arc::new(StampedInFlight {
        window: Semaphore::new(window),
        seq: (0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect(),
        sent_us: (0..=u16::MAX as usize).map(|_| AtomicU64::new(0)).collect(),
        sent: AtomicU64::new(0),
        writer_done: AtomicBool::new(false),
    });
    let acks = tokio::spawn(read_stamped_acks(
        reader,
        buf,
        state.clone(),
        on_ack,
        spec.ack_wait,
    ));
    let topic = format!("scans/{}", spec.device);
    let mut out = BytesMut::with_capacity(MAX_WRITE_BATCH * (EVENT_BYTES + 64));
    let mut seq = spec.first_seq;
    let mut pkid: u16 = 0;
    let started = Instant::now();
    let written: anyhow::Result<()> = async {
        loop {
            let published = seq - spec.first_seq;
            let left = spec.limit.map_or(u64::MAX, |l| l.saturating_sub(published));
            // A dropped sender stops the run too, rather than wake every select at once.
            if *stop.borrow() || stop.has_changed().is_err() || left == 0 {
                return Ok(());
            }
            // How many are due now: all of them without a rate.
            let due = match spec.rate {
                Some(rate) => {
                    let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                    if due <= published {
                        let next = started + Duration::from_secs_f64(published as f64 / rate);
                        tokio::select! {
                            _ = tokio::time::sleep_until(next.into()) => {}
                            _ = stop.changed() => {}
                        }
                        continue;
                    }
                    due - published
                }
                None => u64::MAX,
            };
            let want = due.min(left).min(MAX_WRITE_BATCH as u64) as usize;
            let permit = tokio::select! {
                permit = state.window.acquire() => match permit {
                    Ok(permit) => permit,
                    // The reader closed the window: the connection is gone.
                    Err(_) => return Ok(()),
                },
                _ = stop.changed() => continue,
            };
            permit.forget();
            let mut batch = 1;
            while batch < want {
                match state.window.try_acquire() {
                    Ok(permit) => {
                        permit.forget();
                        batch += 1;
                    }
                    Err(_) => break,
                }
            }
            let now = unix_us();
            for _ in 0..batch {
                pkid = if pkid == u16::MAX { 1 } else { pkid + 1 };
                let id = stamped_id(&spec.id_prefix, seq, now);
                let payload = event_json(&id, &spec.device, seq);
                let mut publish =
                    Publish::from_bytes(topic.as_str(), QoS::AtLeastOnce, payload.into());
                publish.pkid = pkid;
                state.seq[usize::from(pkid)].store(seq, Ordering::Relaxed);
                state.sent_us[usize::from(pkid)].store(now, Ordering::Relaxed);
                Packet::Publish(publish)
                    .write(&mut out, MAX_PACKET)
                    .context("encoding PUBLISH")?;
                seq += 1;
            }
            state.sent.fetch_add(batch as u64, Ordering::SeqCst);
            if writer.write_all(&out).await.is_err() {
                // The reader sees the same broken connection and says why.
                return Ok(());
            }
            out.clear();
        }
    }
    .await;
    state.writer_done.store(true, Ordering::SeqCst);
    if let Err(e) = written {
        acks.abort();
        return Err(e);
    }
    let (acked, mut latencies, lost_connection) =
        acks.await.context("the ack reader panicked")??;
    if lost_connection.is_none() {
        let mut bye = BytesMut::new();
        if Packet::Disconnect.write(&mut bye, MAX_PACKET).is_ok() {
            let _ = writer.write_all(&bye).await;
        }
    }
    latencies.sort_unstable();
    Ok(StampedReport {
        sent: state.sent.load(Ordering::SeqCst),
        acked,
        next_seq: seq,
        ack_latency_us: latencies,
        lost_connection,
    })
}

/// Reads PUBACKs, handing each run of them to `on_ack`, until the writer stopped and every
/// publish is acknowledged, `ack_wait` after the writer stopped, or the connection ends.
/// Returns (acks, their latencies in µs, why the connection ended when it did).
async fn read_stamped_acks(
    mut reader: OwnedReadHalf,
    mut buf: BytesMut,
    state: Arc<StampedInFlight>,
    on_ack: OnAck,
    ack_wait: Duration,
) -> anyhow::Result<(u64, Vec<u32>, Option<String>)> {
    let mut acked = 0u64;
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut run = Vec::with_capacity(1024);
    let mut give_up: Option<Instant> = None;
    let lost = loop {
        let now = unix_us();
        let parsed: anyhow::Result<()> = (|| {
            while let Some(packet) = read_packet(&mut buf)? {
                match packet {
                    Packet::PubAck(PubAck { pkid }) => {
                        let sent = state.sent_us[usize::from(pkid)].load(Ordering::Relaxed);
                        let seq = state.seq[usize::from(pkid)].load(Ordering::Relaxed);
                        run.push((seq, sent));
                        latencies.push(u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX));
                    }
                    Packet::PingResp => {}
                    Packet::Disconnect => bail!("the broker sent DISCONNECT"),
                    other => bail!("unexpected packet from the broker: {other:?}"),
                }
            }
            Ok(())
        })();
        if !run.is_empty() {
            on_ack(&run);
            acked += run.len() as u64;
            state.window.add_permits(run.len());
            run.clear();
        }
        if let Err(e) = parsed {
            break Some(format!("{e:#}"));
        }
        if state.writer_done.load(Ordering::SeqCst) {
            if acked >= state.sent.load(Ordering::SeqCst) {
                break None;
            }
            let deadline = *give_up.get_or_insert_with(|| Instant::now() + ack_wait);
            if Instant::now() > deadline {
                break None;
            }
        }
        // A writer that just stopped may be waiting for nothing: poll its flag now and then.
        match tokio::time::timeout(Duration::from_millis(100), reader.read_buf(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0)) => break Some("the broker closed the connection".to_string()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break Some(format!("reading PUBACKs: {e}")),
        }
    };
    // A writer waiting for room in the window learns that there will be none.
    state.window.close();
    Ok((acked, latencies, lost))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_ids_carry_sequence_and_time_and_fit_the_id_rule() {
        let id = stamped_id("bh-backlog", 12_345_678, 1_790_000_000_123_456);
        assert!(id.len() <= 64);
        assert_eq!(
            parse_stamped_id("bh-backlog", &id),
            Some((12_345_678, 1_790_000_000_123_456))
        );
        assert_eq!(parse_stamped_id("bh-steady", &id), None);
        assert_eq!(parse_stamped_id("bh", &id), None);
        let event = event_json(&id, "scanner-001", 12_345_678);
        assert_eq!(event.len(), EVENT_BYTES);
    }

    #[test]
    fn events_are_padded_to_the_target_size() {
        let event = event_json("bench-r1-007-123456", "scanner-007", 123_456);
        assert_eq!(event.len(), EVENT_BYTES);
        let value: serde_json::Value = serde_json::from_str(&event).expect("valid JSON");
        assert_eq!(value["id"], "bench-r1-007-123456");
        assert_eq!(value["v"], 1);
    }
}
