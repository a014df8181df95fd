//! The delivery engine on its own: its decisions ([`Schedule`]) with time passed in, then the
//! whole engine over a real outbox with a connector that answers as a test tells it (per-key
//! order, a waiting key that holds back nothing else, a throttle, a call that panics).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backhaul_events::event::parse_event;
use backhaul_events::service::Heartbeat;
use backhaul_events::{BatchEntry, BatchFrame, Epoch, StampedEvent};
use backhaul_relay::config::DeliveryConfig;
use backhaul_relay::connector::{Capabilities, Delivered, Delivery, Sink};
use backhaul_relay::engine::{Engine, Schedule};
use backhaul_relay::metrics::RelayMetrics;
use backhaul_relay::outbox::{Head, OutboxOptions, RedbOutbox, queue_of};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

fn config() -> DeliveryConfig {
    DeliveryConfig {
        concurrency: 4,
        max_batch: 10,
        rate_per_sec: 1000.0,
        burst: 1000,
        retry_min_ms: 100,
        retry_max_ms: 2000,
        pause_after_failures: 2,
    }
}

fn capabilities() -> Capabilities {
    Capabilities {
        max_batch: 10,
        max_concurrency: 4,
        arrival_order: false,
        rate_limited: true,
    }
}

/// A pick of order `order` (its ordering key).
fn event(id: &str, order: &str, seq: u64) -> StampedEvent {
    let json = format!(
        r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T10:15:00Z","order":"{order}","sku":"S","qty":1}}"#
    );
    StampedEvent {
        site: "wh".into(),
        epoch: Epoch(1),
        seq,
        received_at_ms: 0,
        event: parse_event(json.as_bytes()).expect("a valid event"),
    }
}

fn head(id: &str, order: &str, seq: u64) -> Head {
    let event = event(id, order, seq);
    Head {
        queue: queue_of(&event),
        outbox_seq: seq,
        event,
    }
}

fn waiting() -> Delivery {
    Delivery::Waiting {
        reason: "waiting for stock".into(),
        retry_after: Duration::from_secs(60),
    }
}

fn posted() -> Delivery {
    Delivery::Posted {
        erp_ref: "r".into(),
    }
}

fn transient() -> Delivery {
    Delivery::Transient {
        reason: "HTTP 500".into(),
        retry_after: None,
    }
}

#[test]
fn a_waiting_key_holds_back_only_itself_and_never_pauses_the_erp() {
    let now = Instant::now();
    let mut schedule = Schedule::new(config(), capabilities(), now);
    let (a, b) = (head("a1", "A", 1), head("b1", "B", 2));
    schedule.call_started(&[a.clone(), b.clone()]);
    assert!(schedule.held_back(&a.queue, now) && schedule.held_back(&b.queue, now));
    let settled = schedule.call_finished(&[a.clone(), b.clone()], vec![waiting(), posted()], now);
    assert_eq!((settled.posted.len(), settled.retried), (1, 1));
    assert!(schedule.held_back(&a.queue, now + Duration::from_secs(59)));
    assert!(!schedule.held_back(&a.queue, now + Duration::from_secs(61)));
    assert!(!schedule.held_back(&b.queue, now));
    // The waiting key retried alone, again and again: the ERP answers each time, so nothing
    // pauses and calls of full size go on for every other key.
    for round in 1..=5 {
        let at = now + Duration::from_secs(61 * round);
        schedule.call_started(std::slice::from_ref(&a));
        schedule.call_finished(std::slice::from_ref(&a), vec![waiting()], at);
        assert!(!schedule.degraded(at), "round {round}");
        assert_eq!(schedule.next_call(0, at), Ok(10));
    }
}

