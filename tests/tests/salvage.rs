//! Salvage of a damaged log, end to end: an agent holding 100k events behind a cut link is
//! killed, pages of its log are scribbled over, the service refuses to start and names the
//! command, `backhaul-agent salvage` recovers what is legible, and every recovered event reaches
//! the relay's ledger exactly once while the unreadable ones are exactly those reported.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use backhaul_tests::events::pick;
use backhaul_tests::pipeline::{DELIVERY_TIMEOUT, Order, Pipeline, assert_once_in_order};
use backhaul_tests::{binary, poll_until, run_binary};
use serde_json::{Value, json};

const EVENTS: usize = 100_000;
const PER_POST: usize = 1000;
const SCRIBBLED_PAGES: usize = 20;

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

fn id(n: usize) -> String {
    format!("salv-{n:06}")
}

/// Overwrites `pages` random leaf pages of the file (their first byte is 1: the pages that
/// hold events) with garbage; returns how many pages the file has.
fn scribble(path: &std::path::Path, pages: usize, seed: u64) -> u64 {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("the agent's log file");
    let total = file.metadata().expect("log metadata").len() / 4096;
    let mut rng = Lcg(seed);
    let mut done = HashSet::new();
    while done.len() < pages {
        let page = 1 + rng.next() % (total - 1);
        let mut first = [0u8; 1];
        file.read_exact_at(&mut first, page * 4096)
            .expect("read a page");
        if first[0] != 1 || !done.insert(page) {
            continue;
        }
        let garbage: Vec<u8> = (0..4096).map(|_| rng.next() as u8).collect();
        file.write_all_at(&garbage, page * 4096)
            .expect("scribble a page");
    }
    file.sync_all().expect("sync the scribbled log");
    total
}

#[test]
fn salvage_recovers_the_legible_events_and_each_reaches_the_ledger_once() {
    let mut pipeline = Pipeline::start("salvage");
    pipeline.proxy.cut();
    pipeline.wait_link(false);
    for first in (0..EVENTS).step_by(PER_POST) {
        let batch: Vec<Value> = (first..first + PER_POST)
            .map(|n| pick(&id(n), &format!("SO-{}", n / 10)))
            .collect();
        let answer = pipeline.agent.post_events(&json!(batch), None);
        assert_eq!(answer.status().as_u16(), 202, "POST of events {first}..");
    }
    pipeline.agent.kill9();
    let log = pipeline.agent.state_dir().join("events.redb");
    let pages = scribble(&log, SCRIBBLED_PAGES, 0x0005_eed0_f5a1);

    // The service refuses the damaged log and says what to run.
    let config = pipeline.agent.config_path();
    let mut refused = Command::new(binary("backhaul-agent"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let exited = poll_until(Duration::from_secs(30), || {
        refused.try_wait().ok().flatten()
    });
    if exited.is_none() {
        let _ = refused.kill();
        panic!("the agent started on a log with {SCRIBBLED_PAGES} scribbled leaf pages");
    }
    let mut stderr = String::new();
    std::io::Read::read_to_string(refused.stderr.as_mut().expect("stderr"), &mut stderr)
        .expect("the agent's stderr");
    assert!(
        stderr.contains("cannot be opened") && stderr.contains("backhaul-agent salvage"),
        "the start error names the salvage command:\n{stderr}"
    );

    let damaged = std::fs::read(&log).expect("the damaged log");
    let config_arg = config.display().to_string();
    let output = run_binary(
        "backhaul-agent",
        &["salvage", "--config", &config_arg, "--json"],
    );
    assert!(
        output.status.success(),
        "salvage failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_slice(&output.stdout).expect("the salvage report");
    let recovered = report["recovered"].as_u64().expect("recovered") as usize;
    let lost = report["unreadable_events"].as_u64().expect("unreadable") as usize;
    assert_eq!(recovered + lost, EVENTS, "{report}");
    // No more than 20 leaves' worth of events (a 4 KiB leaf holds about 36 of these).
    assert!(
        lost <= SCRIBBLED_PAGES * 40,
        "{lost} events lost to {SCRIBBLED_PAGES} pages"
    );
    assert!(
        lost > 0,
        "no scribbled page held events: {pages} pages, {report}"
    );
    let quarantined = report["quarantined_as"].as_str().expect("quarantined_as");
    assert!(
        std::fs::read(quarantined).expect("the quarantined file") == damaged,
        "the damaged file is kept unchanged"
    );

    // The unreadable events are exactly those of the reported ranges (the log's first event
    // was seq 1), and every other one reaches the ledger once, in order.
    let unreadable: HashSet<String> = report["unreadable"]
        .as_array()
        .expect("unreadable ranges")
        .iter()
        .flat_map(|r| {
            let first = r["first"].as_u64().expect("first") as usize;
            let last = r["last"].as_u64().expect("last") as usize;
            (first..=last).map(|seq| id(seq - 1))
        })
        .collect();
    assert_eq!(unreadable.len(), lost);
    let expected: HashSet<String> = (0..EVENTS)
        .map(id)
        .filter(|i| !unreadable.contains(i))
        .collect();

    pipeline.agent.restart();
    pipeline.proxy.restore();
    let site_lines = |ledger: Vec<Value>| -> Vec<Value> {
        ledger
            .into_iter()
            .filter(|line| line["site"] == "salvage")
            .collect()
    };
    let delivered = poll_until(DELIVERY_TIMEOUT, || {
        let lines = site_lines(pipeline.ledger());
        (lines.len() >= expected.len()).then_some(lines)
    })
    .unwrap_or_else(|| {
        panic!(
            "{} of {} recovered events reached the ledger",
            site_lines(pipeline.ledger()).len(),
            expected.len()
        )
    });
    let (ids, _) = assert_once_in_order("salvage", &delivered, Order::PerSite);
    assert!(
        ids == expected,
        "the ledger holds {} ids, {} of them not recovered, {} recovered ones missing",
        ids.len(),
        ids.difference(&expected).count(),
        expected.difference(&ids).count()
    );
    pipeline.assert_drained();
}
