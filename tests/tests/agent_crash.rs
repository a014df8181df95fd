//! The promise under `kill -9`: every event the agent acknowledged is in its log after any
//! number of crashes, exactly once.
//!
//! Scanners (MQTT 3.1.1 and 5, QoS 1, one message in flight each) publish events with unique
//! ids and record every id whose PUBACK arrived; a WMS posts batches over HTTP and records
//! every batch answered 202. The agent is killed with SIGKILL at random moments and restarted
//! on the same state directory; the producers reconnect and re-send what they were waiting
//! on, as a real producer keeps an event until it is acknowledged.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use backhaul_tests::agent::AgentProcess;
use backhaul_tests::events::{assert_stored_as_sent, id_of, pick, to_bytes, unique_id};
use backhaul_tests::mqtt::{V4Client, V5Client, v4_options, v5_options};
use backhaul_tests::poll_until;
use rand::{RngExt, SeedableRng};
use serde_json::Value;

const PUBLISHERS: usize = 4;
const KILLS: usize = 12;
const WMS_BATCH: usize = 20;

/// What one producer saw.
#[derive(Default)]
struct Tally {
    /// The scanner's device (the topic's), `None` for the WMS.
    device: Option<String>,
    /// Every event whose acknowledgement arrived, in order.
    acked: Vec<Value>,
    /// Publishes that failed because the connection went away (a kill).
    failed_publishes: u64,
    connects: u64,
}

/// A scanner speaking MQTT 3.1.1 or 5.
enum Scanner {
    V4(Box<V4Client>),
    V5(Box<V5Client>),
}

impl Scanner {
    fn connect(addr: SocketAddr, device: &str, v5: bool) -> Option<Scanner> {
        if v5 {
            V5Client::connect(v5_options(addr, device))
                .ok()
                .map(|(c, _)| Scanner::V5(Box::new(c)))
        } else {
            V4Client::connect(v4_options(addr, device))
                .ok()
                .map(|(c, _)| Scanner::V4(Box::new(c)))
        }
    }

    /// True only when the agent acknowledged the event as stored.
    fn publish(&mut self, topic: &str, payload: Vec<u8>) -> bool {
        match self {
            Scanner::V4(c) => c.publish(topic, 1, payload).is_ok(),
            Scanner::V5(c) => c
                .publish(topic, 1, payload)
                .is_ok_and(|ack| ack.is_success()),
        }
    }
}

