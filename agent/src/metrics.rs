//! The agent's Prometheus metrics: what is counted where, and the text served on `/metrics`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::log::{EventLog, now_ms};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransportLabel {
    pub transport: &'static str,
}

pub const MQTT: TransportLabel = TransportLabel { transport: "mqtt" };
pub const HTTP: TransportLabel = TransportLabel { transport: "http" };
/// Scans taken from a site broker as a subscriber (`[site_broker]`).
pub const SITE_BROKER: TransportLabel = TransportLabel {
    transport: "site_broker",
};

pub struct AgentMetrics {
    registry: Registry,
    pub accepted: Family<TransportLabel, Counter>,
    pub duplicates: Family<TransportLabel, Counter>,
    pub rejected: Family<TransportLabel, Counter>,
    pub quota_refusals: Family<TransportLabel, Counter>,
    pub mqtt_connections: Gauge,
    pub mqtt_protocol_errors: Counter,
    /// Sockets closed before their CONNECT to make room for newer ones.
    pub mqtt_pending_evicted: Counter,
    pub flush_seconds: Histogram,
    pub link_up: Gauge,
    pub batches_sent: Counter,
    pub batch_resends: Counter,
    /// Frames from the relay ignored because they were not signed with the site's key.
    pub unsigned_frames: Counter,
    pub events_forwarded: Counter,
    /// Bytes of the batch frames published, as they go on the wire.
    pub uplink_bytes: Counter,
    pub events_acked: Counter,
    /// When the relay last acknowledged a batch, in ms since the Unix epoch (0: never).
    pub last_ack_ms: Gauge,
    last_ack_age_seconds: Gauge<f64, AtomicU64>,
    backlog_events: Gauge,
    backlog_bytes: Gauge,
    oldest_age_seconds: Gauge<f64, AtomicU64>,
    quota_bytes: Gauge,
    quota_exceeded: Gauge,
    log_file_bytes: Gauge,
    rejects_stored: Gauge,
    rejects_not_kept: Gauge,
}

