//! The delivery engine: drains the outbox's per-key queues to the connector.
//!
//! What it owns: one event per ordering key in flight at a time (so order holds per key), several
//! connector calls in flight, the token-bucket rate limit, each key's own retry back-off (a
//! key that is waiting or failing holds back no other key), pausing every key only when the ERP
//! as a whole asks for it or stops answering, the dead-letter queue for permanent refusals, and
//! reporting each event's outcome back to its site.
//!
//! The decisions live in [`Schedule`], a state machine with named transitions and no I/O, so
//! they are unit-tested on their own; [`Engine`] connects it to the outbox and a [`Sink`].
//! The engine ends with an error when the outbox can no longer be read or written: delivering
//! on without recording what was delivered would deliver it again, so the process stops and
//! its supervisor restarts it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backhaul_events::service::Heartbeat;
use backhaul_events::{EventOutcome, Outcome, StampedEvent};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::DeliveryConfig;
use crate::connector::{Capabilities, CommitToken, Delivered, Delivery, Sink};
use crate::metrics::RelayMetrics;
use crate::outbox::{Head, Outbox, OutboxError, now_ms};
use crate::trace::{Attempt, AttemptLog, AttemptResult, EventTrace, Finished};

/// The one queue of a connector that drains the outbox in arrival order.
const SINGLE_QUEUE: &[u8] = b"";
/// The engine looks at the outbox at least this often, and beats its heartbeat as often.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// Outcomes of one site's events, for the site's outcomes topic.
pub type SiteOutcomes = (String, Vec<EventOutcome>);

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
#[derive(Debug)]
struct TokenBucket {
    tokens: f64,
    rate: f64,
    burst: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            rate: rate.max(f64::MIN_POSITIVE),
            burst: f64::from(burst),
            refilled: now,
        }
    }

    fn available(&mut self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.refilled = now;
        self.tokens
    }

    fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// When one whole token will be there.
    fn next_token(&mut self, now: Instant) -> Instant {
        let missing = (1.0 - self.available(now)).max(0.0);
        now + Duration::from_secs_f64(missing / self.rate)
    }
}

/// A key that failed or must wait: not before `at`; `attempts` so far.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    attempts: u32,
}

/// Whether the ERP as a whole is answering: calls whose every event failed count against it;
/// after `pause_after_failures` of them, or when the ERP throttles, every key pauses and then
/// one event at a time probes until an answer comes back.
#[derive(Debug)]
struct ErpHealth {
    failed_calls: u32,
    paused_until: Option<Instant>,
    pause: Duration,
    probing: bool,
}

/// What the engine must do with the events of one finished call.
#[derive(Debug, Default)]
pub struct Settled {
    pub posted: Vec<(u64, StampedEvent)>,
    /// Outbox sequence number, event, the ERP's reason, attempts.
    pub dead: Vec<(u64, StampedEvent, String, u32)>,
    pub outcomes: HashMap<String, Vec<EventOutcome>>,
    /// Events whose key will be tried again.
    pub retried: u64,
}

/// The engine's decisions: which keys may go, how many calls and events, and what the
/// answers mean for each key and for the ERP. Time is passed in, so the transitions are
/// deterministic.
#[derive(Debug)]
pub struct Schedule {
    config: DeliveryConfig,
    capabilities: Capabilities,
    in_flight: HashSet<Vec<u8>>,
    retries: HashMap<Vec<u8>, Retry>,
    bucket: TokenBucket,
    health: ErpHealth,
}

impl Schedule {
    pub fn new(config: DeliveryConfig, capabilities: Capabilities, now: Instant) -> Schedule {
        let bucket = TokenBucket::new(config.rate_per_sec, config.burst, now);
        let pause = Duration::from_millis(config.retry_min_ms);
        Schedule {
            config,
            capabilities,
            in_flight: HashSet::new(),
            retries: HashMap::new(),
            bucket,
            health: ErpHealth {
                failed_calls: 0,
                paused_until: None,
                pause,
                probing: false,
            },
        }
    }

    /// Whether every key is held back (the ERP throttled, or is not answering).
    pub fn paused(&self, now: Instant) -> bool {
        self.health.paused_until.is_some_and(|until| now < until)
    }

    /// Whether delivery is paused or probing with one event at a time.
    pub fn degraded(&self, now: Instant) -> bool {
        self.paused(now) || self.health.probing
    }

