//! The durable log on its own: sequence numbers, deduplication, acknowledged deletion, the
//! quota, reopening, refusing a damaged file, and giving disk space back.

use std::time::{Duration, Instant};

use backhaul_agent::log::{Appended, EventLog, LogError, LogOptions, RejectRecord};
use backhaul_events::event::parse_event;
use backhaul_events::{Event, Violation};

fn options(dir: &std::path::Path) -> LogOptions {
    LogOptions {
        dir: dir.to_path_buf(),
        max_bytes: 64 << 20,
        cache_size: 8 << 20,
        group_commit_delay: Duration::from_millis(1),
        group_commit_max_events: 4096,
        max_rejects: 3,
        tally_days: 30,
    }
}

fn event(id: &str) -> Event {
    parse_event(
        format!(
            r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T10:15:00Z","order":"SO-1",
               "sku":"SKU-1","qty":"1.50","location":"A-01","attrs":{{"pad":"{}"}}}}"#,
            "x".repeat(100)
        )
        .as_bytes(),
    )
    .expect("valid test event")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn appends_get_sequence_numbers_and_duplicates_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(options(dir.path())).unwrap();
    let rt = runtime();
    let first = rt
        .block_on(log.append(vec![event("a"), event("b"), event("a")]))
        .unwrap();
    assert_eq!(
        first,
        vec![
            Appended::Stored { seq: 1 },
            Appended::Stored { seq: 2 },
            Appended::Duplicate { seq: 1 }
        ]
    );
    let again = rt
        .block_on(log.append(vec![event("b"), event("c")]))
        .unwrap();
    assert_eq!(
        again,
        vec![Appended::Duplicate { seq: 2 }, Appended::Stored { seq: 3 }]
    );
    let read = log.read_from(2, 10, usize::MAX).unwrap();
    let ids: Vec<(u64, &str)> = read
        .iter()
        .map(|(s, r)| (*s, r.event.id.as_str()))
        .collect();
    assert_eq!(ids, vec![(2, "b"), (3, "c")]);
    assert_eq!(read[0].1.event, event("b"));
    assert_eq!(log.stats().backlog_events, 3);
}

#[test]
fn acknowledged_events_are_deleted_and_their_ids_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(options(dir.path())).unwrap();
    let rt = runtime();
    rt.block_on(log.append((0..10).map(|i| event(&format!("e{i}"))).collect()))
        .unwrap();
    let bytes_before = log.stats().backlog_bytes;
    assert_eq!(rt.block_on(log.ack_through(4)).unwrap(), 4);
    let stats = log.stats();
    assert_eq!(stats.backlog_events, 6);
    assert_eq!(stats.oldest_seq, Some(5));
    assert!(stats.backlog_bytes < bytes_before);
    assert_eq!(log.read_from(0, 100, usize::MAX).unwrap()[0].0, 5);
    // A deleted id may arrive again (a late retransmission); it is a new event to the log and
    // the relay deduplicates it.
    let again = rt.block_on(log.append(vec![event("e0")])).unwrap();
    assert_eq!(again, vec![Appended::Stored { seq: 11 }]);
}

#[test]
fn the_quota_refuses_new_events_and_recovers_when_acknowledged_ones_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.max_bytes = 1 << 20;
    let log = EventLog::open(opts).unwrap();
    let rt = runtime();
    let mut stored = 0u64;
    let mut refused = false;
    for chunk in 0..1000 {
        let events = (0..100).map(|i| event(&format!("q{chunk}-{i}"))).collect();
        let outcome = rt.block_on(log.append(events)).unwrap();
        stored += outcome
            .iter()
            .filter(|o| matches!(o, Appended::Stored { .. }))
            .count() as u64;
        if outcome.contains(&Appended::QuotaExceeded) {
            refused = true;
            break;
        }
    }
    assert!(refused, "the quota was never reached");
    let stats = log.stats();
    assert!(stats.quota_exceeded);
    assert!(stats.backlog_bytes <= 1 << 20);
    assert_eq!(stats.backlog_events, stored);
    // Nothing acknowledged was deleted to make room.
    assert_eq!(
        log.read_from(0, usize::MAX, usize::MAX).unwrap().len() as u64,
        stored
    );

    rt.block_on(log.ack_through(stored / 2)).unwrap();
    assert!(!log.stats().quota_exceeded);
    let outcome = rt.block_on(log.append(vec![event("after")])).unwrap();
    assert!(matches!(outcome[0], Appended::Stored { .. }));
}

