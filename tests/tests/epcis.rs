//! The EPCIS 2.0 connector end to end: every event type reaches a repository's capture
//! interface as an ObjectEvent in documents GS1's own epcis2.js accepts; a document the
//! repository refuses is split so that only its bad event is dead-lettered, with the same
//! EPCIS event ids on the retry; a SKU without a GTIN is dead-lettered naming the SKU.

use std::collections::HashMap;
use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::epcis::{CaptureStandIn, assert_valid_epcis};
use backhaul_tests::events::{adjust, count, pick, receive, ship};
use backhaul_tests::poll_until;
use backhaul_tests::relay::RelayProcess;
use serde_json::{Value, json};

const SITE: &str = "epcis-site";

fn sink(repository: &CaptureStandIn) -> String {
    format!(
        r#"[sink.epcis]
url = "{}"
owner_gln = "9506000134352"
gtins = {{ "SKU-001" = "09506000134352", "SKU-002" = "09506000134369", "SKU-BLOCKED" = "09506000134376" }}
locations = {{ "A-01-03" = "urn:epc:id:sgln:9506000134.52.A0103", "DOCK-1" = "urn:epc:id:sgln:9506000134.52.DOCK1", "B-02-01" = "urn:epc:id:sgln:9506000134.52.B0201" }}
sites = {{ "{SITE}" = "urn:epc:id:sgln:9506000134.52.0" }}
"#,
        repository.url()
    )
}

