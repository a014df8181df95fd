//! The relay tier on PostgreSQL: relays share one outbox in a real PostgreSQL behind real
//! Mosquitto with a `$share` group, and whatever is SIGKILLed (a relay, the database) or cut
//! (a site's link), every event an agent had acknowledged reaches the ERP with one effect, in
//! order per key, and nothing is left in the outbox.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::erp_standin::{ErpStandIn, Mode};
use backhaul_tests::events::pick;
use backhaul_tests::mosquitto::Mosquitto;
use backhaul_tests::postgres::Postgres;
use backhaul_tests::proxy::TcpProxy;
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::{poll_until, run_binary};
use rand::RngExt;
use serde_json::Value;

const ORDERS_PER_SITE: usize = 5;

fn relay(
    dir: &std::path::Path,
    broker_port: u16,
    postgres: &Postgres,
    erp: &ErpStandIn,
    shared: bool,
) -> RelayProcess {
    let sink = format!("[sink.http]\nurl = \"{}\"\ntimeout_ms = 2000\n", erp.url());
    let mut settings: Vec<(&str, toml_edit::Value)> = vec![
        ("outbox.backend", "postgres".into()),
        ("outbox.url", postgres.url().into()),
        ("outbox.lease_secs", 5.into()),
        ("delivery.concurrency", 4.into()),
        ("delivery.retry_min_ms", 100.into()),
        ("delivery.retry_max_ms", 1000.into()),
    ];
    if shared {
        settings.push(("broker.shared_group", "backhaul-relays".into()));
    }
    RelayProcess::start_with(dir, broker_port, false, Some(&sink), &settings)
}

fn site_agent(broker_port: u16, site: &str) -> AgentProcess {
    AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", site)
            .set("uplink.client_id", format!("agent-{site}-{broker_port}"))
            .set("uplink.linger_ms", 10)
            .set("uplink.ack_timeout_secs", 3)
            .set("uplink.reconnect_min_ms", 50)
            .set("uplink.reconnect_max_ms", 1000),
    )
}

/// Posts `n` picks, numbered from `from`, spread over the site's orders; returns their ids.
fn post(agent: &AgentProcess, site: &str, from: usize, n: usize) -> Vec<String> {
    let events: Vec<Value> = (from..from + n)
        .map(|i| {
            pick(
                &format!("{site}-{i:06}"),
                &format!("{site}-SO-{}", i % ORDERS_PER_SITE),
            )
        })
        .collect();
    let ids = events
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect();
    let response = agent.post_events(&Value::Array(events), None);
    assert_eq!(response.status().as_u16(), 202);
    ids
}

