//! The forwarder: drains the log to the relay in batches over MQTT (3.1.1 or 5, as configured),
//! and deletes events from the log only when the relay acknowledges them as durable in its
//! outbox.
//!
//! The log is the single source of truth for what is in flight. Broker PUBACKs are not taken as
//! delivery and the MQTT client's own retry queue is not relied on: after a reconnect or an ack
//! timeout, every unacknowledged batch is read again from the log and re-sent, and the relay
//! drops what it already has.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backhaul_events::Epoch;
use backhaul_events::OutcomeFrame;
use backhaul_events::config::Secret;
use backhaul_events::frame::Outcome;
use backhaul_events::frame::{AckFrame, BatchEntry, BatchFrame, BatchRefusal};
use backhaul_events::service::Backoff;
use backhaul_events::service::Heartbeat;
use backhaul_events::signing::{SiteKeys, is_sealed};
use backhaul_events::topics::{
    acks_topic, batches_topic, outcomes_topic, refusal_acks_topic, refusals_topic, tally_topic,
};
use backhaul_events::{RefusalAckFrame, RefusalFrame, TallyFrame, WaitingAtSite};
use bytes::Bytes;
use rumqttc::{Outgoing, Transport, v5};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{UplinkConfig, UplinkProtocol};

mod window;
use crate::log::{EventLog, now_ms};
use crate::metrics::AgentMetrics;
use window::{Window, WindowSettings};

/// Largest frame the agent sends or accepts; batches are far smaller, acks tiny.
const MAX_FRAME_BYTES: usize = 8 << 20;

/// Requests (publishes, subscribes) the MQTT client queues for its event loop.
const REQUEST_QUEUE: usize = 64;

/// A changed tally goes to the relay at most this often (and at once after each connect).
const TALLY_EVERY: Duration = Duration::from_secs(5);
/// An unchanged one goes again this often, in case the last was lost on the way.
const TALLY_REFRESH: Duration = Duration::from_secs(60);

/// The link states in which the relay holds events back on purpose, so the link is not stalled.
const RELAY_FULL: &str = "relay full";
const RELAY_OUTBOX_DOWN: &str = "relay outbox down";

/// What the status page says about the link to the broker and the relay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    /// "connecting", "up", "down", "stalled" (connected, but nothing acknowledged within the
    /// ack timeout), "relay full" (the relay refuses batches until its outbox has room) or
    /// "relay outbox down" (the relay refuses batches until its outbox database is back).
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