fn scanner(
    index: usize,
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    progress: Arc<AtomicU64>,
) -> Tally {
    let device = format!("crash-scanner-{index}");
    let topic = format!("scans/{device}");
    let v5 = index % 2 == 1;
    let mut tally = Tally {
        device: Some(device.clone()),
        ..Tally::default()
    };
    // The event waiting for its acknowledgement; kept across reconnects.
    let mut current: Option<Value> = None;
    while !stop.load(Ordering::Relaxed) {
        let Some(mut client) = Scanner::connect(addr, &device, v5) else {
            // The agent is down: try again shortly, like a scanner's reconnect loop.
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        tally.connects += 1;
        while !stop.load(Ordering::Relaxed) {
            let event = current
                .get_or_insert_with(|| pick(&unique_id(&format!("k{index}")), "SO-CRASH"))
                .clone();
            if client.publish(&topic, to_bytes(&event)) {
                tally.acked.push(event);
                current = None;
                progress.fetch_add(1, Ordering::Relaxed);
            } else {
                tally.failed_publishes += 1;
                break;
            }
        }
    }
    tally
}

/// The WMS: posts batches over HTTP; a batch answered 202 is acknowledged, event by event.
fn wms(http_url: String, stop: Arc<AtomicBool>, progress: Arc<AtomicU64>) -> Tally {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    let url = format!("{http_url}/v1/events");
    let mut tally = Tally::default();
    let mut current: Option<Vec<Value>> = None;
    while !stop.load(Ordering::Relaxed) {
        let batch = current
            .get_or_insert_with(|| {
                (0..WMS_BATCH)
                    .map(|_| pick(&unique_id("kw"), "SO-WMS"))
                    .collect()
            })
            .clone();
        match client.post(&url).json(&batch).send() {
            Ok(response) => {
                let status = response.status();
                let Ok(body) = response.json::<Value>() else {
                    // Killed while answering: not a complete answer, so send the batch again.
                    tally.failed_publishes += 1;
                    continue;
                };
                assert_eq!(status, 202, "{body}");
                for result in body["results"].as_array().unwrap() {
                    let outcome = result["status"].as_str().unwrap();
                    assert!(outcome == "accepted" || outcome == "duplicate", "{result}");
                }
                tally.acked.extend(batch);
                current = None;
                progress.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                // The agent died under the request, or is still down: send the batch again.
                tally.failed_publishes += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    tally
}

#[test]
fn acknowledged_events_survive_repeated_kill_9() {
    let started = Instant::now();
    let seed = std::env::var("BACKHAUL_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("kill schedule seed {seed} (set BACKHAUL_CRASH_SEED={seed} to repeat it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut agent = AgentProcess::start_default();
    let addr = agent.mqtt_addr();
    let stop = Arc::new(AtomicBool::new(false));
    // One progress counter per scanner, and the WMS's last.
    let progress: Vec<Arc<AtomicU64>> = (0..=PUBLISHERS)
        .map(|_| Arc::new(AtomicU64::new(0)))
        .collect();
    let mut threads: Vec<_> = (0..PUBLISHERS)
        .map(|i| {
            let stop = stop.clone();
            let progress = progress[i].clone();
            std::thread::spawn(move || scanner(i, addr, stop, progress))
        })
        .collect();
    threads.push({
        let (stop, progress, url) = (stop.clone(), progress[PUBLISHERS].clone(), agent.http_url());
        std::thread::spawn(move || wms(url, stop, progress))
    });
    let counts = || -> Vec<u64> { progress.iter().map(|p| p.load(Ordering::Relaxed)).collect() };
    // Every scanner is publishing before the first kill.
    poll_until(Duration::from_secs(20), || {
        counts().iter().all(|&n| n > 0).then_some(())
    })
    .expect("every producer got a first acknowledgement");

    let mut acked_at_kill = Vec::new();
    for _ in 0..KILLS {
        // Pacing of the random kill schedule, not synchronisation.
        std::thread::sleep(Duration::from_millis(rng.random_range(100..=600)));
        agent.kill9();
        let now = counts();
        acked_at_kill
            .push(now[..PUBLISHERS].iter().sum::<u64>() + now[PUBLISHERS] * WMS_BATCH as u64);
        agent.restart();
    }
    // Every producer comes back and gets acknowledgements from the last incarnation too.
    let after_last = counts();
    poll_until(Duration::from_secs(30), || {
        counts()
            .iter()
            .zip(&after_last)
            .all(|(now, then)| *now >= then + 5)
            .then_some(())
    })
    .expect("every producer is acknowledged again after the last restart");
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<Tally> = threads.into_iter().map(|t| t.join().unwrap()).collect();

    // The log after the crashes: each id once, sequence numbers strictly increasing.
    let log = agent.log_events();
    let mut stored: HashMap<String, Value> = HashMap::new();
    let mut duplicated = Vec::new();
    let mut last_seq = 0;
    for record in &log {
        let seq = record["seq"].as_u64().unwrap();
        assert!(seq > last_seq, "seq {seq} after {last_seq}");
        last_seq = seq;
        let id = id_of(record).to_string();
        if stored.insert(id.clone(), record.clone()).is_some() {
            duplicated.push(id);
        }
    }

    let mut acked_total = 0;
    let mut lost = Vec::new();
    for tally in &tallies {
        for event in &tally.acked {
            acked_total += 1;
            match stored.get(id_of(event)) {
                Some(record) => assert_stored_as_sent(event, record, tally.device.as_deref()),
                None => lost.push(id_of(event).to_string()),
            }
        }
    }
    // A scanner re-sends its unacknowledged event until it is acknowledged (as a duplicate
    // when it was stored before the kill took the PUBACK away), so in the end the log holds
    // exactly the acknowledged ids.
    let acked_ids: std::collections::HashSet<&str> = tallies
        .iter()
        .flat_map(|t| t.acked.iter().map(id_of))
        .collect();
    assert_eq!(acked_ids.len(), acked_total, "each id is acknowledged once");
    let unacked_in_log: Vec<&String> = stored
        .keys()
        .filter(|id| !acked_ids.contains(id.as_str()))
        .collect();
    let resent: u64 = tallies.iter().map(|t| t.failed_publishes).sum();
    println!(
        "crash test: {KILLS} kills (SIGKILL) in {:.1} s, {PUBLISHERS} scanners (3.1.1 and 5, QoS 1) \
         and a WMS (HTTP, {WMS_BATCH} per request), {acked_total} acknowledged ids ({} over \
         HTTP), {} events in the log, {resent} publishes and posts cut off by a kill and re-sent, \
         {} MQTT connects, acknowledged so far at each kill {acked_at_kill:?}; lost {}, \
         duplicated {}, in the log but never acknowledged {}",
        started.elapsed().as_secs_f64(),
        tallies[PUBLISHERS].acked.len(),
        stored.len(),
        tallies.iter().map(|t| t.connects).sum::<u64>(),
        lost.len(),
        duplicated.len(),
        unacked_in_log.len(),
    );
    assert!(lost.is_empty(), "acknowledged but not in the log: {lost:?}");
    assert!(duplicated.is_empty(), "in the log twice: {duplicated:?}");
    assert!(
        unacked_in_log.is_empty(),
        "in the log, never acknowledged: {unacked_in_log:?}"
    );
    assert_eq!(agent.starts() as usize, KILLS + 1);
    // The restarts happened while events were flowing, not after they stopped.
    assert!(
        acked_at_kill.windows(2).filter(|w| w[1] > w[0]).count() >= KILLS / 2,
        "events were acknowledged between kills: {acked_at_kill:?}"
    );
}
