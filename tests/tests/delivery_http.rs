//! Relay → ERP through the HTTP connector, against a stand-in ERP that fails on demand: 500s,
//! 429 with Retry-After, requests that never get an answer, slow answers and permanent
//! refusals lose nothing, duplicate nothing, keep the order per key and the rate limit, and a
//! refused event waits in the dead-letter queue until it is replayed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::erp_standin::{ErpStandIn, Mode};
use backhaul_tests::mosquitto::Mosquitto;
use backhaul_tests::poll_until;
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::scanner::{Scanner, pick_event};

const RATE_PER_SEC: u64 = 40;
const BURST: u64 = 10;

fn relay(dir: &std::path::Path, broker_port: u16, erp: &ErpStandIn) -> RelayProcess {
    // The timeout is far above the slow answers (150 ms) and far below the hung ones (2.5 s):
    // a loaded machine delaying an answer past it would make the relay re-post an event the
    // ERP had answered, which is correct at-least-once behaviour but not what this test checks.
    let sink = format!("[sink.http]\nurl = \"{}\"\ntimeout_ms = 1500\n", erp.url());
    let settings: Vec<(&str, toml_edit::Value)> = vec![
        ("delivery.concurrency", 4.into()),
        ("delivery.max_batch", 8.into()),
        ("delivery.rate_per_sec", (RATE_PER_SEC as f64).into()),
        ("delivery.burst", (BURST as i64).into()),
        ("delivery.retry_min_ms", 100.into()),
        ("delivery.retry_max_ms", 1500.into()),
        ("delivery.pause_after_failures", 3.into()),
    ];
    RelayProcess::start_with(
        &dir.join("relay"),
        broker_port,
        true,
        Some(&sink),
        &settings,
    )
}

fn agent(broker_port: u16, site: &str) -> AgentProcess {
    AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", site)
            .set("uplink.client_id", format!("agent-{site}-{broker_port}"))
            .set("uplink.linger_ms", 10),
    )
}

fn wait_for_acks(scanner: &Scanner, count: usize) {
    let reached = poll_until(Duration::from_secs(30), || {
        (scanner.acked_count() >= count).then_some(())
    });
    assert!(
        reached.is_some(),
        "the scanner stalled at {} acknowledgements",
        scanner.acked_count()
    );
}

/// Waits until every id has had its effect in the ERP.
fn wait_for_effects(
    erp: &ErpStandIn,
    ids: &[String],
    relay: &RelayProcess,
) -> Vec<serde_json::Value> {
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let done = poll_until(Duration::from_secs(90), || {
        let effects = erp.effects();
        let have: HashSet<&str> = effects.iter().filter_map(|e| e["id"].as_str()).collect();
        wanted
            .iter()
            .all(|id| have.contains(id))
            .then(|| effects.clone())
    });
    done.unwrap_or_else(|| {
        let have: HashSet<String> = erp
            .effects()
            .iter()
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect();
        let missing = wanted.iter().filter(|id| !have.contains(**id)).count();
        panic!(
            "{missing} of {} events never reached the ERP\nrelay log:\n{}",
            wanted.len(),
            relay.log_tail()
        )
    })
}

