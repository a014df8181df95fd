//! An event's trace, end to end: a scanner's event that the ERP failed twice before taking it,
//! and one the ERP refused for good, are traced by `backhaul-relay trace` and
//! `GET /v1/events/{id}` from the device that sent them to the ERP's last answer.

use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::erp_standin::{ErpStandIn, Mode};
use backhaul_tests::mqtt::{V4Client, v4_options};
use backhaul_tests::poll_until;
use backhaul_tests::relay::RelayProcess;
use serde_json::{Value, json};

fn relay(dir: &std::path::Path, broker_port: u16, erp: &ErpStandIn) -> RelayProcess {
    let sink = format!("[sink.http]\nurl = \"{}\"\ntimeout_ms = 3000\n", erp.url());
    let settings: Vec<(&str, toml_edit::Value)> = vec![
        ("delivery.retry_min_ms", 100.into()),
        ("delivery.retry_max_ms", 300.into()),
        ("delivery.pause_after_failures", 100.into()),
    ];
    RelayProcess::start_with(
        &dir.join("relay"),
        broker_port,
        true,
        Some(&sink),
        &settings,
    )
}

fn pick(id: &str, order: &str, sku: &str) -> String {
    json!({"v": 1, "id": id, "type": "pick", "ts": "2026-11-22T10:15:00Z", "order": order,
           "line": 1, "sku": sku, "qty": "2", "uom": "EA", "location": "A-01-03"})
    .to_string()
}

fn traces(relay: &RelayProcess, id: &str) -> Vec<Value> {
    let text = relay.cli(&["trace", id, "--json"]);
    serde_json::from_str::<Vec<Value>>(&text).expect("trace --json is a JSON list")
}

/// Waits until the event's single trace is in `state`.
fn wait_state(relay: &RelayProcess, id: &str, state: &str) -> Value {
    poll_until(Duration::from_secs(60), || {
        let found = traces(relay, id);
        (found.len() == 1 && found[0]["state"] == state).then(|| found[0].clone())
    })
    .unwrap_or_else(|| panic!("{id} never became {state}: {:?}", traces(relay, id)))
}

#[test]
fn trace_tells_where_an_event_came_from_and_every_answer_the_erp_gave() {
    let dir = tempfile::tempdir().unwrap();
    let erp = ErpStandIn::start();
    erp.set_mode(Mode::Fail);
    erp.refuse_sku("SKU-404");
    let broker_port = backhaul_tests::free_port();
    let relay = relay(dir.path(), broker_port, &erp);
    let agent = AgentProcess::start(
        AgentOptions::default()
            .uplink("127.0.0.1", broker_port)
            .set("site", "tracing")
            .set("uplink.client_id", format!("agent-tracing-{broker_port}"))
            .set("uplink.linger_ms", 10),
    );
    let mut scanner = V4Client::connect_retrying(
        &v4_options(agent.mqtt_addr(), "handheld-7"),
        Duration::from_secs(10),
    );
    scanner
        .publish("scans/handheld-7", 1, pick("trace-ok", "SO-T1", "SKU-001"))
        .expect("PUBACK for trace-ok");
    scanner
        .publish("scans/handheld-7", 1, pick("trace-bad", "SO-T2", "SKU-404"))
        .expect("PUBACK for trace-bad");

    // While the ERP fails, the event waits in the outbox with its failed attempts.
    let waiting = poll_until(Duration::from_secs(60), || {
        let found = traces(&relay, "trace-ok");
        (found.len() == 1
            && found[0]["attempts"]
                .as_array()
                .is_some_and(|a| a.len() >= 2))
        .then(|| found[0].clone())
    })
    .unwrap_or_else(|| {
        panic!(
            "no failed attempts traced: {:?}",
            traces(&relay, "trace-ok")
        )
    });
    assert_eq!(waiting["state"], "waiting", "{waiting}");
    erp.set_mode(Mode::Ok);

    let ok = wait_state(&relay, "trace-ok", "posted");
    assert_eq!(ok["site"], "tracing");
    assert_eq!(ok["device"], "handheld-7");
    assert_eq!(ok["type"], "pick");
    let seq = ok["seq"].as_u64().expect("seq");
    assert_eq!(seq, 1, "the site's first event");
    assert_eq!(ok["epoch"].as_str().map(str::len), Some(32));
    let batch = &ok["batch"];
    assert!(
        batch["first_seq"].as_u64() <= Some(seq) && batch["last_seq"].as_u64() >= Some(seq),
        "the batch carried the event: {ok}"
    );
    assert!(batch["stored_at"].is_string() && ok["received_at"].is_string());
    let attempts = ok["attempts"].as_array().expect("attempts");
    let (last, failed) = attempts.split_last().expect("at least one attempt");
    assert!(failed.len() >= 2, "{ok}");
    for attempt in failed {
        assert_eq!(attempt["result"], "transient", "{ok}");
        assert!(
            attempt["detail"]
                .as_str()
                .is_some_and(|d| d.contains("500")),
            "the ERP's answer is kept: {attempt}"
        );
        assert!(attempt["latency_ms"].is_u64());
    }
    assert_eq!(last["result"], "posted");
    let erp_ref = ok["erp_ref"].as_str().expect("the ERP's reference");
    assert!(!erp_ref.is_empty());
    assert_eq!(last["detail"], erp_ref);

    let bad = wait_state(&relay, "trace-bad", "dead_lettered");
    assert_eq!(bad["seq"], 2);
    let reason = bad["reason"].as_str().expect("reason");
    assert!(reason.contains("unknown product SKU-404"), "{bad}");
    assert_eq!(
        bad["attempts"]
            .as_array()
            .and_then(|a| a.last())
            .map(|a| a["result"].clone()),
        Some(json!("refused"))
    );

    // The terminal form, and a clear answer for an id nobody has.
    let text = relay.cli(&["trace", "trace-ok", "--site", "tracing"]);
    assert!(
        text.contains("handheld-7") && text.contains(&format!("ERP reference {erp_ref}")),
        "{text}"
    );
    let unknown = reqwest::blocking::get(format!(
        "http://127.0.0.1:{}/v1/events/no-such-event",
        relay.admin_port
    ))
    .expect("GET /v1/events/no-such-event");
    assert_eq!(unknown.status().as_u16(), 404);
    let body = unknown.text().unwrap_or_default();
    assert!(body.contains("no event no-such-event"), "{body}");
}
