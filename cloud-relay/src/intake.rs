//! Batch intake: takes batch frames off the broker, checks them, stores them in the outbox
//! (several batches share one durable commit), and only then publishes the acknowledgement
//! the agent waits for before it deletes anything. It also carries the ERP's answers back:
//! each site's refusals are sent until the site's agent acknowledges them (at once when they
//! happen, again when the site is heard from, and every few seconds while any are left). It keeps
//! each site's latest tally of what its agent accepted, for reconciliation.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use backhaul_events::config::Secret;
use backhaul_events::frame::{AckFrame, BatchFrame, BatchRefusal};
use backhaul_events::service::{Backoff, Heartbeat};
use backhaul_events::signing::{Keyring, is_sealed};
use backhaul_events::topics::{
    ALL_BATCHES_FILTER, ALL_REFUSAL_ACKS_FILTER, ALL_TALLIES_FILTER, acks_topic, outcomes_topic,
    refusals_topic, site_of_batches_topic, site_of_refusal_acks_topic, site_of_tally_topic,
};
use backhaul_events::{RefusalAckFrame, RefusalFrame, TallyFrame};
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::BrokerConfig;
use crate::metrics::{ReasonLabel, RelayMetrics};
use crate::outbox::{Outbox, Stored};

/// Batches stored in one commit at most.
const MAX_BATCHES_PER_COMMIT: usize = 64;
/// Events stored in one commit at most (a batch is never split): decoded events are what the
/// relay holds in memory per batch, so this and [`DECODED_AHEAD`] bound its memory whatever
/// the backlog, and a 16k-event commit already spreads the fsync over enough events.
const MAX_EVENTS_PER_COMMIT: usize = 16_384;
/// Reconnect back-off to the broker: the first wait and the cap.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(10);
/// Frames waiting to be decoded, and decoded frames waiting for the outbox writer, at most.
const DECODED_AHEAD: usize = 16;
/// Refusals in one frame at most.
const REFUSALS_PER_FRAME: usize = 200;
/// A site's unacknowledged refusals are sent again after this long.
const REFUSALS_RESEND: Duration = Duration::from_secs(10);

/// What the broker brought, decoded.
enum Inbound {
    Batch(BatchFrame, Instant),
    RefusalAck(RefusalAckFrame),
    Tally(Box<TallyFrame>),
}

struct Received {
    topic: String,
    payload: Bytes,
    at: Instant,
}

pub struct Intake {
    pub broker: BrokerConfig,
    /// The relay's own username and password on the broker.
    pub login: Option<(String, Secret)>,
    pub outbox: Arc<dyn Outbox>,
    pub metrics: Arc<RelayMetrics>,
    /// Woken after each commit so the connector sees new events at once.
    pub stored: Arc<tokio::sync::Notify>,
    /// Outcomes from the delivery engine, to publish to each site.
    pub outcomes: mpsc::Receiver<crate::engine::SiteOutcomes>,
    pub heartbeat: Heartbeat,
    /// The sites' keys (`security.site_keys`): with them, every frame must be sealed by its
    /// site, and what goes back to a site is sealed with its key.
    pub keys: Option<Arc<Keyring>>,
}

impl Intake {
    fn options(&self) -> MqttOptions {
        let mut options = MqttOptions::new(
            self.broker.client_id.clone(),
            self.broker.host.clone(),
            self.broker.port,
        );
        options.set_keep_alive(Duration::from_secs(30));
        options.set_clean_session(true);
        let max = self.broker.max_frame_size.0 as usize;
        options.set_max_packet_size(max, max);
        options.set_inflight(1000);
        if let Some((user, password)) = &self.login {
            options.set_credentials(user.clone(), password.expose().to_string());
        }
        options
    }

    /// The batches filter, the refusal acknowledgements filter and the tallies filter.
    fn filters(&self) -> [String; 3] {
        [
            ALL_BATCHES_FILTER,
            ALL_REFUSAL_ACKS_FILTER,
            ALL_TALLIES_FILTER,
        ]
        .map(|filter| match &self.broker.shared_group {
            Some(group) => format!("$share/{group}/{filter}"),
            None => filter.to_string(),
        })
    }

