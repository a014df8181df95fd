//! The Tryton connector against a real Tryton 8.0 server (see tests/src/tryton.rs): events of
//! every type reach the ERP's books, stock levels read back equal what was scanned, delivering
//! the same events again changes nothing, documents are dated by their events' `ts`, and
//! refusals are permanent with a readable reason.

use std::time::{Duration, Instant};

use backhaul_events::event::parse_event;
use backhaul_events::{Epoch, StampedEvent};
use backhaul_relay::connector::Delivery;
use backhaul_relay::connector::tryton::{TrytonConfig, TrytonConnector};
use backhaul_tests::tryton::{self, Tryton};
use serde_json::{Value, json};
use time::{Date, Duration as Days};

/// The connector as a relay would configure it for the seed, with bin "A1" mapped.
fn config(tryton: &Tryton) -> TrytonConfig {
    serde_json::from_value(json!({
        "url": tryton.url(),
        "database": tryton::DATABASE,
        "username": tryton::USERNAME,
        "password": {"value": tryton::PASSWORD},
        "customer_party": "CUST-A",
        "supplier_party": "SUPP-B",
        "locations": {"A1": "STO-A1", "MAIN": "STO", "IN": "IN", "OUT": "OUT"},
        "timeout_ms": 20_000,
    }))
    .expect("a valid connector config")
}