    /// How many events the next call may carry, if one may start now with `calls` in flight;
    /// otherwise when to look again (or `None`: when a call ends).
    pub fn next_call(&mut self, calls: usize, now: Instant) -> Result<usize, Option<Instant>> {
        if let Some(until) = self.health.paused_until.filter(|until| now < *until) {
            return Err(Some(until));
        }
        let probing = self.health.probing;
        let most_calls = if probing {
            1
        } else {
            self.capabilities.max_concurrency.max(1)
        };
        if calls >= most_calls {
            return Err(None);
        }
        let most_events = if probing {
            1
        } else {
            self.capabilities.max_batch.max(1)
        };
        if !self.capabilities.rate_limited {
            return Ok(most_events);
        }
        let tokens = self.bucket.available(now);
        if tokens < 1.0 {
            return Err(Some(self.bucket.next_token(now)));
        }
        Ok(most_events.min(tokens as usize))
    }

    /// Whether a queue must not go now: it has a call in flight or is waiting to retry.
    pub fn held_back(&self, queue: &[u8], now: Instant) -> bool {
        self.in_flight.contains(queue) || self.retries.get(queue).is_some_and(|r| r.at > now)
    }

    /// The queues held back now, for a reader on another thread.
    pub fn held_back_set(&self, now: Instant) -> HashSet<Vec<u8>> {
        let waiting = self
            .retries
            .iter()
            .filter(|(_, r)| r.at > now)
            .map(|(queue, _)| queue.clone());
        self.in_flight.iter().cloned().chain(waiting).collect()
    }

    /// A call with these heads has started.
    pub fn call_started(&mut self, heads: &[Head]) {
        if self.capabilities.rate_limited {
            self.bucket.take(heads.len());
        }
        for head in heads {
            self.in_flight.insert(head.queue.clone());
        }
    }

    /// When the soonest waiting key may go again, if any.
    pub fn next_retry(&self, now: Instant) -> Option<Instant> {
        self.retries
            .values()
            .map(|r| r.at)
            .filter(|at| *at > now)
            .min()
    }

    /// A call ended with these results (one per head, in order): frees its keys, sets each
    /// failing key's back-off, and judges the ERP's health from the whole call.
    pub fn call_finished(
        &mut self,
        heads: &[Head],
        results: Vec<Delivery>,
        now: Instant,
    ) -> Settled {
        let mut settled = Settled::default();
        let mut answered = false;
        let mut throttled: Option<Option<Duration>> = None;
        let missing = std::iter::repeat(Delivery::Transient {
            reason: "the connector gave no result for this event".into(),
            retry_after: None,
        });
        for (head, result) in heads.iter().zip(results.into_iter().chain(missing)) {
            self.in_flight.remove(&head.queue);
            let attempts = self.retries.get(&head.queue).map_or(0, |r| r.attempts) + 1;
            let event = &head.event;
            let outcome = match result {
                Delivery::Posted { erp_ref } => {
                    answered = true;
                    self.retries.remove(&head.queue);
                    tracing::debug!(site = %event.site, id = %event.event.id, %erp_ref, "event posted");
                    settled.posted.push((head.outbox_seq, event.clone()));
                    Outcome::Posted { erp_ref }
                }
                Delivery::Permanent { reason } => {
                    answered = true;
                    self.retries.remove(&head.queue);
                    tracing::warn!(site = %event.site, id = %event.event.id, key = %event.ordering_key(), %reason, "the ERP refused the event: dead-lettered");
                    settled
                        .dead
                        .push((head.outbox_seq, event.clone(), reason.clone(), attempts));
                    Outcome::DeadLettered { reason }
                }
                Delivery::Waiting {
                    reason,
                    retry_after,
                } => {
                    answered = true;
                    self.retry_key(head, attempts, Some(retry_after), &reason, now);
                    settled.retried += 1;
                    continue;
                }
                Delivery::Transient {
                    reason,
                    retry_after,
                } => {
                    self.retry_key(head, attempts, retry_after, &reason, now);
                    settled.retried += 1;
                    continue;
                }
                Delivery::Throttled {
                    reason,
                    retry_after,
                } => {
                    throttled = Some(throttled.flatten().max(retry_after));
                    self.retry_key(head, attempts, retry_after, &reason, now);
                    settled.retried += 1;
                    continue;
                }
            };
            settled
                .outcomes
                .entry(event.site.clone())
                .or_default()
                .push(EventOutcome {
                    seq: event.seq,
                    id: event.event.id.clone(),
                    outcome,
                });
        }
        if answered && throttled.is_none() {
            self.erp_answered();
        } else if !heads.is_empty() {
            self.erp_failed(throttled, now);
        }
        settled
    }

