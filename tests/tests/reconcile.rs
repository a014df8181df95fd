//! Reconciliation against a real Tryton: a day with a WAN cut, an event Tryton refuses, and a
//! document an operator deleted in Tryton by hand. `backhaul-relay reconcile` shows what the
//! site accepted, what the relay posted and dead-lettered and what Tryton still holds, per
//! type, and lists exactly the dead letter and the deleted document as differences; the
//! ledger connector is reconciled against its own file, an HTTP ERP at its lookup URL.

use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::erp_standin::ErpStandIn;
use backhaul_tests::poll_until;
use backhaul_tests::proxy::TcpProxy;
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::tryton::Tryton;
use serde_json::{Value, json};

fn event(id: &str, fields: Value) -> Value {
    let mut event = fields;
    event["v"] = json!(1);
    event["id"] = json!(id);
    event["ts"] = json!(backhaul_tests::events::scan_ts());
    event
}

/// Posts events to the agent over HTTP; they are durable when it answers 202.
fn post(agent: &AgentProcess, events: Vec<Value>) {
    let response = agent.post_events(&Value::Array(events), None);
    assert_eq!(response.status().as_u16(), 202);
}

/// Yesterday, today and tomorrow (UTC): a run that crosses midnight still covers its events.
fn days_around_now() -> (String, String) {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    let today = time::OffsetDateTime::now_utc().date();
    let day = |d: Option<time::Date>| {
        d.expect("a day next to today")
            .format(&format)
            .expect("a formatted day")
    };
    (day(today.previous_day()), day(today.next_day()))
}

fn reconcile(relay: &RelayProcess, site: &str) -> Value {
    let (from, to) = days_around_now();
    let text = relay.cli(&[
        "reconcile",
        "--site",
        site,
        "--from",
        &from,
        "--to",
        &to,
        "--json",
    ]);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("reconcile --json: {e}: {text}"))
}

