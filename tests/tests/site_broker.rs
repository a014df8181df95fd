//! An agent taking scans from the site's own Mosquitto as a subscriber: every message
//! Mosquitto acknowledged to a scanner reaches the agent's log exactly once, across SIGKILLs
//! of the agent, and invalid ones land in the reject store.

use std::collections::HashMap;
use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::mosquitto::{Mosquitto, client_binary};
use backhaul_tests::poll_until;
use backhaul_tests::scanner::{Scanner, pick_event};

fn wait_for_acks(scanners: &[Scanner], more: usize) {
    let start: usize = scanners.iter().map(Scanner::acked_count).sum();
    let reached = poll_until(Duration::from_secs(30), || {
        let now: usize = scanners.iter().map(Scanner::acked_count).sum();
        (now >= start + more).then_some(())
    });
    assert!(reached.is_some(), "scanners stalled at {start}");
}

#[test]
fn scans_from_the_site_broker_reach_the_log_once_across_agent_kills() {
    let broker = Mosquitto::start();
    let mut agent = AgentProcess::start(
        AgentOptions::default()
            .set("site_broker.host", "127.0.0.1")
            .set("site_broker.port", i64::from(broker.port()))
            .set("site_broker.client_id", "agent-site-broker-test"),
    );
    // The broker keeps scans for the agent only once its subscription is in place.
    let subscribed = poll_until(Duration::from_secs(20), || {
        (agent.status()["site_broker"]["state"] == "subscribed").then_some(())
    });
    assert!(subscribed.is_some(), "never subscribed: {}", agent.status());
    let scanners: Vec<Scanner> = (0..2)
        .map(|i| Scanner::start(broker.addr(), &format!("sb-scanner-{i}"), 150, pick_event))
        .collect();
    for _ in 0..3 {
        wait_for_acks(&scanners, 200);
        // Killed between storing and acknowledging, or before storing: the broker keeps
        // what was not acknowledged for the agent's session and sends it again.
        agent.kill9();
        wait_for_acks(&scanners, 100);
        agent.restart();
    }
    wait_for_acks(&scanners, 200);
    // An invalid scan is refused with its reasons, and does not hold up the others.
    let published = std::process::Command::new(client_binary("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &broker.port().to_string()])
        .args([
            "-q",
            "1",
            "-t",
            "scans/sb-bad",
            "-m",
            r#"{"v":1,"id":"bad-1"}"#,
        ])
        .output()
        .unwrap();
    assert!(published.status.success(), "{published:?}");
    let acked: Vec<String> = scanners.into_iter().flat_map(Scanner::stop).collect();

    let complete = poll_until(Duration::from_secs(30), || {
        let events = agent.log_events();
        let ids: HashMap<String, usize> = events.iter().fold(HashMap::new(), |mut counts, e| {
            if let Some(id) = e["event"]["id"].as_str().or(e["id"].as_str()) {
                *counts.entry(id.to_string()).or_default() += 1;
            }
            counts
        });
        acked.iter().all(|id| ids.contains_key(id)).then_some(ids)
    });
    let Some(ids) = complete else {
        let events = agent.log_events();
        let have: std::collections::HashSet<&str> = events
            .iter()
            .filter_map(|e| e["event"]["id"].as_str().or(e["id"].as_str()))
            .collect();
        let missing: Vec<&String> = acked
            .iter()
            .filter(|id| !have.contains(id.as_str()))
            .collect();
        panic!(
            "{} acknowledged scans, {} in the agent's log, missing {missing:?}; agent:\n{}",
            acked.len(),
            events.len(),
            agent.stderr()
        );
    };
    let twice: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let rejected = poll_until(Duration::from_secs(10), || {
        agent
            .rejects()
            .into_iter()
            .find(|r| r["transport"] == "site_broker")
    })
    .expect("the invalid scan in the reject store");
    assert_eq!(rejected["sender"], "site broker topic scans/sb-bad");
    println!(
        "{} scans acknowledged by the site broker, each in the agent's log once",
        acked.len()
    );
}