#[test]
fn erp_failures_lose_nothing_duplicate_nothing_and_keep_order_and_rate() {
    let dir = tempfile::tempdir().unwrap();
    let erp = ErpStandIn::start();
    let broker_port = backhaul_tests::free_port();
    let relay = relay(dir.path(), broker_port, &erp);
    let agent = agent(broker_port, "erp");
    let scanner = Scanner::start(agent.mqtt_addr(), "erp-scanner", 60, pick_event);

    let phases = [
        Mode::Ok,
        Mode::Fail,
        Mode::Ok,
        Mode::Throttle(1),
        Mode::Ok,
        Mode::Hang(Duration::from_millis(2500)),
        Mode::Slow(Duration::from_millis(150)),
        Mode::Ok,
    ];
    let mut target = 0;
    for mode in phases {
        erp.set_mode(mode);
        target += 40;
        wait_for_acks(&scanner, target);
    }
    let acked = scanner.stop();
    let effects = wait_for_effects(&erp, &acked, &relay);

    // Exactly one effect per event, and nothing posted again once the ERP had answered 2xx.
    let mut effect_count: HashMap<&str, usize> = HashMap::new();
    for effect in &effects {
        *effect_count
            .entry(effect["id"].as_str().unwrap())
            .or_default() += 1;
    }
    assert!(
        effect_count.values().all(|n| *n == 1),
        "an event had two effects"
    );
    let requests = erp.requests();
    let mut answered: HashSet<&str> = HashSet::new();
    let mut reposted = Vec::new();
    for r in &requests {
        if answered.contains(r.key.as_str()) {
            reposted.push(r.key.clone());
        }
        if (200..300).contains(&r.status) {
            answered.insert(r.key.as_str());
        }
    }
    let history = |key: &str| -> Vec<(u16, u128)> {
        let start = requests[0].at;
        requests
            .iter()
            .filter(|r| r.key == key)
            .map(|r| (r.status, r.at.duration_since(start).as_millis()))
            .collect()
    };
    assert!(
        reposted.is_empty(),
        "events posted again after a 2xx: {:?}, the first one's requests (status, ms): {:?}",
        &reposted[..reposted.len().min(5)],
        reposted.first().map(|k| history(k))
    );

    // Order per key: the picks of one order reach the ERP in the order they were logged.
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    for effect in &effects {
        let order = effect["order"].as_str().unwrap().to_string();
        let seq = effect["seq"].as_u64().unwrap();
        if let Some(previous) = last_seq.insert(order.clone(), seq) {
            assert!(
                seq > previous,
                "order {order}: seq {seq} reached the ERP after {previous}"
            );
        }
    }

    // The rate limit: no one-second window saw more than the rate plus the burst.
    let times: Vec<_> = requests.iter().map(|r| r.at).collect();
    let busiest = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && t.duration_since(*start) < Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        busiest as u64 <= RATE_PER_SEC + BURST,
        "{busiest} requests in one second (limit {RATE_PER_SEC}/s, burst {BURST})"
    );

    let failures = requests
        .iter()
        .filter(|r| r.status >= 400 || r.status == 0)
        .count();
    println!(
        "{} events, {} requests ({failures} failed or unanswered), 1 effect each, busiest second {busiest} requests",
        acked.len(),
        requests.len()
    );
    assert!(
        failures > 0,
        "the stand-in never failed: the test proved nothing"
    );
}

#[test]
fn a_refused_event_waits_in_the_dlq_without_blocking_others_and_replays_once_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let erp = ErpStandIn::start();
    erp.refuse_sku("SKU-BAD");
    let broker_port = backhaul_tests::free_port();
    let relay = relay(dir.path(), broker_port, &erp);
    let agent = agent(broker_port, "dlq");

    let events: Vec<serde_json::Value> = (0..10)
        .map(|i| {
            let sku = if i % 5 == 2 { "SKU-BAD" } else { "SKU-OK" };
            serde_json::json!({"v":1, "id": format!("dlq-{i}"), "type":"receive",
                "ts":"2026-11-22T10:15:00Z", "sku": sku, "qty": 1, "location": format!("L-{i}")})
        })
        .collect();
    let response = agent.post_events(&serde_json::Value::Array(events), None);
    assert_eq!(response.status().as_u16(), 202);

    // The good events are not held back by the bad ones.
    let good: Vec<String> = (0..10)
        .filter(|i| i % 5 != 2)
        .map(|i| format!("dlq-{i}"))
        .collect();
    wait_for_effects(&erp, &good, &relay);

    let listed = poll_until(Duration::from_secs(30), || {
        let list: serde_json::Value =
            serde_json::from_str(&relay.cli(&["dlq", "list", "--json"])).ok()?;
        (list["total"] == 2).then_some(list)
    })
    .expect("two dead letters");
    for letter in listed["dead_letters"].as_array().unwrap() {
        assert!(
            letter["reason"]
                .as_str()
                .unwrap()
                .contains("unknown product SKU-BAD"),
            "the dead letter does not carry the ERP's message: {letter}"
        );
    }
    let table = relay.cli(&["dlq", "list"]);
    assert!(
        table.contains("dlq-2") && table.contains("unknown product SKU-BAD"),
        "{table}"
    );

    // The warehouse learns what the ERP refused.
    let refusals = poll_until(Duration::from_secs(30), || {
        let rejects = agent.get_json("/v1/rejects");
        let list = rejects["erp_refusals"].as_array()?.clone();
        (list.len() == 2).then_some(list)
    })
    .expect("the agent shows the ERP's refusals");
    assert!(refusals.iter().all(|r| {
        r["reason"]
            .as_str()
            .unwrap()
            .contains("unknown product SKU-BAD")
    }));
    assert_eq!(agent.status()["erp_refusals_stored"], 2);
    let sites = relay.sites();
    assert_eq!(sites["sites"][0]["events_dead_lettered"], 2, "{sites}");
    // The operator's table once showed 0 dead letters for every site: it read a field the
    // server did not send. Columns: site, highest seq, outbox, dead, delivered, last seen.
    let table = relay.cli(&["sites"]);
    let header: Vec<&str> = table
        .lines()
        .next()
        .map(|line| line.split_whitespace().collect())
        .unwrap_or_default();
    assert_eq!(header.get(4), Some(&"dead"), "{table}");
    let row: Vec<&str> = table
        .lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|words| words.first() == Some(&"dlq"))
        .unwrap_or_default();
    assert_eq!(row.get(3), Some(&"2"), "dead letters of site dlq: {table}");
    // The other typed answers read by the commands: one dead letter, and the agent's status.
    let first = listed["dead_letters"][0]["id"].to_string();
    let shown = relay.cli(&["dlq", "show", &first]);
    assert!(shown.contains("unknown product SKU-BAD"), "{shown}");
    let status = agent_cli(&agent, &["status"]);
    assert!(status.contains("2 refusals kept"), "{status}");

    // Fix the master data, replay, and the events are posted once.
    erp.accept_sku("SKU-BAD");
    let replayed = relay.cli(&["dlq", "replay", "--all"]);
    assert!(replayed.contains("2 dead letters sent back"), "{replayed}");
    wait_for_effects(&erp, &["dlq-2".to_string(), "dlq-7".to_string()], &relay);
    let list: serde_json::Value =
        serde_json::from_str(&relay.cli(&["dlq", "list", "--json"])).unwrap();
    assert_eq!(list["total"], 0);
    let effects = erp.effects();
    assert_eq!(effects.len(), 10, "every event exactly once");
}