/// Each column summed over the days, per event type.
fn by_type(report: &Value, kind: &str, column: &str) -> Option<u64> {
    let rows: Vec<&Value> = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter(|r| r["type"] == kind)
        .collect();
    let values: Vec<u64> = rows.iter().filter_map(|r| r[column].as_u64()).collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

#[test]
fn a_day_with_a_cut_a_dead_letter_and_a_deleted_document_reconciles_to_exactly_those_two() {
    let tryton = Tryton::start();
    let dir = tempfile::tempdir().unwrap();
    let broker_port = backhaul_tests::free_port();
    let settings: Vec<(&str, toml_edit::Value)> = vec![
        ("delivery.retry_min_ms", 200.into()),
        ("delivery.retry_max_ms", 2000.into()),
    ];
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker_port,
        true,
        Some(&format!("{}waiting_retry_ms = 500\n", tryton.sink_config())),
        &settings,
    );
    let wan = TcpProxy::start(([127, 0, 0, 1], broker_port).into());
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", wan.port())
            .set("site", "wh1")
            .set("uplink.client_id", format!("agent-wh1-{broker_port}"))
            .set("uplink.linger_ms", 10)
            .set("uplink.reconnect_max_ms", 500),
    );

    // Morning: the link is up.
    let morning = vec![
        event(
            "rcv-1",
            json!({"type": "receive", "sku": "SKU-001", "qty": "30", "po": "PO-1"}),
        ),
        event(
            "adj-1",
            json!({"type": "adjust", "sku": "SKU-001", "qty": "-2", "reason": "damaged"}),
        ),
        event(
            "cnt-1",
            json!({"type": "count", "sku": "SKU-002", "qty": "17", "location": "A1"}),
        ),
    ];
    post(&agent, morning);
    let in_tryton = |model: &str, reference: &str| {
        tryton.shipment_state(model, reference).as_deref() == Some("done")
    };
    assert!(
        poll_until(Duration::from_secs(90), || in_tryton(
            "stock.shipment.in",
            "rcv-1"
        )
        .then_some(()))
        .is_some(),
        "rcv-1 never reached Tryton\n{}",
        relay.log_tail()
    );

    assert!(
        poll_until(Duration::from_secs(30), || {
            (agent.status()["backlog"]["events"] == 0).then_some(())
        })
        .is_some()
    );

    // The WAN goes down: the afternoon's scans wait at the site.
    wan.cut();
    let afternoon = vec![
        event(
            "rcv-2",
            json!({"type": "receive", "sku": "SKU-003", "qty": "12", "po": "PO-2"}),
        ),
        event(
            "adj-2",
            json!({"type": "adjust", "sku": "SKU-001", "qty": "4", "reason": "found"}),
        ),
        event(
            "rcv-bad",
            json!({"type": "receive", "sku": "SKU-NEW", "qty": "5", "po": "PO-3"}),
        ),
        event(
            "pick-1",
            json!({"type": "pick", "sku": "SKU-001", "qty": "3", "order": "SO-R-1", "line": 1}),
        ),
        event(
            "ship-1",
            json!({"type": "ship", "sku": "SKU-001", "qty": "3", "order": "SO-R-1"}),
        ),
        // The WMS sends the morning's adjustment again: the agent, which forwarded and
        // forgot it, takes it as new; the relay drops it as a repeat.
        event(
            "adj-1",
            json!({"type": "adjust", "sku": "SKU-001", "qty": "-2", "reason": "damaged"}),
        ),
    ];
    post(&agent, afternoon);
    assert_eq!(agent.status()["backlog"]["events"], 6);

    // Back up: everything goes; Tryton refuses the unknown SKU.
    wan.restore();
    let afternoon_booked = || {
        in_tryton("stock.shipment.in", "rcv-2")
            && in_tryton("stock.shipment.internal", "adj-2")
            && in_tryton("stock.shipment.out", "SO-R-1")
    };
    assert!(
        poll_until(Duration::from_secs(90), || afternoon_booked().then_some(())).is_some(),
        "the afternoon never reached Tryton\n{}",
        relay.log_tail()
    );
    let dead = poll_until(Duration::from_secs(30), || {
        let list: Value = serde_json::from_str(&relay.cli(&["dlq", "list", "--json"])).ok()?;
        (list["total"] == 1).then_some(list)
    });
    assert!(dead.is_some(), "no dead letter\n{}", relay.log_tail());

    // An operator deletes rcv-2's receipt in Tryton by hand: cancelled, then deleted.
    let shipment = tryton
        .id_of("stock.shipment.in", "reference", "rcv-2")
        .expect("rcv-2's shipment");
    tryton.call("model.stock.shipment.in.cancel", json!([[shipment]]));
    tryton.call("model.stock.shipment.in.delete", json!([[shipment]]));
    assert_eq!(
        tryton.id_of("stock.shipment.in", "reference", "rcv-2"),
        None
    );

    // The site's tally reaches the relay (at each connect, and within seconds of a change).
    let report = poll_until(Duration::from_secs(30), || {
        let report = reconcile(&relay, "wh1");
        let accepted: u64 = ["pick", "ship", "receive", "adjust", "count"]
            .iter()
            .filter_map(|kind| by_type(&report, kind, "accepted"))
            .sum();
        (accepted == 9 && report["waiting_at_site"] == 0).then_some(report)
    })
    .unwrap_or_else(|| {
        panic!(
            "the relay never had the site's tally of 9 accepted events: {}",
            reconcile(&relay, "wh1")
        )
    });
    assert_eq!(report["erp"], "tryton");
    assert_eq!(report["erp_checked"], true, "{report:#}");

    let column = |kind: &str, name: &str| by_type(&report, kind, name);
    // Receipts: three accepted, all at the relay; two posted, one dead-lettered; Tryton holds
    // one of the two posted (the other was deleted).
    assert_eq!(column("receive", "accepted"), Some(3), "{report:#}");
    assert_eq!(column("receive", "at_relay"), Some(3));
    assert_eq!(column("receive", "not_at_relay"), Some(0));
    assert_eq!(column("receive", "posted"), Some(2));
    assert_eq!(column("receive", "dead_lettered"), Some(1));
    assert_eq!(column("receive", "in_erp"), Some(1));
    assert_eq!(column("receive", "not_in_erp"), Some(1));
    // Adjustments and counts: everything in Tryton, the repeat once.
    assert_eq!(column("adjust", "accepted"), Some(3));
    assert_eq!(column("adjust", "repeats"), Some(1), "{report:#}");
    assert_eq!(column("adjust", "posted"), Some(2));
    assert_eq!(column("adjust", "not_at_relay"), Some(0));
    assert_eq!(column("adjust", "in_erp"), Some(2));
    assert_eq!(column("adjust", "not_in_erp"), Some(0));
    assert_eq!(column("count", "accepted"), Some(1));
    assert_eq!(column("count", "in_erp"), Some(1));
    // The pick and the ship of one order line are in the order's customer shipment.
    for kind in ["pick", "ship"] {
        assert_eq!(column(kind, "accepted"), Some(1), "{report:#}");
        assert_eq!(column(kind, "in_erp"), Some(1), "{report:#}");
    }

    // Exactly two differences: the dead letter and the deleted document, each with why.
    assert_eq!(report["differences_total"], 2, "{report:#}");
    let differences = report["differences"].as_array().unwrap();
    let of = |id: &str| {
        differences
            .iter()
            .find(|d| d["id"] == id)
            .unwrap_or_else(|| panic!("no difference for {id}: {report:#}"))
    };
    let refused = of("rcv-bad");
    assert_eq!(refused["state"], "dead_lettered");
    assert!(
        refused["detail"].as_str().unwrap().contains("SKU-NEW"),
        "{refused}"
    );
    let deleted = of("rcv-2");
    assert_eq!(deleted["state"], "not_in_erp");
    let detail = deleted["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("stock.shipment.in/{shipment}")) && detail.contains("deleted"),
        "{detail}"
    );

    // Per SKU and location: what the site's events imply against Tryton's done moves (SKU-001:
    // +30 received, -2 and +4 adjusted, 3 picked and shipped once). The deleted receipt and the
    // refused one are short; everything else matches.
    let quantities: Vec<(String, String, String, String, bool)> = report["quantities"]
        .as_array()
        .unwrap_or_else(|| panic!("no quantities: {report:#}"))
        .iter()
        .map(|q| {
            let text = |k: &str| q[k].as_str().unwrap_or_default().to_string();
            (
                text("sku"),
                text("location"),
                text("implied"),
                text("booked"),
                q["differs"] == true,
            )
        })
        .collect();
    let row = |sku: &str, implied: &str, booked: &str| {
        let differs = implied != booked;
        (
            sku.to_string(),
            "(storage)".to_string(),
            implied.to_string(),
            booked.to_string(),
            differs,
        )
    };
    assert_eq!(
        quantities,
        vec![
            row("SKU-001", "29", "29"),
            row("SKU-003", "12", "0"),
            row("SKU-NEW", "5", "0"),
        ],
        "{report:#}"
    );

    // The same report as a table and as CSV.
    let (from, to) = days_around_now();
    let table = relay.cli(&["reconcile", "--site", "wh1", "--from", &from, "--to", &to]);
    assert!(table.contains("2 differences:"), "{table}");
    assert!(
        table.contains("rcv-2") && table.contains("not_in_erp"),
        "{table}"
    );
    let csv = relay.cli(&[
        "reconcile",
        "--site",
        "wh1",
        "--from",
        &from,
        "--to",
        &to,
        "--csv",
    ]);
    assert!(csv.starts_with("site,day,type,accepted_at_site,"), "{csv}");
    assert_eq!(
        csv.lines()
            .filter(|l| l.starts_with("wh1,") && l.contains(",not_in_erp,"))
            .count(),
        1,
        "{csv}"
    );

    // A site the relay never heard of says so instead of reporting nothing.
    let unknown = reconcile(&relay, "wh9");
    assert!(
        unknown["notes"][0]
            .as_str()
            .unwrap()
            .contains("no tally from site wh9"),
        "{unknown}"
    );
    drop(agent);
}