impl AgentMetrics {
    pub fn new() -> Arc<AgentMetrics> {
        let mut registry = Registry::with_prefix("backhaul_agent");
        let metrics = AgentMetrics {
            accepted: Family::default(),
            duplicates: Family::default(),
            rejected: Family::default(),
            quota_refusals: Family::default(),
            mqtt_connections: Gauge::default(),
            mqtt_protocol_errors: Counter::default(),
            mqtt_pending_evicted: Counter::default(),
            flush_seconds: Histogram::new(exponential_buckets(0.0002, 2.0, 16)),
            link_up: Gauge::default(),
            batches_sent: Counter::default(),
            batch_resends: Counter::default(),
            unsigned_frames: Counter::default(),
            events_forwarded: Counter::default(),
            uplink_bytes: Counter::default(),
            events_acked: Counter::default(),
            last_ack_ms: Gauge::default(),
            last_ack_age_seconds: Gauge::default(),
            backlog_events: Gauge::default(),
            backlog_bytes: Gauge::default(),
            oldest_age_seconds: Gauge::default(),
            quota_bytes: Gauge::default(),
            quota_exceeded: Gauge::default(),
            log_file_bytes: Gauge::default(),
            rejects_stored: Gauge::default(),
            rejects_not_kept: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "events_accepted",
            "Events made durable in the log, by transport",
            metrics.accepted.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events whose id was already in the log, answered as accepted and not stored again",
            metrics.duplicates.clone(),
        );
        registry.register(
            "events_rejected",
            "Events refused at the edge as invalid, by transport",
            metrics.rejected.clone(),
        );
        registry.register(
            "quota_refusals",
            "Events refused because the log's disk quota was full, by transport",
            metrics.quota_refusals.clone(),
        );
        registry.register(
            "mqtt_connections",
            "MQTT clients connected now",
            metrics.mqtt_connections.clone(),
        );
        registry.register(
            "mqtt_protocol_errors",
            "MQTT connections closed for breaking the protocol",
            metrics.mqtt_protocol_errors.clone(),
        );
        registry.register(
            "mqtt_pending_evicted",
            "MQTT sockets closed before their CONNECT to make room for newer ones (too many open without logging in)",
            metrics.mqtt_pending_evicted.clone(),
        );
        registry.register(
            "log_flush_duration_seconds",
            "Time of one durable flush (group commit) of the log",
            metrics.flush_seconds.clone(),
        );
        registry.register(
            "link_up",
            "1 while connected to the broker and subscribed to the relay's acknowledgements",
            metrics.link_up.clone(),
        );
        registry.register(
            "batches_sent",
            "Batches published to the broker, first sends and re-sends",
            metrics.batches_sent.clone(),
        );
        registry.register(
            "batch_resends",
            "Batches dropped from the in-flight window to be re-sent from the log (timeout or reconnect)",
            metrics.batch_resends.clone(),
        );
        registry.register(
            "relay_frames_unsigned",
            "Acknowledgements and reports from the relay ignored: not signed with uplink.site_key",
            metrics.unsigned_frames.clone(),
        );
        registry.register(
            "events_forwarded",
            "Events published in batches, counting re-sends",
            metrics.events_forwarded.clone(),
        );
        registry.register(
            "uplink_bytes",
            "Bytes of batch frames published, as on the wire (compressed and signed), counting re-sends",
            metrics.uplink_bytes.clone(),
        );
        registry.register(
            "events_acked",
            "Events the relay acknowledged as durable and the agent deleted from its log",
            metrics.events_acked.clone(),
        );
        registry.register(
            "last_ack_age_seconds",
            "Seconds since the relay last acknowledged a batch (-1: never since start)",
            metrics.last_ack_age_seconds.clone(),
        );
        registry.register(
            "backlog_events",
            "Events in the log not yet acknowledged by the relay",
            metrics.backlog_events.clone(),
        );
        registry.register(
            "backlog_bytes",
            "Bytes of events in the log not yet acknowledged by the relay",
            metrics.backlog_bytes.clone(),
        );
        registry.register(
            "oldest_event_age_seconds",
            "Age of the oldest event in the log (0 when the log is empty)",
            metrics.oldest_age_seconds.clone(),
        );
        registry.register(
            "log_quota_bytes",
            "The log's disk quota (log.max_bytes)",
            metrics.quota_bytes.clone(),
        );
        registry.register(
            "log_quota_exceeded",
            "1 while the log's disk quota is full and producers are refused",
            metrics.quota_exceeded.clone(),
        );
        registry.register(
            "log_file_bytes",
            "Size of the log's database file on disk",
            metrics.log_file_bytes.clone(),
        );
        registry.register(
            "rejects_stored",
            "Rejected events kept in the reject store",
            metrics.rejects_stored.clone(),
        );
        registry.register(
            "rejects_not_kept",
            "Rejected events answered but not kept since start (quota full of backlog, or rejects faster than the disk keeps them)",
            metrics.rejects_not_kept.clone(),
        );
        // Every transport shows up from the start, at 0, so dashboards and alerts see it.
        for transport in [MQTT, HTTP, SITE_BROKER] {
            let _ = metrics.accepted.get_or_create(&transport);
            let _ = metrics.duplicates.get_or_create(&transport);
            let _ = metrics.rejected.get_or_create(&transport);
            let _ = metrics.quota_refusals.get_or_create(&transport);
        }
        AgentMetrics {
            registry,
            ..metrics
        }
        .into()
    }

    /// The Prometheus text exposition, with the log's gauges brought up to date.
    pub fn render(&self, log: &EventLog) -> String {
        let stats = log.stats();
        self.backlog_events.set(stats.backlog_events as i64);
        self.backlog_bytes.set(stats.backlog_bytes as i64);
        self.oldest_age_seconds.set(
            stats
                .oldest_received_at_ms
                .map(|t| (now_ms() - t).max(0) as f64 / 1000.0)
                .unwrap_or(0.0),
        );
        self.quota_bytes.set(stats.max_bytes as i64);
        self.quota_exceeded.set(i64::from(stats.quota_exceeded));
        self.log_file_bytes.set(stats.file_bytes as i64);
        self.rejects_stored.set(stats.rejects_stored as i64);
        self.rejects_not_kept.set(stats.rejects_not_kept as i64);
        let last_ack = self.last_ack_ms.get();
        self.last_ack_age_seconds.set(if last_ack == 0 {
            -1.0
        } else {
            (now_ms() - last_ack).max(0) as f64 / 1000.0
        });
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text = "# metrics could not be encoded\n".into();
        }
        text
    }
}
