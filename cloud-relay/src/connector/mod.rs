//! ERP connectors: the boundary of "how an event reaches one ERP". What one delivery attempt
//! of a group of events came to, what a connector can take ([`Capabilities`]), and the
//! connectors a relay can be configured with (one per relay).
//!
//! A connector receives the heads of several ordering keys at once (never two events of one
//! key), may post them in one ERP call where the ERP allows, and answers one [`Delivery`] per
//! event, in order. Every connector writes idempotently, keyed by the event id, because a
//! delivery can be repeated after a crash or a timeout. The delivery engine knows connectors
//! only through [`Sink`].

pub mod body;
pub mod epcis;
pub mod http;
pub mod ledger;
pub mod tryton;

use std::future::Future;
use std::time::Duration;

use backhaul_events::StampedEvent;
use tokio::sync::Mutex;

use std::collections::HashMap;

use crate::config::DeliveryConfig;
use crate::reconcile::ErpHoldings;
use ledger::Ledger;

/// The result of delivering one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The ERP has the event; `erp_ref` names its record.
    Posted { erp_ref: String },
    /// The ERP answered, but this event cannot go yet (a pick waiting for stock that has not
    /// been received): its key tries again after `retry_after`, every other key goes on, and
    /// the ERP counts as answering.
    Waiting {
        reason: String,
        retry_after: Duration,
    },
    /// This attempt failed (no connection, a timeout, a 5xx): its key backs off, at least
    /// `retry_after` when the ERP gave that hint. When every event of a call fails so, the ERP
    /// is taken as down: delivery pauses, then probes with one event.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The ERP asks every caller to slow down (429, 503): delivery of every key pauses for
    /// `retry_after`, or the engine's own back-off when the ERP gave no hint.
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The ERP refused the event for good (validation, unknown master data, a refused
    /// transition): it goes to the dead-letter queue with this reason.
    Permanent { reason: String },
}

/// What a connector records in the outbox in the same transaction as the deliveries it made,
/// and reads back at start to reconcile what it wrote after the last commit (the ledger's file
/// length). The engine and the outbox carry it without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitToken(pub u64);

/// One call's answers: one [`Delivery`] per event, in order, and the token to commit with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub results: Vec<Delivery>,
    pub commit: Option<CommitToken>,
}

impl From<Vec<Delivery>> for Delivered {
    fn from(results: Vec<Delivery>) -> Delivered {
        Delivered {
            results,
            commit: None,
        }
    }
}

/// How the engine must drive a connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Events in one call at most.
    pub max_batch: usize,
    /// Calls in flight at once at most.
    pub max_concurrency: usize,
    /// The outbox drains as one queue in arrival order instead of a queue per ordering key.
    pub arrival_order: bool,
    /// Whether `delivery.rate_per_sec` applies: an ERP to protect, not a local file.
    pub rate_limited: bool,
}

/// A destination the delivery engine drains the outbox to.
pub trait Sink: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// What this connector can take, given the `[delivery]` configuration.
    fn capabilities(&self, configured: &DeliveryConfig) -> Capabilities;
    /// Delivers events of distinct ordering keys.
    fn deliver(&self, events: &[StampedEvent]) -> impl Future<Output = Delivered> + Send;
}

/// The most of an ERP's answer read for an excerpt: a misbehaving server cannot fill memory.
pub(crate) const EXCERPT_BYTES: usize = 64 * 1024;