#[test]
fn reopening_keeps_epoch_sequence_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let epoch = {
        let log = EventLog::open(options(dir.path())).unwrap();
        rt.block_on(log.append(vec![event("a"), event("b")]))
            .unwrap();
        rt.block_on(log.ack_through(1)).unwrap();
        log.epoch()
    };
    // The writer thread lets go of the file once the last handle is dropped.
    let log = backhaul_tests_support::reopen(dir.path(), options);
    assert_eq!(log.epoch(), epoch);
    let stats = log.stats();
    assert_eq!((stats.backlog_events, stats.oldest_seq), (1, Some(2)));
    let outcome = rt
        .block_on(log.append(vec![event("c"), event("b")]))
        .unwrap();
    assert_eq!(
        outcome,
        vec![Appended::Stored { seq: 3 }, Appended::Duplicate { seq: 2 }]
    );
}

#[test]
fn a_damaged_log_fails_to_open_and_keeps_failing_until_moved_aside() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    {
        let log = EventLog::open(options(dir.path())).unwrap();
        rt.block_on(log.append((0..200).map(|i| event(&format!("d{i}"))).collect()))
            .unwrap();
    }
    let path = dir.path().join("events.redb");
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    // Scribble over every page that holds one event's id: the live copy is among them
    // wherever the allocator put it, so the damage is always somewhere the log reads.
    const PAGE: usize = 4096;
    let needle = b"d150";
    let pages: std::collections::BTreeSet<usize> = bytes
        .windows(needle.len())
        .enumerate()
        .filter(|(_, window)| window == needle)
        .map(|(at, _)| at / PAGE)
        .collect();
    assert!(!pages.is_empty(), "the event's id is in the file");
    for page in pages {
        let end = ((page + 1) * PAGE).min(len);
        for b in &mut bytes[page * PAGE..end] {
            *b ^= 0x5a;
        }
    }
    std::fs::write(&path, &bytes).unwrap();
    let error = match backhaul_tests_support::try_reopen(dir.path(), options) {
        Err(e) => e,
        Ok(_) => panic!("a damaged log opened"),
    };
    assert!(matches!(error, LogError::Damaged { .. }), "{error}");
    let text = error.to_string();
    assert!(text.contains("events.redb"), "{text}");
    assert!(text.contains("cannot be opened"), "{text}");
    // Nothing was truncated away, and the damage is still refused on the next open.
    assert!(std::fs::metadata(&path).unwrap().len() >= len as u64);
    assert!(backhaul_tests_support::try_reopen(dir.path(), options).is_err());
}

#[test]
fn rejects_are_kept_newest_first_and_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(options(dir.path())).unwrap();
    let rt = runtime();
    for i in 0..5 {
        let record = RejectRecord::new(
            "http",
            format!("peer-{i}"),
            b"{\"v\":2}",
            vec![Violation::new("v", "must be 1")],
        );
        rt.block_on(log.record_reject(record)).unwrap();
    }
    let rejects = log.recent_rejects(10).unwrap();
    let senders: Vec<&str> = rejects.iter().map(|r| r.sender.as_str()).collect();
    assert_eq!(senders, vec!["peer-4", "peer-3", "peer-2"]);
    assert_eq!(rejects[0].violations[0].to_string(), "v: must be 1");
}

#[test]
fn rejects_count_in_the_quota_and_give_way_to_events() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(LogOptions {
        max_bytes: 1 << 20,
        max_rejects: 10_000,
        tally_days: 30,
        ..options(dir.path())
    })
    .unwrap();
    let rt = runtime();
    // A flood of 16 KiB rejects: far more than the quota holds.
    let payload = vec![b'x'; 16 << 10];
    for i in 0..200 {
        let record = RejectRecord::new(
            "mqtt",
            format!("flood-{i}"),
            &payload,
            vec![Violation::new("event", "is not valid JSON")],
        );
        rt.block_on(log.record_reject(record)).unwrap();
    }
    let stats = log.stats();
    assert!(stats.rejects_bytes <= 1 << 20, "{stats:?}");
    assert!(stats.rejects_stored < 200, "{stats:?}");
    assert_eq!(log.recent_rejects(1).unwrap()[0].sender, "flood-199");
    // Good events still fill the quota: the rejects make room.
    let mut stored = 0;
    for chunk in 0..60 {
        let events = (0..100).map(|i| event(&format!("q{chunk}-{i}"))).collect();
        let results = rt.block_on(log.append(events)).unwrap();
        stored += results
            .iter()
            .filter(|r| matches!(r, Appended::Stored { .. }))
            .count();
    }
    let stats = log.stats();
    assert!(
        stats.backlog_bytes > (1 << 20) * 9 / 10,
        "events got only part of the quota: {stats:?}"
    );
    assert!(
        stats.backlog_bytes + stats.rejects_bytes <= 1 << 20,
        "{stats:?}"
    );
    assert!(
        stats.quota_exceeded,
        "the quota was never reached: {stats:?}"
    );
    assert!(stored > 4000, "{stored} events stored");
}

