//! The delivery engine: drains the outbox's per-key queues to the connector.
//!
//! What it owns: one event per ordering key in flight at a time (so order holds per key and a
//! retrying key holds back no other), several connector calls in flight, the token-bucket rate
//! limit, per-key retry back-off with jitter honouring Retry-After, pausing and probing when
//! every call fails, the dead-letter queue for permanent refusals, and reporting each event's
//! outcome back to its site.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backhaul_events::{EventOutcome, Outcome, StampedEvent};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::DeliveryConfig;
use crate::connector::{Connector, Delivery};
use crate::metrics::RelayMetrics;
use crate::outbox::{Head, Outbox};

/// The one queue of a connector that drains the outbox in arrival order.
const SINGLE_QUEUE: &[u8] = b"";

/// Outcomes of one site's events, for the site's outcomes topic.
pub type SiteOutcomes = (String, Vec<EventOutcome>);

struct Retry {
    at: Instant,
    attempts: u32,
}

struct CallDone {
    heads: Vec<Head>,
    results: Vec<Delivery>,
    ledger_len: Option<u64>,
    took: Duration,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn available(&mut self) -> f64 {
        let now = Instant::now();
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        self.tokens
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When one whole token will be there.
    fn next_token(&mut self) -> Instant {
        let missing = (1.0 - self.available()).max(0.0);
        Instant::now() + Duration::from_secs_f64(missing / self.rate)
    }
}

pub struct Engine {
    pub outbox: Arc<Outbox>,
    pub connector: Arc<Connector>,
    pub config: DeliveryConfig,
    pub metrics: Arc<RelayMetrics>,
    pub outcomes: mpsc::Sender<SiteOutcomes>,
    /// Woken when intake stores events or a replay puts some back.
    pub wake: Arc<Notify>,
}

impl Engine {
    pub async fn run(self, stop: CancellationToken) {
        let concurrency = self.connector.max_concurrency(self.config.concurrency);
        let max_batch = self.connector.max_batch(self.config.max_batch);
        let mut bucket = TokenBucket {
            tokens: f64::from(self.config.burst),
            rate: self.config.rate_per_sec,
            burst: f64::from(self.config.burst),
            refilled: Instant::now(),
        };
        let mut in_flight: HashSet<Vec<u8>> = HashSet::new();
        let mut retries: HashMap<Vec<u8>, Retry> = HashMap::new();
        let mut calls: JoinSet<CallDone> = JoinSet::new();
        let mut failed_calls = 0u32;
        let mut paused_until: Option<Instant> = None;
        let mut pause = Duration::from_millis(self.config.retry_min_ms);
        let mut probing = false;
        tracing::info!(
            connector = self.connector.name(),
            concurrency,
            max_batch,
            rate_per_sec = self.config.rate_per_sec,
            "delivery engine running"
        );

        loop {
            let now = Instant::now();
            let paused = paused_until.is_some_and(|until| now < until);
            let mut next_wake = now + Duration::from_secs(1);
            if let Some(until) = paused_until.filter(|_| paused) {
                next_wake = next_wake.min(until);
            }
            while !paused && calls.len() < (if probing { 1 } else { concurrency }) {
                // The ledger is a local file, not an ERP to protect: it is not rate-limited.
                let tokens = if self.connector.single_queue() {
                    max_batch as f64
                } else {
                    bucket.available()
                };
                if tokens < 1.0 {
                    next_wake = next_wake.min(bucket.next_token());
                    break;
                }
                let limit = (if probing { 1 } else { max_batch }).min(tokens as usize);
                let waiting = retries
                    .iter()
                    .filter(|(_, r)| r.at > now)
                    .map(|(k, _)| k.clone());
                let skip: HashSet<Vec<u8>> = in_flight.iter().cloned().chain(waiting).collect();
                let outbox = self.outbox.clone();
                let single_queue = self.connector.single_queue();
                let heads = tokio::task::spawn_blocking(move || {
                    if single_queue {
                        if skip.contains(SINGLE_QUEUE) {
                            return Ok(Vec::new());
                        }
                        outbox.pending(limit).map(|events| {
                            events
                                .into_iter()
                                .map(|(outbox_seq, event)| Head {
                                    queue: SINGLE_QUEUE.to_vec(),
                                    outbox_seq,
                                    event,
                                })
                                .collect()
                        })
                    } else {
                        outbox.heads(limit, |queue| skip.contains(queue))
                    }
                })
                .await;
                let heads = match heads {
                    Ok(Ok(heads)) => heads,
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "the outbox cannot be read");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the outbox reader failed");
                        break;
                    }
                };
                if heads.is_empty() {
                    break;
                }
                bucket.take(heads.len());
                for head in &heads {
                    in_flight.insert(head.queue.clone());
                }
                let connector = self.connector.clone();
                calls.spawn(async move {
                    let events: Vec<StampedEvent> = heads.iter().map(|h| h.event.clone()).collect();
                    let started = Instant::now();
                    let (results, ledger_len) = connector.deliver(&events).await;
                    CallDone {
                        heads,
                        results,
                        ledger_len,
                        took: started.elapsed(),
                    }
                });
            }
            if let Some(soonest) = retries.values().map(|r| r.at).filter(|at| *at > now).min() {
                next_wake = next_wake.min(soonest);
            }
            self.metrics
                .delivery_paused
                .set(i64::from(paused || probing));

