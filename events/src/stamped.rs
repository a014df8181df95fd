//! What the agent adds to an accepted event (site, log epoch, sequence number, receive time),
//! and the ordering key that decides which events must reach the ERP in log order.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::event::{Event, EventType};

/// The random id of one agent log, made when the log is created. Sequence numbers are only
/// comparable within one epoch: a log rebuilt from scratch starts a new epoch at 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Epoch(pub u128);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for Epoch {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() != 32 {
            return Err(format!(
                "an epoch is 32 hex digits, got {} characters",
                s.len()
            ));
        }
        u128::from_str_radix(s, 16)
            .map(Epoch)
            .map_err(|e| format!("an epoch is 32 hex digits: {e}"))
    }
}

/// An accepted event as the agent logged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StampedEvent {
    pub site: String,
    pub epoch: Epoch,
    /// Position in the site's log; strictly increasing within an epoch.
    pub seq: u64,
    /// When the agent received the event, in milliseconds since the Unix epoch. The event's
    /// own `ts` comes from the scanner's clock and is never used for ordering.
    pub received_at_ms: i64,
    pub event: Event,
}

/// Events with equal keys must reach the ERP in the order the agent logged them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum OrderingKey {
    /// Picks and shipments of one order.
    Order(String),
    /// Stock movements of one SKU at one location (receipts, adjustments and counts).
    Stock {
        sku: String,
        location: Option<String>,
    },
}

impl OrderingKey {
    pub fn of(event: &Event) -> OrderingKey {
        match (event.kind, &event.order) {
            (EventType::Pick | EventType::Ship, Some(order)) => OrderingKey::Order(order.clone()),
            _ => OrderingKey::Stock {
                sku: event.sku.clone(),
                location: event.location.clone(),
            },
        }
    }

    /// A byte form that sorts and compares like the key, for use as a storage key.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            OrderingKey::Order(order) => {
                out.push(b'o');
                push_len_prefixed(&mut out, order);
            }
            OrderingKey::Stock { sku, location } => {
                out.push(b's');
                push_len_prefixed(&mut out, sku);
                push_len_prefixed(&mut out, location.as_deref().unwrap_or(""));
            }
        }
        out
    }
}

fn push_len_prefixed(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl fmt::Display for OrderingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OrderingKey::Order(order) => write!(f, "order {order}"),
            OrderingKey::Stock {
                sku,
                location: Some(location),
            } => write!(f, "sku {sku} at {location}"),
            OrderingKey::Stock {
                sku,
                location: None,
            } => write!(f, "sku {sku}"),
        }
    }
}

impl StampedEvent {
    pub fn ordering_key(&self) -> OrderingKey {
        OrderingKey::of(&self.event)
    }

    /// The record as one JSON object: the canonical event fields plus site, epoch, sequence
    /// number and receive time.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = self.event.to_json();
        if let serde_json::Value::Object(map) = &mut value {
            map.insert("site".into(), self.site.clone().into());
            map.insert("epoch".into(), self.epoch.to_string().into());
            map.insert("seq".into(), self.seq.into());
            map.insert("received_at_ms".into(), self.received_at_ms.into());
        }
        value
    }
}