fn connector(tryton: &Tryton) -> TrytonConnector {
    let config = config(tryton);
    TrytonConnector::new(
        &config,
        backhaul_events::config::Secret::new(tryton::PASSWORD),
    )
    .expect("a connector")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

/// A stamped event from the fields given; `v` and `ts` (this test's start, on Tryton's today)
/// are filled in. Tests of dates set their own with [`on`].
fn event(fields: Value) -> StampedEvent {
    let mut fields = fields;
    fields["v"] = json!(1);
    fields["ts"] = json!(backhaul_tests::events::scan_ts());
    let event = parse_event(fields.to_string().as_bytes())
        .unwrap_or_else(|v| panic!("invalid test event {fields}: {v}"));
    StampedEvent {
        site: "WH1".into(),
        epoch: Epoch(7),
        seq: 1,
        received_at_ms: 0,
        event,
    }
}

fn adjust(id: &str, sku: &str, qty: i64, location: Option<&str>) -> StampedEvent {
    let mut fields = json!({"id": id, "type": "adjust", "sku": sku, "qty": qty, "reason": "found"});
    if let Some(location) = location {
        fields["location"] = json!(location);
    }
    event(fields)
}

fn receive(id: &str, sku: &str, qty: i64, location: Option<&str>) -> StampedEvent {
    let mut fields = json!({"id": id, "type": "receive", "sku": sku, "qty": qty, "po": "PO-1"});
    if let Some(location) = location {
        fields["location"] = json!(location);
    }
    event(fields)
}

fn count(id: &str, sku: &str, qty: i64, location: &str) -> StampedEvent {
    event(json!({"id": id, "type": "count", "sku": sku, "qty": qty, "location": location}))
}

fn pick(id: &str, order: &str, sku: &str, qty: i64) -> StampedEvent {
    event(json!({"id": id, "type": "pick", "order": order, "sku": sku, "qty": qty, "line": 1}))
}

fn ship(id: &str, order: &str, sku: &str, qty: i64) -> StampedEvent {
    event(json!({
        "id": id, "type": "ship", "order": order, "sku": sku, "qty": qty,
        "carrier": "UPS", "tracking": "1Z999",
    }))
}

/// Delivers and checks there is one outcome per event.
fn deliver(
    rt: &tokio::runtime::Runtime,
    connector: &TrytonConnector,
    events: &[StampedEvent],
) -> Vec<Delivery> {
    let outcomes = rt.block_on(connector.deliver(events));
    assert_eq!(outcomes.len(), events.len(), "one outcome per event");
    outcomes
}

/// The ERP references of outcomes that must all be posted.
fn posted(outcomes: &[Delivery]) -> Vec<String> {
    outcomes
        .iter()
        .map(|d| match d {
            Delivery::Posted { erp_ref } => erp_ref.clone(),
            other => panic!("expected Posted, got {other:?} (all: {outcomes:#?})"),
        })
        .collect()
}

fn permanent(outcome: &Delivery) -> &str {
    match outcome {
        Delivery::Permanent { reason } => reason,
        other => panic!("expected Permanent, got {other:?}"),
    }
}

/// Records in the ERP that a repeated delivery must not add to.
fn books(tryton: &Tryton) -> Vec<(&'static str, u64)> {
    [
        "stock.shipment.internal",
        "stock.shipment.in",
        "stock.shipment.out",
        "stock.inventory",
        "stock.move",
    ]
    .into_iter()
    .map(|model| (model, tryton.count(model, json!([]))))
    .collect()
}

fn rate(events: usize, elapsed: Duration) -> String {
    format!(
        "{events} events in {:.2} s = {:.1} events/s",
        elapsed.as_secs_f64(),
        events as f64 / elapsed.as_secs_f64()
    )
}

#[test]
fn stock_events_reach_tryton_once_and_levels_match() {
    let tryton = Tryton::start();
    let rt = runtime();
    let connector = connector(&tryton);
    let skus: Vec<String> = (1..=10).map(|n| format!("SKU-{n:03}")).collect();

    // Receipts: every SKU into storage (no location) and into bin A1, one batch of 20.
    let receipts: Vec<StampedEvent> = skus
        .iter()
        .enumerate()
        .flat_map(|(i, sku)| {
            [
                receive(&format!("rcv-{sku}"), sku, 10 + i as i64, None),
                receive(&format!("rcv-{sku}-A1"), sku, 5, Some("A1")),
            ]
        })
        .collect();
    let started = Instant::now();
    let receipt_refs = posted(&deliver(&rt, &connector, &receipts));
    eprintln!("receive: {}", rate(receipts.len(), started.elapsed()));
    assert!(
        receipt_refs[0].starts_with("stock.shipment.in/"),
        "{receipt_refs:?}"
    );
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.in", "rcv-SKU-001")
            .as_deref(),
        Some("done")
    );

    // Adjustments: three rounds of 20 (one per SKU and location each round), half of them
    // losses, so every round is one batch of 20 keys.
    let mut adjust_rounds = Vec::new();
    for round in 0..3 {
        let events: Vec<StampedEvent> = skus
            .iter()
            .flat_map(|sku| {
                let qty = if round == 1 { -2 } else { 3 };
                [
                    adjust(&format!("adj-{round}-{sku}"), sku, qty, None),
                    adjust(&format!("adj-{round}-{sku}-A1"), sku, qty, Some("A1")),
                ]
            })
            .collect();
        adjust_rounds.push(events);
    }
    let started = Instant::now();
    let mut adjust_refs = Vec::new();
    for events in &adjust_rounds {
        adjust_refs.push(posted(&deliver(&rt, &connector, events)));
    }
    eprintln!("adjust: {}", rate(60, started.elapsed()));
    assert!(adjust_refs[0][0].starts_with("stock.shipment.internal/"));

    // Counts: absolute quantities for SKU-001..005 in A1 and SKU-006..010 in the storage zone
    // (mapped as "MAIN").
    let counts: Vec<StampedEvent> = skus
        .iter()
        .enumerate()
        .map(|(i, sku)| {
            let location = if i < 5 { "A1" } else { "MAIN" };
            count(&format!("cnt-{sku}"), sku, 100 + i as i64, location)
        })
        .collect();
    let started = Instant::now();
    let count_refs = posted(&deliver(&rt, &connector, &counts));
    eprintln!("count: {}", rate(counts.len(), started.elapsed()));
    assert!(count_refs[0].starts_with("stock.inventory/"));

    // The books. Before the counts: the zone itself held 10 + i + 4 and the bin 5 + 4. A count
    // is of the location itself (Tryton's inventory), and the zone's level includes its bin.
    for (i, sku) in skus.iter().enumerate() {
        let i = i as f64;
        let (bin, zone_itself) = if i < 5.0 {
            (100.0 + i, 14.0 + i)
        } else {
            (9.0, 100.0 + i)
        };
        assert_eq!(tryton.stock_level(sku, "STO-A1"), bin, "{sku} in A1");
        assert_eq!(
            tryton.stock_level(sku, "STO"),
            zone_itself + bin,
            "{sku} in STO"
        );
    }

    // Everything again, in one go per type: the same references, nothing new in the books.
    let before = books(&tryton);
    let levels: Vec<f64> = skus.iter().map(|s| tryton.stock_level(s, "STO")).collect();
    let started = Instant::now();
    assert_eq!(posted(&deliver(&rt, &connector, &receipts)), receipt_refs);
    for (events, refs) in adjust_rounds.iter().zip(&adjust_refs) {
        assert_eq!(&posted(&deliver(&rt, &connector, events)), refs);
    }
    assert_eq!(posted(&deliver(&rt, &connector, &counts)), count_refs);
    eprintln!("re-delivery: {}", rate(90, started.elapsed()));
    assert_eq!(books(&tryton), before, "a re-delivery created records");
    let after: Vec<f64> = skus.iter().map(|s| tryton.stock_level(s, "STO")).collect();
    assert_eq!(after, levels, "a re-delivery moved stock");

    // Throughput of full batches: 50 adjustments (10 SKUs at 5 locations) per call.
    let locations = [None, Some("A1"), Some("MAIN"), Some("IN"), Some("OUT")];
    let started = Instant::now();
    for round in 0..2 {
        let events: Vec<StampedEvent> = skus
            .iter()
            .flat_map(|sku| {
                locations.iter().map(move |location| {
                    let id = format!("bulk-{round}-{sku}-{}", location.unwrap_or("none"));
                    adjust(&id, sku, 1, *location)
                })
            })
            .collect();
        assert_eq!(events.len(), 50);
        posted(&deliver(&rt, &connector, &events));
    }
    eprintln!("adjust, batches of 50: {}", rate(100, started.elapsed()));
    assert_eq!(tryton.stock_level("SKU-001", "IN"), 2.0);
}