            let done = tokio::select! {
                _ = stop.cancelled() => break,
                done = calls.join_next(), if !calls.is_empty() => done,
                _ = self.wake.notified() => continue,
                _ = tokio::time::sleep_until(next_wake) => continue,
            };
            let done = match done {
                Some(Ok(done)) => done,
                Some(Err(e)) => {
                    // A connector call panicked: its keys stay in flight-less limbo unless freed.
                    tracing::error!(error = %e, "a connector call failed");
                    in_flight.clear();
                    continue;
                }
                None => continue,
            };
            self.metrics
                .erp_latency_seconds
                .observe(done.took.as_secs_f64());
            let mut posted = Vec::new();
            let mut dead = Vec::new();
            let mut outcomes: HashMap<String, Vec<EventOutcome>> = HashMap::new();
            let mut any_success = false;
            let mut longest_retry_after: Option<Duration> = None;
            let results = done
                .results
                .into_iter()
                .chain(std::iter::repeat(Delivery::Transient {
                    reason: "the connector gave no result for this event".into(),
                    retry_after: None,
                }));
            for (head, result) in done.heads.iter().zip(results) {
                in_flight.remove(&head.queue);
                let attempts = retries.get(&head.queue).map(|r| r.attempts).unwrap_or(0) + 1;
                let event = &head.event;
                match result {
                    Delivery::Posted { erp_ref } => {
                        any_success = true;
                        retries.remove(&head.queue);
                        tracing::debug!(site = %event.site, id = %event.event.id, %erp_ref, "event posted");
                        outcomes
                            .entry(event.site.clone())
                            .or_default()
                            .push(EventOutcome {
                                seq: event.seq,
                                id: event.event.id.clone(),
                                outcome: Outcome::Posted { erp_ref },
                            });
                        posted.push((head.outbox_seq, event.clone()));
                    }
                    Delivery::Permanent { reason } => {
                        any_success = true;
                        retries.remove(&head.queue);
                        tracing::warn!(site = %event.site, id = %event.event.id, key = %event.ordering_key(), %reason, "the ERP refused the event: dead-lettered");
                        outcomes
                            .entry(event.site.clone())
                            .or_default()
                            .push(EventOutcome {
                                seq: event.seq,
                                id: event.event.id.clone(),
                                outcome: Outcome::DeadLettered {
                                    reason: reason.clone(),
                                },
                            });
                        dead.push((head.outbox_seq, event.clone(), reason, attempts));
                    }
                    Delivery::Transient {
                        reason,
                        retry_after,
                    } => {
                        self.metrics.delivery_retries.inc();
                        let base = self
                            .config
                            .retry_min_ms
                            .saturating_mul(1u64 << (attempts - 1).min(20));
                        let capped = base.min(self.config.retry_max_ms);
                        let jittered = capped / 2 + rand::random_range(0..=capped / 2);
                        let mut delay = Duration::from_millis(jittered);
                        if let Some(hint) = retry_after {
                            delay = delay.max(hint);
                            longest_retry_after = longest_retry_after.max(Some(hint));
                        }
                        tracing::info!(site = %event.site, id = %event.event.id, attempts, retry_in_ms = delay.as_millis() as u64, %reason, "delivery failed; will retry");
                        retries.insert(
                            head.queue.clone(),
                            Retry {
                                at: Instant::now() + delay,
                                attempts,
                            },
                        );
                    }
                }
            }
            // Every event failing transiently means the ERP, not the events, is the problem.
            if any_success {
                failed_calls = 0;
                probing = false;
                paused_until = None;
                pause = Duration::from_millis(self.config.retry_min_ms);
            } else {
                failed_calls += 1;
                if failed_calls >= self.config.pause_after_failures.max(1) {
                    if !probing {
                        tracing::warn!(
                            failed_calls,
                            pause_ms = pause.as_millis() as u64,
                            "every recent ERP call failed: pausing, then probing with one event at a time"
                        );
                    }
                    probing = true;
                    paused_until = Some(Instant::now() + pause);
                    pause = (pause * 2).min(Duration::from_millis(self.config.retry_max_ms));
                }
            }
            if let Some(hint) = longest_retry_after {
                // The ERP asked everyone to wait (429/503 with Retry-After).
                let until = Instant::now() + hint;
                paused_until = Some(paused_until.map_or(until, |p| p.max(until)));
            }
            if posted.is_empty() && dead.is_empty() && done.ledger_len.is_none() {
                continue;
            }
            let outbox = self.outbox.clone();
            let (n_posted, n_dead) = (posted.len() as u64, dead.len() as u64);
            let ledger_len = done.ledger_len;
            let completed =
                tokio::task::spawn_blocking(move || outbox.complete(&posted, &dead, ledger_len))
                    .await;
            match completed {
                Ok(Ok(())) => {
                    self.metrics.events_delivered.inc_by(n_posted);
                    self.metrics.events_dead_lettered.inc_by(n_dead);
                    for site_outcomes in outcomes {
                        // Outcomes are information for the warehouse; a full queue drops them.
                        let _ = self.outcomes.try_send(site_outcomes);
                    }
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "delivered events could not be marked; they will be delivered again (idempotently)")
                }
                Err(e) => tracing::error!(error = %e, "the outbox writer failed"),
            }
        }
        calls.abort_all();
    }
}
