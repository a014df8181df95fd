//! ERP connectors: what one delivery attempt of a group of events came to, and the connectors
//! a relay can be configured with (one per relay).
//!
//! A connector receives the heads of several ordering keys at once (never two events of one
//! key), may post them in one ERP call where the ERP allows, and answers one [`Delivery`] per
//! event, in order. Every connector writes idempotently, keyed by the event id, because a
//! delivery can be repeated after a crash or a timeout.

pub mod tryton;

use std::time::Duration;

/// The result of delivering one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The ERP has the event; `erp_ref` names its record.
    Posted { erp_ref: String },
    /// Worth retrying: connection errors, timeouts, 5xx, 429, "busy". `retry_after` is the
    /// ERP's own hint, when it gave one.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The ERP refused the event for good (validation, unknown master data, a refused
    /// transition): it goes to the dead-letter queue with this reason.
    Permanent { reason: String },
}

pub mod body;
pub mod http;

use backhaul_events::StampedEvent;
use tokio::sync::Mutex;

use crate::ledger::Ledger;

/// The connector a relay delivers to.
pub enum Connector {
    Ledger(Mutex<Ledger>),
    Http(Box<http::HttpConnector>),
    Tryton(tryton::TrytonConnector),
}

impl Connector {
    pub fn name(&self) -> &'static str {
        match self {
            Connector::Ledger(_) => "ledger",
            Connector::Http(_) => "http",
            Connector::Tryton(_) => "tryton",
        }
    }

    /// Events per call: the configured batch, within what the connector can take.
    pub fn max_batch(&self, configured: usize) -> usize {
        match self {
            // One local append and fsync per call: bigger is better.
            Connector::Ledger(_) => configured.max(5000),
            Connector::Http(_) => configured,
            Connector::Tryton(t) => configured.min(t.max_batch()).max(1),
        }
    }

    /// Whether the outbox drains as one queue in arrival order instead of a queue per key.
    /// The ledger is a local append-only file: keeping it in arrival order makes each site's
    /// lines follow its sequence numbers, and per-key order follows from that.
    pub fn single_queue(&self) -> bool {
        matches!(self, Connector::Ledger(_))
    }

    /// Calls in flight at once. The ledger's crash recovery needs its appends in commit order.
    pub fn max_concurrency(&self, configured: usize) -> usize {
        match self {
            Connector::Ledger(_) => 1,
            _ => configured,
        }
    }

    /// Delivers events of distinct ordering keys; one result each, in order, and for the
    /// ledger the file length to commit with them.
    pub async fn deliver(&self, events: &[StampedEvent]) -> (Vec<Delivery>, Option<u64>) {
        match self {
            Connector::Ledger(ledger) => {
                let mut ledger = ledger.lock().await;
                tokio::task::block_in_place(|| ledger.append(events))
            }
            Connector::Http(http) => (http.deliver(events).await, None),
            Connector::Tryton(tryton) => (tryton.deliver(events).await, None),
        }
    }
}
