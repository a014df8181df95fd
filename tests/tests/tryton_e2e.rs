//! The whole pipeline into a real Tryton 8.0: scans published to the agent reach Tryton's
//! books through the relay; stock levels read back equal what was scanned; an unknown SKU waits
//! in the dead-letter queue with Tryton's message, the warehouse is told, and after the product
//! is created a replay posts it once.

use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::poll_until;
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::tryton::Tryton;
use serde_json::{Value, json};

fn tryton_sink(tryton: &Tryton) -> String {
    format!("{}waiting_retry_ms = 500\n", tryton.sink_config())
}

/// A relay with its embedded broker and this sink, and an agent of site wh1 forwarding to it.
fn pipeline(
    dir: &std::path::Path,
    sink: &str,
    settings: &[(&str, toml_edit::Value)],
) -> (RelayProcess, AgentProcess) {
    let broker_port = backhaul_tests::free_port();
    let relay =
        RelayProcess::start_with(&dir.join("relay"), broker_port, true, Some(sink), settings);
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", "wh1")
            .set("uplink.client_id", format!("agent-wh1-{broker_port}"))
            .set("uplink.linger_ms", 10),
    );
    (relay, agent)
}

fn event(id: &str, fields: Value) -> Value {
    let mut event = fields;
    event["v"] = json!(1);
    event["id"] = json!(id);
    event["ts"] = json!(backhaul_tests::events::scan_ts());
    event
}

#[test]
fn scans_reach_tryton_and_a_refused_sku_replays_after_the_product_exists() {
    let tryton = Tryton::start();
    let dir = tempfile::tempdir().unwrap();
    let settings: Vec<(&str, toml_edit::Value)> = vec![
        ("delivery.retry_min_ms", 200.into()),
        ("delivery.retry_max_ms", 2000.into()),
    ];
    let (relay, agent) = pipeline(dir.path(), &tryton_sink(&tryton), &settings);
    let before_main = tryton.stock_level("SKU-001", "STO");
    let before_bin = tryton.stock_level("SKU-002", "STO-A1");

    let events = vec![
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
        event(
            "rcv-bad",
            json!({"type": "receive", "sku": "SKU-NEW", "qty": "5", "po": "PO-2"}),
        ),
        event(
            "pick-1",
            json!({"type": "pick", "sku": "SKU-001", "qty": "3", "order": "SO-E2E-1", "line": 1}),
        ),
        event(
            "ship-1",
            json!({"type": "ship", "sku": "SKU-001", "qty": "3", "order": "SO-E2E-1", "carrier": "DHL"}),
        ),
    ];
    let response = agent.post_events(&Value::Array(events), None);
    assert_eq!(response.status().as_u16(), 202);

    // The good events are in Tryton's books, and the levels are what was scanned.
    let shipped = poll_until(Duration::from_secs(90), || {
        (tryton
            .shipment_state("stock.shipment.out", "SO-E2E-1")
            .as_deref()
            == Some("done"))
        .then_some(())
    });
    assert!(
        shipped.is_some(),
        "the order never shipped in Tryton\nrelay log:\n{}",
        relay.log_tail()
    );
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.in", "rcv-1")
            .as_deref(),
        Some("done")
    );
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.internal", "adj-1")
            .as_deref(),
        Some("done")
    );
    assert_eq!(
        tryton.stock_level("SKU-001", "STO"),
        before_main + 30.0 - 2.0 - 3.0
    );
    assert_eq!(
        tryton.stock_level("SKU-002", "STO-A1"),
        17.0,
        "the count set the bin (was {before_bin})"
    );

    // The unknown SKU waits in the dead-letter queue with Tryton's message ...
    let letters = poll_until(Duration::from_secs(30), || {
        let list: Value = serde_json::from_str(&relay.cli(&["dlq", "list", "--json"])).ok()?;
        (list["total"] == 1).then_some(list)
    })
    .expect("one dead letter");
    let reason = letters["dead_letters"][0]["reason"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        reason.contains("SKU-NEW"),
        "the reason does not name the SKU: {reason}"
    );
    // ... and the warehouse sees the refusal.
    let refused = poll_until(Duration::from_secs(30), || {
        let rejects = agent.get_json("/v1/rejects");
        rejects["erp_refusals"]
            .as_array()
            .filter(|l| !l.is_empty())
            .cloned()
    })
    .expect("the agent shows the ERP's refusal");
    assert_eq!(refused[0]["id"], "rcv-bad");

    // Master data fixed, replayed, posted once.
    tryton.create_product("SKU-NEW");
    let replayed = relay.cli(&["dlq", "replay", "--all"]);
    assert!(replayed.contains("1 dead letters sent back"), "{replayed}");
    let posted = poll_until(Duration::from_secs(60), || {
        (tryton
            .shipment_state("stock.shipment.in", "rcv-bad")
            .as_deref()
            == Some("done"))
        .then_some(())
    });
    assert!(
        posted.is_some(),
        "the replayed receipt never reached Tryton\n{}",
        relay.log_tail()
    );
    assert_eq!(tryton.stock_level("SKU-NEW", "STO"), 5.0);
    assert_eq!(
        tryton.count("stock.shipment.in", json!([["reference", "=", "rcv-bad"]])),
        1
    );

    // Re-sending every event through the agent creates nothing new in Tryton.
    let counts_before: Vec<u64> = [
        "stock.shipment.in",
        "stock.shipment.internal",
        "stock.shipment.out",
        "stock.inventory",
    ]
    .iter()
    .map(|m| tryton.count(m, json!([])))
    .collect();
    let again = vec![
        event(
            "rcv-1",
            json!({"type": "receive", "sku": "SKU-001", "qty": "30", "po": "PO-1"}),
        ),
        event(
            "adj-1",
            json!({"type": "adjust", "sku": "SKU-001", "qty": "-2", "reason": "damaged"}),
        ),
    ];
    assert_eq!(
        agent
            .post_events(&Value::Array(again), None)
            .status()
            .as_u16(),
        202
    );
    let settled = poll_until(Duration::from_secs(30), || {
        let sites = relay.sites();
        (sites["sites"][0]["outbox_depth"] == 0
            && sites["sites"][0]["events_duplicate"].as_u64().unwrap_or(0)
                + sites["sites"][0]["events_stored"].as_u64().unwrap_or(0)
                >= 8)
            .then_some(())
    });
    assert!(settled.is_some(), "{}", relay.sites());
    let counts_after: Vec<u64> = [
        "stock.shipment.in",
        "stock.shipment.internal",
        "stock.shipment.out",
        "stock.inventory",
    ]
    .iter()
    .map(|m| tryton.count(m, json!([])))
    .collect();
    assert_eq!(
        counts_before, counts_after,
        "re-sent events created records in Tryton"
    );
}