#[test]
fn the_ledger_is_reconciled_against_its_own_lines() {
    let dir = tempfile::tempdir().unwrap();
    let broker_port = backhaul_tests::free_port();
    let relay = RelayProcess::start(&dir.path().join("relay"), broker_port, true);
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", "wh2")
            .set("uplink.client_id", format!("agent-wh2-{broker_port}"))
            .set("uplink.linger_ms", 10),
    );
    let events: Vec<Value> = (1..=5)
        .map(|n| {
            event(
                &format!("pick-{n}"),
                json!({"type": "pick", "sku": "SKU-001", "qty": "1", "order": format!("SO-{n}")}),
            )
        })
        .collect();
    post(&agent, events);
    assert!(
        poll_until(Duration::from_secs(30), || (relay.ledger().len() == 5)
            .then_some(()))
        .is_some()
    );
    // A line removed from the ledger by hand is the one difference.
    let path = relay.ledger_path();
    let text = std::fs::read_to_string(&path).unwrap();
    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("\"pick-3\"")).collect();
    let report = poll_until(Duration::from_secs(30), || {
        let report = reconcile(&relay, "wh2");
        (by_type(&report, "pick", "accepted") == Some(5)).then_some(report)
    })
    .expect("the site's tally");
    assert_eq!(report["differences_total"], 0, "{report:#}");
    std::fs::write(&path, format!("{}\n", kept.join("\n"))).unwrap();
    let report = reconcile(&relay, "wh2");
    assert_eq!(report["erp"], "ledger");
    assert_eq!(by_type(&report, "pick", "posted"), Some(5));
    assert_eq!(by_type(&report, "pick", "in_erp"), Some(4));
    assert_eq!(report["differences_total"], 1, "{report:#}");
    assert_eq!(report["differences"][0]["id"], "pick-3");
    assert_eq!(report["differences"][0]["state"], "not_in_erp");
    drop(agent);
}