    /// A call ended without results (its task panicked): only its own keys are freed, and they
    /// back off like a failure, so no key ever has two calls in flight.
    pub fn call_lost(&mut self, queues: &[Vec<u8>], now: Instant) {
        for queue in queues {
            self.in_flight.remove(queue);
            let attempts = self.retries.get(queue).map_or(0, |r| r.attempts) + 1;
            let at = now + self.backoff(attempts);
            self.retries.insert(queue.clone(), Retry { at, attempts });
        }
    }

    fn backoff(&self, attempts: u32) -> Duration {
        let base = self
            .config
            .retry_min_ms
            .saturating_mul(1u64 << (attempts.saturating_sub(1)).min(20));
        let capped = base.min(self.config.retry_max_ms);
        Duration::from_millis(capped / 2 + rand::random_range(0..=capped / 2))
    }

    fn retry_key(
        &mut self,
        head: &Head,
        attempts: u32,
        hint: Option<Duration>,
        reason: &str,
        now: Instant,
    ) {
        let delay = self.backoff(attempts).max(hint.unwrap_or_default());
        let event = &head.event;
        tracing::info!(site = %event.site, id = %event.event.id, key = %event.ordering_key(), attempts, retry_in_ms = delay.as_millis() as u64, %reason, "not delivered yet; this key will retry");
        self.retries.insert(
            head.queue.clone(),
            Retry {
                at: now + delay,
                attempts,
            },
        );
    }

    fn erp_answered(&mut self) {
        if self.health.probing {
            tracing::info!("the ERP answers again: delivery resumes");
        }
        self.health = ErpHealth {
            failed_calls: 0,
            paused_until: None,
            pause: Duration::from_millis(self.config.retry_min_ms),
            probing: false,
        };
    }

    /// Every event of a call failed, or the ERP throttled (with its hint, if it gave one).
    fn erp_failed(&mut self, throttled: Option<Option<Duration>>, now: Instant) {
        let health = &mut self.health;
        health.failed_calls += 1;
        let hint = throttled.flatten();
        if throttled.is_none() && health.failed_calls < self.config.pause_after_failures.max(1) {
            return;
        }
        if !health.probing {
            tracing::warn!(
                failed_calls = health.failed_calls,
                pause_ms = hint.unwrap_or(health.pause).as_millis() as u64,
                throttled = throttled.is_some(),
                "the ERP is not taking events: every key pauses, then one event at a time probes"
            );
        }
        health.probing = true;
        let until = now + hint.unwrap_or(health.pause);
        health.paused_until = Some(health.paused_until.map_or(until, |p| p.max(until)));
        health.pause = (health.pause * 2).min(Duration::from_millis(self.config.retry_max_ms));
    }
}

/// How soon the engine asks an unavailable outbox again, at first and at most.
const OUTBOX_RETRY_MIN: Duration = Duration::from_millis(200);
const OUTBOX_RETRY_MAX: Duration = Duration::from_secs(5);

/// Why the engine stopped before it was asked to.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the outbox cannot be read: {0}")]
    Read(OutboxError),
    #[error(
        "the outbox cannot record delivered events: {0}. Stopping rather than deliver them \
         again; they are still in the outbox"
    )]
    Complete(OutboxError),
    #[error("the outbox's worker thread failed: {0}")]
    Worker(tokio::task::JoinError),
}

/// One call in flight: its keys, so a call that panics frees only its own.
struct CallDone {
    heads: Vec<Head>,
    delivered: Delivered,
    took: Duration,
}

pub struct Engine<S: Sink> {
    pub outbox: Arc<dyn Outbox>,
    pub sink: Arc<S>,
    pub config: DeliveryConfig,
    pub metrics: Arc<RelayMetrics>,
    pub outcomes: mpsc::Sender<SiteOutcomes>,
    /// Woken when intake stores events or a replay puts some back.
    pub wake: Arc<Notify>,
    pub heartbeat: Heartbeat,
    /// The attempts of events still waiting, which `trace` shows.
    pub attempts: Arc<AttemptLog>,
    /// How long what became of a delivered event is kept for `trace`; `None` keeps nothing.
    pub trace_retention: Option<Duration>,
}