#[test]
fn picks_and_ships_drive_the_orders_customer_shipments() {
    let tryton = Tryton::start();
    let rt = runtime();
    let connector = connector(&tryton);
    posted(&deliver(
        &rt,
        &connector,
        &[
            receive("rcv-1", "SKU-001", 10, None),
            receive("rcv-2", "SKU-002", 10, None),
            receive("rcv-3", "SKU-003", 10, None),
        ],
    ));

    // Two orders picked in one batch: each gets a shipment made from its line, picked.
    let first_picks = [
        pick("pick-1", "ORD-1", "SKU-001", 2),
        pick("pick-2", "ORD-2", "SKU-002", 3),
    ];
    let started = Instant::now();
    let refs = posted(&deliver(&rt, &connector, &first_picks));
    eprintln!("pick (new shipments): {}", rate(2, started.elapsed()));
    assert!(refs[0].starts_with("stock.shipment.out/"));
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "ORD-1")
            .as_deref(),
        Some("picked")
    );
    assert_eq!(tryton.stock_level("SKU-001", "STO"), 8.0);

    // A second line of an order already picked goes to a second shipment of that order.
    let second_line = [pick("pick-3", "ORD-1", "SKU-002", 1)];
    let second = posted(&deliver(&rt, &connector, &second_line));
    assert_ne!(second[0], refs[0]);
    let ord1 = json!([["reference", "=", "ORD-1"]]);
    assert_eq!(tryton.count("stock.shipment.out", ord1.clone()), 2);

    // A shipment the ERP made (two lines, draft): a pick of one line picks the whole shipment.
    let erp_made = tryton.call(
        "model.stock.shipment.out.create",
        json!([[customer_shipment(
            &tryton,
            "ORD-3",
            &[("SKU-001", 1.0), ("SKU-003", 4.0)]
        )]]),
    );
    let erp_made = erp_made[0].as_i64().expect("a shipment id");
    let third = posted(&deliver(
        &rt,
        &connector,
        &[pick("pick-4", "ORD-3", "SKU-003", 4)],
    ));
    assert_eq!(third[0], format!("stock.shipment.out/{erp_made}"));
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "ORD-3")
            .as_deref(),
        Some("picked")
    );
    assert_eq!(tryton.stock_level("SKU-003", "STO"), 6.0);

    // Not enough stock: the pick waits (its key alone retries, after the configured minute),
    // and goes through once stock arrives.
    let short = [pick("pick-5", "ORD-4", "SKU-005", 5)];
    match &deliver(&rt, &connector, &short)[0] {
        Delivery::Waiting {
            reason,
            retry_after,
        } => {
            assert!(reason.contains("waiting for stock"), "{reason}");
            assert!(reason.contains("ORD-4"), "{reason}");
            assert_eq!(*retry_after, Duration::from_secs(60));
        }
        other => panic!("expected a wait for stock, got {other:?}"),
    }
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "ORD-4")
            .as_deref(),
        Some("waiting")
    );
    posted(&deliver(
        &rt,
        &connector,
        &[receive("rcv-5", "SKU-005", 5, None)],
    ));
    posted(&deliver(&rt, &connector, &short));
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "ORD-4")
            .as_deref(),
        Some("picked")
    );

    // Ships: picked shipments go to done; an order never picked gets a shipment made and done.
    let ships = [
        ship("ship-1", "ORD-1", "SKU-001", 2),
        ship("ship-2", "ORD-2", "SKU-002", 3),
        ship("ship-3", "ORD-3", "SKU-001", 1),
        ship("ship-4", "ORD-5", "SKU-003", 2),
    ];
    let started = Instant::now();
    let ship_refs = posted(&deliver(&rt, &connector, &ships));
    eprintln!("ship (batch of 4): {}", rate(4, started.elapsed()));
    assert_eq!(ship_refs[0], refs[0]);
    assert_eq!(ship_refs[2], format!("stock.shipment.out/{erp_made}"));
    for order in ["ORD-2", "ORD-3", "ORD-5"] {
        assert_eq!(
            tryton
                .shipment_state("stock.shipment.out", order)
                .as_deref(),
            Some("done"),
            "{order}"
        );
    }
    // ORD-1's second shipment (SKU-002) is shipped by its own line's ship event.
    posted(&deliver(
        &rt,
        &connector,
        &[ship("ship-5", "ORD-1", "SKU-002", 1)],
    ));
    assert_eq!(
        tryton.count(
            "stock.shipment.out",
            json!([["reference", "=", "ORD-1"], ["state", "=", "done"]])
        ),
        2
    );
    // The warehouse (all its zones) lost what was shipped: SKU-001 2 + 1, SKU-003 4 + 2.
    assert_eq!(tryton.stock_level("SKU-001", "WH"), 7.0);
    assert_eq!(tryton.stock_level("SKU-002", "WH"), 6.0);
    assert_eq!(tryton.stock_level("SKU-003", "WH"), 4.0);
    assert_eq!(tryton.stock_level("SKU-005", "WH"), 5.0);
    assert_eq!(tryton.stock_level("SKU-005", "STO"), 0.0);

    // An ERP shipment still waiting takes a new line; the pick then picks both lines.
    let waiting = tryton.call(
        "model.stock.shipment.out.create",
        json!([[customer_shipment(&tryton, "ORD-6", &[("SKU-001", 1.0)])]]),
    );
    tryton.call("model.stock.shipment.out.wait", json!([waiting]));
    let extended = posted(&deliver(
        &rt,
        &connector,
        &[pick("pick-6", "ORD-6", "SKU-002", 2)],
    ));
    assert_eq!(extended[0], format!("stock.shipment.out/{}", waiting[0]));
    assert_eq!(
        tryton.count(
            "stock.move",
            json!([[
                "shipment",
                "=",
                format!("stock.shipment.out,{}", waiting[0])
            ]])
        ),
        4,
        "two outgoing and two inventory moves"
    );
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "ORD-6")
            .as_deref(),
        Some("picked")
    );

    // Tryton warns when packing a shipment whose lines do not match what was picked (a line
    // added after picking): the connector acknowledges the warning and ships.
    let warned = tryton.call(
        "model.stock.shipment.out.create",
        json!([[customer_shipment(&tryton, "ORD-W", &[("SKU-001", 1.0)])]]),
    );
    for transition in ["wait", "assign_try", "pick"] {
        tryton.call(
            &format!("model.stock.shipment.out.{transition}"),
            json!([warned.clone()]),
        );
    }
    let mut extra = customer_shipment(&tryton, "ORD-W", &[("SKU-002", 1.0)]);
    tryton.call(
        "model.stock.shipment.out.write",
        json!([warned, {"outgoing_moves": extra["outgoing_moves"].take()}]),
    );
    posted(&deliver(
        &rt,
        &connector,
        &[ship("ship-w", "ORD-W", "SKU-001", 1)],
    ));
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "ORD-W")
            .as_deref(),
        Some("done")
    );

    // Every pick and ship again: posted, nothing new.
    let before = books(&tryton);
    let mut all: Vec<StampedEvent> = first_picks.to_vec();
    all.extend(second_line.iter().cloned());
    all.push(pick("pick-4", "ORD-3", "SKU-003", 4));
    all.extend(short.iter().cloned());
    for event in &all {
        posted(&deliver(&rt, &connector, std::slice::from_ref(event)));
    }
    posted(&deliver(&rt, &connector, &ships));
    assert_eq!(books(&tryton), before, "a re-delivery created records");
    // ORD-W shipped one more SKU-001 since.
    assert_eq!(tryton.stock_level("SKU-001", "WH"), 6.0);
}

