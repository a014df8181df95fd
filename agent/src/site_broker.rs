//! The site-broker source: at a site whose scanners already publish to a broker of its own,
//! the agent subscribes there with a persistent session and acknowledges each message only
//! once it is durable in the log (manual acknowledgements).
//!
//! A message the agent has not acknowledged stays with the broker and comes back after a
//! reconnect or a restart of the agent; one stored twice that way is a duplicate id and is
//! kept once. The broker's own durability is the broker's: Mosquitto, for one, acknowledges
//! publishers from memory (see the README).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backhaul_events::Violation;
use backhaul_events::config::Secret;
use backhaul_events::event::parse_event;
use backhaul_events::service::Backoff;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::SiteBrokerConfig;
use crate::log::{Appended, EventLog, RejectRecord, now_ms};
use crate::metrics::{AgentMetrics, SITE_BROKER};
use crate::mqtt::device_in_topic;

/// Messages stored in one append at most.
const MAX_GATHER: usize = 4096;
/// Messages taken off the connection and not yet stored at most.
const QUEUED: usize = 8192;
/// Reconnect back-off to the site broker: the first wait and the cap.
const RECONNECT_MIN: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// Wait before trying an append again that the quota or the disk refused.
const RETRY_APPEND: Duration = Duration::from_millis(500);

/// What the status page says about the site broker.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SiteBrokerStatus {
    /// "connecting", "subscribed" (messages flow), or "down".
    pub state: &'static str,
    /// Since when (ms since the Unix epoch).
    pub since_ms: i64,
    pub last_error: Option<String>,
}

pub type SharedSiteBrokerStatus = Arc<Mutex<SiteBrokerStatus>>;

fn set_state(status: &SharedSiteBrokerStatus, state: &'static str, error: Option<String>) {
    if let Ok(mut status) = status.lock() {
        if status.state != state {
            status.state = state;
            status.since_ms = now_ms();
        }
        if error.is_some() {
            status.last_error = error;
        }
    }
}

pub struct SiteBrokerSource {
    pub site: String,
    pub config: SiteBrokerConfig,
    pub password: Option<Secret>,
    pub log: EventLog,
    pub metrics: Arc<AgentMetrics>,
    pub status: SharedSiteBrokerStatus,
}

impl SiteBrokerSource {
    fn options(&self) -> MqttOptions {
        let client_id = self.config.client_id(&self.site);
        let mut options = MqttOptions::new(client_id, self.config.host.clone(), self.config.port);
        options.set_keep_alive(Duration::from_secs(u64::from(
            self.config.keep_alive_secs.max(5),
        )));
        // The broker keeps what the agent has not acknowledged, across reconnects and restarts.
        options.set_clean_session(false);
        options.set_manual_acks(true);
        let max = self.config.max_packet_size.0 as usize;
        options.set_max_packet_size(max, max);
        if let Some(user) = &self.config.username {
            let password = self
                .password
                .as_ref()
                .map(|p| p.expose().to_string())
                .unwrap_or_default();
            options.set_credentials(user.clone(), password);
        }
        options
    }

    /// Runs until `stop` is cancelled.
    pub async fn run(self, stop: CancellationToken) {
        let (client, mut eventloop) = AsyncClient::new(self.options(), 1024);
        eventloop.set_network_options(crate::forward::without_nagle(eventloop.network_options()));
        let filter = self.config.topic.replace("{device}", "+");
        let (tx, mut rx) = mpsc::channel::<Publish>(QUEUED);
        let poll_client = client.clone();
        let poll_stop = stop.clone();
        let (host, port) = (self.config.host.clone(), self.config.port);
        let poll_filter = filter.clone();
        let status = self.status.clone();
        set_state(&status, "connecting", None);
        let poller = tokio::spawn(async move {
            let mut backoff = Backoff::new(RECONNECT_MIN, RECONNECT_MAX);
            let mut was_up = false;
            loop {
                let event = tokio::select! {
                    _ = poll_stop.cancelled() => return,
                    event = eventloop.poll() => event,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        backoff.reset();
                        // With a session present the subscription is still there; asking
                        // again is harmless and covers a broker that lost it.
                        if let Err(e) =
                            poll_client.try_subscribe(poll_filter.clone(), QoS::AtLeastOnce)
                        {
                            tracing::error!(error = %e, "cannot subscribe to {poll_filter}");
                        }
                        tracing::info!(%host, port, filter = %poll_filter, session_present = ack.session_present, "connected to the site broker");
                        was_up = true;
                    }
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        // Only from here on does the broker keep scans for the agent.
                        let refused = ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                        if refused {
                            tracing::error!(filter = %poll_filter, "the site broker refused the subscription");
                            set_state(
                                &status,
                                "down",
                                Some(format!(
                                    "the site broker refused the subscription to {poll_filter}"
                                )),
                            );
                        } else {
                            set_state(&status, "subscribed", None);
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if tx.send(publish).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        set_state(&status, "down", Some(e.to_string()));
                        if was_up {
                            tracing::warn!(error = %e, "site broker connection lost");
                            was_up = false;
                        } else {
                            tracing::debug!(error = %e, "site broker not reachable");
                        }
                        tokio::select! {
                            _ = poll_stop.cancelled() => return,
                            _ = tokio::time::sleep(backoff.next_wait()) => {}
                        }
                    }
                }
            }
        });

