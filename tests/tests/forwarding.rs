//! Agent → broker → relay under faults, with the real binaries, a real Mosquitto and a TCP proxy
//! standing for the WAN. Scanners publish steadily and record every id that got a PUBACK;
//! after each scenario every acknowledged id is in the relay's ledger exactly once, each site's
//! events in sequence order, and the agent's log has drained.
//!
//! The pipeline, the scanners and the delivery checks are `backhaul_tests::pipeline`'s.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use backhaul_tests::agent::AgentProcess;
use backhaul_tests::mosquitto::Mosquitto;
use backhaul_tests::pipeline::{
    Order, Pipeline, agent_options, assert_agent_drained, assert_delivered, assert_once_in_order,
    start_scanners, stop_scanners, wait_for_scanner_acks,
};
use backhaul_tests::poll_until;
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::scanner::{Scanner, pick_event};
use serde_json::Value;

/// Scans per second of each scanner.
const RATE: u32 = 150;

fn scanners(agent: &AgentProcess, site: &str, count: usize) -> Vec<Scanner> {
    start_scanners(agent, site, count, RATE)
}

/// Waits until the scanners have `more` further acknowledgements (they keep running).
fn wait_for_acks(scanners: &[Scanner], more: usize) {
    wait_for_scanner_acks(scanners, more, Duration::from_secs(30));
}

/// Every acknowledged id reaches the ledger exactly once, each site's lines are in sequence
/// order within an epoch, and no event crosses into another site (`sites`: device id prefix →
/// the site its events belong to).
fn assert_exactly_once_in_order(
    relay: &RelayProcess,
    acked: &[String],
    sites: &HashMap<&str, &str>,
) {
    let mut names: Vec<&str> = sites.values().copied().collect();
    names.sort_unstable();
    let scenario = names.join("+");
    let delivered = assert_delivered(&scenario, acked, || relay.ledger(), relay, Order::PerSite);
    for line in &delivered.records {
        let id = line["id"].as_str().expect("ledger line has an id");
        let site = line["site"].as_str().expect("ledger line has a site");
        let device_site = sites
            .iter()
            .find(|(prefix, _)| id.starts_with(*prefix))
            .map(|(_, site)| *site);
        if let Some(expected) = device_site {
            assert_eq!(site, expected, "event {id} crossed into site {site}");
        }
    }
}

fn site_map(site: &'static str) -> HashMap<&'static str, &'static str> {
    HashMap::from([(site, site)])
}

#[test]
fn wan_cut_and_stall_lose_nothing() {
    wan_cut_and_stall("cut", "3.1.1");
}

#[test]
fn wan_cut_and_stall_over_mqtt5_lose_nothing() {
    wan_cut_and_stall("cut5", "5");
}

/// Scanners publish steadily while the link between agent and broker is cut, restored, stalled
/// and restored again, with the agent's uplink on MQTT `protocol`.
fn wan_cut_and_stall(site: &'static str, protocol: &str) {
    let p = Pipeline::start_with(site, |o| o.set("uplink.protocol", protocol), None, &[]);
    let s = scanners(&p.agent, site, 2);
    wait_for_acks(&s, 200);
    p.proxy.cut();
    // Scanners keep getting PUBACKs while the link is down: the log holds the events.
    wait_for_acks(&s, 400);
    let down = p.agent.status();
    assert_ne!(
        down["link"]["state"], "up",
        "link still reported up while cut: {down}"
    );
    assert!(down["backlog"]["events"].as_u64().unwrap_or(0) > 0);
    p.proxy.restore();
    wait_for_acks(&s, 200);
    // A stalled link (connections open, nothing moving) must not pass for a healthy one: the
    // unacknowledged batches are re-sent after the ack timeout.
    p.proxy.stall();
    wait_for_acks(&s, 300);
    p.proxy.restore();
    wait_for_acks(&s, 200);
    let acked = stop_scanners(s);
    assert_exactly_once_in_order(&p.relay, &acked, &site_map(site));
    assert_agent_drained(&p.agent);
    // Mosquitto logs each client's protocol: p2 is 3.1.1, p5 is 5.
    let level = if protocol == "5" { "p5" } else { "p2" };
    let connected = format!("as agent-{site}-{} ({level},", p.proxy.port());
    let log = p.broker.log();
    assert!(
        log.contains(&connected),
        "the agent did not connect over MQTT {protocol} (no `{connected}`):\n{log}"
    );
}