/// A customer shipment as an ERP user would make it, for CUST-A from warehouse WH.
fn customer_shipment(tryton: &Tryton, order: &str, lines: &[(&str, f64)]) -> Value {
    let id = |model: &str, field: &str, value: &str| {
        tryton
            .id_of(model, field, value)
            .unwrap_or_else(|| panic!("no {model} {value}"))
    };
    let output = id("stock.location", "code", "OUT");
    let customer_location = id("stock.location", "code", "CUS");
    let moves: Vec<Value> = lines
        .iter()
        .map(|(sku, qty)| {
            json!({
                "product": id("product.product", "code", sku),
                "unit": id("product.uom", "symbol", "u"),
                "quantity": qty,
                "from_location": output,
                "to_location": customer_location,
                "company": tryton::COMPANY,
                "unit_price": {"__class__": "Decimal", "decimal": "25"},
                "currency": id("currency.currency", "code", "USD"),
            })
        })
        .collect();
    let customer = id("party.party", "code", "CUST-A");
    let address =
        tryton.call("model.party.party.read", json!([[customer], ["addresses"]]))[0]["addresses"]
            [0]
        .clone();
    json!({
        "reference": order,
        "company": tryton::COMPANY,
        "customer": customer,
        "delivery_address": address,
        "warehouse": id("stock.location", "code", "WH"),
        "warehouse_storage": id("stock.location", "code", "STO"),
        "warehouse_output": output,
        "outgoing_moves": [["create", moves]],
    })
}

#[test]
fn unknown_master_data_is_permanent_until_fixed() {
    let tryton = Tryton::start();
    let rt = runtime();
    let connector = connector(&tryton);

    let batch = [
        adjust("adj-new", "SKU-NEW", 4, None),
        adjust("adj-ok", "SKU-001", 4, None),
        adjust("adj-where", "SKU-002", 4, Some("Z9")),
        count("cnt-new", "SKU-NEW", 3, "A1"),
    ];
    let outcomes = deliver(&rt, &connector, &batch);
    let reason = permanent(&outcomes[0]);
    assert!(reason.contains("SKU-NEW"), "{reason}");
    posted(&outcomes[1..2]);
    let reason = permanent(&outcomes[2]);
    assert!(
        reason.contains("\"Z9\"") && reason.contains("sink.tryton.locations"),
        "{reason}"
    );
    assert!(permanent(&outcomes[3]).contains("SKU-NEW"));
    assert_eq!(
        tryton.count(
            "stock.shipment.internal",
            json!([["reference", "=", "adj-new"]])
        ),
        0
    );

    // The master data is fixed in the ERP; the dead-lettered events are replayed.
    tryton.create_product("SKU-NEW");
    let replay = [batch[0].clone(), batch[3].clone()];
    posted(&deliver(&rt, &connector, &replay));
    assert_eq!(tryton.stock_level("SKU-NEW", "STO"), 7.0);
    assert_eq!(tryton.stock_level("SKU-NEW", "STO-A1"), 3.0);
}