pub struct Forwarder {
    site: String,
    log: EventLog,
    config: UplinkConfig,
    password: Option<Secret>,
    metrics: Arc<AgentMetrics>,
    status: SharedLinkStatus,
    heartbeat: Heartbeat,
    /// `uplink.site_key`: batches are sealed with it, and the relay's frames must be.
    site_key: Option<SiteKeys>,
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
                site_key: None,
            },
            status,
        )
    }

    /// Signs what goes to the relay with the site's key, and takes from the relay only what
    /// is signed with it.
    pub fn with_site_key(mut self, site_key: Option<SiteKeys>) -> Forwarder {
        self.site_key = site_key;
        self
    }

    /// A frame for the relay, sealed when the site has a key.
    fn seal(&self, frame: Vec<u8>) -> Vec<u8> {
        match &self.site_key {
            Some(key) => key.seal(&frame),
            None => frame,
        }
    }

    /// The frame inside what the relay sent, if the site's key sealed it (or, without a key,
    /// if it is not sealed); `what` names it in the log line of a refusal.
    fn open<'a>(&self, payload: &'a [u8], what: &str) -> Option<&'a [u8]> {
        let opened = match &self.site_key {
            Some(key) => key.open(payload).map_err(|e| e.to_string()),
            None if is_sealed(payload) => Err(
                "it is signed, but this agent has no uplink.site_key to check it with".to_string(),
            ),
            None => Ok(payload),
        };
        match opened {
            Ok(frame) => Some(frame),
            Err(why) => {
                self.metrics.unsigned_frames.inc();
                tracing::warn!(what, "a frame from the relay was ignored: {why}");
                None
            }
        }
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
                let (client, mut eventloop) = rumqttc::AsyncClient::new(options, REQUEST_QUEUE);
                eventloop.set_network_options(without_nagle(eventloop.network_options()));
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
                options.set_network_options(without_nagle(options.network_options()));
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
            tracing::warn!(id = %refusal.id, seq = refusal.seq, reason = %refusal.reason, "the ERP refused an event");
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
        match ack.encode().map(|payload| self.seal(payload)) {
            Ok(payload) => {
                if let Err(e) = client.try_publish(&refusal_acks_topic(&self.site), payload) {
                    tracing::debug!(error = %e, "refusal acknowledgement not sent; the relay sends them again");
                }
            }
            Err(e) => tracing::error!(error = %e, "a refusal acknowledgement could not be encoded"),
        }
    }

    /// Tells the relay what the site accepted per day, and which events still wait here, for
    /// reconciliation. Best effort: a tally lost on the way is replaced by the next one.
    async fn send_tally(&self, client: &UplinkClient, epoch: Epoch, acked_through: u64) {
        let log = self.log.clone();
        let read = tokio::task::spawn_blocking(move || {
            let days = log.tally()?;
            let waiting = log.read_from(acked_through + 1, TallyFrame::WAITING_LISTED, 1 << 20)?;
            anyhow::Ok((days, waiting, log.stats().backlog_events))
        })
        .await;
        let (mut days, waiting, waiting_total) = match read {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the tally could not be read; it goes with the next one");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "the tally reader failed");
                return;
            }
        };
        if days.len() > TallyFrame::MAX_DAYS {
            days.drain(..days.len() - TallyFrame::MAX_DAYS);
        }
        let frame = TallyFrame {
            site: self.site.clone(),
            epoch,
            acked_through,
            at_ms: now_ms(),
            days,
            waiting: waiting
                .into_iter()
                .map(|(seq, record)| WaitingAtSite {
                    seq,
                    id: record.event.id,
                    received_at_ms: record.received_at_ms,
                })
                .collect(),
            waiting_total,
        };
        match frame.encode().map(|payload| self.seal(payload)) {
            Ok(payload) => {
                if let Err(e) = client.try_publish(&tally_topic(&self.site), payload) {
                    tracing::debug!(error = %e, "tally not sent; the next one replaces it");
                }
            }
            Err(e) => tracing::error!(error = %e, "the tally could not be encoded"),
        }
    }

    /// Reads the batch from `from` out of the log and publishes it; whether one went (a full
    /// client queue means the link is going down: the batch goes again after the reconnect).
    async fn send_batch(
        &self,
        client: &UplinkClient,
        topic: &str,
        epoch: Epoch,
        window: &mut Window,
        from: u64,
    ) -> anyhow::Result<bool> {
        let records = {
            let log = self.log.clone();
            let (max_events, max_bytes) = (
                self.config.batch_max_events,
                self.config.batch_max_bytes.0 as usize,
            );
            tokio::task::spawn_blocking(move || log.read_from(from, max_events, max_bytes))
                .await??
        };
        let (Some(first), Some(last)) = (records.first().map(|r| r.0), records.last().map(|r| r.0))
        else {
            // Acknowledged and deleted meanwhile: skip ahead.
            window.skip_to(self.log.stats().next_seq);
            return Ok(false);
        };
        let events = records.len() as u64;
        let frame = BatchFrame {
            site: self.site.clone(),
            epoch,
            acked_through: window.acked_through(),
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
        let payload = self.seal(frame.encode_with(self.config.compression)?);
        let bytes = payload.len() as u64;
        if let Err(e) = client.try_publish(topic, payload) {
            tracing::debug!(error = %e, "batch not queued");
            return Ok(false);
        }
        self.metrics.uplink_bytes.inc_by(bytes);
        let resend = window.sent(first, last, events, Instant::now());
        self.metrics.batches_sent.inc();
        self.metrics.events_forwarded.inc_by(events);
        let (batches, in_flight) = (window.batches_in_flight(), window.events_in_flight());
        self.set_status(|s| {
            s.batches_sent += 1;
            s.events_forwarded += events;
            s.batches_in_flight = batches;
            s.events_in_flight = in_flight;
            if resend {
                s.batches_resent += 1;
            }
        });
        Ok(true)
    }

    /// An acknowledgement from the relay: the log deletes what it covers, and the status says
    /// whether the relay is taking batches.
    fn take_ack(&self, payload: &[u8], epoch: Epoch, window: &mut Window) {
        // An acknowledgement deletes events: only one signed with the site's key counts.
        let Some(payload) = self.open(payload, "acknowledgement") else {
            return;
        };
        let ack = match AckFrame::decode(payload, MAX_FRAME_BYTES) {
            Ok(ack) => ack,
            Err(e) => {
                tracing::warn!(error = %e, "an acknowledgement could not be decoded");
                return;
            }
        };
        if ack.site != self.site || ack.epoch != epoch {
            tracing::debug!(site = %ack.site, epoch = %ack.epoch, "acknowledgement for another log ignored");
            return;
        }
        let answer = window.acknowledged(ack.acked_through, ack.refused, Instant::now());
        if answer.relay_full {
            let (state, why) = if ack.refused == Some(BatchRefusal::OutboxUnavailable) {
                (
                    RELAY_OUTBOX_DOWN,
                    "the relay's outbox database is unavailable: events wait here and are offered again",
                )
            } else {
                (
                    RELAY_FULL,
                    "the relay's outbox is full (outbox.max_bytes) while the ERP catches up: events wait here and are offered again",
                )
            };
            self.set_status(|s| {
                if s.state != state {
                    s.state = state;
                    s.since_ms = now_ms();
                }
                s.last_error = Some(why.into());
            });
        }
        let Some(through) = answer.delete_through else {
            return;
        };
        match self.log.request_ack_through(through) {
            Ok(deleted) => {
                window.deleted_through(through, Instant::now());
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    match deleted.await {
                        Ok(deleted) => {
                            metrics.events_acked.inc_by(deleted);
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "acknowledged events could not be deleted; they are re-sent after a restart")
                        }
                    }
                });
                self.metrics.last_ack_ms.set(now_ms());
                let (batches, in_flight) = (window.batches_in_flight(), window.events_in_flight());
                self.set_status(|s| {
                    if s.state == "stalled" || s.state == RELAY_FULL || s.state == RELAY_OUTBOX_DOWN
                    {
                        s.state = "up";
                        s.since_ms = now_ms();
                    }
                    s.acked_through = through;
                    s.last_ack_ms = Some(now_ms());
                    s.batches_in_flight = batches;
                    s.events_in_flight = in_flight;
                });
            }
            Err(e) => {
                tracing::error!(error = %e, "acknowledged events could not be queued for deletion")
            }
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
        let acked_through = stats.oldest_seq.unwrap_or(stats.next_seq).saturating_sub(1);
        let settings = WindowSettings {
            capacity: self.config.window,
            batch_max_events: self.config.batch_max_events as u64,
            linger: Duration::from_millis(self.config.linger_ms),
            ack_timeout: Duration::from_secs(self.config.ack_timeout_secs),
        };
        let mut window = Window::new(settings, acked_through, Instant::now());
        self.set_status(|s| s.acked_through = acked_through);
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        // What the last tally sent said (next sequence number, acknowledged through) and when.
        let mut tally_sent: Option<(u64, u64, Instant)> = None;
        let mut link_up = false;

        loop {
            self.heartbeat.beat();
            // Send while the window has room and the log has events.
            while let Some(from) = window.next_batch(self.log.stats().next_seq, Instant::now()) {
                if !self
                    .send_batch(&client, &topic, epoch, &mut window, from)
                    .await?
                {
                    break;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                event = link_rx.recv() => match event {
                    None => break,
                    Some(LinkEvent::Ready) => {
                        link_up = true;
                        tally_sent = None;
                        let resent = window.link_up();
                        self.metrics.batch_resends.inc_by(resent as u64);
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
                        link_up = false;
                        if window.link_down() {
                            tracing::warn!(error = %error, "uplink down");
                        }
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
                        let Some(payload) = self.open(&payload, "refusal report") else {
                            continue;
                        };
                        match RefusalFrame::decode(payload, MAX_FRAME_BYTES) {
                            Ok(frame) if frame.site == self.site => self.take_refusals(&client, frame).await,
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "a refusal report could not be decoded"),
                        }
                    }
                    Some(LinkEvent::Outcomes(payload)) => {
                        let Some(payload) = self.open(&payload, "outcome report") else {
                            continue;
                        };
                        match OutcomeFrame::decode(payload, MAX_FRAME_BYTES) {
                            Ok(frame) if frame.site == self.site => self.record_outcomes(frame),
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "an outcome report could not be decoded"),
                        }
                    }
                    Some(LinkEvent::Ack(payload)) => self.take_ack(&payload, epoch, &mut window),
                },
                _ = sleep_until_opt(window.gap_resend_at()), if window.gap_resend_at().is_some() => {
                    let resent = window.resend_after_gap();
                    tracing::info!(from = window.acked_through() + 1, "the relay is missing earlier batches: re-sending from the log");
                    self.metrics.batch_resends.inc_by(resent as u64);
                }
                _ = appends.changed() => {}
                _ = beat.tick() => {
                    let state = (self.log.stats().next_seq, window.acked_through());
                    let due = tally_sent.is_none_or(|(next, acked, at)| {
                        ((next, acked) != state && at.elapsed() >= TALLY_EVERY)
                            || at.elapsed() >= TALLY_REFRESH
                    });
                    if link_up && due {
                        self.send_tally(&client, epoch, state.1).await;
                        tally_sent = Some((state.0, state.1, Instant::now()));
                    }
                }
                _ = sleep_until_opt(window.linger_until()), if window.linger_until().is_some() => {}
                _ = sleep_until_opt(window.ack_deadline()), if window.ack_deadline().is_some() => {
                    let Some(timed_out) = window.timed_out(Instant::now()) else {
                        continue;
                    };
                    tracing::warn!(first = timed_out.first, last = timed_out.last, "no acknowledgement in {:?}: re-sending from the log", settings.ack_timeout);
                    // Connected is not forwarding: say so until an acknowledgement comes. A
                    // relay that answers "full" is not stalled, it holds back.
                    if !timed_out.relay_full {
                        self.set_status(|s| {
                            if s.state != "stalled" {
                                s.state = "stalled";
                                s.since_ms = now_ms();
                            }
                            s.last_error = Some(format!(
                                "connected, but the relay has acknowledged nothing for {} s: batches are re-sent; check that the relay runs and subscribes to this broker",
                                settings.ack_timeout.as_secs()
                            ));
                        });
                    }
                    self.metrics.batch_resends.inc_by(timed_out.resent as u64);
                }
            }
        }
        client.try_disconnect();
        link_task.abort();
        Ok(())
    }
}

/// rumqttc leaves Nagle's algorithm on, so a frame's last segment and each acknowledgement can
/// wait for the broker's delayed ACK (up to 40 ms on Linux) before they leave.
pub(crate) fn without_nagle(mut options: rumqttc::NetworkOptions) -> rumqttc::NetworkOptions {
    options.set_tcp_nodelay(true);
    options
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
            // A batch is not re-sent at once: the relay's acknowledgement does not come, and
            // the ack timeout sends it again from the log. A tally or a refusal acknowledgement
            // refused here (a broker ACL older than them) goes again later.
            let reason = ack.properties.and_then(|p| p.reason_string);
            tracing::warn!(pkid = ack.pkid, code = ?ack.reason, reason = reason.as_deref().unwrap_or(""), "the broker refused a publish (a batch, a tally or a refusal acknowledgement): check its ACL against config/mosquitto/backhaul.acl");
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