fn backlog(agent: &AgentProcess) -> u64 {
    agent.status()["backlog"]["events"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// Every id has exactly one effect in the ERP, and each order's events took effect in the
/// order they were posted (the ids number them).
fn assert_exactly_once_in_order(erp: &ErpStandIn, wanted: &[String]) {
    let effects = erp.effects();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut by_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for effect in &effects {
        let id = effect["id"].as_str().unwrap_or_default().to_string();
        *seen.entry(id.clone()).or_default() += 1;
        let order = effect["order"].as_str().unwrap_or_default().to_string();
        by_order.entry(order).or_default().push(id);
    }
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "events with more than one effect: {twice:?}"
    );
    let wanted_set: HashSet<&String> = wanted.iter().collect();
    let missing: Vec<_> = wanted.iter().filter(|id| !seen.contains_key(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} events never reached the ERP: {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(
        effects.len(),
        wanted_set.len(),
        "effects of events nobody posted"
    );
    for (order, ids) in by_order {
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "order {order} took effect out of order");
    }
}

fn outbox_rows(postgres: &Postgres) -> i64 {
    postgres
        .client()
        .query_one(
            "SELECT (SELECT count(*) FROM backhaul.events)
                  + (SELECT coalesce(sum(events), 0) FROM backhaul.staged)::bigint",
            &[],
        )
        .expect("count the outbox")
        .get(0)
}

fn assert_outbox_empties(postgres: &Postgres) {
    let emptied = poll_until(Duration::from_secs(30), || {
        (outbox_rows(postgres) == 0).then_some(())
    });
    assert!(
        emptied.is_some(),
        "{} events left in the outbox",
        outbox_rows(postgres)
    );
}

#[test]
fn a_relay_on_postgres_loses_nothing_through_its_sigkill_and_the_databases() {
    let dir = tempfile::tempdir().unwrap();
    let mut postgres = Postgres::start();
    let broker = Mosquitto::start();
    let erp = ErpStandIn::start();
    let mut relay = relay(
        &dir.path().join("relay"),
        broker.port(),
        &postgres,
        &erp,
        false,
    );
    let agent = site_agent(broker.port(), "wh-a");

    let mut wanted = post(&agent, "wh-a", 0, 300);
    relay.kill9();
    wanted.extend(post(&agent, "wh-a", 300, 300));
    relay.restart();
    wanted.extend(post(&agent, "wh-a", 600, 300));
    postgres.kill9();
    wanted.extend(post(&agent, "wh-a", 900, 300));
    // The relay refuses what it cannot store, and the site says why.
    let refused = poll_until(Duration::from_secs(30), || {
        let link = &agent.status()["link"];
        (link["state"] == "relay outbox down").then(|| link.clone())
    });
    assert!(refused.is_some(), "{}", agent.status());
    assert!(
        relay
            .metrics()
            .contains("backhaul_relay_batches_refused_total{reason=\"outbox_unavailable\"}"),
        "{}",
        relay.metrics()
    );
    assert!(
        backlog(&agent) >= 300,
        "the agent keeps what was refused: {}",
        agent.status()
    );
    postgres.restart();
    wanted.extend(post(&agent, "wh-a", 1200, 300));

    let done = poll_until(Duration::from_secs(90), || {
        (backlog(&agent) == 0 && erp.effects().len() >= wanted.len()).then_some(())
    });
    assert!(
        done.is_some(),
        "backlog {}, {} of {} in the ERP; relay:\n{}",
        backlog(&agent),
        erp.effects().len(),
        wanted.len(),
        relay.log_tail()
    );
    assert_exactly_once_in_order(&erp, &wanted);
    assert_outbox_empties(&postgres);
    let status = relay.status();
    assert!(
        status["outbox_path"]
            .as_str()
            .unwrap_or_default()
            .starts_with("postgresql 127.0.0.1:"),
        "{status}"
    );
}

/// Fifty real agents (the real uplink, its signing, log and acknowledgement rules, rather than
/// a simulation of them) into three relays on one PostgreSQL.
#[test]
fn three_relays_share_one_outbox_through_kills_a_database_restart_and_a_cut_link() {
    const SITES: usize = 50;
    const PER_WAVE: usize = 10;
    let dir = tempfile::tempdir().unwrap();
    let mut postgres = Postgres::start();
    let broker = Mosquitto::start();
    let erp = ErpStandIn::start();
    let mut relays: Vec<RelayProcess> = (0..3)
        .map(|i| {
            relay(
                &dir.path().join(format!("relay-{i}")),
                broker.port(),
                &postgres,
                &erp,
                true,
            )
        })
        .collect();
    let proxy = TcpProxy::start(broker.addr());
    let sites: Vec<(String, AgentProcess)> = (0..SITES)
        .map(|i| {
            let site = format!("wh-{i:02}");
            // The last site reaches the broker through a link the test cuts.
            let port = if i == SITES - 1 {
                proxy.port()
            } else {
                broker.port()
            };
            let agent = site_agent(port, &site);
            (site, agent)
        })
        .collect();

    let mut wanted = Vec::new();
    let mut next = 0;
    let wave = |wanted: &mut Vec<String>, next: &mut usize| {
        for (site, agent) in &sites {
            wanted.extend(post(agent, site, *next, PER_WAVE));
        }
        *next += PER_WAVE;
    };
    let mut rng = rand::rng();
    let mut killed = Vec::new();
    for round in 0..10 {
        wave(&mut wanted, &mut next);
        let victim = rng.random_range(0..relays.len());
        killed.push(victim);
        relays[victim].kill9();
        wave(&mut wanted, &mut next);
        relays[victim].restart();
        match round {
            2 => proxy.cut(),
            4 => {
                postgres.kill9();
                wave(&mut wanted, &mut next);
                postgres.restart();
            }
            7 => proxy.restore(),
            _ => {}
        }
    }
    wave(&mut wanted, &mut next);

    let done = poll_until(Duration::from_secs(180), || {
        (sites.iter().all(|(_, agent)| backlog(agent) == 0) && erp.effects().len() >= wanted.len())
            .then_some(())
    });
    assert!(
        done.is_some(),
        "relays killed {killed:?}; backlogs {:?}, {} of {} in the ERP",
        sites.iter().map(|(_, a)| backlog(a)).collect::<Vec<_>>(),
        erp.effects().len(),
        wanted.len()
    );
    assert_exactly_once_in_order(&erp, &wanted);
    assert_outbox_empties(&postgres);
    // Every relay answers for the whole fleet.
    for relay in &relays {
        let listed = poll_until(Duration::from_secs(10), || {
            let sites = relay.sites();
            (sites["sites"].as_array().map(Vec::len) == Some(SITES)).then_some(())
        });
        assert!(listed.is_some(), "{}", relay.sites());
    }
    eprintln!(
        "relays killed {killed:?}: {} events, {} effects, {} requests to the ERP (repeats after \
         kills are idempotent)",
        wanted.len(),
        erp.effects().len(),
        erp.requests().len()
    );
}

/// Dead letters, replay, discard, status and the sites table work the same on PostgreSQL,
/// from any relay: one relay dead-letters, the other lists, replays and discards.
#[test]
fn dead_letters_are_seen_and_handled_from_any_relay() {
    let dir = tempfile::tempdir().unwrap();
    let postgres = Postgres::start();
    let broker = Mosquitto::start();
    let erp = ErpStandIn::start();
    erp.refuse_sku("SKU-BAD");
    let first = relay(
        &dir.path().join("first"),
        broker.port(),
        &postgres,
        &erp,
        true,
    );
    let second = relay(
        &dir.path().join("second"),
        broker.port(),
        &postgres,
        &erp,
        true,
    );
    let agent = site_agent(broker.port(), "wh-dlq");
    let events: Vec<Value> = (0..9)
        .map(|i| {
            let sku = if i % 3 == 1 { "SKU-BAD" } else { "SKU-OK" };
            serde_json::json!({"v": 1, "id": format!("dlq-{i}"), "type": "receive",
                "ts": "2026-11-22T10:15:00Z", "sku": sku, "qty": 1, "location": format!("L-{i}")})
        })
        .collect();
    let response = agent.post_events(&Value::Array(events), None);
    assert_eq!(response.status().as_u16(), 202);

    let dead_letters = |relay: &RelayProcess| -> Option<Value> {
        serde_json::from_str(&relay.cli(&["dlq", "list", "--json"])).ok()
    };
    for relay in [&first, &second] {
        let listed = poll_until(Duration::from_secs(30), || {
            dead_letters(relay).filter(|list| list["total"] == 3)
        });
        assert!(listed.is_some(), "{:?}", dead_letters(relay));
        let sites = poll_until(Duration::from_secs(10), || {
            let sites = relay.sites();
            (sites["sites"][0]["events_dead_lettered"] == 3).then_some(sites)
        });
        assert!(sites.is_some(), "{}", relay.sites());
    }
    assert_eq!(erp.effects().len(), 6, "the good events are not held back");
    let listed = dead_letters(&second).unwrap();
    let ids: Vec<String> = listed["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].to_string())
        .collect();
    let shown = first.cli(&["dlq", "show", &ids[0]]);
    assert!(shown.contains("unknown product SKU-BAD"), "{shown}");

    // One is discarded through the first relay, the rest replayed through the second.
    erp.accept_sku("SKU-BAD");
    let discarded = first.cli(&["dlq", "discard", &ids[2]]);
    assert!(discarded.contains('1'), "{discarded}");
    let replayed = second.cli(&["dlq", "replay", "--all"]);
    assert!(replayed.contains("2 dead letters sent back"), "{replayed}");
    let effects = poll_until(Duration::from_secs(30), || {
        (erp.effects().len() == 8).then(|| erp.effects())
    });
    assert!(effects.is_some(), "{:?}", erp.effects());
    for relay in [&first, &second] {
        let emptied = poll_until(Duration::from_secs(10), || {
            dead_letters(relay).filter(|list| list["total"] == 0)
        });
        assert!(emptied.is_some(), "{:?}", dead_letters(relay));
        // A discarded dead letter has left the outbox too.
        let empty = poll_until(Duration::from_secs(10), || {
            (relay.status()["outbox_depth"] == 0).then_some(())
        });
        assert!(empty.is_some(), "{}", relay.status());
        let site = &relay.sites()["sites"][0];
        assert_eq!(site["events_discarded"], 1, "{site}");
        assert_eq!(site["events_delivered"], 8, "{site}");
    }
    assert_eq!(outbox_rows(&postgres), 0);

    // Either relay traces a replayed event from its refusal to its delivery.
    for relay in [&first, &second] {
        let traces: Value =
            serde_json::from_str(&relay.cli(&["trace", "dlq-1", "--json"])).expect("trace JSON");
        let trace = &traces[0];
        assert_eq!(trace["state"], "posted", "{traces}");
        assert_eq!(trace["site"], "wh-dlq");
        let results: Vec<&str> = trace["attempts"]
            .as_array()
            .expect("attempts")
            .iter()
            .filter_map(|a| a["result"].as_str())
            .collect();
        assert_eq!(results, ["refused", "posted"], "{trace}");
        let seq = trace["seq"].as_u64();
        assert!(
            trace["batch"]["first_seq"].as_u64() <= seq
                && trace["batch"]["last_seq"].as_u64() >= seq,
            "{trace}"
        );
    }

    // The site takes dlq-0 again (it had forwarded and forgotten it): a repeat, dropped.
    let again = agent.post_events(
        &serde_json::json!([{"v": 1, "id": "dlq-0", "type": "receive",
            "ts": "2026-11-22T10:15:00Z", "sku": "SKU-OK", "qty": 1, "location": "L-0"}]),
        None,
    );
    assert_eq!(again.status().as_u16(), 202);

    // Either relay reconciles the site's day from the PostgreSQL outbox: ten accepted, eight
    // posted, one discarded, one repeat; the HTTP ERP cannot be asked, and the report says so.
    let today = time::OffsetDateTime::now_utc().date();
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let (from, to) = (
        today.previous_day().unwrap().format(&format).unwrap(),
        today.next_day().unwrap().format(&format).unwrap(),
    );
    for relay in [&first, &second] {
        let reconciled = poll_until(Duration::from_secs(30), || {
            let report: Value = serde_json::from_str(&relay.cli(&[
                "reconcile",
                "--site",
                "wh-dlq",
                "--from",
                &from,
                "--to",
                &to,
                "--json",
            ]))
            .ok()?;
            let receive = report["rows"]
                .as_array()?
                .iter()
                .find(|r| r["type"] == "receive" && r["accepted"].as_u64() > Some(0))?
                .clone();
            (receive["accepted"] == 10 && receive["repeats"] == 1).then_some((report, receive))
        });
        let (report, receive) = reconciled.expect("the site's tally on PostgreSQL");
        assert_eq!(receive["posted"], 8, "{report:#}");
        assert_eq!(receive["discarded"], 1, "{report:#}");
        assert_eq!(receive["not_at_relay"], 0, "{report:#}");
        assert_eq!(receive["in_erp"], Value::Null, "{report:#}");
        assert_eq!(report["erp_checked"], false);
        assert_eq!(report["differences_total"], 1, "{report:#}");
        assert_eq!(report["differences"][0]["state"], "discarded");
    }

    // Relays that stop cleanly hand back the keys they hold: with the ERP failing, a key
    // stays held while it is retried, until both relays stop.
    erp.set_mode(Mode::Fail);
    let response = agent.post_events(&Value::Array(vec![pick("dlq-held", "SO-HELD")]), None);
    assert_eq!(response.status().as_u16(), 202);
    let held = || -> i64 {
        postgres
            .client()
            .query_one(
                "SELECT count(*) FROM backhaul.queues WHERE lease_owner IS NOT NULL",
                &[],
            )
            .map(|row| row.get(0))
            .unwrap_or(-1)
    };
    assert!(
        poll_until(Duration::from_secs(30), || (held() >= 1).then_some(())).is_some(),
        "no relay took the key"
    );
    let (mut first, mut second) = (first, second);
    for relay in [&mut first, &mut second] {
        let status = relay.terminate().expect("the relay stops on SIGTERM");
        assert!(status.success(), "{status}");
    }
    assert_eq!(held(), 0, "keys still held by stopped relays");
}

#[test]
fn check_config_refuses_postgres_settings_that_cannot_work() {
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(backhaul_tests::example_config("relay.toml")).unwrap();
    let check = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = run_binary(
            "backhaul-relay",
            &["check-config", "--config", &file.to_string_lossy()],
        );
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = check(
        "no-url.toml",
        &shipped.replace("backend = \"redb\"", "backend = \"postgres\""),
    );
    assert!(!ok);
    assert!(stderr.contains("key `outbox.url`"), "{stderr}");
    let (ok, stderr) = check(
        "ledger-shared.toml",
        &shipped
            .replace(
                "backend = \"redb\"",
                "backend = \"postgres\"\nurl = \"postgresql://backhaul@db/backhaul\"",
            )
            .replace(
                "# shared_group = \"backhaul-relays\"",
                "shared_group = \"backhaul-relays\"",
            ),
    );
    assert!(!ok);
    assert!(stderr.contains("key `sink.ledger`"), "{stderr}");
    assert!(
        stderr.contains("each relay would write its own"),
        "{stderr}"
    );
}

/// A count event of `site` with its own location, so each is a queue of its own.
fn count_entry(seq: u64, id: &str) -> backhaul_events::BatchEntry {
    let json = format!(
        r#"{{"v":1,"id":"{id}","type":"count","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"location":"L-{id}"}}"#
    );
    backhaul_events::BatchEntry {
        seq,
        received_at_ms: 0,
        event: backhaul_events::event::parse_event(json.as_bytes()).expect("a valid event"),
    }
}

/// A batch of `site` sent while the agent had everything through `acked_through`
/// acknowledged, its events numbered from `first_seq`.
fn batch_of(
    epoch: u128,
    acked_through: u64,
    first_seq: u64,
    ids: &[&str],
) -> backhaul_events::BatchFrame {
    backhaul_events::BatchFrame {
        site: "wh-park".into(),
        epoch: backhaul_events::Epoch(epoch),
        acked_through,
        first_seq,
        last_seq: first_seq + ids.len() as u64 - 1,
        events: ids
            .iter()
            .enumerate()
            .map(|(i, id)| count_entry(first_seq + i as u64, id))
            .collect(),
        signature: None,
    }
}

/// With a `$share` group, a site's batches reach different relays and are stored in any
/// order: one that starts past a gap is kept without being acknowledged, the batch that
/// closes the gap is acknowledged through every batch it joined, delivery follows the
/// sites' order, and re-sent batches and ids seen in an earlier epoch are stored once.
#[test]
fn batches_stored_out_of_order_are_acknowledged_once_the_gap_closes() {
    use backhaul_relay::outbox::Outbox;
    use backhaul_relay::outbox::postgres::{PgOptions, PgOutbox};
    let postgres = Postgres::start();
    let outbox = PgOutbox::open(PgOptions {
        url: postgres.url(),
        password: None,
        relay_id: "relay-test".into(),
        lease: Duration::from_secs(5),
        max_bytes: 1 << 30,
        connections: 2,
        keep_batches: true,
    })
    .expect("the outbox opens");
    let store = |batch: backhaul_events::BatchFrame| {
        let mut results = outbox.store(&[batch]).expect("stored");
        results.remove(0)
    };
    // The agent sent three batches before any acknowledgement; the third arrives first.
    let third = store(batch_of(1, 0, 7, &["p7", "p8", "p9"]));
    assert_eq!((third.acked_through, third.refused), (0, None));
    let second = store(batch_of(1, 0, 4, &["p4", "p5", "p6"]));
    assert_eq!((second.acked_through, second.refused), (0, None));
    // A re-send of a parked batch is not kept twice.
    store(batch_of(1, 0, 4, &["p4", "p5", "p6"]));
    let parked: i64 = postgres
        .client()
        .query_one("SELECT count(*) FROM backhaul.staged WHERE parked", &[])
        .expect("count parked batches")
        .get(0);
    assert_eq!(parked, 2);
    assert!(outbox.pending(100).expect("pending").is_empty());
    // The first closes the gap: its acknowledgement covers all three.
    let first = store(batch_of(1, 0, 1, &["p1", "p2", "p3"]));
    assert_eq!((first.acked_through, first.refused), (9, None));
    // Re-sent after a timeout, the third is acknowledged and stored once.
    let again = store(batch_of(1, 0, 7, &["p7", "p8", "p9"]));
    assert_eq!((again.acked_through, again.stored), (9, 0));
    // Far past anything stored is still a gap, refused for the agent to re-send in order.
    let far = store(batch_of(1, 9, 500_000, &["far"]));
    assert_eq!(
        far.refused,
        Some(backhaul_events::BatchRefusal::Gap),
        "{far:?}"
    );
    // A new epoch (the agent's log started over) repeating an id: stored once.
    let next_epoch = store(batch_of(2, 0, 1, &["p1", "q2"]));
    assert_eq!(next_epoch.acked_through, 2);
    let pending: Vec<String> = outbox
        .pending(100)
        .expect("pending")
        .into_iter()
        .map(|(_, event)| event.event.id)
        .collect();
    assert_eq!(
        pending,
        ["p1", "p2", "p3", "p4", "p5", "p6", "p7", "p8", "p9", "q2"]
    );
    let site = poll_until(Duration::from_secs(10), || {
        outbox
            .sites()
            .into_iter()
            .find(|s| s.site == "wh-park" && s.events_duplicate >= 4)
    })
    .unwrap_or_else(|| panic!("the site's record counts the repeats: {:?}", outbox.sites()));
    assert_eq!(site.events_stored, 10, "{site:?}");
    assert_eq!(site.events_duplicate, 4, "{site:?}");
    assert_eq!(site.outbox_depth(), 10, "{site:?}");
}