#[test]
fn deleted_space_is_given_back_to_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(options(dir.path())).unwrap();
    let rt = runtime();
    for chunk in 0..100 {
        let events = (0..1000).map(|i| event(&format!("s{chunk}-{i}"))).collect();
        rt.block_on(log.append(events)).unwrap();
    }
    let full = log.stats().file_bytes;
    assert!(full > 16 << 20, "file only {full} bytes");
    let acked = Instant::now();
    rt.block_on(log.ack_through(u64::MAX)).unwrap();
    // The writer compacts on its own once most of the file is free; wait for it.
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(dir.path().join("events.redb"))
        .unwrap()
        .len()
        > full / 4
    {
        assert!(
            Instant::now() < deadline,
            "the file never shrank from {full} bytes"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = std::fs::metadata(dir.path().join("events.redb"))
        .unwrap()
        .len();
    println!(
        "log file {full} bytes with 100000 events → {after} bytes {:?} after acknowledging all",
        acked.elapsed()
    );
}

/// Reopening waits for the previous writer thread to let go of the file.
mod backhaul_tests_support {
    use super::*;

    pub fn try_reopen(
        dir: &std::path::Path,
        options: fn(&std::path::Path) -> LogOptions,
    ) -> Result<EventLog, LogError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match EventLog::open(options(dir)) {
                Err(LogError::InUse { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    pub fn reopen(dir: &std::path::Path, options: fn(&std::path::Path) -> LogOptions) -> EventLog {
        try_reopen(dir, options).unwrap()
    }
}

#[test]
fn the_daily_tally_counts_what_was_accepted_and_outlives_the_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    // Three days kept, so the two days of the test stay kept if midnight passes meanwhile.
    opts.tally_days = 3;
    let log = EventLog::open(opts).unwrap();
    let rt = runtime();
    let today = backhaul_agent::log::now_ms().div_euclid(86_400_000);
    let at = |d: i64, hour: i64| d * 86_400_000 + hour * 3_600_000;
    let mut receive = event("r1");
    receive.kind = backhaul_events::EventType::Receive;
    let appended = rt
        .block_on(log.append_received(vec![
            (event("p1"), at(today - 1, 1)),
            (receive, at(today - 1, 2)),
            (event("p1"), at(today - 1, 3)),
            (event("p2"), at(today, 0)),
        ]))
        .unwrap();
    assert_eq!(appended[2], Appended::Duplicate { seq: 1 });
    rt.block_on(log.ack_through(3)).unwrap();
    let days = |log: &EventLog| -> Vec<(i32, u64, u64, [u64; 5])> {
        log.tally()
            .unwrap()
            .iter()
            .map(|d| (d.day, d.first_seq, d.last_seq, d.counts))
            .collect()
    };
    // counts: pick, ship, receive, adjust, count; the duplicate is not accepted twice.
    let expected = vec![
        (today as i32 - 1, 1, 2, [1, 0, 1, 0, 0]),
        (today as i32, 3, 3, [1, 0, 0, 0, 0]),
    ];
    assert_eq!(days(&log), expected);
    assert!(log.tally().unwrap().iter().all(|d| d.epoch == log.epoch()));

    // A clock set back a week, or a year ahead, adds no day outside those kept around today,
    // and takes none of them away.
    rt.block_on(log.append_received(vec![
        (event("p3"), at(today - 7, 0)),
        (event("p4"), at(today + 365, 0)),
    ]))
    .unwrap();
    assert_eq!(days(&log), expected);

    // The tally is in the file: it survives a restart.
    rt.block_on(log.close());
    let log = EventLog::open(options(dir.path())).unwrap();
    assert_eq!(days(&log), expected);
}
