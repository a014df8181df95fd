//! The admin API of both services as types: every answer of the agent's `/v1/status`,
//! `/v1/rejects`, `/v1/log` and `/v1/tail`, and of the relay's `/v1/status`, `/v1/sites` and
//! `/v1/dlq...`, with the request bodies of replay and discard. The servers build these and the
//! operator commands decode them, so a field one side forgets is a compile error on the server
//! and a decoding error in the command, never a number silently shown as 0.
//!
//! The JSON names and shapes are a public contract (operators' scripts and the end-to-end
//! tests read them): a rename here is a breaking change.
//!
//! Nullable fields must still be present (as `null`): a command talking to a service that
//! does not send a field says so instead of guessing "not configured".

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::event::{EventType, Violation};

/// Decodes an `Option` that must be present, even if `null`: serde would otherwise read a
/// missing field as `None`, which is the silent default this module exists to prevent.
fn nullable<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(deserializer)
}

/// The body of every refusal (4xx, 5xx) of both admin APIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    pub error: String,
}

// ---- the agent ----

/// `GET /v1/status` of the agent: is it moving, and what is stuck.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub site: String,
    /// The log's epoch, 32 hex digits.
    pub epoch: String,
    pub version: String,
    pub uptime_seconds: u64,
    pub backlog: Backlog,
    pub quota: Quota,
    pub log: LogFile,
    pub ingest: Ingest,
    pub mqtt: MqttListener,
    pub rejects_stored: u64,
    /// Rejects answered but not kept since the agent started: the quota was full of events
    /// waiting to be forwarded, or rejects came faster than the disk kept them.
    #[serde(default)]
    pub rejects_not_kept: u64,
    /// `null` when no uplink is configured.
    #[serde(deserialize_with = "nullable")]
    pub link: Option<LinkStatus>,
    pub erp_refusals_stored: u64,
    /// The latest few, newest first; `/v1/rejects` has them all.
    pub erp_refusals: Vec<ErpRefusal>,
    /// `null` when the agent does not subscribe to a site broker.
    #[serde(deserialize_with = "nullable")]
    pub site_broker: Option<SiteBrokerStatus>,
}

/// The events in the agent's log that the relay has not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backlog {
    pub events: u64,
    pub bytes: u64,
    #[serde(deserialize_with = "nullable")]
    pub oldest_seq: Option<u64>,
    #[serde(deserialize_with = "nullable")]
    pub oldest_age_seconds: Option<f64>,
    pub next_seq: u64,
}

/// The disk quota of the log; when it is exceeded producers are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    pub max_bytes: u64,
    /// Bytes of the events waiting for the relay.
    pub used_bytes: u64,
    /// Bytes of the kept rejects: inside the quota, but they give way to events.
    pub rejects_bytes: u64,
    pub used_ratio: f64,
    pub exceeded: bool,
}

/// The log's file on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogFile {
    pub path: String,
    pub file_bytes: u64,
    pub flushes: u64,
    pub compactions: u64,
}

/// Ingest counters since the agent started, per transport.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ingest {
    pub accepted: ByTransport,
    pub duplicates: ByTransport,
    pub rejected: ByTransport,
    pub quota_refusals: ByTransport,
}

/// One counter split by the way events arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByTransport {
    pub mqtt: u64,
    pub http: u64,
    pub site_broker: u64,
}

impl ByTransport {
    pub fn total(&self) -> u64 {
        self.mqtt
            .saturating_add(self.http)
            .saturating_add(self.site_broker)
    }
}

/// The agent's own MQTT listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MqttListener {
    /// `null` when the agent does not listen for MQTT.
    #[serde(deserialize_with = "nullable")]
    pub listen: Option<String>,
    pub connected_clients: u64,
}

