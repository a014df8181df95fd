//! Salvage of a damaged log, on the log alone: what an intact file gives back, what scribbled
//! pages cost, and that the damaged file is kept byte for byte.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use backhaul_agent::log::{EventLog, LogError, LogOptions, LoggedEvent};
use backhaul_agent::salvage::{SalvageError, salvage};
use backhaul_events::Event;
use backhaul_events::event::parse_event;

const EVENTS: usize = 20_000;
const ACKED: u64 = 2_000;

fn options(dir: &std::path::Path) -> LogOptions {
    LogOptions {
        dir: dir.to_path_buf(),
        max_bytes: 256 << 20,
        cache_size: 8 << 20,
        group_commit_delay: Duration::from_millis(1),
        group_commit_max_events: 4096,
        max_rejects: 10,
        tally_days: 30,
    }
}

fn event(n: usize) -> Event {
    parse_event(
        format!(
            r#"{{"v":1,"id":"salvage-{n:06}","type":"pick","ts":"2026-11-22T10:15:00Z",
               "order":"SO-{}","sku":"SKU-{}","qty":"{}","location":"A-01"}}"#,
            n / 7,
            n % 13,
            n % 5 + 1
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

/// A closed log of [`EVENTS`] events, the first [`ACKED`] acknowledged by the relay, written
/// in flushes of 500 as a busy agent would.
fn filled_log(dir: &std::path::Path, rt: &tokio::runtime::Runtime) {
    let log = EventLog::open(options(dir)).unwrap();
    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(500) {
        rt.block_on(log.append(chunk.iter().map(|&n| event(n)).collect()))
            .unwrap();
    }
    assert_eq!(rt.block_on(log.ack_through(ACKED)).unwrap(), ACKED);
    rt.block_on(log.close());
}

fn all_events(dir: &std::path::Path) -> Vec<(u64, LoggedEvent)> {
    let log = EventLog::open(options(dir)).unwrap();
    let events = log.read_from(0, usize::MAX, usize::MAX).unwrap();
    drop(log);
    events
}

/// A small deterministic generator, so a failure can be replayed.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[test]
fn an_intact_log_is_refused_and_with_force_gives_back_every_unacknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    filled_log(dir.path(), &rt);
    let refused = rt
        .block_on(salvage(options(dir.path()), false))
        .unwrap_err();
    assert!(matches!(refused, SalvageError::NotDamaged(_)), "{refused}");

    let original = std::fs::read(dir.path().join("events.redb")).unwrap();
    let report = rt.block_on(salvage(options(dir.path()), true)).unwrap();
    assert_eq!(report.recovered, EVENTS as u64 - ACKED);
    assert_eq!(report.acked_through, Some(ACKED));
    assert_eq!(report.next_seq, Some(EVENTS as u64 + 1));
    assert!(report.unreadable.is_empty(), "{:?}", report.unreadable);
    assert!(
        std::fs::read(&report.quarantined_as).unwrap() == original,
        "the quarantined file is the damaged one, byte for byte"
    );
    assert!(
        report
            .quarantined_as
            .starts_with(dir.path().join("quarantine"))
    );

    let events = all_events(dir.path());
    let ids: Vec<String> = events.iter().map(|(_, e)| e.event.id.clone()).collect();
    let expected: Vec<String> = (ACKED as usize..EVENTS).map(|n| event(n).id).collect();
    assert_eq!(ids, expected, "every unacknowledged event, once, in order");
    for (_, logged) in &events {
        let n: usize = logged.event.id["salvage-".len()..].parse().unwrap();
        assert_eq!(logged.event, event(n));
        assert!(logged.received_at_ms > 0);
    }
    assert_ne!(
        report.old_epoch.as_deref(),
        Some(report.new_epoch.as_str()),
        "the new log is a new epoch"
    );
}

#[test]
fn scribbled_pages_cost_only_the_events_on_them() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    filled_log(dir.path(), &rt);
    let path = dir.path().join("events.redb");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let pages = file.metadata().unwrap().len() / 4096;
    let mut rng = Lcg(0x05a1_4a6e);
    // Leaves (their first byte is 1) of any table, live or freed: the pages whose loss costs
    // events, and whose damage the open must notice.
    let mut scribbled = Vec::new();
    while scribbled.len() < 12 {
        let page = 1 + rng.next() % (pages - 1);
        let mut first = [0u8; 1];
        file.read_exact_at(&mut first, page * 4096).unwrap();
        if first[0] != 1 || scribbled.contains(&page) {
            continue;
        }
        let garbage: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
        file.write_all_at(&garbage, page * 4096).unwrap();
        scribbled.push(page);
    }
    file.sync_all().unwrap();
    drop(file);

    match EventLog::open(options(dir.path())) {
        Err(damaged @ LogError::Damaged { .. }) => {
            let text = damaged.to_string();
            assert!(text.contains("backhaul-agent salvage"), "{text}");
        }
        Err(other) => panic!("{other}"),
        // Only freed pages were hit: the log is whole, salvage must still agree with it.
        Ok(log) => rt.block_on(log.close()),
    }

    let damaged = std::fs::read(&path).unwrap();
    let report = rt.block_on(salvage(options(dir.path()), true)).unwrap();
    assert!(std::fs::read(&report.quarantined_as).unwrap() == damaged);
    let unacknowledged = EVENTS as u64 - ACKED;
    assert_eq!(
        report.recovered + report.unreadable_events,
        unacknowledged,
        "each unacknowledged event is either recovered or reported: {report:?}"
    );
    // A leaf holds 45 of these events: twelve pages cannot cost more than twelve leaves' worth.
    assert!(
        report.unreadable_events <= 12 * 45,
        "lost {} events to 12 pages",
        report.unreadable_events
    );
    let events = all_events(dir.path());
    assert_eq!(events.len() as u64, report.recovered);
    let mut previous = None;
    for (_, logged) in &events {
        let n: usize = logged.event.id["salvage-".len()..].parse().unwrap();
        assert_eq!(logged.event, event(n), "recovered events are intact");
        assert!(n >= ACKED as usize, "acknowledged event {n} came back");
        assert!(previous < Some(n), "recovered events keep their order");
        previous = Some(n);
        let seq = n as u64 + 1;
        assert!(
            !report
                .unreadable
                .iter()
                .any(|r| r.first <= seq && seq <= r.last),
            "seq {seq} is both recovered and reported unreadable"
        );
    }
}