#[test]
fn refused_transitions_are_permanent_and_outages_transient() {
    let mut tryton = Tryton::start();
    let rt = runtime();
    let connector = connector(&tryton);
    posted(&deliver(
        &rt,
        &connector,
        &[
            receive("rcv-1", "SKU-001", 10, None),
            receive("rcv-2", "SKU-002", 10, None),
        ],
    ));

    // An ERP shipment whose moves lie in a closed stock period: Tryton refuses to wait it.
    let mut locked = customer_shipment(&tryton, "ORD-LOCKED", &[("SKU-001", 1.0)]);
    let long_ago = json!({"__class__": "date", "year": 2020, "month": 1, "day": 1});
    locked["planned_date"] = long_ago.clone();
    locked["outgoing_moves"][0][1][0]["planned_date"] = long_ago.clone();
    tryton.call("model.stock.shipment.out.create", json!([[locked]]));
    let period = tryton.call(
        "model.stock.period.create",
        json!([[{"date": long_ago, "company": tryton::COMPANY}]]),
    );
    tryton.call("model.stock.period.close", json!([period]));

    // A cancelled ERP shipment: its order is refused rather than shipped again.
    let cancelled = tryton.call(
        "model.stock.shipment.out.create",
        json!([[customer_shipment(
            &tryton,
            "ORD-CANCELLED",
            &[("SKU-002", 1.0)]
        )]]),
    );
    tryton.call("model.stock.shipment.out.cancel", json!([cancelled]));

    // One batch: the refused events fail alone, the good one in the same calls goes through.
    let outcomes = deliver(
        &rt,
        &connector,
        &[
            pick("pick-locked", "ORD-LOCKED", "SKU-001", 1),
            pick("pick-ok", "ORD-OK", "SKU-002", 1),
            pick("pick-cancelled", "ORD-CANCELLED", "SKU-002", 1),
        ],
    );
    let reason = permanent(&outcomes[0]);
    assert!(reason.contains("period"), "{reason}");
    assert!(reason.contains("Tryton refused"), "{reason}");
    posted(&outcomes[1..2]);
    let reason = permanent(&outcomes[2]);
    assert!(reason.contains("cancelled"), "{reason}");
    assert_eq!(
        tryton
            .shipment_state("stock.shipment.out", "ORD-OK")
            .as_deref(),
        Some("picked")
    );

    // A throwaway login with a wrong password is transient (the setup, not the event, is bad).
    let mut wrong = config(&tryton);
    wrong.username = "nobody".into();
    let stranger = TrytonConnector::new(&wrong, backhaul_events::config::Secret::new("nope"))
        .expect("a connector");
    match &deliver(&rt, &stranger, &[adjust("adj-x", "SKU-001", 1, None)])[0] {
        Delivery::Transient { reason, .. } => {
            assert!(reason.contains("login"), "{reason}")
        }
        other => panic!("expected transient, got {other:?}"),
    }

    // The ERP restored from a backup forgets the connector's session: it logs in again.
    tryton.restart_from_seed();
    posted(&deliver(
        &rt,
        &connector,
        &[adjust("adj-after-restore", "SKU-001", 1, None)],
    ));

    // Tryton down: transient, nothing lost.
    tryton.kill();
    match &deliver(&rt, &connector, &[adjust("adj-y", "SKU-001", 1, None)])[0] {
        Delivery::Transient { reason, .. } => {
            assert!(reason.contains("connect"), "{reason}")
        }
        other => panic!("expected transient, got {other:?}"),
    }
}

/// The same event at another `ts`: this time and offset on `date`.
fn on(mut stamped: StampedEvent, date: Date, time_and_offset: &str) -> StampedEvent {
    let ts = format!("{date}T{time_and_offset}");
    time::OffsetDateTime::parse(&ts, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("invalid test ts {ts}: {e}"));
    stamped.event.ts = ts;
    stamped
}

/// A date as Tryton's JSON-RPC carries it.
fn tryton_date(date: Date) -> Value {
    json!({"__class__": "date", "year": date.year(), "month": u8::from(date.month()), "day": date.day()})
}

/// A date read from Tryton, as `YYYY-MM-DD` (or "none").
fn day(value: &Value) -> String {
    match (value.get("year"), value.get("month"), value.get("day")) {
        (Some(y), Some(m), Some(d)) => format!(
            "{:04}-{:02}-{:02}",
            y.as_i64().unwrap_or_default(),
            m.as_i64().unwrap_or_default(),
            d.as_i64().unwrap_or_default()
        ),
        _ => "none".into(),
    }
}

/// Tryton's today (the seed's company has no time zone: the server's).
fn tryton_today(tryton: &Tryton) -> Date {
    let today = tryton.call("model.ir.date.today", json!([]));
    let part = |name: &str| today[name].as_i64().unwrap_or_default();
    let month = u8::try_from(part("month")).unwrap_or_default();
    time::Month::try_from(month)
        .and_then(|month| Date::from_calendar_date(part("year") as i32, month, part("day") as u8))
        .unwrap_or_else(|e| panic!("today {today}: {e}"))
}

/// Fields of the record of `model` an outcome posted (`model/id`).
fn read_posted(tryton: &Tryton, outcome: &Delivery, fields: Value) -> Value {
    let erp_ref = match outcome {
        Delivery::Posted { erp_ref } => erp_ref,
        other => panic!("expected Posted, got {other:?}"),
    };
    let (model, id) = erp_ref.rsplit_once('/').expect("model/id");
    let id: i64 = id.parse().expect("an id");
    tryton.call(&format!("model.{model}.read"), json!([[id], fields]))[0].clone()
}