/// The link to the broker and the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    /// "connecting", "up", "down", "stalled" (connected, but nothing acknowledged within the
    /// ack timeout), "relay full" (the relay refuses batches until its outbox has room) or
    /// "relay outbox down" (the relay refuses batches until its outbox database is back).
    pub state: String,
    /// Since when the link is in its current state (ms since the Unix epoch).
    pub since_ms: i64,
    #[serde(deserialize_with = "nullable")]
    pub last_error: Option<String>,
    #[serde(deserialize_with = "nullable")]
    pub last_ack_ms: Option<i64>,
    pub acked_through: u64,
    pub batches_in_flight: u64,
    pub events_in_flight: u64,
    pub batches_sent: u64,
    pub batches_resent: u64,
    pub events_forwarded: u64,
    pub reconnects: u64,
    /// Events the relay reports posted to the ERP since the agent started.
    pub erp_posted: u64,
}

/// The subscription to a broker the site already runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteBrokerStatus {
    /// "connecting", "subscribed" (messages flow), or "down".
    pub state: String,
    /// Since when (ms since the Unix epoch).
    pub since_ms: i64,
    #[serde(deserialize_with = "nullable")]
    pub last_error: Option<String>,
}

/// An event the ERP refused for good, as the relay reported it to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErpRefusal {
    /// The event's id.
    pub id: String,
    pub seq: u64,
    pub reason: String,
    /// When the relay dead-lettered it.
    pub refused_at_ms: i64,
    /// When the agent learned of it.
    pub reported_at_ms: i64,
}

/// `GET /v1/rejects` of the agent: one page of the events refused at the edge, and the ERP's
/// refusals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectsAnswer {
    /// Newest first, or oldest first when following with `after`.
    pub rejects: Vec<Reject>,
    /// Where the next (older) page starts, when this page was full.
    #[serde(deserialize_with = "nullable")]
    pub next_before: Option<u64>,
    pub erp_refusals: Vec<ErpRefusal>,
}

/// An event refused at the edge, as the reject store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The reject's number in the store (for paging).
    pub id: u64,
    pub at_ms: i64,
    /// "mqtt", "http" or "site_broker".
    pub transport: String,
    /// The MQTT client id and topic, or the HTTP peer address.
    pub sender: String,
    /// The payload as received (lossy UTF-8), cut at 16 KiB.
    pub payload: String,
    pub payload_truncated: bool,
    pub violations: Vec<Violation>,
}

/// `GET /v1/log` and `GET /v1/tail` of the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventsAnswer {
    /// Stamped events as `StampedEvent::to_json` writes them: the canonical event passed
    /// through as it is, with `site`, `epoch`, `seq` and `received_at_ms` added.
    pub events: Vec<Value>,
}

// ---- the relay ----

/// `GET /v1/status` of the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStatus {
    pub broker_connected: bool,
    /// Events waiting for delivery.
    pub outbox_depth: u64,
    pub outbox_path: String,
    /// Bytes of the waiting events and dead letters, which `outbox_max_bytes` caps.
    pub outbox_bytes: u64,
    pub outbox_max_bytes: u64,
    pub outbox_full: bool,
    pub batches_received: u64,
    pub events_received: u64,
    pub events_duplicate: u64,
    pub events_delivered: u64,
    /// How many sites the relay has heard from.
    pub sites: u64,
    /// Dead letters in the queue now.
    pub dlq_events: u64,
    /// Events dead-lettered since the relay started.
    pub events_dead_lettered: u64,
    pub delivery_retries: u64,
    pub delivery_paused: bool,
}

/// `GET /v1/sites` of the relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SitesAnswer {
    pub sites: Vec<SiteSummary>,
}

/// What the relay knows of one site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteSummary {
    pub site: String,
    /// The epoch of the site's most recent batch.
    pub epoch: String,
    /// Highest sequence number of that epoch stored without a gap.
    pub highest_seq: u64,
    pub last_seen_ms: i64,
    pub events_stored: u64,
    pub events_duplicate: u64,
    pub events_delivered: u64,
    /// The site's events in the dead-letter queue.
    pub events_dead_lettered: u64,
    /// Dead letters an operator discarded for good.
    #[serde(default)]
    pub events_discarded: u64,
    /// ERP refusals kept until the site's agent acknowledges them.
    pub refusals_unacknowledged: u64,
    /// The site's events waiting for delivery.
    pub outbox_depth: u64,
}

/// `GET /v1/dlq` of the relay: one page of the dead-letter queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLettersAnswer {
    /// Dead letters in the whole queue, not only on this page.
    pub total: u64,
    pub dead_letters: Vec<DeadLetterSummary>,
}

