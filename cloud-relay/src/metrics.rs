//! The relay's Prometheus metrics and the text served on `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::outbox::Outbox;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SiteLabel {
    pub site: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

pub struct RelayMetrics {
    registry: Registry,
    pub batches_received: Counter,
    pub events_received: Counter,
    /// Bytes of the batch frames taken off the broker, as on the wire.
    pub batch_bytes_received: Counter,
    pub events_duplicate: Counter,
    pub batches_refused: Family<ReasonLabel, Counter>,
    pub tallies_refused: Family<ReasonLabel, Counter>,
    pub acks_published: Counter,
    pub ack_latency_seconds: Histogram,
    pub events_delivered: Counter,
    pub broker_connected: Gauge,
    pub delivery_retries: Counter,
    pub events_dead_lettered: Counter,
    pub delivery_paused: Gauge,
    pub erp_latency_seconds: Histogram,
    pub outcomes_published: Counter,
    outbox_events: Family<SiteLabel, Gauge>,
    dlq_events: Gauge,
    outbox_bytes: Gauge,
    outbox_max_bytes: Gauge,
    frontier_blocked: Gauge,
}

impl RelayMetrics {
    pub fn new() -> Arc<RelayMetrics> {
        let metrics = RelayMetrics {
            registry: Registry::default(),
            batches_received: Counter::default(),
            events_received: Counter::default(),
            batch_bytes_received: Counter::default(),
            events_duplicate: Counter::default(),
            batches_refused: Family::default(),
            tallies_refused: Family::default(),
            acks_published: Counter::default(),
            ack_latency_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            events_delivered: Counter::default(),
            broker_connected: Gauge::default(),
            delivery_retries: Counter::default(),
            events_dead_lettered: Counter::default(),
            delivery_paused: Gauge::default(),
            erp_latency_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            outcomes_published: Counter::default(),
            outbox_events: Family::default(),
            dlq_events: Gauge::default(),
            outbox_bytes: Gauge::default(),
            outbox_max_bytes: Gauge::default(),
            frontier_blocked: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("backhaul_relay");
        registry.register(
            "batches_received",
            "Batch frames taken off the broker",
            metrics.batches_received.clone(),
        );
        registry.register(
            "events_received",
            "Events in batches taken off the broker, counting repeats",
            metrics.events_received.clone(),
        );
        registry.register(
            "batch_bytes_received",
            "Bytes of batch frames taken off the broker, as on the wire (compressed and signed)",
            metrics.batch_bytes_received.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events already in the outbox, dropped (re-sent batches, repeated ids)",
            metrics.events_duplicate.clone(),
        );
        registry.register(
            "batches_refused",
            "Batch frames refused, by reason (undecodable, site_mismatch, gap, outbox_full)",
            metrics.batches_refused.clone(),
        );
        registry.register(
            "tallies_refused",
            "Site tallies refused, by reason (unsigned, undecodable, site_mismatch)",
            metrics.tallies_refused.clone(),
        );
        registry.register(
            "acks_published",
            "Acknowledgements published to agents",
            metrics.acks_published.clone(),
        );
        registry.register(
            "ack_latency_seconds",
            "From a batch's arrival to its acknowledgement (durable in the outbox)",
            metrics.ack_latency_seconds.clone(),
        );
        registry.register(
            "events_delivered",
            "Events delivered by the connector",
            metrics.events_delivered.clone(),
        );
        registry.register(
            "broker_connected",
            "1 while connected to the broker and subscribed",
            metrics.broker_connected.clone(),
        );
        registry.register(
            "outbox_events",
            "Events waiting in the outbox, by site",
            metrics.outbox_events.clone(),
        );
        registry.register(
            "outbox_bytes",
            "Bytes of waiting events and dead letters, which outbox.max_bytes caps",
            metrics.outbox_bytes.clone(),
        );
        registry.register(
            "outbox_max_bytes",
            "The outbox's disk cap (outbox.max_bytes); at it, batches are refused",
            metrics.outbox_max_bytes.clone(),
        );
        registry.register(
            "frontier_blocked",
            "1 while the oldest waiting events all belong to held-back keys and newer keys wait",
            metrics.frontier_blocked.clone(),
        );
        registry.register(
            "delivery_retries",
            "Deliveries that failed transiently and will be retried",
            metrics.delivery_retries.clone(),
        );
        registry.register(
            "events_dead_lettered",
            "Events the ERP refused for good, moved to the dead-letter queue",
            metrics.events_dead_lettered.clone(),
        );
        registry.register(
            "dlq_events",
            "Events in the dead-letter queue now",
            metrics.dlq_events.clone(),
        );
        registry.register(
            "delivery_paused",
            "1 while delivery pauses and probes because every ERP call failed",
            metrics.delivery_paused.clone(),
        );
        registry.register(
            "erp_call_duration_seconds",
            "Time of one connector call (ERP latency)",
            metrics.erp_latency_seconds.clone(),
        );
        registry.register(
            "outcomes_published",
            "Outcome reports published to sites",
            metrics.outcomes_published.clone(),
        );
        for reason in ["undecodable", "site_mismatch", "gap", "outbox_full"] {
            let _ = metrics
                .batches_refused
                .get_or_create(&ReasonLabel { reason });
        }
        Arc::new(RelayMetrics {
            registry,
            ..metrics
        })
    }

    pub fn render(&self, outbox: &dyn Outbox) -> String {
        for site in outbox.sites() {
            self.outbox_events
                .get_or_create(&SiteLabel {
                    site: site.site.clone(),
                })
                .set(site.outbox_depth() as i64);
        }
        self.dlq_events.set(outbox.dead_letter_count() as i64);
        self.outbox_bytes.set(outbox.held_bytes() as i64);
        self.outbox_max_bytes.set(outbox.max_bytes() as i64);
        self.frontier_blocked
            .set(i64::from(outbox.frontier_blocked()));
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text = "# metrics could not be encoded\n".into();
        }
        text
    }
}