/// The mapping of `config/relay.toml`'s example, plus a lot that only some scans have.
const PICK_MAPPING: &str = r#"
[sink.http.body.pick]
"salesOrder" = "{order}"
"line.number" = "{line:number}"
"line.item" = "{sku}"
"line.quantity" = "{qty:number}"
"line.lot" = "{lot}"
"externalId" = "{id}"
"postingDate" = "{ts:date}"
"source" = "backhaul {site}"
"#;

/// Scan `n` of the mapping test: picks with and without a line and a lot, in several offsets,
/// one with more digits than a float keeps; every fourth scan a receipt, which has no mapping.
fn mapped_scan(id: &str, n: u64) -> String {
    match n % 4 {
        0 => format!(
            r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T23:30:00-05:00","order":"SO-{n}","line":{},"sku":"SKU-1","qty":"1234567890.123456789","lot":"LOT-{n}"}}"#,
            n + 1
        ),
        1 => format!(
            r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-23T01:30:00+02:00","order":"SO-{n}","sku":"SKU-2","qty":"2.500"}}"#
        ),
        2 => format!(
            r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-11-22T10:15:00.123Z","order":"SO-{n}","line":1,"sku":"SKU-3","qty":3}}"#
        ),
        _ => format!(
            r#"{{"v":1,"id":"{id}","type":"receive","ts":"2026-11-22T10:15:00Z","sku":"SKU-4","qty":"5","location":"DOCK"}}"#
        ),
    }
}

/// The exact body the ERP must get for scan `n` (keys sorted by name; the agent keeps a qty
/// without its trailing zeros).
fn mapped_body(id: &str, n: u64, site: &str) -> Option<String> {
    let (line, date) = match n % 4 {
        0 => (
            format!(
                r#"{{"item":"SKU-1","lot":"LOT-{n}","number":{},"quantity":1234567890.123456789}}"#,
                n + 1
            ),
            "2026-11-22",
        ),
        1 => (
            r#"{"item":"SKU-2","quantity":2.5}"#.to_string(),
            "2026-11-23",
        ),
        2 => (
            r#"{"item":"SKU-3","number":1,"quantity":3}"#.to_string(),
            "2026-11-22",
        ),
        _ => return None,
    };
    Some(format!(
        r#"{{"externalId":"{id}","line":{line},"postingDate":"{date}","salesOrder":"SO-{n}","source":"backhaul {site}"}}"#
    ))
}

