//! The forwarder: drains the log to the relay in batches over MQTT (3.1.1 or 5, as configured),
//! and deletes events from the log only when the relay acknowledges them as durable in its
//! outbox.
//!
//! The log is the single source of truth for what is in flight. Broker PUBACKs are not taken as
//! delivery and the MQTT client's own retry queue is not relied on: after a reconnect or an ack
//! timeout, every unacknowledged batch is read again from the log and re-sent, and the relay
//! drops what it already has.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backhaul_events::OutcomeFrame;
use backhaul_events::config::Secret;
use backhaul_events::frame::Outcome;
use backhaul_events::frame::{AckFrame, BatchEntry, BatchFrame, BatchRefusal};
use backhaul_events::service::Backoff;
use backhaul_events::service::Heartbeat;
use backhaul_events::topics::{
    acks_topic, batches_topic, outcomes_topic, refusal_acks_topic, refusals_topic,
};
use backhaul_events::{RefusalAckFrame, RefusalFrame};
use bytes::Bytes;
use rumqttc::{Outgoing, Transport, v5};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{UplinkConfig, UplinkProtocol};
use crate::log::{EventLog, now_ms};
use crate::metrics::AgentMetrics;

/// How long after the relay refuses a batch as a gap everything unacknowledged is re-sent.
const GAP_RESEND_DELAY: Duration = Duration::from_secs(1);

/// Largest frame the agent sends or accepts; batches are far smaller, acks tiny.
const MAX_FRAME_BYTES: usize = 8 << 20;

/// Requests (publishes, subscribes) the MQTT client queues for its event loop.
const REQUEST_QUEUE: usize = 64;

/// What the status page says about the link to the broker and the relay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    /// "connecting", "up", "down", "stalled" (connected, but nothing acknowledged within the
    /// ack timeout) or "relay full" (the relay refuses batches until its outbox has room).
    pub state: &'static str,
    /// Since when the link is in its current state (ms since the Unix epoch).
    pub since_ms: i64,
    pub last_error: Option<String>,
    pub last_ack_ms: Option<i64>,
    pub acked_through: u64,
    pub batches_in_flight: usize,
    pub events_in_flight: u64,
    pub batches_sent: u64,
    pub batches_resent: u64,
    pub events_forwarded: u64,
    pub reconnects: u64,
    /// Events the relay reports posted to the ERP since the agent started (the ERP's
    /// refusals are kept in the log: `EventLog::erp_refusals`).
    pub erp_posted: u64,
}

pub type SharedLinkStatus = Arc<Mutex<LinkStatus>>;

enum LinkEvent {
    /// Connected and subscribed to the acks topic: batches may flow.
    Ready,
    Down(String),
    Ack(Vec<u8>),
    Outcomes(Vec<u8>),
    Refusals(Vec<u8>),
}

struct InFlight {
    first: u64,
    last: u64,
    events: u64,
    sent_at: Instant,
}

pub struct Forwarder {
    site: String,
    log: EventLog,
    config: UplinkConfig,
    password: Option<Secret>,
    metrics: Arc<AgentMetrics>,
    status: SharedLinkStatus,
    heartbeat: Heartbeat,
}

impl Forwarder {
    pub fn new(
        site: String,
        log: EventLog,
        config: UplinkConfig,
        password: Option<Secret>,
        metrics: Arc<AgentMetrics>,
    ) -> (Forwarder, SharedLinkStatus) {
        let status = Arc::new(Mutex::new(LinkStatus {
            state: "connecting",
            since_ms: now_ms(),
            ..LinkStatus::default()
        }));
        (
            Forwarder {
                site,
                log,
                config,
                password,
                metrics,
                status: status.clone(),
                heartbeat: Heartbeat::detached("forwarder"),
            },
            status,
        )
    }

    /// Beats `heartbeat` each time round the forwarding loop, at least once a second.
    pub fn with_heartbeat(mut self, heartbeat: Heartbeat) -> Forwarder {
        self.heartbeat = heartbeat;
        self
    }