#[test]
fn a_throttle_pauses_every_key_for_its_hint_then_one_event_probes() {
    let now = Instant::now();
    let mut schedule = Schedule::new(config(), capabilities(), now);
    let (a, b) = (head("a1", "A", 1), head("b1", "B", 2));
    schedule.call_started(std::slice::from_ref(&a));
    let throttled = Delivery::Throttled {
        reason: "HTTP 429".into(),
        retry_after: Some(Duration::from_secs(30)),
    };
    schedule.call_finished(std::slice::from_ref(&a), vec![throttled], now);
    assert!(schedule.paused(now + Duration::from_secs(29)));
    assert_eq!(
        schedule.next_call(0, now + Duration::from_secs(29)),
        Err(Some(now + Duration::from_secs(30)))
    );
    // After the pause: one call of one event at a time until the ERP answers.
    let later = now + Duration::from_secs(31);
    assert_eq!(schedule.next_call(0, later), Ok(1));
    assert_eq!(schedule.next_call(1, later), Err(None));
    schedule.call_started(std::slice::from_ref(&b));
    schedule.call_finished(std::slice::from_ref(&b), vec![posted()], later);
    assert!(!schedule.degraded(later));
    assert_eq!(schedule.next_call(3, later), Ok(10));
}

#[test]
fn calls_whose_every_event_fails_pause_after_the_configured_number_then_probe() {
    let now = Instant::now();
    let mut schedule = Schedule::new(config(), capabilities(), now);
    let heads = [head("a1", "A", 1), head("b1", "B", 2)];
    schedule.call_started(&heads);
    schedule.call_finished(&heads, vec![transient(), transient()], now);
    assert!(
        !schedule.degraded(now),
        "one failed call is not yet an outage"
    );
    let heads = [head("c1", "C", 3)];
    schedule.call_started(&heads);
    schedule.call_finished(&heads, vec![transient()], now);
    assert!(
        schedule.paused(now),
        "the second failed call in a row pauses"
    );
    // A call where one event fails and another is posted says the ERP answers.
    let mut fresh = Schedule::new(config(), capabilities(), now);
    let heads = [head("a1", "A", 1), head("b1", "B", 2)];
    for _ in 0..5 {
        fresh.call_started(&heads);
        fresh.call_finished(&heads, vec![transient(), posted()], now);
    }
    assert!(!fresh.degraded(now));
}

#[test]
fn a_key_backs_off_longer_after_each_failure_within_the_cap() {
    let now = Instant::now();
    let mut schedule = Schedule::new(config(), capabilities(), now);
    let (a, b) = (head("a1", "A", 1), head("b1", "B", 2));
    let mut waits = Vec::new();
    for _ in 0..8 {
        schedule.call_started(&[a.clone(), b.clone()]);
        schedule.call_finished(&[a.clone(), b.clone()], vec![transient(), posted()], now);
        let until = schedule.next_retry(now).expect("a retry is due");
        waits.push((until - now).as_millis() as u64);
    }
    // 100 ms doubling, each between half and all of its base, capped at 2 s.
    for (wait, base) in waits
        .iter()
        .zip([100, 200, 400, 800, 1600, 2000, 2000, 2000])
    {
        assert!((base / 2..=base).contains(wait), "{waits:?}");
    }
}

#[test]
fn a_lost_call_frees_only_its_own_keys() {
    let now = Instant::now();
    let mut schedule = Schedule::new(config(), capabilities(), now);
    let (a, b) = (head("a1", "A", 1), head("b1", "B", 2));
    schedule.call_started(std::slice::from_ref(&a));
    schedule.call_started(std::slice::from_ref(&b));
    schedule.call_lost(std::slice::from_ref(&a.queue), now);
    assert!(
        schedule.held_back(&b.queue, now + Duration::from_secs(60)),
        "B's call is still in flight"
    );
    assert!(!schedule.held_back(&a.queue, now + Duration::from_secs(60)));
}

#[test]
fn the_rate_limit_bounds_each_call_and_a_local_file_has_none() {
    let now = Instant::now();
    let limited = DeliveryConfig {
        rate_per_sec: 5.0,
        burst: 3,
        ..config()
    };
    let mut schedule = Schedule::new(limited.clone(), capabilities(), now);
    assert_eq!(schedule.next_call(0, now), Ok(3));
    schedule.call_started(&[head("a", "A", 1), head("b", "B", 2), head("c", "C", 3)]);
    assert!(matches!(schedule.next_call(1, now), Err(Some(_))));
    let file = Capabilities {
        rate_limited: false,
        max_batch: 5000,
        max_concurrency: 1,
        arrival_order: true,
    };
    let mut unlimited = Schedule::new(limited, file, now);
    assert_eq!(unlimited.next_call(0, now), Ok(5000));
    assert_eq!(unlimited.next_call(1, now), Err(None));
}

