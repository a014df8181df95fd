//! An event's whole story at the relay, for `backhaul-relay trace ID` and
//! `GET /v1/events/{id}`.
//!
//! What it owns: the records the outbox keeps for a trace ([`EventTrace`]: every delivery
//! attempt with the ERP's answer and latency, the outcome and the ERP's reference;
//! [`BatchRecord`]: the batch that carried an event and when it was stored), the attempts of
//! events still waiting ([`AttemptLog`], in memory: they are the engine's, and a restart starts
//! them again), and the view both the API and the CLI show ([`TraceView`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use backhaul_events::StampedEvent;
use serde::{Deserialize, Serialize};

use crate::outbox::{Outbox, OutboxError};

/// Attempts kept per event: the first few and the latest, so a key that retried for a week
/// keeps how it started and how it is going.
const FIRST_ATTEMPTS_KEPT: usize = 4;
const ATTEMPTS_KEPT: usize = 20;
/// Waiting events whose attempts are remembered at most; past it the oldest are forgotten.
const WAITING_EVENTS_KEPT: usize = 100_000;
/// The longest answer kept per attempt, in characters: the ERP's words, not its whole page.
const DETAIL_CHARS: usize = 300;

/// What one delivery attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptResult {
    Posted,
    /// The ERP answered that the event cannot go yet (its key waits).
    Waiting,
    /// No answer, a timeout, a 5xx: the key backs off.
    Transient,
    /// The ERP asked every caller to slow down.
    Throttled,
    /// The ERP refused the event for good: dead-lettered.
    Refused,
}

/// One delivery attempt: when it started, how long the ERP took, and what it said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub at_ms: i64,
    pub latency_ms: u64,
    pub result: AttemptResult,
    /// The ERP's reference for a posted event, its reason otherwise.
    pub detail: String,
}

/// How an event left the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finished {
    Posted,
    DeadLettered,
}

/// What the relay keeps of an event after it left the outbox, for the trace retention.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTrace {
    pub event: StampedEvent,
    pub finished: Finished,
    pub finished_at_ms: i64,
    pub erp_ref: Option<String>,
    pub reason: Option<String>,
    pub attempts: Vec<Attempt>,
}

impl EventTrace {
    /// Takes in a later chapter of the same event (a dead letter replayed, then posted): the
    /// outcome is the latest, the attempts are all of them (bounded).
    pub fn merge_after(&mut self, earlier: EventTrace) {
        let mut attempts = earlier.attempts;
        attempts.append(&mut self.attempts);
        self.attempts = attempts;
        keep_bounded(&mut self.attempts);
    }
}

/// The batch that carried events of a site's epoch, and when the relay stored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: u64,
    pub stored_at_ms: i64,
}

fn keep_bounded(attempts: &mut Vec<Attempt>) {
    if attempts.len() > ATTEMPTS_KEPT {
        let excess = attempts.len() - ATTEMPTS_KEPT;
        attempts.drain(FIRST_ATTEMPTS_KEPT..FIRST_ATTEMPTS_KEPT + excess);
    }
}

/// The attempts of events that have not left the outbox yet, by site and id.
#[derive(Default)]
pub struct AttemptLog {
    inner: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    attempts: HashMap<(String, String), Vec<Attempt>>,
    /// Insertion order, to forget the oldest past [`WAITING_EVENTS_KEPT`].
    order: VecDeque<(String, String)>,
}

impl AttemptLog {
    pub fn push(&self, site: &str, id: &str, attempt: Attempt) {
        let Ok(mut waiting) = self.inner.lock() else {
            return;
        };
        let mut attempt = attempt;
        if attempt.detail.chars().count() > DETAIL_CHARS {
            attempt.detail = attempt.detail.chars().take(DETAIL_CHARS).collect();
            attempt.detail.push('…');
        }
        let key = (site.to_string(), id.to_string());
        match waiting.attempts.get_mut(&key) {
            Some(list) => {
                list.push(attempt);
                keep_bounded(list);
            }
            None => {
                while waiting.attempts.len() >= WAITING_EVENTS_KEPT {
                    match waiting.order.pop_front() {
                        Some(oldest) => {
                            waiting.attempts.remove(&oldest);
                        }
                        None => break,
                    }
                }
                waiting.order.push_back(key.clone());
                waiting.attempts.insert(key, vec![attempt]);
            }
        }
    }

    /// The attempts so far, forgotten here (the event finished).
    pub fn take(&self, site: &str, id: &str) -> Vec<Attempt> {
        let Ok(mut waiting) = self.inner.lock() else {
            return Vec::new();
        };
        let key = (site.to_string(), id.to_string());
        let taken = waiting.attempts.remove(&key).unwrap_or_default();
        // The key stays in `order` (finding it would cost a scan per delivered event); the
        // order is rebuilt from what is still waiting once stale keys fill half of it.
        if waiting.order.len() > 2 * waiting.attempts.len() + 1024 {
            let Waiting { attempts, order } = &mut *waiting;
            order.retain(|k| attempts.contains_key(k));
        }
        taken
    }

    pub fn get(&self, site: &str, id: &str) -> Vec<Attempt> {
        self.inner
            .lock()
            .ok()
            .and_then(|w| w.attempts.get(&(site.to_string(), id.to_string())).cloned())
            .unwrap_or_default()
    }
}

/// Where an event is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TraceState {
    /// In the outbox, waiting for (another) delivery.
    Waiting,
    Posted,
    DeadLettered,
}