/// A pick scanned before its stock was received waits in Tryton ("waiting for stock"); with the
/// default `waiting_retry_ms` (a minute), its order retries alone while every other key is
/// delivered at once.
#[test]
fn a_pick_waiting_for_stock_holds_back_no_other_key() {
    let tryton = Tryton::start();
    let dir = tempfile::tempdir().unwrap();
    let (relay, agent) = pipeline(dir.path(), &tryton.sink_config(), &[]);
    let pick = event(
        "pick-early",
        json!({"type": "pick", "sku": "SKU-003", "qty": "1000", "order": "SO-WAIT", "line": 1}),
    );
    assert_eq!(
        agent
            .post_events(&Value::Array(vec![pick]), None)
            .status()
            .as_u16(),
        202
    );
    let waiting = poll_until(Duration::from_secs(60), || {
        (tryton
            .shipment_state("stock.shipment.out", "SO-WAIT")
            .as_deref()
            == Some("waiting"))
        .then_some(())
    });
    assert!(
        waiting.is_some(),
        "the pick never reached Tryton\nrelay log:\n{}",
        relay.log_tail()
    );

    // 60 adjustments of 12 other keys (6 SKUs, each in the storage zone and in bin A1).
    let adjustments: Vec<Value> = (0..60)
        .map(|i| {
            let mut fields = json!({
                "type": "adjust", "sku": format!("SKU-{:03}", 4 + i % 6), "qty": "1",
                "reason": "found",
            });
            if (i / 6) % 2 == 1 {
                fields["location"] = json!("A1");
            }
            event(&format!("adj-w-{i}"), fields)
        })
        .collect();
    assert_eq!(
        agent
            .post_events(&Value::Array(adjustments), None)
            .status()
            .as_u16(),
        202
    );
    // Before the minute the waiting pick holds its own order back is up (had the pick paused
    // every key, none of these could be posted before then); the margin is for a busy machine.
    let posted = poll_until(Duration::from_secs(50), || {
        let done = tryton.count(
            "stock.shipment.internal",
            json!([["reference", "like", "adj-w-%"], ["state", "=", "done"]]),
        );
        (done == 60).then_some(())
    });
    assert!(
        posted.is_some(),
        "{} of 60 adjustments reached Tryton while a pick waited for stock\nrelay log:\n{}",
        tryton.count(
            "stock.shipment.internal",
            json!([["reference", "like", "adj-w-%"], ["state", "=", "done"]]),
        ),
        relay.log_tail()
    );
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "SO-WAIT")
            .as_deref(),
        Some("waiting")
    );
    let status: Value =
        serde_json::from_str(&relay.cli(&["status", "--json"])).expect("status as JSON");
    assert_eq!(status["delivery_paused"], json!(false), "{status}");
    assert_eq!(
        status["outbox_depth"],
        json!(1),
        "only the pick waits: {status}"
    );
}