    /// The MQTT client and event loop of the configured protocol version, with the same
    /// session, size, window, credential and TLS settings for both.
    fn uplink(&self) -> anyhow::Result<(UplinkClient, UplinkEventLoop)> {
        let client_id = self.config.client_id(&self.site);
        let (host, port) = (self.config.host.clone(), self.config.port);
        let keep_alive = Duration::from_secs(u64::from(self.config.keep_alive_secs.max(5)));
        let inflight = self.config.window.clamp(1, 1000) as u16 + 1;
        let credentials = self.config.username.as_ref().map(|user| {
            let password = self
                .password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            (user.clone(), password)
        });
        let transport = self.transport()?;
        Ok(match self.config.protocol {
            UplinkProtocol::V311 => {
                let mut options = rumqttc::MqttOptions::new(client_id, host, port);
                options.set_keep_alive(keep_alive);
                // A clean session on purpose: what the broker kept would only be replayed out
                // of order; unacknowledged batches are re-sent from the log instead.
                options.set_clean_session(true);
                options.set_max_packet_size(MAX_FRAME_BYTES, MAX_FRAME_BYTES);
                options.set_inflight(inflight);
                if let Some((user, password)) = credentials {
                    options.set_credentials(user, password);
                }
                if let Some(transport) = transport {
                    options.set_transport(transport);
                }
                let (client, eventloop) = rumqttc::AsyncClient::new(options, REQUEST_QUEUE);
                (
                    UplinkClient::V4(client),
                    UplinkEventLoop::V4(Box::new(eventloop)),
                )
            }
            UplinkProtocol::V5 => {
                let mut options = v5::MqttOptions::new(client_id, host, port);
                options.set_keep_alive(keep_alive);
                // Clean start and no session expiry: a 3.1.1 clean session, for the same
                // reason.
                options.set_clean_start(true);
                // Goes out as CONNECT's Maximum Packet Size, so the broker sends nothing
                // larger, and bounds what the client reads. What the agent may send is the
                // broker's to say in its CONNACK; rumqttc fails the connection rather than
                // send more.
                options.set_max_packet_size(Some(MAX_FRAME_BYTES as u32));
                // The broker's Receive Maximum lowers this when it is smaller.
                options.set_outgoing_inflight_upper_limit(inflight);
                if let Some((user, password)) = credentials {
                    options.set_credentials(user, password);
                }
                if let Some(transport) = transport {
                    options.set_transport(transport);
                }
                let (client, eventloop) = v5::AsyncClient::new(options, REQUEST_QUEUE);
                (
                    UplinkClient::V5(client),
                    UplinkEventLoop::V5(Box::new(eventloop)),
                )
            }
        })
    }

    /// TLS to the broker when `uplink.tls` is set; plain TCP otherwise.
    fn transport(&self) -> anyhow::Result<Option<Transport>> {
        let Some(tls) = &self.config.tls else {
            return Ok(None);
        };
        let read = |path: &std::path::Path, what: &str| {
            std::fs::read(path).map_err(|e| {
                anyhow::anyhow!("cannot read uplink.tls.{what} {}: {e}", path.display())
            })
        };
        let ca = read(&tls.ca_file, "ca_file")?;
        let client_auth = match (&tls.client_cert_file, &tls.client_key_file) {
            (Some(cert), Some(key)) => Some((
                read(cert, "client_cert_file")?,
                read(key, "client_key_file")?,
            )),
            _ => None,
        };
        Ok(Some(Transport::tls(ca, client_auth, None)))
    }

    fn set_status(&self, update: impl FnOnce(&mut LinkStatus)) {
        if let Ok(mut status) = self.status.lock() {
            update(&mut status);
        }
    }