/// An event's trace as the API and the CLI show it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceView {
    pub id: String,
    pub site: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub device: Option<String>,
    pub epoch: String,
    pub seq: u64,
    pub received_at: String,
    pub batch: Option<BatchView>,
    pub state: TraceState,
    pub erp_ref: Option<String>,
    pub reason: Option<String>,
    pub finished_at: Option<String>,
    pub attempts: Vec<AttemptView>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchView {
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: u64,
    pub stored_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptView {
    pub at: String,
    pub latency_ms: u64,
    pub result: AttemptResult,
    pub detail: String,
}

/// Milliseconds since the Unix epoch as RFC 3339 UTC, with milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| ms.to_string())
}

fn attempt_views(attempts: &[Attempt]) -> Vec<AttemptView> {
    attempts
        .iter()
        .map(|a| AttemptView {
            at: rfc3339_ms(a.at_ms),
            latency_ms: a.latency_ms,
            result: a.result,
            detail: a.detail.clone(),
        })
        .collect()
}

/// Every trace of event `id`: of `site`, or of every site the relay knows (ids are unique per
/// site, not across sites). Blocks on the outbox.
pub fn trace(
    outbox: &dyn Outbox,
    waiting: &AttemptLog,
    site: Option<&str>,
    id: &str,
) -> Result<Vec<TraceView>, OutboxError> {
    let sites: Vec<String> = match site {
        Some(site) => vec![site.to_string()],
        None => outbox.sites().into_iter().map(|s| s.site).collect(),
    };
    let mut views = Vec::new();
    for site in sites {
        let finished = outbox.trace(&site, id)?;
        let pending = outbox.find_pending(&site, id)?;
        let (event, state, mut attempts, erp_ref, reason, finished_at) = match (pending, finished) {
            (Some((_, event)), earlier) => {
                // Replayed after a dead letter: the earlier chapter comes first.
                let mut attempts = earlier.map(|t| t.attempts).unwrap_or_default();
                attempts.extend(waiting.get(&site, id));
                (event, TraceState::Waiting, attempts, None, None, None)
            }
            (None, Some(done)) => (
                done.event,
                match done.finished {
                    Finished::Posted => TraceState::Posted,
                    Finished::DeadLettered => TraceState::DeadLettered,
                },
                done.attempts,
                done.erp_ref,
                done.reason,
                Some(rfc3339_ms(done.finished_at_ms)),
            ),
            (None, None) => continue,
        };
        keep_bounded(&mut attempts);
        let batch = outbox
            .batch_of(&site, event.epoch, event.seq)?
            .map(|b| BatchView {
                first_seq: b.first_seq,
                last_seq: b.last_seq,
                events: b.events,
                stored_at: rfc3339_ms(b.stored_at_ms),
            });
        views.push(TraceView {
            id: event.event.id.clone(),
            site: event.site.clone(),
            kind: event.event.kind.to_string(),
            device: event.event.device.clone(),
            epoch: event.epoch.to_string(),
            seq: event.seq,
            received_at: rfc3339_ms(event.received_at_ms),
            batch,
            state,
            erp_ref,
            reason,
            finished_at,
            attempts: attempt_views(&attempts),
        });
    }
    Ok(views)
}

/// A trace as the terminal shows it.
pub fn render(view: &TraceView) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "event {} ({}) of site {}",
        view.id, view.kind, view.site
    );
    let _ = writeln!(
        out,
        "  received   {} from device {}",
        view.received_at,
        view.device
            .as_deref()
            .unwrap_or("(none: posted by the WMS)")
    );
    let _ = writeln!(out, "  log        epoch {} seq {}", view.epoch, view.seq);
    match &view.batch {
        Some(b) => {
            let _ = writeln!(
                out,
                "  batch      seq {}-{} ({} event{}), stored by the relay {}",
                b.first_seq,
                b.last_seq,
                b.events,
                if b.events == 1 { "" } else { "s" },
                b.stored_at
            );
        }
        None => {
            let _ = writeln!(out, "  batch      (no longer kept)");
        }
    }
    for (n, a) in view.attempts.iter().enumerate() {
        let result = serde_json::to_value(a.result)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  attempt {:<2} {} {:>6} ms  {:<10} {}",
            n + 1,
            a.at,
            a.latency_ms,
            result,
            a.detail
        );
    }
    let state = match view.state {
        TraceState::Waiting => "waiting in the outbox".to_string(),
        TraceState::Posted => format!(
            "posted {}, ERP reference {}",
            view.finished_at.as_deref().unwrap_or("?"),
            view.erp_ref.as_deref().unwrap_or("?")
        ),
        TraceState::DeadLettered => format!(
            "dead-lettered {}: {}",
            view.finished_at.as_deref().unwrap_or("?"),
            view.reason.as_deref().unwrap_or("?")
        ),
    };
    let _ = writeln!(out, "  now        {state}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(n: i64) -> Attempt {
        Attempt {
            at_ms: n,
            latency_ms: 1,
            result: AttemptResult::Transient,
            detail: String::new(),
        }
    }

    #[test]
    fn a_long_retry_keeps_its_first_and_latest_attempts() {
        let log = AttemptLog::default();
        for n in 0..100 {
            log.push("s", "e", attempt(n));
        }
        let kept: Vec<i64> = log.take("s", "e").iter().map(|a| a.at_ms).collect();
        assert_eq!(kept.len(), ATTEMPTS_KEPT);
        assert_eq!(&kept[..4], &[0, 1, 2, 3]);
        assert_eq!(*kept.last().unwrap(), 99);
        assert!(log.get("s", "e").is_empty());
    }
}