    /// Runs until `stop`; ends with an error when the outbox cannot store batches.
    pub async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        let (client, mut eventloop) = AsyncClient::new(self.options(), 1024);
        // rumqttc leaves Nagle's algorithm on: acknowledgements to the agents would wait for the
        // broker's delayed ACK (up to 40 ms on Linux) before they leave.
        let mut network = eventloop.network_options();
        network.set_tcp_nodelay(true);
        eventloop.set_network_options(network);
        let (tx, mut rx) = mpsc::channel::<Received>(DECODED_AHEAD);
        let filters = self.filters();
        let filter = filters.join(", ");
        let metrics = self.metrics.clone();
        let poll_client = client.clone();
        let poll_stop = stop.clone();
        let (host, port) = (self.broker.host.clone(), self.broker.port);
        let poller = tokio::spawn(async move {
            let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
            let mut was_up = false;
            loop {
                let event = tokio::select! {
                    _ = poll_stop.cancelled() => return,
                    event = eventloop.poll() => event,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        backoff.reset();
                        let subscriptions = filters
                            .iter()
                            .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                        if let Err(e) = poll_client.try_subscribe_many(subscriptions) {
                            tracing::error!(error = %e, "cannot subscribe to {filter}");
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        metrics.broker_connected.set(1);
                        was_up = true;
                        tracing::info!(%host, port, %filter, "relay subscribed to batches");
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        let received = Received {
                            topic: publish.topic,
                            payload: publish.payload,
                            at: Instant::now(),
                        };
                        if tx.send(received).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics.broker_connected.set(0);
                        if was_up {
                            tracing::warn!(error = %e, "broker connection lost");
                            was_up = false;
                        } else {
                            tracing::debug!(error = %e, "broker not reachable");
                        }
                        tokio::select! {
                            _ = poll_stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next_wait()) => {}
                        }
                    }
                }
            }
        });

        // Frames are decoded while the previous ones are being stored.
        let max_frame = self.broker.max_frame_size.0 as usize;
        let (decoded_tx, mut decoded_rx) = mpsc::channel::<Inbound>(DECODED_AHEAD);
        let decode_metrics = self.metrics.clone();
        let decode_keys = self.keys.clone();
        let decoder = tokio::spawn(async move {
            while let Some(received) = rx.recv().await {
                if let Some(inbound) = check(
                    &decode_metrics,
                    &received,
                    max_frame,
                    decode_keys.as_deref(),
                ) && decoded_tx.send(inbound).await.is_err()
                {
                    return;
                }
            }
        });
        let mut beat = tokio::time::interval(Duration::from_secs(1));
        let mut refusals_sent: HashMap<String, Instant> = HashMap::new();
        // The latest tally of each site since the last write, and whether a write is running.
        let mut tallies: HashMap<String, TallyFrame> = HashMap::new();
        let tally_writer = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let result = loop {
            self.heartbeat.beat();
            let first = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = beat.tick() => {
                    self.keep_tallies(&mut tallies, &tally_writer);
                    for site in self.outbox.sites_with_refusals() {
                        if refusals_sent.get(&site).is_none_or(|at| at.elapsed() >= REFUSALS_RESEND) {
                            self.publish_refusals(&client, &site, &mut refusals_sent).await;
                        }
                    }
                    continue;
                }
                received = decoded_rx.recv() => match received {
                    Some(Inbound::Batch(batch, at)) => (batch, at),
                    Some(Inbound::RefusalAck(ack)) => {
                        self.refusals_acknowledged(ack).await;
                        continue;
                    }
                    Some(Inbound::Tally(tally)) => {
                        tallies.insert(tally.site.clone(), *tally);
                        continue;
                    }
                    None => break Err(anyhow::anyhow!("the broker reader stopped")),
                },
                outcomes = self.outcomes.recv() => {
                    if let Some((site, outcomes)) = outcomes {
                        let refused = outcomes
                            .iter()
                            .any(|o| matches!(o.outcome, backhaul_events::Outcome::DeadLettered { .. }));
                        self.publish_outcomes(&client, site.clone(), outcomes);
                        if refused {
                            self.publish_refusals(&client, &site, &mut refusals_sent).await;
                        }
                    }
                    continue;
                }
            };
            let mut events = first.0.events.len();
            let (mut batches, mut arrivals) = (vec![first.0], vec![first.1]);
            let mut acks = Vec::new();
            while batches.len() < MAX_BATCHES_PER_COMMIT && events < MAX_EVENTS_PER_COMMIT {
                match decoded_rx.try_recv() {
                    Ok(Inbound::Batch(batch, at)) => {
                        events += batch.events.len();
                        batches.push(batch);
                        arrivals.push(at);
                    }
                    Ok(Inbound::RefusalAck(ack)) => acks.push(ack),
                    Ok(Inbound::Tally(tally)) => {
                        tallies.insert(tally.site.clone(), *tally);
                    }
                    Err(_) => break,
                }
            }
            for ack in acks {
                self.refusals_acknowledged(ack).await;
            }

            let outbox = self.outbox.clone();
            let stored = tokio::task::spawn_blocking(move || {
                let result = outbox.store(&batches);
                (batches, result)
            })
            .await;
            let (batches, result) = match stored {
                Ok(pair) => pair,
                Err(e) => break Err(anyhow::anyhow!("the outbox writer failed: {e}")),
            };
            let results = match result {
                Ok(results) => results,
                Err(e) if e.is_transient() => {
                    // Refused, so the agents keep the batches, say why, and send them again.
                    tracing::warn!(error = %e, batches = batches.len(), "batches not stored: the outbox is unavailable; the agents keep them");
                    batches
                        .iter()
                        .map(|batch| Stored {
                            site: batch.site.clone(),
                            epoch: batch.epoch,
                            acked_through: batch.acked_through,
                            stored: 0,
                            duplicates: 0,
                            refused: Some(BatchRefusal::OutboxUnavailable),
                            stale_epoch: false,
                            outcomes: Vec::new(),
                        })
                        .collect()
                }
                Err(e) => {
                    // Nothing is acknowledged; the agents keep the batches and re-send them
                    // to whichever relay runs next.
                    break Err(anyhow::anyhow!(
                        "{} batches could not be stored (not acknowledged): {e}",
                        batches.len()
                    ));
                }
            };
            self.stored.notify_one();
            for ((batch, result), at) in batches.iter().zip(results).zip(arrivals) {
                self.metrics.events_duplicate.inc_by(result.duplicates);
                if result.stale_epoch {
                    self.metrics
                        .batches_refused
                        .get_or_create(&ReasonLabel {
                            reason: "old_epoch",
                        })
                        .inc();
                    tracing::warn!(site = %batch.site, epoch = %batch.epoch, first = batch.first_seq, last = batch.last_seq, "batch frame refused: its site has moved on to a newer epoch (a replayed frame, or two agents with one site id); never acknowledged");
                    continue;
                }
                match result.refused {
                    Some(BatchRefusal::Gap) => {
                        self.metrics
                            .batches_refused
                            .get_or_create(&ReasonLabel { reason: "gap" })
                            .inc();
                        tracing::info!(site = %batch.site, epoch = %batch.epoch, first = batch.first_seq, stored_through = result.acked_through, "batch starts past a gap; waiting for the agent to re-send in order");
                    }
                    Some(BatchRefusal::OutboxUnavailable) => {
                        self.metrics
                            .batches_refused
                            .get_or_create(&ReasonLabel {
                                reason: "outbox_unavailable",
                            })
                            .inc();
                    }
                    Some(BatchRefusal::OutboxFull) => {
                        self.metrics
                            .batches_refused
                            .get_or_create(&ReasonLabel {
                                reason: "outbox_full",
                            })
                            .inc();
                        tracing::warn!(site = %batch.site, first = batch.first_seq, held_bytes = self.outbox.held_bytes(), max_bytes = self.outbox.max_bytes(), "outbox full (outbox.max_bytes): batch refused; the agent keeps its events until deliveries make room");
                    }
                    None => {}
                }
                let ack = AckFrame {
                    site: result.site.clone(),
                    epoch: result.epoch,
                    acked_through: result.acked_through,
                    refused: result.refused,
                    outcomes: result.outcomes,
                };
                let payload = match ack.encode() {
                    Ok(p) => sealed_for(self.keys.as_deref(), &batch.site, p),
                    Err(e) => {
                        tracing::error!(error = %e, "an acknowledgement could not be encoded");
                        continue;
                    }
                };
                match client.try_publish(acks_topic(&batch.site), QoS::AtLeastOnce, false, payload)
                {
                    Ok(()) => {
                        self.metrics.acks_published.inc();
                        self.metrics
                            .ack_latency_seconds
                            .observe(at.elapsed().as_secs_f64());
                        tracing::debug!(site = %batch.site, first = batch.first_seq, last = batch.last_seq, stored = result.stored, duplicates = result.duplicates, acked_through = result.acked_through, "batch stored and acknowledged");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, site = %batch.site, "acknowledgement not sent; the agent will re-send")
                    }
                }
            }
            // A site heard from is there to take its refusals.
            for batch in &batches {
                let due = refusals_sent
                    .get(&batch.site)
                    .is_none_or(|at| at.elapsed() >= Duration::from_secs(1));
                if due && self.outbox.has_refusals_for(&batch.site) {
                    self.publish_refusals(&client, &batch.site, &mut refusals_sent)
                        .await;
                }
            }
        };
        let _ = client.try_disconnect();
        poller.abort();
        decoder.abort();
        result
    }

    /// Sends the refusals the outbox keeps for `site`, oldest first.
    async fn publish_refusals(
        &self,
        client: &AsyncClient,
        site: &str,
        sent: &mut HashMap<String, Instant>,
    ) {
        sent.insert(site.to_string(), Instant::now());
        let outbox = self.outbox.clone();
        let for_site = site.to_string();
        let read =
            tokio::task::spawn_blocking(move || outbox.refusals(&for_site, REFUSALS_PER_FRAME))
                .await;
        let refusals = match read {
            Ok(Ok(refusals)) if !refusals.is_empty() => refusals,
            Ok(Ok(_)) => return,
            Ok(Err(e)) => {
                tracing::error!(site, error = %e, "the refusals kept for the site cannot be read");
                return;
            }
            Err(e) => {
                tracing::error!(site, error = %e, "the refusals reader failed");
                return;
            }
        };
        let frame = RefusalFrame {
            site: site.to_string(),
            refusals,
        };
        match frame.encode() {
            Ok(payload) => {
                let payload = sealed_for(self.keys.as_deref(), site, payload);
                if let Err(e) =
                    client.try_publish(refusals_topic(site), QoS::AtLeastOnce, false, payload)
                {
                    tracing::debug!(site, error = %e, "refusals not sent; they go again later");
                } else {
                    tracing::debug!(
                        site,
                        refusals = frame.refusals.len(),
                        "refusals sent to the site"
                    );
                }
            }
            Err(e) => tracing::error!(site, error = %e, "refusals could not be encoded"),
        }
    }

    /// Writes the sites' latest tallies in one transaction, off the intake's path: batches
    /// never wait for a tally. While a write runs, newer tallies wait for the next second.
    fn keep_tallies(
        &self,
        tallies: &mut HashMap<String, TallyFrame>,
        writing: &Arc<std::sync::atomic::AtomicBool>,
    ) {
        use std::sync::atomic::Ordering;
        if tallies.is_empty() || writing.swap(true, Ordering::AcqRel) {
            return;
        }
        let frames: Vec<TallyFrame> = tallies.drain().map(|(_, tally)| tally).collect();
        let (outbox, writing) = (self.outbox.clone(), writing.clone());
        tokio::task::spawn_blocking(move || {
            match outbox.record_tallies(&frames) {
                Ok(()) => tracing::debug!(sites = frames.len(), "the sites' tallies are kept"),
                Err(e) => {
                    tracing::warn!(error = %e, sites = frames.len(), "tallies could not be kept; the agents send them again")
                }
            }
            writing.store(false, Ordering::Release);
        });
    }

    async fn refusals_acknowledged(&self, ack: RefusalAckFrame) {
        let outbox = self.outbox.clone();
        let (site, through) = (ack.site.clone(), ack.through);
        match tokio::task::spawn_blocking(move || outbox.acknowledge_refusals(&site, through)).await
        {
            Ok(Ok(forgotten)) => {
                tracing::debug!(site = %ack.site, through, forgotten, "the site has its refusals")
            }
            Ok(Err(e)) => {
                tracing::warn!(site = %ack.site, error = %e, "a refusal acknowledgement could not be recorded; the refusals go again")
            }
            Err(e) => tracing::error!(error = %e, "the refusal acknowledgement writer failed"),
        }
    }

    fn publish_outcomes(
        &self,
        client: &AsyncClient,
        site: String,
        outcomes: Vec<backhaul_events::EventOutcome>,
    ) {
        let frame = backhaul_events::OutcomeFrame { site, outcomes };
        match frame
            .encode()
            .map(|payload| sealed_for(self.keys.as_deref(), &frame.site, payload))
        {
            Ok(payload) => match client.try_publish(
                outcomes_topic(&frame.site),
                QoS::AtLeastOnce,
                false,
                payload,
            ) {
                Ok(()) => {
                    self.metrics.outcomes_published.inc();
                }
                Err(e) => tracing::debug!(site = %frame.site, error = %e, "outcomes not published"),
            },
            Err(e) => tracing::error!(error = %e, "outcomes could not be encoded"),
        }
    }
}