#[test]
fn a_refused_mqtt5_connection_shows_the_reason() {
    // Without a password file and with anonymous access off, Mosquitto refuses every client.
    let broker = Mosquitto::start_with_config("allow_anonymous false");
    let agent =
        AgentProcess::start(agent_options("refused5", broker.port()).set("uplink.protocol", "5"));
    let refused = poll_until(Duration::from_secs(20), || {
        let status = agent.status();
        let error = status["link"]["last_error"].as_str().unwrap_or_default();
        (status["link"]["state"] == "down" && error.contains("refused the connection"))
            .then(|| error.to_string())
    });
    let Some(error) = refused else {
        panic!("no refusal in the status: {}", agent.status());
    };
    assert_eq!(
        error,
        "the broker refused the connection: not authorized (0x87)"
    );
}

#[test]
fn agent_killed_repeatedly_loses_nothing() {
    let mut p = Pipeline::start("akill");
    let s = scanners(&p.agent, "akill", 2);
    for round in 0..5u64 {
        wait_for_acks(&s, 100 + ((round * 37) % 150) as usize);
        p.agent.kill9();
        p.agent.restart();
    }
    wait_for_acks(&s, 200);
    let acked = stop_scanners(s);
    assert_exactly_once_in_order(&p.relay, &acked, &site_map("akill"));
    assert_agent_drained(&p.agent);
}

#[test]
fn relay_killed_repeatedly_loses_nothing() {
    let mut p = Pipeline::start("rkill");
    let s = scanners(&p.agent, "rkill", 2);
    for round in 0..5u64 {
        wait_for_acks(&s, 100 + ((round * 53) % 150) as usize);
        p.relay.kill9();
        wait_for_acks(&s, 50);
        p.relay.restart();
    }
    wait_for_acks(&s, 200);
    let acked = stop_scanners(s);
    assert_exactly_once_in_order(&p.relay, &acked, &site_map("rkill"));
    assert_agent_drained(&p.agent);
}

#[test]
fn broker_killed_and_restarted_loses_nothing() {
    let mut p = Pipeline::start("bkill");
    let s = scanners(&p.agent, "bkill", 2);
    for _ in 0..2 {
        wait_for_acks(&s, 200);
        p.broker.kill9();
        wait_for_acks(&s, 100);
        p.broker.restart();
    }
    wait_for_acks(&s, 200);
    let acked = stop_scanners(s);
    assert_exactly_once_in_order(&p.relay, &acked, &site_map("bkill"));
    assert_agent_drained(&p.agent);
}

