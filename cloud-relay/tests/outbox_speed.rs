use backhaul_events::event::parse_event;
use backhaul_events::{BatchEntry, BatchFrame, Epoch};
use backhaul_relay::outbox::{Outbox, OutboxOptions};
use std::time::Instant;

fn event_json(id: &str, seq: u64) -> String {
    let order = 1000 + seq % 9000;
    let line = 1 + seq % 20;
    let sku = seq % 500;
    let aisle = seq % 40;
    format!(
        r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T10:15:00.123Z","device":"wms","order":"SO-{order}","line":{line},"sku":"SKU-{sku:04}","qty":"2","uom":"EA","location":"A-{aisle:02}-03","lot":"LOT-2026-47","serial":"SN-000000000000000000000000000000000000000000000000000000000000000000000000000000000000000"}}"#
    )
}

#[test]
#[ignore]
fn store_speed() {
    let random = std::env::var("RANDOM_IDS").is_ok();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(
        dir.path(),
        OutboxOptions {
            cache_size: 64 << 20,
            dedup_ids: 1_000_000,
            per_key_queues: std::env::var("PER_KEY").is_ok(),
        },
    )
    .unwrap();
    let total = 1_000_000u64;
    let per_batch = 2000u64;
    let per_commit = 8;
    let mut seq = 1;
    let start = Instant::now();
    let mut last = Instant::now();
    let mut spent = std::time::Duration::ZERO;
    while seq <= total {
        let mut batches = Vec::new();
        for _ in 0..per_commit {
            let first = seq;
            let events: Vec<BatchEntry> = (0..per_batch)
                .map(|i| {
                    let s = first + i;
                    let id = if random {
                        format!("{:016x}", (s.wrapping_mul(0x9E3779B97F4A7C15)))
                    } else {
                        format!("drain-{s:08}")
                    };
                    BatchEntry {
                        seq: s,
                        received_at_ms: 0,
                        event: parse_event(event_json(&id, s).as_bytes()).unwrap(),
                    }
                })
                .collect();
            seq += per_batch;
            batches.push(BatchFrame {
                site: "wh".into(),
                epoch: Epoch(1),
                first_seq: first,
                last_seq: seq - 1,
                events,
                signature: None,
            });
        }
        let t = Instant::now();
        outbox.store(&batches).unwrap();
        spent += t.elapsed();
        if last.elapsed().as_secs() >= 2 || seq > total {
            println!(
                "{seq}: {:.2} us/event so far",
                spent.as_secs_f64() * 1e6 / (seq - 1) as f64
            );
            last = Instant::now();
        }
    }
    println!(
        "total store time {:?} for {total} ({:.0} ev/s), wall {:?}",
        spent,
        total as f64 / spent.as_secs_f64(),
        start.elapsed()
    );
}