        loop {
            let first = tokio::select! {
                _ = stop.cancelled() => break,
                publish = rx.recv() => match publish {
                    Some(publish) => publish,
                    None => break,
                },
            };
            let mut publishes = vec![first];
            while publishes.len() < MAX_GATHER {
                match rx.try_recv() {
                    Ok(publish) => publishes.push(publish),
                    Err(_) => break,
                }
            }
            if !self.store(&publishes, &stop).await {
                break;
            }
            // In the order received, as MQTT asks; only now may the broker forget them.
            for publish in &publishes {
                if let Err(e) = client.ack(publish).await {
                    tracing::debug!(error = %e, "acknowledgement not sent; the broker sends the message again");
                }
            }
        }
        let _ = client.try_disconnect();
        poller.abort();
    }

    /// Makes the messages durable: valid events in the log, invalid ones in the reject store.
    /// Returns true once all are, false when stopping first (then nothing is acknowledged:
    /// the broker keeps them).
    async fn store(&self, publishes: &[Publish], stop: &CancellationToken) -> bool {
        let mut events = Vec::with_capacity(publishes.len());
        for publish in publishes {
            let checked = match device_in_topic(&self.config.topic, &publish.topic) {
                None => Err(vec![Violation::new(
                    "topic",
                    format!("{:?} does not match {:?}", publish.topic, self.config.topic),
                )]),
                Some(device) => parse_event(&publish.payload)
                    .map(|mut event| {
                        if event.device.is_none() {
                            event.device = Some(device.to_string());
                        }
                        event
                    })
                    .map_err(|violations| violations.0),
            };
            match checked {
                Ok(event) => events.push(event),
                Err(violations) => {
                    self.metrics.rejected.get_or_create(&SITE_BROKER).inc();
                    let record = RejectRecord::new(
                        "site_broker",
                        format!("site broker topic {}", publish.topic),
                        &publish.payload,
                        violations,
                    );
                    if let Err(e) = self.log.record_reject(record).await {
                        tracing::error!(error = %e, "a reject could not be stored");
                    }
                }
            }
        }
        while !events.is_empty() {
            match self.log.append(events.clone()).await {
                Ok(results) => {
                    let mut refused = Vec::new();
                    for (event, result) in events.into_iter().zip(results) {
                        match result {
                            Appended::Stored { .. } => {
                                self.metrics.accepted.get_or_create(&SITE_BROKER).inc();
                            }
                            Appended::Duplicate { .. } => {
                                self.metrics.duplicates.get_or_create(&SITE_BROKER).inc();
                            }
                            Appended::QuotaExceeded => refused.push(event),
                        }
                    }
                    if !refused.is_empty() {
                        // Back-pressure: unacknowledged, the messages wait at the broker.
                        self.metrics
                            .quota_refusals
                            .get_or_create(&SITE_BROKER)
                            .inc_by(refused.len() as u64);
                    }
                    events = refused;
                }
                Err(e) => {
                    tracing::error!(error = %e, events = events.len(), "events from the site broker could not be logged; trying again");
                }
            }
            if events.is_empty() {
                break;
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(RETRY_APPEND) => {}
            }
        }
        true
    }
}