#[test]
fn an_http_erp_is_asked_at_its_lookup_url() {
    let erp = ErpStandIn::start();
    let dir = tempfile::tempdir().unwrap();
    let broker_port = backhaul_tests::free_port();
    let sink = format!(
        "[sink.http]\nurl = \"{0}\"\nlookup_url = \"{0}/{{id}}\"\n",
        erp.url()
    );
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker_port,
        true,
        Some(&sink),
        &[],
    );
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", "wh3")
            .set("uplink.client_id", format!("agent-wh3-{broker_port}"))
            .set("uplink.linger_ms", 10),
    );
    let events: Vec<Value> = (1..=4)
        .map(|n| {
            event(
                &format!("adj-{n}"),
                json!({"type": "adjust", "sku": format!("SKU-{n}"), "qty": "1", "reason": "found"}),
            )
        })
        .collect();
    post(&agent, events);
    assert!(
        poll_until(Duration::from_secs(30), || (erp.effects().len() == 4)
            .then_some(()))
        .is_some()
    );
    erp.forget("adj-2");
    let report = poll_until(Duration::from_secs(30), || {
        let report = reconcile(&relay, "wh3");
        (by_type(&report, "adjust", "posted") == Some(4)
            && by_type(&report, "adjust", "accepted") == Some(4))
        .then_some(report)
    })
    .expect("the site's tally and four posted adjustments");
    assert_eq!(report["erp"], "http");
    assert_eq!(report["erp_checked"], true, "{report:#}");
    assert_eq!(by_type(&report, "adjust", "in_erp"), Some(3));
    assert_eq!(report["differences_total"], 1, "{report:#}");
    assert_eq!(report["differences"][0]["id"], "adj-2");
    let detail = report["differences"][0]["detail"].as_str().unwrap();
    assert!(detail.contains("HTTP 404"), "{detail}");
    drop(agent);
}