/// One dead letter in a listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterSummary {
    pub id: u64,
    pub site: String,
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: EventType,
    pub seq: u64,
    pub at_ms: i64,
    pub attempts: u32,
    /// The ERP's message.
    pub reason: String,
}

/// `GET /v1/dlq/{id}` of the relay: one dead letter with its event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub reason: String,
    pub at_ms: i64,
    pub attempts: u32,
    /// The stamped event as `StampedEvent::to_json` writes it, passed through.
    pub event: Value,
}

/// `POST /v1/dlq/replay`: the dead letters to send back for delivery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayRequest {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<u64>,
    /// Every dead letter, whatever `ids` says.
    #[serde(default, skip_serializing_if = "is_false")]
    pub all: bool,
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// The answer to a replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayAnswer {
    /// The ids replayed; an id asked for and missing here was not in the queue.
    pub replayed: Vec<u64>,
}

/// `POST /v1/dlq/discard`: the dead letters to drop for good. There is no "all": discarding
/// is not undone, so each one is named.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscardRequest {
    #[serde(default)]
    pub ids: Vec<u64>,
}

/// The answer to a discard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiscardAnswer {
    /// The ids discarded; an id asked for and missing here was not in the queue.
    pub discarded: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

    /// Decodes `sent` and encodes it again: the result must be `sent` exactly, so no field
    /// was renamed, dropped or added compared with what the servers answered before.
    fn round_trip<T: Serialize + DeserializeOwned>(sent: Value) {
        let decoded: T = match serde_json::from_value(sent.clone()) {
            Ok(decoded) => decoded,
            Err(e) => panic!("{e}: {sent}"),
        };
        let again = serde_json::to_value(&decoded).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again, sent);
    }

    fn agent_status() -> Value {
        json!({
            "site": "wh-east", "epoch": "0123456789abcdef0123456789abcdef",
            "version": "0.1.0", "uptime_seconds": 12,
            "backlog": {"events": 3, "bytes": 900, "oldest_seq": 7,
                        "oldest_age_seconds": 1.5, "next_seq": 10},
            "quota": {"max_bytes": 1000, "used_bytes": 900, "rejects_bytes": 50, "used_ratio": 0.9,
                      "exceeded": false},
            "log": {"path": "/var/lib/backhaul/log.redb", "file_bytes": 4096, "flushes": 5,
                    "compactions": 0},
            "ingest": {
                "accepted": {"mqtt": 1, "http": 2, "site_broker": 3},
                "duplicates": {"mqtt": 0, "http": 0, "site_broker": 0},
                "rejected": {"mqtt": 0, "http": 1, "site_broker": 0},
                "quota_refusals": {"mqtt": 0, "http": 0, "site_broker": 0},
            },
            "mqtt": {"listen": "0.0.0.0:1883", "connected_clients": 2},
            "rejects_stored": 1,
            "rejects_not_kept": 0,
            "link": {"state": "up", "since_ms": 1, "last_error": null, "last_ack_ms": 2,
                     "acked_through": 6, "batches_in_flight": 1, "events_in_flight": 3,
                     "batches_sent": 4, "batches_resent": 0, "events_forwarded": 9,
                     "reconnects": 0, "erp_posted": 5},
            "erp_refusals_stored": 1,
            "erp_refusals": [{"id": "e-1", "seq": 4, "reason": "unknown product",
                              "refused_at_ms": 3, "reported_at_ms": 4}],
            "site_broker": {"state": "subscribed", "since_ms": 1, "last_error": null},
        })
    }

    #[test]
    fn every_answer_keeps_the_names_and_shapes_the_services_sent() {
        round_trip::<ErrorAnswer>(json!({"error": "no dead letter 3"}));
        round_trip::<AgentStatus>(agent_status());
        let mut bare = agent_status();
        bare["link"] = Value::Null;
        bare["site_broker"] = Value::Null;
        bare["mqtt"]["listen"] = Value::Null;
        bare["backlog"]["oldest_seq"] = Value::Null;
        bare["backlog"]["oldest_age_seconds"] = Value::Null;
        round_trip::<AgentStatus>(bare);
        round_trip::<RejectsAnswer>(json!({
            "rejects": [{"id": 9, "at_ms": 1, "transport": "http", "sender": "http 1.2.3.4:5",
                         "payload": "{}", "payload_truncated": false,
                         "violations": [{"field": "qty", "rule": "must be greater than 0"}]}],
            "next_before": null,
            "erp_refusals": [],
        }));
        round_trip::<EventsAnswer>(json!({"events": [{"id": "e-1", "seq": 1, "qty": "1.5"}]}));
        round_trip::<RelayStatus>(json!({
            "broker_connected": true, "outbox_depth": 2, "outbox_path": "/x/outbox.redb",
            "outbox_bytes": 10, "outbox_max_bytes": 100, "outbox_full": false,
            "batches_received": 3, "events_received": 30, "events_duplicate": 1,
            "events_delivered": 27, "sites": 2, "dlq_events": 1, "events_dead_lettered": 1,
            "delivery_retries": 4, "delivery_paused": false,
        }));
        round_trip::<SitesAnswer>(json!({"sites": [{
            "site": "east", "epoch": "0123456789abcdef0123456789abcdef", "highest_seq": 10,
            "last_seen_ms": 5, "events_stored": 10, "events_duplicate": 0,
            "events_delivered": 8, "events_dead_lettered": 2, "events_discarded": 0,
            "refusals_unacknowledged": 1,
            "outbox_depth": 0,
        }]}));
        round_trip::<DeadLettersAnswer>(json!({"total": 1, "dead_letters": [{
            "id": 1, "site": "east", "event_id": "e-2", "type": "receive", "seq": 2,
            "at_ms": 3, "attempts": 1, "reason": "unknown product SKU-BAD",
        }]}));
        round_trip::<DeadLetter>(json!({
            "id": 1, "reason": "unknown product", "at_ms": 3, "attempts": 2,
            "event": {"v": 1, "id": "e-2", "type": "receive", "site": "east", "seq": 2},
        }));
        round_trip::<ReplayAnswer>(json!({"replayed": [1, 2]}));
        round_trip::<DiscardAnswer>(json!({"discarded": [3]}));
    }

    #[test]
    fn requests_are_sent_as_before_and_read_with_defaults() {
        let all = ReplayRequest {
            ids: Vec::new(),
            all: true,
        };
        assert_eq!(serde_json::to_value(&all).ok(), Some(json!({"all": true})));
        let some = ReplayRequest {
            ids: vec![2, 7],
            all: false,
        };
        assert_eq!(
            serde_json::to_value(&some).ok(),
            Some(json!({"ids": [2, 7]}))
        );
        assert_eq!(
            serde_json::from_value::<ReplayRequest>(json!({})).ok(),
            Some(ReplayRequest::default())
        );
        assert_eq!(
            serde_json::from_value::<DiscardRequest>(json!({"ids": [1], "all": true})).ok(),
            Some(DiscardRequest { ids: vec![1] })
        );
    }

    #[test]
    fn a_missing_field_is_an_error_not_a_zero() {
        let mut site = json!({
            "site": "east", "epoch": "e", "highest_seq": 10, "last_seen_ms": 5,
            "events_stored": 10, "events_duplicate": 0, "events_delivered": 8,
            "refusals_unacknowledged": 0, "outbox_depth": 0,
        });
        let missing = serde_json::from_value::<SiteSummary>(site.clone())
            .err()
            .map(|e| e.to_string());
        assert!(
            missing
                .as_deref()
                .is_some_and(|e| e.contains("events_dead_lettered")),
            "{missing:?}"
        );
        site["events_dead_lettered"] = json!(2);
        assert!(serde_json::from_value::<SiteSummary>(site).is_ok());

        // A nullable field must be sent, as null: missing is not "not configured".
        let mut status = agent_status();
        if let Value::Object(map) = &mut status {
            map.remove("link");
        }
        let missing = serde_json::from_value::<AgentStatus>(status)
            .err()
            .map(|e| e.to_string());
        assert!(
            missing.as_deref().is_some_and(|e| e.contains("link")),
            "{missing:?}"
        );
    }
}