/// The frame inside what a site sent, checked against the site's keys when the relay has a
/// keyring (then every frame must be sealed by its topic's site); or why not, as a metric label.
fn opened<'a>(
    keys: Option<&Keyring>,
    site: &str,
    payload: &'a [u8],
) -> Result<&'a [u8], &'static str> {
    match keys {
        Some(ring) => match ring.get(site) {
            Some(site_keys) => site_keys.open(payload).map_err(|e| e.label()),
            None => Err("unknown_site"),
        },
        // Without a keyring nothing can be checked: a sealed frame is a site configured for a
        // relay that has its keys, not this one.
        None if is_sealed(payload) => Err("unknown_site"),
        None => Ok(payload),
    }
}

/// A frame for a site, sealed with its key when the relay has one.
fn sealed_for(keys: Option<&Keyring>, site: &str, frame: Vec<u8>) -> Vec<u8> {
    match keys.and_then(|ring| ring.get(site)) {
        Some(site_keys) => site_keys.seal(&frame),
        None => frame,
    }
}

/// Decodes and checks a frame; refused frames are counted, logged and never acknowledged.
fn check(
    metrics: &RelayMetrics,
    received: &Received,
    max_frame: usize,
    keys: Option<&Keyring>,
) -> Option<Inbound> {
    if let Some(topic_site) = site_of_refusal_acks_topic(&received.topic) {
        let Ok(payload) = opened(keys, topic_site, &received.payload) else {
            tracing::warn!(
                site = topic_site,
                "refusal acknowledgement ignored: not signed by its site"
            );
            return None;
        };
        return match RefusalAckFrame::decode(payload, max_frame) {
            Ok(ack) if ack.site == topic_site => Some(Inbound::RefusalAck(ack)),
            Ok(ack) => {
                tracing::warn!(topic_site, frame_site = %ack.site, "refusal acknowledgement ignored: its site does not match its topic");
                None
            }
            Err(e) => {
                tracing::warn!(site = topic_site, error = %e, "refusal acknowledgement ignored");
                None
            }
        };
    }
    if let Some(topic_site) = site_of_tally_topic(&received.topic) {
        let refused = |reason: &'static str| {
            metrics
                .tallies_refused
                .get_or_create(&ReasonLabel { reason })
                .inc();
        };
        let Ok(payload) = opened(keys, topic_site, &received.payload) else {
            refused("unsigned");
            tracing::warn!(site = topic_site, "tally ignored: not signed by its site");
            return None;
        };
        return match TallyFrame::decode(payload, max_frame) {
            Ok(tally) if tally.site == topic_site => Some(Inbound::Tally(Box::new(tally))),
            Ok(tally) => {
                refused("site_mismatch");
                tracing::warn!(topic_site, frame_site = %tally.site, "tally ignored: its site does not match its topic");
                None
            }
            Err(e) => {
                refused("undecodable");
                tracing::warn!(site = topic_site, error = %e, "tally ignored");
                None
            }
        };
    }
    let Some(topic_site) = site_of_batches_topic(&received.topic) else {
        tracing::warn!(topic = %received.topic, "message on a topic that is not a site's batches topic ignored");
        return None;
    };
    metrics.batches_received.inc();
    metrics
        .batch_bytes_received
        .inc_by(received.payload.len() as u64);
    let payload = match opened(keys, topic_site, &received.payload) {
        Ok(payload) => payload,
        Err(reason) => {
            metrics
                .batches_refused
                .get_or_create(&ReasonLabel { reason })
                .inc();
            tracing::warn!(
                site = topic_site,
                reason,
                "batch frame refused: not signed by its site's key; never acknowledged"
            );
            return None;
        }
    };
    let batch = match BatchFrame::decode(payload, max_frame) {
        Ok(batch) => batch,
        Err(e) => {
            metrics
                .batches_refused
                .get_or_create(&ReasonLabel {
                    reason: "undecodable",
                })
                .inc();
            tracing::warn!(site = topic_site, bytes = received.payload.len(), error = %e, "batch frame refused");
            return None;
        }
    };
    metrics.events_received.inc_by(batch.events.len() as u64);
    if batch.site != topic_site {
        metrics
            .batches_refused
            .get_or_create(&ReasonLabel {
                reason: "site_mismatch",
            })
            .inc();
        tracing::warn!(topic_site, frame_site = %batch.site, "batch frame refused: its site does not match its topic");
        return None;
    }
    Some(Inbound::Batch(batch, received.at))
}