#[test]
fn two_sites_through_the_embedded_broker_never_cross() {
    let dir = tempfile::tempdir().unwrap();
    let broker_port = backhaul_tests::free_port();
    let relay = RelayProcess::start(&dir.path().join("relay"), broker_port, true);
    let east = AgentProcess::start(agent_options("east", broker_port));
    let west = AgentProcess::start(agent_options("west", broker_port));
    let mut s = scanners(&east, "east", 1);
    s.extend(scanners(&west, "west", 1));
    wait_for_acks(&s, 600);
    let acked = stop_scanners(s);
    let sites = HashMap::from([("east", "east"), ("west", "west")]);
    assert_exactly_once_in_order(&relay, &acked, &sites);
    assert_agent_drained(&east);
    assert_agent_drained(&west);
    let listed = relay.sites();
    let names: Vec<&str> = listed["sites"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["site"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(names, vec!["east", "west"], "{listed}");
    let _: Vec<Value> = relay.ledger();
}

/// The ids in a ledger, checking that none is there twice and that each epoch's sequence
/// numbers rise.
fn ledger_ids_once_in_order(relay: &RelayProcess) -> HashSet<String> {
    assert_once_in_order("aside", &relay.ledger(), Order::PerSite).0
}

#[test]
fn a_relay_on_an_empty_outbox_gets_everything_not_yet_acknowledged() {
    // The operator moves a damaged outbox aside and starts the relay empty. Batches the agent
    // sent while the relay was away went nowhere (the relay's session is clean); the first
    // batch the new outbox sees is a later one, which must not be taken as the start.
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let mut first = RelayProcess::start(&dir.path().join("first"), broker.port(), false);
    let agent = AgentProcess::start(
        agent_options("aside", broker.port())
            .set("uplink.batch_max_events", 20)
            .set("uplink.window", 1000)
            // Far beyond the test: only the relay's gap answer can bring the lost batches back.
            .set("uplink.ack_timeout_secs", 600),
    );
    let s = scanners(&agent, "aside", 2);
    wait_for_acks(&s, 300);
    first.kill9();
    wait_for_acks(&s, 300);
    let second = RelayProcess::start(&dir.path().join("second"), broker.port(), false);
    wait_for_acks(&s, 600);
    let acked = stop_scanners(s);
    assert_agent_drained(&agent);
    // What the first outbox had acknowledged but not yet written to its ledger when it was
    // killed is still in it: let it finish (the agent has nothing left to send).
    first.restart();
    let everything = poll_until(Duration::from_secs(60), || {
        let mut have = ledger_ids_once_in_order(&first);
        have.extend(ledger_ids_once_in_order(&second));
        acked.iter().all(|id| have.contains(id)).then_some(())
    });
    if everything.is_none() {
        let mut have = ledger_ids_once_in_order(&first);
        have.extend(ledger_ids_once_in_order(&second));
        let missing: Vec<&String> = acked.iter().filter(|id| !have.contains(*id)).collect();
        panic!(
            "{} of {} acknowledged events are in neither ledger, e.g. {:?}\nagent: {}",
            missing.len(),
            acked.len(),
            &missing[..missing.len().min(10)],
            agent.status()
        );
    }
    println!(
        "{} acknowledged events: {} in the first ledger, {} in the second, 0 lost",
        acked.len(),
        first.ledger().len(),
        second.ledger().len()
    );
}

#[test]
fn connected_without_a_relay_is_shown_as_stalled_not_up() {
    let broker = Mosquitto::start();
    let agent = AgentProcess::start(agent_options("norelay", broker.port()));
    let scan = pick_event("norelay-wms-1", 1);
    let posted = agent.post_events_raw(scan.into_bytes(), None);
    assert!(posted.status().is_success(), "{:?}", posted.text());
    // Connected to the broker, but nobody acknowledges: after the ack timeout (3 s here) the
    // status must not say "up".
    let stalled = poll_until(Duration::from_secs(20), || {
        let status = agent.status();
        (status["link"]["state"] == "stalled").then_some(status)
    });
    let Some(status) = stalled else {
        panic!("the link never showed as stalled: {}", agent.status());
    };
    assert_eq!(
        status["link"]["last_error"],
        "connected, but the relay has acknowledged nothing for 3 s: batches are re-sent; check that the relay runs and subscribes to this broker"
    );
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(dir.path(), broker.port(), false);
    let up = poll_until(Duration::from_secs(20), || {
        let status = agent.status();
        (status["link"]["state"] == "up" && status["backlog"]["events"] == 0).then_some(())
    });
    assert!(up.is_some(), "the link did not recover: {}", agent.status());
    assert_eq!(relay.ledger().len(), 1);
}

/// Batches go compressed by default and as plain version-1 frames with
/// `uplink.compression = "none"` (for relays older than compression); the relay takes both,
/// and the compressed uplink carries a fraction of the bytes per event.
#[test]
fn compressed_and_plain_batches_both_reach_the_ledger_once() {
    let mut bytes_per_event = Vec::new();
    for (site, compression) in [("zstd", "zstd"), ("plain", "none")] {
        let p = Pipeline::start_with(
            site,
            |o| o.set("uplink.compression", compression),
            None,
            &[],
        );
        // A backlog built while the link is down leaves in full batches, as after an outage.
        p.proxy.cut();
        let s = scanners(&p.agent, site, 2);
        wait_for_acks(&s, 600);
        let acked = stop_scanners(s);
        p.proxy.restore();
        assert_exactly_once_in_order(&p.relay, &acked, &site_map(site));
        assert_agent_drained(&p.agent);
        let sent = p.agent.metric("backhaul_agent_uplink_bytes_total");
        let events = p.agent.metric("backhaul_agent_events_forwarded_total");
        let (Some(sent), Some(events)) = (sent, events) else {
            panic!("{compression}: no uplink metrics:\n{}", p.agent.metrics());
        };
        assert!(
            events >= acked.len() as f64,
            "{compression}: {events} forwarded"
        );
        bytes_per_event.push(sent / events);
    }
    eprintln!(
        "bytes per event on the uplink: zstd {:.1}, none {:.1}",
        bytes_per_event[0], bytes_per_event[1]
    );
    assert!(
        bytes_per_event[0] < bytes_per_event[1] / 2.0,
        "zstd {:.1} B per event, none {:.1}",
        bytes_per_event[0],
        bytes_per_event[1]
    );
}