/// The effective dates of the moves of a shipment (`model,id`), by destination location code,
/// with their states.
fn move_dates(tryton: &Tryton, shipment: &str) -> Vec<(String, String, String)> {
    let moves = tryton.call(
        "model.stock.move.search_read",
        json!([
            [["shipment", "=", shipment]],
            0,
            null,
            [["id", "ASC"]],
            ["to_location.code", "effective_date", "state"]
        ]),
    );
    moves
        .as_array()
        .expect("moves")
        .iter()
        .map(|m| {
            (
                m["to_location."]["code"]
                    .as_str()
                    .or_else(|| m["to_location.code"].as_str())
                    .unwrap_or_default()
                    .to_string(),
                day(&m["effective_date"]),
                m["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// The quantity of `sku` at the location with this code at the end of `date`.
fn level_on(tryton: &Tryton, sku: &str, location_code: &str, date: Date) -> f64 {
    let product = tryton
        .id_of("product.product", "code", sku)
        .expect("the product");
    let location = tryton
        .id_of("stock.location", "code", location_code)
        .expect("the location");
    let read = tryton
        .rpc_with_context(
            "model.product.product.read",
            json!([[product], ["quantity"]]),
            json!({
                "company": tryton::COMPANY, "language": "en", "locations": [location],
                "stock_date_end": tryton_date(date),
            }),
        )
        .unwrap_or_else(|e| panic!("reading the stock of {sku}: {e}"));
    read[0]["quantity"].as_f64().expect("a quantity")
}

#[test]
fn documents_are_dated_by_their_events_ts() {
    let tryton = Tryton::start();
    let rt = runtime();
    let connector = connector(&tryton);
    let today = tryton_today(&tryton);
    let ago = |days: i64| today - Days::days(days);

    // Ten days ago, late in the evening at UTC-5 (already the next day in UTC): booked on the
    // warehouse's day. Two receipts in one batch.
    let receipts = [
        on(
            receive("rcv-old-1", "SKU-001", 10, None),
            ago(10),
            "23:30:00-05:00",
        ),
        on(
            receive("rcv-old-2", "SKU-002", 10, None),
            ago(10),
            "23:30:00-05:00",
        ),
    ];
    let outcomes = deliver(&rt, &connector, &receipts);
    let receipt_refs = posted(&outcomes);
    let shipment = read_posted(
        &tryton,
        &outcomes[0],
        json!(["effective_date", "planned_date", "state"]),
    );
    assert_eq!(
        day(&shipment["effective_date"]),
        ago(10).to_string(),
        "{shipment}"
    );
    assert_eq!(
        day(&shipment["planned_date"]),
        ago(10).to_string(),
        "{shipment}"
    );
    let moves = move_dates(&tryton, &receipt_refs[0].replace('/', ","));
    assert_eq!(moves.len(), 2, "{moves:?}");
    for (to, date, state) in &moves {
        assert_eq!(
            (date.as_str(), state.as_str()),
            (ago(10).to_string().as_str(), "done"),
            "move to {to}"
        );
    }

    // Three days ago, early in the morning at UTC+9 (still the day before in UTC).
    let adjustment = [on(
        adjust("adj-old", "SKU-001", 5, None),
        ago(3),
        "06:00:00+09:00",
    )];
    let outcomes = deliver(&rt, &connector, &adjustment);
    let internal = read_posted(
        &tryton,
        &outcomes[0],
        json!([
            "effective_date",
            "planned_date",
            "planned_start_date",
            "moves"
        ]),
    );
    assert_eq!(
        day(&internal["effective_date"]),
        ago(3).to_string(),
        "{internal}"
    );
    assert_eq!(
        day(&internal["planned_date"]),
        ago(3).to_string(),
        "{internal}"
    );
    let adjust_ref = posted(&outcomes)[0].replace('/', ",");
    assert_eq!(
        move_dates(&tryton, &adjust_ref)
            .iter()
            .map(|m| m.1.clone())
            .collect::<Vec<_>>(),
        [ago(3).to_string()]
    );

    // Today's receipt reaches Tryton before a count made three days ago.
    posted(&deliver(
        &rt,
        &connector,
        &[on(
            receive("rcv-today", "SKU-001", 4, None),
            today,
            "12:00:00Z",
        )],
    ));
    assert_eq!(tryton.stock_level("SKU-001", "STO"), 19.0);
    // The count of 12 is of the stock three days ago (10 + 5 = 15): the difference (-3) is
    // booked then, and today's receipt stays on top of it.
    let counted = [on(
        count("cnt-old", "SKU-001", 12, "MAIN"),
        ago(3),
        "17:00:00+00:00",
    )];
    let outcomes = deliver(&rt, &connector, &counted);
    let inventory = read_posted(&tryton, &outcomes[0], json!(["date", "lines", "state"]));
    assert_eq!(day(&inventory["date"]), ago(3).to_string(), "{inventory}");
    let line = tryton.call(
        "model.stock.inventory.line.read",
        json!([inventory["lines"], ["expected_quantity", "quantity"]]),
    );
    assert_eq!(line[0]["expected_quantity"].as_f64(), Some(15.0), "{line}");
    assert_eq!(tryton.stock_level("SKU-001", "STO"), 16.0);
    assert_eq!(level_on(&tryton, "SKU-001", "STO", ago(3)), 12.0);
    assert_eq!(level_on(&tryton, "SKU-001", "STO", ago(5)), 10.0);
    assert_eq!(level_on(&tryton, "SKU-001", "STO", ago(11)), 0.0);

    // Picked three days ago, shipped yesterday: the picking (storage to output) is booked on
    // the pick's day, the shipment and its outgoing moves on the ship's.
    let pick_event = [on(
        pick("pick-old", "ORD-D", "SKU-002", 2),
        ago(3),
        "09:00:00+01:00",
    )];
    let pick_ref = posted(&deliver(&rt, &connector, &pick_event));
    let ship_event = [on(
        ship("ship-old", "ORD-D", "SKU-002", 2),
        ago(1),
        "15:00:00+01:00",
    )];
    let outcomes = deliver(&rt, &connector, &ship_event);
    assert_eq!(posted(&outcomes), pick_ref);
    let customer = read_posted(
        &tryton,
        &outcomes[0],
        json!(["effective_date", "planned_date", "state"]),
    );
    assert_eq!(customer["state"], "done");
    assert_eq!(
        day(&customer["effective_date"]),
        ago(1).to_string(),
        "{customer}"
    );
    assert_eq!(
        day(&customer["planned_date"]),
        ago(3).to_string(),
        "{customer}"
    );
    let moves = move_dates(&tryton, &pick_ref[0].replace('/', ","));
    assert_eq!(
        moves,
        [
            ("CUS".to_string(), ago(1).to_string(), "done".to_string()),
            ("OUT".to_string(), ago(3).to_string(), "done".to_string()),
        ],
        "the outgoing move (to the customer) and the inventory move (to output)"
    );
    assert_eq!(level_on(&tryton, "SKU-002", "STO", ago(4)), 10.0);
    assert_eq!(level_on(&tryton, "SKU-002", "STO", ago(3)), 8.0);
    assert_eq!(level_on(&tryton, "SKU-002", "WH", ago(2)), 10.0);
    assert_eq!(level_on(&tryton, "SKU-002", "WH", ago(1)), 8.0);

    // A shipment the ERP made with two lines is picked as a whole by the first pick, on its
    // day; the second line's pick, a day later, changes nothing. The ERP's planned date stays.
    let erp_made = tryton.call(
        "model.stock.shipment.out.create",
        json!([[customer_shipment(
            &tryton,
            "ORD-M",
            &[("SKU-001", 1.0), ("SKU-002", 1.0)]
        )]]),
    );
    let erp_ref = format!("stock.shipment.out,{}", erp_made[0]);
    let line_picks = [
        on(pick("pick-m1", "ORD-M", "SKU-001", 1), ago(2), "08:00:00Z"),
        on(pick("pick-m2", "ORD-M", "SKU-002", 1), ago(1), "08:00:00Z"),
    ];
    for stamped in &line_picks {
        let refs = posted(&deliver(&rt, &connector, std::slice::from_ref(stamped)));
        assert_eq!(refs[0].replace('/', ","), erp_ref);
    }
    let picked: Vec<String> = move_dates(&tryton, &erp_ref)
        .into_iter()
        .filter(|(to, _, _)| to == "OUT")
        .map(|(_, date, state)| format!("{date} {state}"))
        .collect();
    let expected = format!("{} done", ago(2));
    assert_eq!(picked, [expected.clone(), expected]);
    let erp_shipment = tryton.call(
        "model.stock.shipment.out.read",
        json!([erp_made, ["state", "planned_date", "effective_date"]]),
    );
    assert_eq!(erp_shipment[0]["state"], "picked", "{erp_shipment}");
    assert_eq!(
        day(&erp_shipment[0]["planned_date"]),
        "none",
        "{erp_shipment}"
    );
    assert_eq!(
        day(&erp_shipment[0]["effective_date"]),
        "none",
        "{erp_shipment}"
    );

    // A document found under the event's key (left half-way by an earlier delivery, say) gets
    // the event's date before it is driven on.
    let storage = tryton.id_of("stock.location", "code", "STO").expect("STO");
    let lost_found = tryton.call(
        "model.stock.location.search",
        json!([[["type", "=", "lost_found"]], 0, 1, null]),
    )[0]
    .as_i64()
    .expect("a lost-and-found location");
    let product = tryton
        .id_of("product.product", "code", "SKU-007")
        .expect("SKU-007");
    let unit = tryton.id_of("product.uom", "symbol", "u").expect("unit");
    let half_way = tryton.call(
        "model.stock.shipment.internal.create",
        json!([[{
            "reference": "adj-half", "company": tryton::COMPANY,
            "from_location": lost_found, "to_location": storage,
            "moves": [["create", [{
                "product": product, "unit": unit, "quantity": 2.0,
                "from_location": lost_found, "to_location": storage,
                "company": tryton::COMPANY,
            }]]],
        }]]),
    );
    tryton.call(
        "model.stock.shipment.internal.wait",
        json!([half_way.clone()]),
    );
    let resumed = [on(
        adjust("adj-half", "SKU-007", 2, None),
        ago(2),
        "12:00:00Z",
    )];
    let outcomes = deliver(&rt, &connector, &resumed);
    assert_eq!(
        posted(&outcomes),
        [format!("stock.shipment.internal/{}", half_way[0])]
    );
    let internal = read_posted(&tryton, &outcomes[0], json!(["effective_date", "state"]));
    assert_eq!(internal["state"], "done");
    assert_eq!(
        day(&internal["effective_date"]),
        ago(2).to_string(),
        "{internal}"
    );
    let moves = move_dates(&tryton, &format!("stock.shipment.internal,{}", half_way[0]));
    assert_eq!(
        moves,
        [("STO".to_string(), ago(2).to_string(), "done".to_string())]
    );

    // A ts in the future is booked on Tryton's today.
    let future = [on(
        adjust("adj-future", "SKU-003", 1, None),
        today + Days::days(3),
        "08:00:00Z",
    )];
    let outcomes = deliver(&rt, &connector, &future);
    let internal = read_posted(&tryton, &outcomes[0], json!(["effective_date"]));
    assert_eq!(
        day(&internal["effective_date"]),
        today.to_string(),
        "{internal}"
    );
    assert_eq!(tryton.stock_level("SKU-003", "STO"), 1.0);

    // Every dated event again: the same documents, nothing new.
    let before = books(&tryton);
    assert_eq!(posted(&deliver(&rt, &connector, &receipts)), receipt_refs);
    for events in [
        &adjustment[..],
        &counted[..],
        &pick_event[..],
        &ship_event[..],
        &line_picks[..1],
        &line_picks[1..],
        &resumed[..],
        &future[..],
    ] {
        posted(&deliver(&rt, &connector, events));
    }
    assert_eq!(books(&tryton), before, "a re-delivery created records");

    // The books are closed up to five days ago.
    let period = tryton.call(
        "model.stock.period.create",
        json!([[{"date": tryton_date(ago(5)), "company": tryton::COMPANY}]]),
    );
    tryton.call("model.stock.period.close", json!([period]));
    // A connector that has just started (or whose reading of the periods is a minute old)
    // refuses events dated in the closed period before creating anything; a document already
    // done is still posted.
    let fresh = self::connector(&tryton);
    let batch = [
        on(
            adjust("adj-closed", "SKU-004", 1, None),
            ago(7),
            "10:00:00Z",
        ),
        on(adjust("adj-open", "SKU-004", 1, None), ago(4), "10:00:00Z"),
        on(
            count("cnt-closed", "SKU-005", 3, "A1"),
            ago(5),
            "23:59:00+02:00",
        ),
        on(
            pick("pick-closed", "ORD-C", "SKU-002", 1),
            ago(6),
            "10:00:00Z",
        ),
        receipts[0].clone(),
    ];
    let outcomes = deliver(&rt, &fresh, &batch);
    for (stamped, outcome) in batch.iter().zip(&outcomes) {
        eprintln!(
            "{} dated {}: {outcome:?}",
            stamped.event.id, stamped.event.ts
        );
    }
    for (i, date) in [(0, ago(7)), (2, ago(5)), (3, ago(6))] {
        let reason = permanent(&outcomes[i]);
        assert!(reason.contains(&format!("dated {date}")), "{reason}");
        assert!(reason.contains("closed stock period"), "{reason}");
        assert!(
            reason.contains(&format!("closed up to {}", ago(5))),
            "{reason}"
        );
    }
    posted(&outcomes[1..2]);
    assert_eq!(posted(&outcomes[4..5]), receipt_refs[..1]);
    assert_eq!(
        tryton.count(
            "stock.shipment.internal",
            json!([["reference", "=", "adj-closed"]])
        ),
        0
    );
    assert_eq!(
        tryton.count("stock.inventory", json!([["number", "=", "cnt-closed"]])),
        0
    );
    assert_eq!(
        tryton.count("stock.shipment.out", json!([["reference", "=", "ORD-C"]])),
        0
    );

    // A period closed after the connector read the periods: Tryton itself refuses the moves,
    // which carry their date before they are done.
    let later = tryton.call(
        "model.stock.period.create",
        json!([[{"date": tryton_date(ago(2)), "company": tryton::COMPANY}]]),
    );
    tryton.call("model.stock.period.close", json!([later]));
    let late = [on(
        adjust("adj-late", "SKU-006", 2, None),
        ago(3),
        "10:00:00Z",
    )];
    let outcomes = deliver(&rt, &fresh, &late);
    eprintln!("adj-late dated {}: {:?}", late[0].event.ts, outcomes[0]);
    let reason = permanent(&outcomes[0]);
    assert!(reason.contains(&ago(3).to_string()), "{reason}");
    assert!(reason.contains("period"), "{reason}");
    assert_eq!(tryton.stock_level("SKU-006", "STO"), 0.0);
}

/// The calendar's edges, each found from Tryton's today so that the test holds on any day: the
/// last evening of last month and of last year at UTC-5 (already the 1st in UTC) are booked on
/// that last day, a count early on the 1st at UTC+2 (still the day before in UTC) is of the
/// stock at the end of the 1st, and the latest 29 February is a day like any other.
#[test]
fn month_ends_year_ends_and_leap_days_are_booked_on_the_warehouses_day() {
    let tryton = Tryton::start();
    let rt = runtime();
    let connector = connector(&tryton);
    let today = tryton_today(&tryton);
    let first_of_month = today.replace_day(1).expect("every month has a 1st");
    let new_year = Date::from_calendar_date(today.year(), time::Month::January, 1)
        .expect("every year has a 1 January");
    let day_before = |date: Date| date.previous_day().expect("a day before");

    for (sku, first) in [("SKU-MONTH", first_of_month), ("SKU-YEAR", new_year)] {
        let eve = day_before(first);
        tryton.create_product(sku);
        let receipt = [on(
            receive(&format!("rcv-{sku}"), sku, 10, None),
            eve,
            "23:30:00-05:00",
        )];
        let outcomes = deliver(&rt, &connector, &receipt);
        let shipment = read_posted(&tryton, &outcomes[0], json!(["effective_date"]));
        assert_eq!(
            day(&shipment["effective_date"]),
            eve.to_string(),
            "{sku}: {shipment}"
        );

        let counted = [on(
            count(&format!("cnt-{sku}"), sku, 7, "MAIN"),
            first,
            "00:30:00+02:00",
        )];
        let outcomes = deliver(&rt, &connector, &counted);
        let inventory = read_posted(&tryton, &outcomes[0], json!(["date", "lines"]));
        assert_eq!(
            day(&inventory["date"]),
            first.to_string(),
            "{sku}: {inventory}"
        );
        let line = tryton.call(
            "model.stock.inventory.line.read",
            json!([inventory["lines"], ["expected_quantity", "quantity"]]),
        );
        assert_eq!(
            line[0]["expected_quantity"].as_f64(),
            Some(10.0),
            "{sku}: {line}"
        );
        assert_eq!(level_on(&tryton, sku, "STO", day_before(eve)), 0.0, "{sku}");
        assert_eq!(level_on(&tryton, sku, "STO", eve), 10.0, "{sku}");
        assert_eq!(level_on(&tryton, sku, "STO", first), 7.0, "{sku}");
        assert_eq!(tryton.stock_level(sku, "STO"), 7.0, "{sku}");
    }

    let leap_day = (0..8)
        .filter_map(|back| {
            Date::from_calendar_date(today.year() - back, time::Month::February, 29).ok()
        })
        .find(|date| *date <= today)
        .expect("a 29 February in the last eight years");
    tryton.create_product("SKU-LEAP");
    let receipt = [on(
        receive("rcv-leap", "SKU-LEAP", 3, None),
        leap_day,
        "23:30:00-05:00",
    )];
    let outcomes = deliver(&rt, &connector, &receipt);
    let shipment = read_posted(&tryton, &outcomes[0], json!(["effective_date"]));
    assert_eq!(
        day(&shipment["effective_date"]),
        leap_day.to_string(),
        "{shipment}"
    );
    assert_eq!(
        level_on(&tryton, "SKU-LEAP", "STO", day_before(leap_day)),
        0.0
    );
    assert_eq!(level_on(&tryton, "SKU-LEAP", "STO", leap_day), 3.0);
}