#[test]
fn every_event_type_is_captured_as_valid_epcis_and_a_refused_one_is_dead_lettered_alone() {
    let dir = tempfile::tempdir().unwrap();
    let repository = CaptureStandIn::start();
    repository.refuse_gtin("09506000134376");
    let broker_port = backhaul_tests::free_port();
    let settings: Vec<(&str, toml_edit::Value)> = vec![
        ("delivery.max_batch", 20.into()),
        ("delivery.retry_min_ms", 100.into()),
    ];
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker_port,
        true,
        Some(&sink(&repository)),
        &settings,
    );
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", SITE)
            .set("uplink.client_id", format!("agent-{SITE}-{broker_port}"))
            .set("uplink.linger_ms", 50),
    );
    let mut blocked = pick("ep-blocked", "SO-7");
    blocked["sku"] = json!("SKU-BLOCKED");
    let mut unmapped = pick("ep-unmapped", "SO-8");
    unmapped["sku"] = json!("SKU-NOGTIN");
    let events = vec![
        pick("ep-pick", "SO-1"),
        ship("ep-ship", "SO-2"),
        receive("ep-receive", "SKU-001", "PO-9"),
        adjust("ep-adjust", "SKU-001", "-2", "damaged"),
        count("ep-count", "SKU-002", "A-01-03", "40"),
        blocked,
        unmapped,
    ];
    let answer = agent.post_events(&Value::Array(events), None);
    assert_eq!(answer.status().as_u16(), 202);

    let good = ["ep-pick", "ep-ship", "ep-receive", "ep-adjust", "ep-count"];
    // Event id → its EPCIS event as captured.
    let captured = || -> HashMap<String, Value> {
        repository
            .captures()
            .into_iter()
            .filter(|(_, success)| *success)
            .flat_map(|(document, _)| {
                document["epcisBody"]["eventList"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|event| {
                let order = event["bizTransactionList"][0]["bizTransaction"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                let key = format!("{}|{}", event["bizStep"].as_str()?, order);
                Some((key, event))
            })
            .collect()
    };
    let all_captured = poll_until(Duration::from_secs(60), || {
        let have = captured();
        (have.len() >= good.len()).then_some(have)
    })
    .unwrap_or_else(|| panic!("captured so far: {:?}", repository.captures()));

    // The business step of each type, its product class, read point, transactions and units.
    let by_step = |step: &str| -> Vec<&Value> {
        all_captured
            .values()
            .filter(|e| e["bizStep"] == step)
            .collect()
    };
    let picking = by_step("picking");
    assert_eq!(picking.len(), 1, "{all_captured:?}");
    let pick_event = picking[0];
    assert_eq!(pick_event["type"], "ObjectEvent");
    assert_eq!(pick_event["action"], "OBSERVE");
    assert_eq!(
        pick_event["quantityList"][0]["epcClass"],
        "https://id.gs1.org/01/09506000134352"
    );
    assert_eq!(pick_event["quantityList"][0]["quantity"], 2.0);
    assert_eq!(
        pick_event["readPoint"]["id"],
        "urn:epc:id:sgln:9506000134.52.A0103"
    );
    assert_eq!(
        pick_event["bizLocation"]["id"],
        "urn:epc:id:sgln:9506000134.52.0"
    );
    assert_eq!(
        pick_event["bizTransactionList"][0]["bizTransaction"],
        "urn:epcglobal:cbv:bt:9506000134352:SO-1"
    );
    assert_eq!(by_step("shipping").len(), 1);
    let receiving = by_step("receiving");
    assert_eq!(receiving.len(), 1);
    assert_eq!(receiving[0]["quantityList"][0]["uom"], "KGM");
    assert_eq!(
        receiving[0]["bizTransactionList"][0]["bizTransaction"],
        "urn:epcglobal:cbv:bt:9506000134352:PO-9"
    );
    let adjusting = by_step("stock_taking");
    assert_eq!(adjusting.len(), 1);
    assert_eq!(adjusting[0]["disposition"], "damaged");
    assert_eq!(adjusting[0]["quantityList"][0]["quantity"], 2.0);
    assert_eq!(by_step("cycle_counting").len(), 1);

    // The first document held the blocked event and was refused; its events were sent again
    // one per document with the same EPCIS event ids, and only the blocked one was refused.
    let captures = repository.captures();
    let (first, first_ok) = &captures[0];
    assert!(!first_ok, "the first document held the refused GTIN");
    let first_ids: Vec<&str> = first["epcisBody"]["eventList"]
        .as_array()
        .expect("eventList")
        .iter()
        .filter_map(|e| e["eventID"].as_str())
        .collect();
    assert_eq!(first_ids.len(), 6, "every mapped event in one document");
    for event in all_captured.values() {
        let id = event["eventID"].as_str().expect("eventID");
        assert!(id.starts_with("urn:uuid:"), "{id}");
        assert!(first_ids.contains(&id), "a retry is the same EPCIS event");
    }

    // GS1's own SDK accepts every document the relay produced.
    let documents: Vec<Value> = captures.into_iter().map(|(d, _)| d).collect();
    assert_valid_epcis(&documents);

    // `export epcis` writes the same ObjectEvents, with the same ids, for the day's delivered
    // events, in a document GS1's SDK accepts too.
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, sink(&repository)).expect("write the mapping");
    let exported = dir.path().join("export.json");
    let (mapping_arg, out_arg) = (
        mapping.display().to_string(),
        exported.display().to_string(),
    );
    relay.cli(&[
        "export",
        "epcis",
        "--site",
        SITE,
        "--from",
        "2026-11-22",
        "--to",
        "2026-11-22",
        "--mapping",
        &mapping_arg,
        "--out",
        &out_arg,
    ]);
    let export: Value =
        serde_json::from_slice(&std::fs::read(&exported).expect("the export")).expect("JSON");
    let mut exported_ids: Vec<&str> = export["epcisBody"]["eventList"]
        .as_array()
        .expect("eventList")
        .iter()
        .filter_map(|e| e["eventID"].as_str())
        .collect();
    let mut captured_ids: Vec<&str> = all_captured
        .values()
        .filter_map(|e| e["eventID"].as_str())
        .collect();
    exported_ids.sort_unstable();
    captured_ids.sort_unstable();
    assert_eq!(
        exported_ids, captured_ids,
        "the delivered events, as captured"
    );
    assert_valid_epcis(std::slice::from_ref(&export));
    let none: Value = serde_json::from_str(&relay.cli(&[
        "export",
        "epcis",
        "--site",
        SITE,
        "--from",
        "2026-11-23",
        "--to",
        "2026-11-30",
        "--mapping",
        &mapping_arg,
    ]))
    .expect("an export to stdout");
    assert_eq!(
        none["epcisBody"]["eventList"],
        json!([]),
        "other days hold nothing"
    );

    // The two bad events are dead letters with reasons an operator can act on.
    let letters = poll_until(Duration::from_secs(30), || {
        let list: Value = serde_json::from_str(&relay.cli(&["dlq", "list", "--json"])).ok()?;
        (list["total"] == 2).then_some(list)
    })
    .unwrap_or_else(|| panic!("{}", relay.cli(&["dlq", "list", "--json"])));
    let reasons: Vec<String> = letters["dead_letters"]
        .as_array()
        .expect("dead_letters")
        .iter()
        .map(|l| l["reason"].to_string())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("SKU SKU-NOGTIN has no GTIN in sink.epcis.gtins")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("EPCIS capture")
            && r.contains("product class refused by the repository")),
        "{reasons:?}"
    );
}