impl<S: Sink> Engine<S> {
    pub async fn run(self, stop: CancellationToken) -> Result<(), EngineError> {
        let capabilities = self.sink.capabilities(&self.config);
        let mut schedule = Schedule::new(self.config.clone(), capabilities, Instant::now());
        let mut calls: JoinSet<CallDone> = JoinSet::new();
        let mut call_keys: HashMap<tokio::task::Id, Vec<Vec<u8>>> = HashMap::new();
        tracing::info!(
            connector = self.sink.name(),
            concurrency = capabilities.max_concurrency,
            max_batch = capabilities.max_batch,
            rate_per_sec = self.config.rate_per_sec,
            "delivery engine running"
        );
        let mut unavailable_since: Option<Instant> = None;
        let result = loop {
            self.heartbeat.beat();
            let now = Instant::now();
            let mut next_wake = now + LOOK_AGAIN;
            loop {
                let limit = match schedule.next_call(calls.len(), now) {
                    Ok(limit) => limit,
                    Err(later) => {
                        next_wake = later.map_or(next_wake, |at| next_wake.min(at));
                        break;
                    }
                };
                let heads = match self.read_heads(&schedule, capabilities, limit, now).await {
                    Ok(heads) => heads,
                    Err(EngineError::Read(e)) if e.is_transient() => {
                        if unavailable_since.is_none() {
                            tracing::warn!(error = %e, "the outbox is unavailable; delivery waits for it");
                        }
                        unavailable_since.get_or_insert(now);
                        next_wake = now + OUTBOX_RETRY_MAX;
                        break;
                    }
                    Err(e) => {
                        calls.abort_all();
                        return Err(e);
                    }
                };
                if let Some(since) = unavailable_since.take() {
                    tracing::info!(
                        after_ms = since.elapsed().as_millis() as u64,
                        "the outbox is available again"
                    );
                }
                if heads.is_empty() {
                    break;
                }
                schedule.call_started(&heads);
                let queues = heads.iter().map(|h| h.queue.clone()).collect();
                let sink = self.sink.clone();
                let call = calls.spawn(async move {
                    let events: Vec<StampedEvent> = heads.iter().map(|h| h.event.clone()).collect();
                    let started = Instant::now();
                    let delivered = sink.deliver(&events).await;
                    CallDone {
                        heads,
                        delivered,
                        took: started.elapsed(),
                    }
                });
                call_keys.insert(call.id(), queues);
            }
            if let Some(soonest) = schedule.next_retry(now) {
                next_wake = next_wake.min(soonest);
            }
            self.metrics
                .delivery_paused
                .set(i64::from(schedule.degraded(now)));

            let done = tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                done = calls.join_next_with_id(), if !calls.is_empty() => done,
                _ = self.wake.notified() => continue,
                _ = tokio::time::sleep_until(next_wake) => continue,
            };
            let done = match done {
                Some(Ok((id, done))) => {
                    call_keys.remove(&id);
                    done
                }
                Some(Err(e)) => {
                    let queues = call_keys.remove(&e.id()).unwrap_or_default();
                    tracing::error!(error = %e, keys = queues.len(), "a connector call failed without results; its keys will retry");
                    schedule.call_lost(&queues, Instant::now());
                    continue;
                }
                None => continue,
            };
            self.metrics
                .erp_latency_seconds
                .observe(done.took.as_secs_f64());
            let traces = self.note_attempts(&done);
            let settled =
                schedule.call_finished(&done.heads, done.delivered.results, Instant::now());
            if let Err(e) = self.record(settled, done.delivered.commit, traces).await {
                break Err(e);
            }
        };
        calls.abort_all();
        result
    }

    async fn read_heads(
        &self,
        schedule: &Schedule,
        capabilities: Capabilities,
        limit: usize,
        now: Instant,
    ) -> Result<Vec<Head>, EngineError> {
        let outbox = self.outbox.clone();
        if capabilities.arrival_order {
            if schedule.held_back(SINGLE_QUEUE, now) {
                return Ok(Vec::new());
            }
            let pending = tokio::task::spawn_blocking(move || outbox.pending(limit))
                .await
                .map_err(EngineError::Worker)?
                .map_err(EngineError::Read)?;
            return Ok(pending
                .into_iter()
                .map(|(outbox_seq, event)| Head {
                    queue: SINGLE_QUEUE.to_vec(),
                    outbox_seq,
                    event,
                })
                .collect());
        }
        let skip = schedule.held_back_set(now);
        tokio::task::spawn_blocking(move || outbox.heads(limit, &|queue| skip.contains(queue)))
            .await
            .map_err(EngineError::Worker)?
            .map_err(EngineError::Read)
    }

    /// Notes each event's attempt in this call; returns the traces of the events it finished.
    fn note_attempts(&self, done: &CallDone) -> Vec<EventTrace> {
        if self.trace_retention.is_none() {
            return Vec::new();
        }
        let finished_at_ms = now_ms();
        let latency_ms = done.took.as_millis() as u64;
        let mut traces = Vec::new();
        for (head, result) in done.heads.iter().zip(&done.delivered.results) {
            let (kind, detail, finished) = match result {
                Delivery::Posted { erp_ref } => {
                    (AttemptResult::Posted, erp_ref, Some(Finished::Posted))
                }
                Delivery::Permanent { reason } => {
                    (AttemptResult::Refused, reason, Some(Finished::DeadLettered))
                }
                Delivery::Waiting { reason, .. } => (AttemptResult::Waiting, reason, None),
                Delivery::Transient { reason, .. } => (AttemptResult::Transient, reason, None),
                Delivery::Throttled { reason, .. } => (AttemptResult::Throttled, reason, None),
            };
            let event = &head.event;
            let attempt = Attempt {
                at_ms: finished_at_ms - latency_ms as i64,
                latency_ms,
                result: kind,
                detail: detail.clone(),
            };
            let Some(finished) = finished else {
                self.attempts.push(&event.site, &event.event.id, attempt);
                continue;
            };
            let mut attempts = self.attempts.take(&event.site, &event.event.id);
            attempts.push(attempt);
            traces.push(EventTrace {
                event: event.clone(),
                finished,
                finished_at_ms,
                erp_ref: (finished == Finished::Posted).then(|| detail.clone()),
                reason: (finished == Finished::DeadLettered).then(|| detail.clone()),
                attempts,
            });
        }
        traces
    }

    /// Makes a call's posted and refused events durable as such, then tells their sites.
    async fn record(
        &self,
        settled: Settled,
        commit: Option<CommitToken>,
        traces: Vec<EventTrace>,
    ) -> Result<(), EngineError> {
        self.metrics.delivery_retries.inc_by(settled.retried);
        if settled.posted.is_empty() && settled.dead.is_empty() && commit.is_none() {
            return Ok(());
        }
        let (n_posted, n_dead) = (settled.posted.len() as u64, settled.dead.len() as u64);
        let done = Arc::new((settled.posted, settled.dead));
        // The ERP has these events: they are recorded as soon as the outbox can take it.
        // Until then nothing else is delivered, and a relay stopped meanwhile delivers them
        // again (connectors are idempotent by event id).
        let mut wait = OUTBOX_RETRY_MIN;
        loop {
            let (outbox, done) = (self.outbox.clone(), done.clone());
            let recorded =
                tokio::task::spawn_blocking(move || outbox.complete(&done.0, &done.1, commit))
                    .await
                    .map_err(EngineError::Worker)?;
            match recorded {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "delivered events cannot be recorded yet; retrying");
                    self.heartbeat.beat();
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(OUTBOX_RETRY_MAX);
                }
                Err(e) => return Err(EngineError::Complete(e)),
            }
        }
        self.metrics.events_delivered.inc_by(n_posted);
        self.metrics.events_dead_lettered.inc_by(n_dead);
        for site_outcomes in settled.outcomes {
            // Outcomes are information for the warehouse; a full queue drops them.
            let _ = self.outcomes.try_send(site_outcomes);
        }
        if let (Some(retention), false) = (self.trace_retention, traces.is_empty()) {
            let forget_before_ms = now_ms() - retention.as_millis() as i64;
            let outbox = self.outbox.clone();
            let kept = tokio::task::spawn_blocking(move || {
                outbox.record_traces(&traces, forget_before_ms)
            })
            .await;
            // Diagnosis only: delivery goes on without it, whatever went wrong.
            match kept {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the traces of delivered events could not be kept")
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the traces of delivered events could not be kept")
                }
            }
        }
        Ok(())
    }
}