/// At most `max` bytes of a response body, read as they arrive (the rest is not read).
pub(crate) async fn read_capped(mut response: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < max {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = max - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The first 2,000 characters of an ERP's answer, for a reason or a trace.
pub(crate) async fn excerpt(response: reqwest::Response) -> String {
    let body = read_capped(response, EXCERPT_BYTES).await;
    String::from_utf8_lossy(&body).chars().take(2000).collect()
}

/// Event ids asked of the ERP per call.
const HOLDINGS_PER_CALL: usize = 500;

/// The connector a relay delivers to.
pub enum Connector {
    Ledger(Mutex<Ledger>),
    Http(Box<http::HttpConnector>),
    Tryton(tryton::TrytonConnector),
    Epcis(Box<epcis::EpcisConnector>),
}

impl Connector {
    /// What the ERP still holds of the site's events the relay posted to it: `posted` is
    /// (event id, the ERP's reference of its record). Tryton is asked for each record by its
    /// reference (a deleted or cancelled document is missing); the ledger is read for the
    /// site's lines; an HTTP ERP at `sink.http.lookup_url`, when set. An EPCIS repository
    /// offers no lookup here.
    pub async fn holdings(
        &self,
        site: &str,
        posted: &[(String, String)],
    ) -> Result<ErpHoldings, String> {
        match self {
            Connector::Ledger(ledger) => {
                let path = ledger.lock().await.path().to_path_buf();
                let site = site.to_string();
                let ids: Vec<String> = posted.iter().map(|(id, _)| id.clone()).collect();
                tokio::task::spawn_blocking(move || ledger::missing_lines(&path, &site, &ids))
                    .await
                    .map_err(|e| format!("the ledger reader failed: {e}"))?
                    .map(|missing| ErpHoldings::Checked { missing })
            }
            Connector::Tryton(tryton) => {
                let mut missing = HashMap::new();
                for chunk in posted.chunks(HOLDINGS_PER_CALL) {
                    missing.extend(tryton.missing_records(chunk).await?);
                }
                Ok(ErpHoldings::Checked { missing })
            }
            Connector::Http(http) => match http.missing(site, posted).await {
                Some(answer) => answer.map(|missing| ErpHoldings::Checked { missing }),
                None => Ok(ErpHoldings::NotAvailable(
                    "sink.http.lookup_url is not set".into(),
                )),
            },
            Connector::Epcis(_) => Ok(ErpHoldings::NotAvailable(
                "the EPCIS connector does not query the repository".into(),
            )),
        }
    }
}

impl Connector {
    /// Per SKU and location, what the events imply against what the ERP booked from them,
    /// for an ERP that keeps stock (Tryton); `None` for the others.
    pub async fn booked_quantities(
        &self,
        events: &[crate::reconcile::Known],
    ) -> Option<Result<Vec<crate::reconcile::QuantityRow>, String>> {
        match self {
            Connector::Tryton(tryton) => Some(tryton.booked_quantities(events).await),
            _ => None,
        }
    }
}

impl Sink for Connector {
    fn name(&self) -> &'static str {
        match self {
            Connector::Ledger(_) => "ledger",
            Connector::Http(_) => "http",
            Connector::Tryton(_) => "tryton",
            Connector::Epcis(_) => "epcis",
        }
    }

    fn capabilities(&self, configured: &DeliveryConfig) -> Capabilities {
        match self {
            // A local append-only file, one fsync per call: big calls, one at a time (its
            // crash recovery needs the appends in commit order), in arrival order so each
            // site's lines follow its sequence numbers (per-key order follows from that).
            Connector::Ledger(_) => Capabilities {
                max_batch: configured.max_batch.max(5000),
                max_concurrency: 1,
                arrival_order: true,
                rate_limited: false,
            },
            // One capture document per call, of up to max_batch events.
            Connector::Epcis(_) => Capabilities {
                max_batch: configured.max_batch.max(1),
                max_concurrency: configured.concurrency.max(1),
                arrival_order: false,
                rate_limited: true,
            },
            Connector::Http(_) => Capabilities {
                max_batch: configured.max_batch.max(1),
                max_concurrency: configured.concurrency.max(1),
                arrival_order: false,
                rate_limited: true,
            },
            Connector::Tryton(t) => Capabilities {
                max_batch: configured.max_batch.min(t.max_batch()).max(1),
                max_concurrency: configured.concurrency.max(1),
                arrival_order: false,
                rate_limited: true,
            },
        }
    }

    async fn deliver(&self, events: &[StampedEvent]) -> Delivered {
        match self {
            Connector::Ledger(ledger) => {
                let mut ledger = ledger.lock().await;
                tokio::task::block_in_place(|| ledger.append(events))
            }
            Connector::Http(http) => http.deliver(events).await.into(),
            Connector::Tryton(tryton) => tryton.deliver(events).await.into(),
            Connector::Epcis(epcis) => epcis.deliver(events).await.into(),
        }
    }
}