    fn record_outcomes(&self, frame: OutcomeFrame) {
        let posted = frame
            .outcomes
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Posted { .. }))
            .count() as u64;
        self.set_status(|s| s.erp_posted += posted);
    }

    /// Stores the refusals the relay reports, then tells the relay it may forget them: the
    /// warehouse learns of every refusal, however long the agent was away or down.
    async fn take_refusals(&self, client: &UplinkClient, frame: RefusalFrame) {
        let Some(through) = frame.refusals.iter().map(|r| r.number).max() else {
            return;
        };
        for refusal in &frame.refusals {
            tracing::warn!(event = %refusal.id, seq = refusal.seq, reason = %refusal.reason, "the ERP refused an event");
        }
        let log = self.log.clone();
        let refusals = frame.refusals;
        match tokio::task::spawn_blocking(move || log.store_erp_refusals(&refusals)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "ERP refusals could not be stored; the relay sends them again");
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "the refusal writer failed; the relay sends them again");
                return;
            }
        }
        let ack = RefusalAckFrame {
            site: self.site.clone(),
            through,
        };
        match ack.encode() {
            Ok(payload) => {
                if let Err(e) = client.try_publish(&refusal_acks_topic(&self.site), payload) {
                    tracing::debug!(error = %e, "refusal acknowledgement not sent; the relay sends them again");
                }
            }
            Err(e) => tracing::error!(error = %e, "a refusal acknowledgement could not be encoded"),
        }
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) -> anyhow::Result<()> {
        let (client, eventloop) = self.uplink()?;
        let (link_tx, mut link_rx) = mpsc::channel(1024);
        let link_task = tokio::spawn(drive_link(
            eventloop,
            client.clone(),
            LinkTopics {
                acks: acks_topic(&self.site),
                outcomes: outcomes_topic(&self.site),
                refusals: refusals_topic(&self.site),
            },
            link_tx,
            self.config.reconnect_min_ms,
            self.config.reconnect_max_ms,
            stop.clone(),
        ));
        let topic = batches_topic(&self.site);
        let epoch = self.log.epoch();
        let mut appends = self.log.watch_appends();
        let stats = self.log.stats();
        // Everything before the oldest event in the log was acknowledged and deleted.
        let mut acked_through = stats.oldest_seq.unwrap_or(stats.next_seq).saturating_sub(1);
        let mut next_to_send = acked_through + 1;
        let mut highest_sent = acked_through;
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut ready = false;
        let linger = Duration::from_millis(self.config.linger_ms);
        let ack_timeout = Duration::from_secs(self.config.ack_timeout_secs);
        let mut linger_until: Option<Instant> = None;
        let mut last_progress = Instant::now();
        let mut gap_resend_at: Option<Instant> = None;
        let mut full_refused_at: Option<Instant> = None;
        self.set_status(|s| s.acked_through = acked_through);
        let mut beat = tokio::time::interval(Duration::from_secs(1));

        loop {
            self.heartbeat.beat();
            // Send while the window has room and the log has events.
            while ready && in_flight.len() < self.config.window {
                let next_seq = self.log.stats().next_seq;
                if next_to_send >= next_seq {
                    break;
                }
                let available = next_seq - next_to_send;
                if available < self.config.batch_max_events as u64 && !linger.is_zero() {
                    let deadline = *linger_until.get_or_insert_with(|| Instant::now() + linger);
                    if Instant::now() < deadline {
                        break;
                    }
                }
                linger_until = None;
                let records = {
                    let log = self.log.clone();
                    let (from, max_events, max_bytes) = (
                        next_to_send,
                        self.config.batch_max_events,
                        self.config.batch_max_bytes.0 as usize,
                    );
                    tokio::task::spawn_blocking(move || log.read_from(from, max_events, max_bytes))
                        .await??
                };
                let (Some(first), Some(last)) =
                    (records.first().map(|r| r.0), records.last().map(|r| r.0))
                else {
                    // Acknowledged and deleted meanwhile: skip ahead.
                    next_to_send = next_seq;
                    break;
                };
                let events = records.len() as u64;
                let frame = BatchFrame {
                    site: self.site.clone(),
                    epoch,
                    acked_through,
                    first_seq: first,
                    last_seq: last,
                    events: records
                        .into_iter()
                        .map(|(seq, r)| BatchEntry {
                            seq,
                            received_at_ms: r.received_at_ms,
                            event: r.event,
                        })
                        .collect(),
                    signature: None,
                };
                let payload = frame.encode()?;
                if let Err(e) = client.try_publish(&topic, payload) {
                    // The client's queue is full or closed: the link is going down; the batch
                    // goes again after the reconnect.
                    tracing::debug!(error = %e, "batch not queued");
                    break;
                }
                let resend = first <= highest_sent;
                highest_sent = highest_sent.max(last);
                in_flight.push_back(InFlight {
                    first,
                    last,
                    events,
                    sent_at: Instant::now(),
                });
                next_to_send = last + 1;
                self.metrics.batches_sent.inc();
                self.metrics.events_forwarded.inc_by(events);
                let in_flight_events: u64 = in_flight.iter().map(|b| b.events).sum();
                self.set_status(|s| {
                    s.batches_sent += 1;
                    s.events_forwarded += events;
                    s.batches_in_flight = in_flight.len();
                    s.events_in_flight = in_flight_events;
                    if resend {
                        s.batches_resent += 1;
                    }
                });
            }

            // A slow link acknowledges late but steadily: only a wait without any progress
            // sends everything again.
            let ack_deadline = in_flight
                .front()
                .map(|b| b.sent_at.max(last_progress) + ack_timeout);
            tokio::select! {
                _ = stop.cancelled() => break,
                event = link_rx.recv() => match event {
                    None => break,
                    Some(LinkEvent::Ready) => {
                        ready = true;
                        gap_resend_at = None;
                        // Everything not acknowledged goes again, from the log.
                        if !in_flight.is_empty() {
                            self.metrics.batch_resends.inc_by(in_flight.len() as u64);
                        }
                        in_flight.clear();
                        next_to_send = acked_through + 1;
                        self.metrics.link_up.set(1);
                        self.set_status(|s| {
                            s.state = "up";
                            s.since_ms = now_ms();
                            s.batches_in_flight = 0;
                            s.events_in_flight = 0;
                        });
                        tracing::info!(host = %self.config.host, port = self.config.port, "uplink connected");
                    }
                    Some(LinkEvent::Down(error)) => {
                        if ready {
                            tracing::warn!(error = %error, "uplink down");
                        }
                        ready = false;
                        self.metrics.link_up.set(0);
                        self.set_status(|s| {
                            if s.state != "down" {
                                s.state = "down";
                                s.since_ms = now_ms();
                                s.reconnects += 1;
                            }
                            s.last_error = Some(error);
                        });
                    }
                    Some(LinkEvent::Refusals(payload)) => {
                        match RefusalFrame::decode(&payload, MAX_FRAME_BYTES) {
                            Ok(frame) if frame.site == self.site => self.take_refusals(&client, frame).await,
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "a refusal report could not be decoded"),
                        }
                    }
                    Some(LinkEvent::Outcomes(payload)) => {
                        match OutcomeFrame::decode(&payload, MAX_FRAME_BYTES) {
                            Ok(frame) if frame.site == self.site => self.record_outcomes(frame),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "an outcome report could not be decoded"),
                        }
                    }
                    Some(LinkEvent::Ack(payload)) => {
                        let ack = match AckFrame::decode(&payload, MAX_FRAME_BYTES) {
                            Ok(ack) => ack,
                            Err(e) => {
                                tracing::warn!(error = %e, "an acknowledgement could not be decoded");
                                continue;
                            }
                        };
                        if ack.site != self.site || ack.epoch != epoch {
                            tracing::debug!(site = %ack.site, epoch = %ack.epoch, "acknowledgement for another log ignored");
                            continue;
                        }
                        match ack.refused {
                            Some(BatchRefusal::Gap) => {
                                // The relay holds less than the batch builds on: batches sent
                                // while it was away never reached it. Acknowledgements of
                                // earlier batches may still be on their way, so wait a moment.
                                gap_resend_at.get_or_insert_with(|| Instant::now() + GAP_RESEND_DELAY);
                            }
                            Some(BatchRefusal::OutboxFull) => {
                                // Back-pressure: the events stay here and go again after the
                                // ack timeout, by when deliveries may have made room.
                                full_refused_at = Some(Instant::now());
                                self.set_status(|s| {
                                    if s.state != "relay full" {
                                        s.state = "relay full";
                                        s.since_ms = now_ms();
                                    }
                                    s.last_error = Some("the relay's outbox is full (outbox.max_bytes) while the ERP catches up: events wait here and are offered again".into());
                                });
                            }
                            None => {}
                        }
                        if ack.acked_through <= acked_through {
                            continue;
                        }
                        let through = ack.acked_through.min(next_to_send.saturating_sub(1).max(acked_through));
                        if through <= acked_through {
                            continue;
                        }
                        match self.log.request_ack_through(through) {
                            Ok(deleted) => {
                                acked_through = through;
                                last_progress = Instant::now();
                                while in_flight.front().is_some_and(|b| b.last <= through) {
                                    in_flight.pop_front();
                                }
                                let metrics = self.metrics.clone();
                                tokio::spawn(async move {
                                    match deleted.await {
                                        Ok(deleted) => {
                                            metrics.events_acked.inc_by(deleted);
                                        }
                                        Err(e) => tracing::error!(error = %e, "acknowledged events could not be deleted; they are re-sent after a restart"),
                                    }
                                });
                                self.metrics.last_ack_ms.set(now_ms());
                                let in_flight_events: u64 = in_flight.iter().map(|b| b.events).sum();
                                self.set_status(|s| {
                                    if s.state == "stalled" || s.state == "relay full" {
                                        s.state = "up";
                                        s.since_ms = now_ms();
                                    }
                                    s.acked_through = through;
                                    s.last_ack_ms = Some(now_ms());
                                    s.batches_in_flight = in_flight.len();
                                    s.events_in_flight = in_flight_events;
                                });
                            }
                            Err(e) => tracing::error!(error = %e, "acknowledged events could not be queued for deletion"),
                        }
                    }
                },
                _ = sleep_until_opt(gap_resend_at), if gap_resend_at.is_some() && ready => {
                    gap_resend_at = None;
                    tracing::info!(from = acked_through + 1, "the relay is missing earlier batches: re-sending from the log");
                    self.metrics.batch_resends.inc_by(in_flight.len() as u64);
                    in_flight.clear();
                    next_to_send = acked_through + 1;
                }
                _ = appends.changed() => {}
                _ = beat.tick() => {}
                _ = sleep_until_opt(linger_until), if linger_until.is_some() => {}
                _ = sleep_until_opt(ack_deadline), if ack_deadline.is_some() && ready => {
                    if let Some(front) = in_flight.front() {
                        tracing::warn!(first = front.first, last = front.last, "no acknowledgement in {:?}: re-sending from the log", ack_timeout);
                    }
                    // Connected is not forwarding: say so until an acknowledgement comes. A
                    // relay that answers "full" is not stalled, it holds back.
                    let answering_full = full_refused_at.is_some_and(|at| at.elapsed() < ack_timeout);
                    self.set_status(|s| {
                        if answering_full {
                            return;
                        }
                        if s.state != "stalled" {
                            s.state = "stalled";
                            s.since_ms = now_ms();
                        }
                        s.last_error = Some(format!(
                            "connected, but the relay has acknowledged nothing for {} s: batches are re-sent; check that the relay runs and subscribes to this broker",
                            ack_timeout.as_secs()
                        ));
                    });
                    self.metrics.batch_resends.inc_by(in_flight.len() as u64);
                    in_flight.clear();
                    next_to_send = acked_through + 1;
                }
            }
        }
        client.try_disconnect();
        link_task.abort();
        Ok(())
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The MQTT client of the uplink in the configured protocol version: what the forwarder asks of
/// it is the same for both.
#[derive(Clone)]
enum UplinkClient {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl UplinkClient {
    /// Queues a QoS 1 publish without waiting; fails when the client's queue is full or closed.
    fn try_publish(&self, topic: &str, payload: Vec<u8>) -> Result<(), String> {
        match self {
            UplinkClient::V4(client) => client
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string()),
            UplinkClient::V5(client) => client
                .try_publish(topic, v5::mqttbytes::QoS::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues one SUBSCRIBE (QoS 1) for all the topics.
    fn try_subscribe(&self, topics: &[&str]) -> Result<(), String> {
        match self {
            UplinkClient::V4(client) => client
                .try_subscribe_many(topics.iter().map(|t| {
                    rumqttc::SubscribeFilter::new(t.to_string(), rumqttc::QoS::AtLeastOnce)
                }))
                .map_err(|e| e.to_string()),
            UplinkClient::V5(client) => {
                client
                    .try_subscribe_many(topics.iter().map(|t| {
                        v5::mqttbytes::v5::Filter::new(*t, v5::mqttbytes::QoS::AtLeastOnce)
                    }))
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Queues a DISCONNECT, if the client still takes requests.
    fn try_disconnect(&self) {
        // A full or closed queue means the connection is going anyway.
        match self {
            UplinkClient::V4(client) => {
                let _ = client.try_disconnect();
            }
            UplinkClient::V5(client) => {
                let _ = client.try_disconnect();
            }
        }
    }
}

/// The event loop that goes with an [`UplinkClient`] (boxed: both are large).
enum UplinkEventLoop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

impl UplinkEventLoop {
    /// The next event of the connection; a failure is reported once, and the poll after it
    /// reconnects at once.
    async fn poll(&mut self) -> Polled {
        match self {
            UplinkEventLoop::V4(eventloop) => polled_v4(eventloop.poll().await),
            UplinkEventLoop::V5(eventloop) => polled_v5(eventloop.poll().await),
        }
    }
}

/// An event of either protocol's event loop, reduced to what the link needs to know.
enum Polled {
    /// The broker accepted the connection (CONNACK with success).
    Connected,
    /// A SUBSCRIBE went out with this packet id.
    Subscribing(u16),
    /// A SUBACK: whether the broker refused any filter, and why when it said.
    Subscribed {
        pkid: u16,
        refused: bool,
        reason: Option<String>,
    },
    /// A message on a subscribed topic.
    Message { topic: Bytes, payload: Bytes },
    /// Anything else: pings, PUBACKs, outgoing packets.
    Other,
    /// The connection failed, was refused or closed.
    Failed(String),
}

fn polled_v4(event: Result<rumqttc::Event, rumqttc::ConnectionError>) -> Polled {
    use rumqttc::{Event, Packet, SubscribeReasonCode};
    match event {
        Ok(Event::Incoming(Packet::ConnAck(_))) => Polled::Connected,
        Ok(Event::Outgoing(Outgoing::Subscribe(pkid))) => Polled::Subscribing(pkid),
        Ok(Event::Incoming(Packet::SubAck(ack))) => Polled::Subscribed {
            pkid: ack.pkid,
            refused: ack
                .return_codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure)),
            reason: None,
        },
        Ok(Event::Incoming(Packet::Publish(publish))) => Polled::Message {
            topic: Bytes::from(publish.topic),
            payload: publish.payload,
        },
        Ok(_) => Polled::Other,
        Err(e) => Polled::Failed(e.to_string()),
    }
}

fn polled_v5(event: Result<v5::Event, v5::ConnectionError>) -> Polled {
    use v5::mqttbytes::v5::{Packet, PubAckReason, SubscribeReasonCode};
    match event {
        Ok(v5::Event::Incoming(Packet::ConnAck(_))) => Polled::Connected,
        Ok(v5::Event::Outgoing(Outgoing::Subscribe(pkid))) => Polled::Subscribing(pkid),
        Ok(v5::Event::Incoming(Packet::SubAck(ack))) => {
            let failures: Vec<String> = ack
                .return_codes
                .iter()
                .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                .map(|c| format!("{c:?}"))
                .collect();
            let reason_string = ack.properties.and_then(|p| p.reason_string);
            Polled::Subscribed {
                pkid: ack.pkid,
                refused: !failures.is_empty(),
                reason: (!failures.is_empty()).then(|| {
                    let codes = failures.join(", ");
                    match reason_string {
                        Some(reason) => format!("{reason} ({codes})"),
                        None => codes,
                    }
                }),
            }
        }
        Ok(v5::Event::Incoming(Packet::Publish(publish))) => Polled::Message {
            topic: publish.topic,
            payload: publish.payload,
        },
        Ok(v5::Event::Incoming(Packet::PubAck(ack)))
            if !matches!(
                ack.reason,
                PubAckReason::Success | PubAckReason::NoMatchingSubscribers
            ) =>
        {
            // The batch is not re-sent at once: the relay's acknowledgement does not come, and
            // the ack timeout sends it again from the log.
            let reason = ack.properties.and_then(|p| p.reason_string);
            tracing::warn!(pkid = ack.pkid, code = ?ack.reason, reason = reason.as_deref().unwrap_or(""), "the broker refused a batch");
            Polled::Other
        }
        Ok(_) => Polled::Other,
        Err(e) => Polled::Failed(v5_error_text(&e)),
    }
}

/// A v5 connection error in words: a refused CONNECT and a DISCONNECT from the broker name the
/// reason code the broker gave.
fn v5_error_text(error: &v5::ConnectionError) -> String {
    use v5::{ConnectionError, StateError};
    match error {
        ConnectionError::ConnectionRefused(code)
        | ConnectionError::MqttState(StateError::ConnFail { reason: code }) => {
            format!(
                "the broker refused the connection: {}",
                connect_reason_text(*code)
            )
        }
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => match reason_string {
            Some(reason) => {
                format!("the broker closed the connection: {reason} ({reason_code:?})")
            }
            None => format!("the broker closed the connection: {reason_code:?}"),
        },
        other => other.to_string(),
    }
}

/// The MQTT 5 name of a CONNACK reason code, with its number.
fn connect_reason_text(code: v5::mqttbytes::v5::ConnectReturnCode) -> &'static str {
    use v5::mqttbytes::v5::ConnectReturnCode as Code;
    match code {
        Code::Success => "success (0x00)",
        Code::RefusedProtocolVersion => "unacceptable protocol version (0x01)",
        Code::BadClientId => "identifier rejected (0x02)",
        Code::ServiceUnavailable => "server unavailable (0x03)",
        Code::UnspecifiedError => "unspecified error (0x80)",
        Code::MalformedPacket => "malformed packet (0x81)",
        Code::ProtocolError => "protocol error (0x82)",
        Code::ImplementationSpecificError => "implementation specific error (0x83)",
        Code::UnsupportedProtocolVersion => "unsupported protocol version (0x84)",
        Code::ClientIdentifierNotValid => "client identifier not valid (0x85)",
        Code::BadUserNamePassword => "bad user name or password (0x86)",
        Code::NotAuthorized => "not authorized (0x87)",
        Code::ServerUnavailable => "server unavailable (0x88)",
        Code::ServerBusy => "server busy (0x89)",
        Code::Banned => "banned (0x8A)",
        Code::BadAuthenticationMethod => "bad authentication method (0x8C)",
        Code::TopicNameInvalid => "topic name invalid (0x90)",
        Code::PacketTooLarge => "packet too large (0x95)",
        Code::QuotaExceeded => "quota exceeded (0x97)",
        Code::PayloadFormatInvalid => "payload format invalid (0x99)",
        Code::RetainNotSupported => "retain not supported (0x9A)",
        Code::QoSNotSupported => "QoS not supported (0x9B)",
        Code::UseAnotherServer => "use another server (0x9C)",
        Code::ServerMoved => "server moved (0x9D)",
        Code::ConnectionRateExceeded => "connection rate exceeded (0x9F)",
    }
}

/// The topics the agent subscribes to: the relay's acknowledgements and outcome reports.
struct LinkTopics {
    acks: String,
    outcomes: String,
    refusals: String,
}

/// Polls the MQTT event loop of either protocol version: reports the link going up (after the
/// acks subscription is confirmed) and down, passes acknowledgements and outcome reports on,
/// and backs off between reconnects.
async fn drive_link(
    mut eventloop: UplinkEventLoop,
    client: UplinkClient,
    topics: LinkTopics,
    link: mpsc::Sender<LinkEvent>,
    backoff_min_ms: u64,
    backoff_max_ms: u64,
    stop: CancellationToken,
) {
    let LinkTopics {
        acks: acks_topic,
        outcomes: outcomes_topic,
        refusals: refusals_topic,
    } = topics;
    let mut backoff = Backoff::new(
        Duration::from_millis(backoff_min_ms),
        Duration::from_millis(backoff_max_ms),
    );
    let mut subscribe_pkid: Option<u16> = None;
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => return,
            event = eventloop.poll() => event,
        };
        match event {
            Polled::Connected => {
                backoff.reset();
                subscribe_pkid = None;
                if let Err(e) =
                    client.try_subscribe(&[&acks_topic, &outcomes_topic, &refusals_topic])
                {
                    let _ = link
                        .send(LinkEvent::Down(format!(
                            "cannot subscribe to {acks_topic}: {e}"
                        )))
                        .await;
                }
            }
            Polled::Subscribing(pkid) => subscribe_pkid = Some(pkid),
            Polled::Subscribed {
                pkid,
                refused,
                reason,
            } => {
                if subscribe_pkid.is_none_or(|p| p == pkid) {
                    let event = if refused {
                        let mut error =
                            format!("the broker refused the subscription to {acks_topic}");
                        if let Some(reason) = reason {
                            error = format!("{error}: {reason}");
                        }
                        LinkEvent::Down(error)
                    } else {
                        LinkEvent::Ready
                    };
                    if link.send(event).await.is_err() {
                        return;
                    }
                }
            }
            Polled::Message { topic, payload } => {
                let event = if topic == outcomes_topic.as_bytes() {
                    LinkEvent::Outcomes(payload.to_vec())
                } else if topic == acks_topic.as_bytes() {
                    LinkEvent::Ack(payload.to_vec())
                } else if topic == refusals_topic.as_bytes() {
                    LinkEvent::Refusals(payload.to_vec())
                } else {
                    continue;
                };
                if link.send(event).await.is_err() {
                    return;
                }
            }
            Polled::Other => {}
            Polled::Failed(error) => {
                if link.send(LinkEvent::Down(error)).await.is_err() {
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff.next_wait()) => {}
                }
            }
        }
    }
}