// ----- the whole engine over a real outbox -----------------------------------------------------

/// What the stand-in connector answers for an event: by id, a list of answers used in turn
/// (the last one repeats); `Posted` when the id has none. "panic" makes the call panic.
#[derive(Default)]
struct Script {
    answers: Mutex<HashMap<String, Vec<Option<Delivery>>>>,
    /// Every event in a call, in the order calls were made: (id, answer kind).
    calls: Mutex<Vec<(String, &'static str)>>,
    in_flight: Mutex<HashSet<String>>,
    overlaps: Mutex<Vec<String>>,
}

struct ScriptedSink(Arc<Script>);

impl Sink for ScriptedSink {
    fn name(&self) -> &'static str {
        "scripted"
    }

    fn capabilities(&self, configured: &DeliveryConfig) -> Capabilities {
        Capabilities {
            max_batch: configured.max_batch,
            max_concurrency: configured.concurrency,
            arrival_order: false,
            rate_limited: true,
        }
    }

    async fn deliver(&self, events: &[StampedEvent]) -> Delivered {
        let script = &self.0;
        let mut answers = Vec::new();
        for event in events {
            let key = event.ordering_key().to_string();
            if !script.in_flight.lock().unwrap().insert(key.clone()) {
                script.overlaps.lock().unwrap().push(key);
            }
            let mut scripted = script.answers.lock().unwrap();
            answers.push(match scripted.get_mut(&event.event.id) {
                Some(list) if list.len() > 1 => list.remove(0),
                Some(list) => list.first().cloned().flatten(),
                None => Some(posted()),
            });
        }
        let panics = answers.iter().any(Option::is_none);
        for (event, answer) in events.iter().zip(&answers) {
            let kind = match answer {
                None => "panic",
                // The call's other events: their answers never reach the engine.
                Some(_) if panics => "lost",
                Some(Delivery::Posted { .. }) => "posted",
                Some(Delivery::Waiting { .. }) => "waiting",
                Some(Delivery::Transient { .. }) => "transient",
                Some(Delivery::Throttled { .. }) => "throttled",
                Some(Delivery::Permanent { .. }) => "permanent",
            };
            script
                .calls
                .lock()
                .unwrap()
                .push((event.event.id.clone(), kind));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        for event in events {
            script
                .in_flight
                .lock()
                .unwrap()
                .remove(&event.ordering_key().to_string());
        }
        assert!(!panics, "the script asked this call to panic");
        answers.into_iter().flatten().collect::<Vec<_>>().into()
    }
}

struct Running {
    outbox: Arc<RedbOutbox>,
    script: Arc<Script>,
    stop: CancellationToken,
    engine: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

/// An outbox holding `events` (id, order) as one batch, and an engine draining it.
fn run_engine(events: &[(&str, &str)], script: Script, delivery: DeliveryConfig) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let outbox = RedbOutbox::open(
        dir.path(),
        OutboxOptions {
            cache_size: 1 << 20,
            dedup_ids: 10_000,
            frontier_events: 10_000,
            max_bytes: 1 << 30,
            keep_batches: true,
        },
    )
    .unwrap();
    let entries: Vec<BatchEntry> = events
        .iter()
        .enumerate()
        .map(|(i, (id, order))| BatchEntry {
            seq: i as u64 + 1,
            received_at_ms: 0,
            event: event(id, order, i as u64 + 1).event,
        })
        .collect();
    outbox
        .store(&[BatchFrame {
            site: "wh".into(),
            epoch: Epoch(1),
            acked_through: 0,
            first_seq: 1,
            last_seq: entries.len() as u64,
            events: entries,
            signature: None,
        }])
        .unwrap();
    let script = Arc::new(script);
    let (outcomes, mut outcomes_rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while outcomes_rx.recv().await.is_some() {} });
    let stop = CancellationToken::new();
    let engine = Engine {
        outbox: outbox.clone(),
        sink: Arc::new(ScriptedSink(script.clone())),
        config: delivery,
        metrics: RelayMetrics::new(),
        outcomes,
        wake: Arc::new(tokio::sync::Notify::new()),
        heartbeat: Heartbeat::detached("engine under test"),
        attempts: Arc::default(),
        trace_retention: Some(Duration::from_secs(3600)),
    };
    let engine_stop = stop.clone();
    let engine = tokio::spawn(async move {
        engine.run(engine_stop).await.expect("the engine runs");
    });
    Running {
        outbox,
        script,
        stop,
        engine,
        _dir: dir,
    }
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Running {
    fn posted_order(&self) -> Vec<String> {
        self.script
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, kind)| *kind == "posted")
            .map(|(id, _)| id.clone())
            .collect()
    }

    async fn stop(self) {
        self.stop.cancel();
        self.engine.await.unwrap();
        assert_eq!(
            self.script.overlaps.lock().unwrap().clone(),
            Vec::<String>::new()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_pick_holds_back_only_its_order_while_sixty_others_are_posted() {
    let mut events = vec![("wait-1", "ORD-W"), ("wait-2", "ORD-W")];
    let others: Vec<(String, String)> = (0..60)
        .map(|i| (format!("other-{i}"), format!("ORD-{}", i % 20)))
        .collect();
    events.extend(
        others
            .iter()
            .map(|(id, order)| (id.as_str(), order.as_str())),
    );
    let script = Script::default();
    script
        .answers
        .lock()
        .unwrap()
        .insert("wait-1".into(), vec![Some(waiting())]);
    let running = run_engine(&events, script, config());
    // Only the waiting order's two events stay.
    wait_until("the other 60 events are posted", || {
        running.outbox.depth() == 2
    })
    .await;
    let posted = running.posted_order();
    assert_eq!(posted.len(), 60, "{posted:?}");
    assert!(
        !posted.contains(&"wait-2".to_string()),
        "wait-2 went before wait-1"
    );
    // Per-key order among the others: each order's events in the order they were logged.
    for order in 0..20 {
        let ids: Vec<&String> = posted
            .iter()
            .filter(|id| {
                id.strip_prefix("other-")
                    .and_then(|n| n.parse::<usize>().ok())
                    .is_some_and(|n| n % 20 == order)
            })
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_by_key(|id| id[6..].parse::<usize>().unwrap_or(0));
        assert_eq!(ids, sorted, "order ORD-{order}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_keys_retry_in_order_and_every_event_is_posted_once() {
    let events: Vec<(String, String)> = (0..40)
        .map(|i| (format!("e-{i}"), format!("ORD-{}", i % 4)))
        .collect();
    let refs: Vec<(&str, &str)> = events
        .iter()
        .map(|(id, order)| (id.as_str(), order.as_str()))
        .collect();
    let script = Script::default();
    {
        let mut answers = script.answers.lock().unwrap();
        // The head of ORD-1 fails twice, then goes; one event of ORD-2 fails its first call
        // by panicking.
        answers.insert(
            "e-1".into(),
            vec![Some(transient()), Some(transient()), Some(posted())],
        );
        answers.insert("e-6".into(), vec![None, Some(posted())]);
    }
    let running = run_engine(&refs, script, config());
    wait_until("every event is posted", || running.outbox.depth() == 0).await;
    let posted = running.posted_order();
    assert_eq!(posted.len(), 40, "each event posted once: {posted:?}");
    for order in 0..4 {
        let ids: Vec<usize> = posted
            .iter()
            .filter_map(|id| id[2..].parse::<usize>().ok())
            .filter(|n| n % 4 == order)
            .collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "order ORD-{order}");
    }
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_holds_back_every_key_until_its_hint_has_passed() {
    let events = [("t-1", "A"), ("t-2", "B"), ("t-3", "C")];
    let script = Script::default();
    script.answers.lock().unwrap().insert(
        "t-1".into(),
        vec![
            Some(Delivery::Throttled {
                reason: "HTTP 429".into(),
                retry_after: Some(Duration::from_millis(400)),
            }),
            Some(posted()),
        ],
    );
    let delivery = DeliveryConfig {
        max_batch: 1,
        concurrency: 1,
        ..config()
    };
    let running = run_engine(&events, script, delivery);
    let started = Instant::now();
    wait_until("every event is posted", || running.outbox.depth() == 0).await;
    let calls = running.script.calls.lock().unwrap().clone();
    assert_eq!(calls[0], ("t-1".to_string(), "throttled"));
    assert_eq!(calls.len(), 4, "{calls:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "the others went during the throttle: {calls:?}"
    );
    running.stop().await;
}