#[test]
fn a_body_mapping_posts_the_erps_own_shape_with_exact_numbers_and_dates() {
    let dir = tempfile::tempdir().unwrap();
    let erp = ErpStandIn::start();
    let broker = Mosquitto::start();
    let sink = format!(
        "[sink.http]\nurl = \"{}\"\ntimeout_ms = 5000\n{PICK_MAPPING}",
        erp.url()
    );
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker.port(),
        false,
        Some(&sink),
        &[("delivery.retry_min_ms", 100.into())],
    );
    let site = "mapped";
    let agent = agent(broker.port(), site);
    let device = "mapping-scanner";
    let scanner = Scanner::start(agent.mqtt_addr(), device, 20, mapped_scan);
    wait_for_acks(&scanner, 8);
    let acked = scanner.stop();

    // A scan sent while the scanner stopped may arrive too: every effect is checked, and
    // every acknowledged scan must be among them.
    let done = poll_until(Duration::from_secs(60), || {
        let keys: HashSet<String> = erp.requests().into_iter().map(|r| r.key).collect();
        acked.iter().all(|id| keys.contains(id)).then_some(())
    });
    assert!(
        done.is_some(),
        "not every scan reached the ERP\nrelay log:\n{}",
        relay.log_tail()
    );
    let requests = erp.requests();
    let mut posted: HashMap<String, String> = HashMap::new();
    for request in requests.iter().filter(|r| (200..300).contains(&r.status)) {
        let n: u64 = request
            .key
            .strip_prefix(&format!("{device}-"))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("an Idempotency-Key that is no scan id: {}", request.key));
        match mapped_body(&request.key, n, site) {
            Some(expected) => assert_eq!(request.text, expected, "scan {n}"),
            None => {
                // No mapping for receipts: the canonical JSON, as without any mapping.
                let body = &request.body;
                assert_eq!(body["id"], request.key.as_str(), "{}", request.text);
                assert_eq!(body["v"], 1);
                assert_eq!(body["type"], "receive");
                assert_eq!(body["qty"], "5");
                assert_eq!(body["location"], "DOCK");
                assert_eq!(body["site"], site);
                assert!(body["seq"].is_u64(), "{}", request.text);
            }
        }
        assert!(
            posted
                .insert(request.key.clone(), request.text.clone())
                .is_none(),
            "{} posted twice",
            request.key
        );
    }
    assert_eq!(
        erp.effect_texts().len(),
        posted.len(),
        "one effect per scan"
    );
    assert!(
        posted.contains_key(&format!("{device}-3")),
        "no receipt was posted"
    );
}

/// The warehouse learns of every refusal however long its agent was away: the relay keeps a
/// site's refusals until the agent has them on disk, and the agent keeps them across a kill.
#[test]
fn a_refusal_made_while_the_agent_is_down_reaches_it_and_survives_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let erp = ErpStandIn::start();
    erp.refuse_sku("SKU-BAD");
    // The ERP is down while the events arrive, so nothing is refused before the agent stops.
    erp.set_mode(Mode::Fail);
    let broker_port = backhaul_tests::free_port();
    let relay = relay(dir.path(), broker_port, &erp);
    let mut agent = agent(broker_port, "away");
    let events: Vec<serde_json::Value> = ["away-good", "away-bad"]
        .iter()
        .map(|id| {
            let sku = if id.ends_with("bad") {
                "SKU-BAD"
            } else {
                "SKU-OK"
            };
            serde_json::json!({"v":1, "id": id, "type":"receive", "ts": backhaul_tests::events::TS,
                "sku": sku, "qty": 1, "location": format!("L-{id}")})
        })
        .collect();
    assert_eq!(
        agent
            .post_events(&serde_json::Value::Array(events), None)
            .status()
            .as_u16(),
        202
    );
    let acknowledged = poll_until(Duration::from_secs(30), || {
        (agent.status()["backlog"]["events"] == 0).then_some(())
    });
    assert!(acknowledged.is_some(), "{}", agent.status());
    assert!(agent.terminate().success());

    erp.set_mode(Mode::Ok);
    let refused = poll_until(Duration::from_secs(30), || {
        let sites = relay.sites();
        (sites["sites"][0]["events_dead_lettered"] == 1).then_some(sites)
    })
    .expect("the bad receipt is dead-lettered");
    assert_eq!(
        refused["sites"][0]["refusals_unacknowledged"], 1,
        "{refused}"
    );

    agent.restart();
    let listed = |agent: &AgentProcess| {
        poll_until(Duration::from_secs(30), || {
            let rejects = agent.get_json("/v1/rejects");
            let list = rejects["erp_refusals"].as_array()?.clone();
            (list.len() == 1).then_some(list)
        })
    };
    let refusals = listed(&agent).expect("the refusal made while the agent was down is listed");
    assert_eq!(refusals[0]["id"], "away-bad");
    assert!(
        refusals[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("unknown product SKU-BAD"),
        "{refusals:?}"
    );
    let text = agent_cli(&agent, &["rejects"]);
    assert!(text.contains("away-bad"), "{text}");
    // The agent has it on disk: the relay forgets it.
    let forgotten = poll_until(Duration::from_secs(30), || {
        let sites = relay.sites();
        (sites["sites"][0]["refusals_unacknowledged"] == 0).then_some(())
    });
    assert!(forgotten.is_some(), "{}", relay.sites());

    // Killed after receiving it: still there, and no copy of it.
    agent.kill9();
    agent.restart();
    let refusals = listed(&agent).expect("the refusal survives a SIGKILL");
    assert_eq!(refusals[0]["id"], "away-bad");
    assert_eq!(agent.status()["erp_refusals_stored"], 1);
}

fn agent_cli(agent: &AgentProcess, args: &[&str]) -> String {
    let output = std::process::Command::new(backhaul_tests::binary("backhaul-agent"))
        .args(args)
        .args(["--url", &agent.admin_url()])
        .output()
        .expect("backhaul-agent runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
