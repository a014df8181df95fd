//! The agent's HTTP ingest, run as the real binary: what a WMS sees when it posts events, when
//! it posts bad ones, the same one twice, without its token, and when the disk quota is full.

use std::collections::HashMap;
use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess, metric_value};
use backhaul_tests::events::{
    assert_stored_as_sent, id_of, one_of_each, pick, rule_cases, to_bytes, unique_id,
};
use backhaul_tests::mqtt::{V4Client, V5Client, v4_options, v5_options};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::{Value, json};

/// Status and JSON body of a response.
fn answer(response: reqwest::blocking::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text}"));
    (status, body)
}

fn log_by_id(agent: &AgentProcess) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for event in agent.log_events() {
        let id = id_of(&event).to_string();
        assert!(map.insert(id.clone(), event).is_none(), "{id} logged twice");
    }
    map
}

fn picks(prefix: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| pick(&unique_id(prefix), &format!("SO-{}", i % 50)))
        .collect()
}

#[test]
fn posted_events_are_acknowledged_after_the_flush_with_a_result_each() {
    let agent = AgentProcess::start_default();

    // One event as a plain object.
    let events = one_of_each("h1");
    let (status, body) = answer(agent.post_events(&events[0], None));
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 1);
    assert_eq!(body["results"][0]["status"], "accepted");
    assert_eq!(body["results"][0]["id"], id_of(&events[0]));
    // 202 means flushed: the event is readable from the log at once, as it was sent.
    let log = log_by_id(&agent);
    let stored = &log[id_of(&events[0])];
    assert_stored_as_sent(&events[0], stored, None);
    assert_eq!(stored["seq"], body["results"][0]["seq"]);

    // An array: one result per event, in order, each with its sequence number.
    let (status, body) = answer(agent.post_events(&json!(events[1..]), None));
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["accepted"], 4);
    assert_eq!(body["rejected"], 0);
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), 4);
    let log = log_by_id(&agent);
    for (i, (event, result)) in events[1..].iter().zip(results).enumerate() {
        assert_eq!(result["index"], i);
        assert_eq!(result["id"], id_of(event));
        assert_eq!(result["status"], "accepted");
        assert_stored_as_sent(event, &log[id_of(event)], None);
        assert_eq!(log[id_of(event)]["seq"], result["seq"]);
    }

    // The largest array: 1000 events.
    let batch = picks("h1k", 1000);
    let (status, body) = answer(agent.post_events(&json!(batch), None));
    assert_eq!(status, 202);
    assert_eq!(body["accepted"], 1000);
    let seqs: std::collections::BTreeSet<u64> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs.len(), 1000, "every event has its own seq");
    let log = log_by_id(&agent);
    assert_eq!(log.len(), 1005);
    for event in &batch {
        assert_stored_as_sent(event, &log[id_of(event)], None);
    }

    // One more is too many, and nothing of it is stored.
    let (status, body) = answer(agent.post_events(&json!(picks("h1x", 1001)), None));
    assert_eq!(status, 413);
    assert_eq!(body["error"], "at most 1000 events per request (got 1001)");
    assert_eq!(agent.log_events().len(), 1005);

    // Bodies that hold no event.
    let (status, body) = answer(agent.post_events(&json!([]), None));
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("the array holds no events"))
    );
    let (status, body) = answer(agent.post_events_raw(b"pick SKU-001".to_vec(), None));
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("the body is not valid JSON"),
        "{body}"
    );
    assert_eq!(agent.log_events().len(), 1005);
    assert_eq!(
        agent.metric("backhaul_agent_events_accepted_total{transport=\"http\"}"),
        Some(1005.0)
    );
}

#[test]
fn every_broken_rule_is_listed_with_its_field() {
    let agent = AgentProcess::start_default();
    let cases: Vec<_> = rule_cases().into_iter().filter(|c| c.is_json).collect();
    let good = pick(&unique_id("h2"), "SO-1");

    // Every invalid event and one valid one in one array, exactly as bytes (one case has a key
    // twice, which no JSON library would write).
    let mut body = b"[".to_vec();
    for case in &cases {
        body.extend_from_slice(&case.payload);
        body.push(b',');
    }
    body.extend_from_slice(&to_bytes(&good));
    body.push(b']');
    let (status, answer_body) = answer(agent.post_events_raw(body, None));
    // Bad input never blocks good input: the valid event is accepted.
    assert_eq!(status, 202, "{answer_body}");
    assert_eq!(answer_body["accepted"], 1);
    assert_eq!(answer_body["rejected"], cases.len());
    let results = answer_body["results"].as_array().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let result = &results[i];
        assert_eq!(result["index"], i);
        assert_eq!(result["status"], "rejected", "{}: {result}", case.name);
        let violations = result["violations"].as_array().unwrap();
        let messages: Vec<String> = violations
            .iter()
            .map(|v| v["message"].as_str().unwrap().to_string())
            .collect();
        assert!(
            case.matches(&messages),
            "{}: {messages:?}, expected {:?}",
            case.name,
            case.expected
        );
        let fields: Vec<&str> = violations
            .iter()
            .map(|v| v["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, case.fields(), "{}", case.name);
        for v in violations {
            assert_eq!(
                v["message"],
                format!(
                    "{}: {}",
                    v["field"].as_str().unwrap(),
                    v["rule"].as_str().unwrap()
                )
            );
        }
    }
    assert_eq!(results[cases.len()]["status"], "accepted");
    let log = agent.log_events();
    assert_eq!(log.len(), 1);
    assert_stored_as_sent(&good, &log[0], None);

    // One invalid event alone: 400 with its violations at the top.
    let mut bad = pick(&unique_id("h2"), "SO-1");
    bad["qty"] = json!("0");
    bad.as_object_mut().unwrap().remove("order");
    let (status, body) = answer(agent.post_events(&bad, None));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "the event was refused");
    let messages: Vec<&str> = body["violations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        messages,
        [
            "qty: must be greater than 0 for pick",
            "order: is required for pick"
        ]
    );

    // Only invalid events in an array: 400.
    let (status, body) = answer(agent.post_events(&json!([bad, bad]), None));
    assert_eq!(status, 400);
    assert_eq!(body["error"], "every event was refused");
    assert_eq!(body["rejected"], 2);
    assert_eq!(agent.log_events().len(), 1);

    // Each refusal is counted and kept for inspection.
    let refused = cases.len() + 3;
    assert_eq!(
        agent.metric("backhaul_agent_events_rejected_total{transport=\"http\"}"),
        Some(refused as f64)
    );
    // The reject store is written after the answer (it need not hold it up): poll.
    let rejects = backhaul_tests::poll_until(Duration::from_secs(10), || {
        let rejects = agent.rejects();
        (rejects.len() == refused).then_some(rejects)
    })
    .expect("every refused event in /v1/rejects");
    assert!(rejects.iter().all(|r| r["transport"] == "http"));

    // Paging back through them, newest first, meets each once; following after an id gives
    // what is newer, oldest first.
    let newest: Vec<u64> = rejects.iter().filter_map(|r| r["id"].as_u64()).collect();
    let mut paged = Vec::new();
    let mut path = "/v1/rejects?limit=2".to_string();
    loop {
        let page = agent.get_json(&path);
        paged.extend(
            page["rejects"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_u64().unwrap()),
        );
        match page["next_before"].as_u64() {
            Some(before) => path = format!("/v1/rejects?limit=2&before={before}"),
            None => break,
        }
    }
    assert_eq!(paged, newest);
    let oldest = *newest.last().unwrap();
    let after = agent.get_json(&format!("/v1/rejects?after={oldest}&limit=1000"));
    let followed: Vec<u64> = after["rejects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_u64().unwrap())
        .collect();
    let mut expected: Vec<u64> = newest[..newest.len() - 1].to_vec();
    expected.reverse();
    assert_eq!(followed, expected);
    let both = agent.get(&format!("/v1/rejects?after=1&before={oldest}"));
    assert_eq!(both.status(), 400);
}

#[test]
fn a_duplicate_id_is_answered_as_accepted_and_stored_once() {
    let agent = AgentProcess::start_default();
    let event = pick(&unique_id("dup"), "SO-1");
    let (status, first) = answer(agent.post_events(&event, None));
    assert_eq!(status, 202);
    let seq = first["results"][0]["seq"].clone();

    let (status, again) = answer(agent.post_events(&event, None));
    assert_eq!(status, 202, "a retry is a success for the producer");
    assert_eq!(again["accepted"], 0);
    assert_eq!(again["duplicates"], 1);
    assert_eq!(again["results"][0]["status"], "duplicate");
    assert_eq!(again["results"][0]["seq"], seq, "the seq of the stored one");

    // Twice in one array, next to a new event.
    let new = pick(&unique_id("dup"), "SO-2");
    let (status, body) = answer(agent.post_events(&json!([event, new, new]), None));
    assert_eq!(status, 202);
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["duplicate", "accepted", "duplicate"]);

    // The same id over MQTT is a duplicate too: acknowledged, not stored again.
    let (mut client, _) = V5Client::connect(v5_options(agent.mqtt_addr(), "dup-scanner")).unwrap();
    assert!(
        client
            .publish("scans/dup-scanner", 1, to_bytes(&event))
            .unwrap()
            .is_success()
    );

    let log = log_by_id(&agent);
    assert_eq!(log.len(), 2);
    assert_stored_as_sent(&event, &log[id_of(&event)], None);
    assert_eq!(log[id_of(&event)]["seq"], seq);
    let metrics = agent.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "backhaul_agent_events_duplicate_total{transport=\"http\"}"
        ),
        Some(3.0)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "backhaul_agent_events_duplicate_total{transport=\"mqtt\"}"
        ),
        Some(1.0)
    );
}

#[test]
fn a_configured_token_is_required_to_post() {
    let token = "wms-token-5f1c9e";
    let agent = AgentProcess::start(AgentOptions::default().token(token));
    let event = pick(&unique_id("tok"), "SO-1");

    let response = agent.post_events(&event, None);
    assert_eq!(
        response.headers()["www-authenticate"].to_str().unwrap(),
        "Bearer"
    );
    let (status, body) = answer(response);
    assert_eq!(status, 401);
    assert_eq!(
        body["error"],
        "a bearer token is required: send `Authorization: Bearer <token>`"
    );
    let (status, _) = answer(agent.post_events(&event, Some("wms-token-5f1c9f")));
    assert_eq!(status, 401, "a wrong token");
    assert!(agent.log_events().is_empty());

    let (status, body) = answer(agent.post_events(&event, Some(token)));
    assert_eq!(status, 202, "{body}");
    assert_eq!(agent.log_events().len(), 1);
    // The admin side stays open (it listens on localhost), and the token is never logged.
    assert_eq!(agent.get("/healthz").status(), 200);
    assert_eq!(agent.status()["site"], "wh-east");
    assert!(!agent.stderr().contains(token));
}

#[test]
fn a_full_quota_refuses_with_back_pressure_and_takes_events_again_with_room() {
    let agent_options = AgentOptions::default().max_bytes("1 MiB");
    let mut agent = AgentProcess::start(agent_options);
    assert_eq!(agent.get("/readyz").status(), 200);

    // Fill the log through HTTP until the agent says 503.
    let mut accepted = 0u64;
    let (refused_batch, body) = loop {
        let batch = picks("q", 1000);
        let response = agent.post_events(&json!(batch), None);
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let (status, body) = answer(response);
        if status == 503 {
            let retry_after = retry_after.expect("503 carries Retry-After");
            assert!(retry_after.parse::<u64>().unwrap() > 0, "{retry_after}");
            break (batch, body);
        }
        assert_eq!(status, 202, "{body}");
        accepted += body["accepted"].as_u64().unwrap();
        assert!(accepted < 20_000, "1 MiB never filled up");
    };
    // Part of the last batch may have fit; the rest is refused, each saying why.
    let fitted = body["accepted"].as_u64().unwrap();
    let refused = body["refused"].as_u64().unwrap();
    assert_eq!(fitted + refused, 1000);
    assert!(refused > 0);
    let results = body["results"].as_array().unwrap();
    let refused_result = results.iter().find(|r| r["status"] == "refused").unwrap();
    assert_eq!(
        refused_result["reason"],
        "the agent's disk quota is full; retry later"
    );
    accepted += fitted;
    assert_eq!(agent.log_events().len() as u64, accepted);

    // Everyone sees it: MQTT 5 gets "quota exceeded", metrics raise the alarm, not ready.
    let (mut v5, _) = V5Client::connect(v5_options(agent.mqtt_addr(), "scanner-q5")).unwrap();
    let mqtt_event = pick(&unique_id("q5"), "SO-1");
    let ack = v5
        .publish("scans/scanner-q5", 1, to_bytes(&mqtt_event))
        .unwrap();
    assert_eq!(ack.reason, PubAckReason::QuotaExceeded, "{ack:?}");
    let reason = ack.reason_string.unwrap();
    assert!(
        reason.contains("disk quota is full; keep the event and retry"),
        "{reason}"
    );
    let ack = v5
        .publish("scans/scanner-q5", 2, to_bytes(&mqtt_event))
        .unwrap();
    assert_eq!(ack.reason, PubAckReason::QuotaExceeded, "QoS 2: {ack:?}");
    let metrics = agent.metrics();
    assert_eq!(
        metric_value(&metrics, "backhaul_agent_log_quota_exceeded"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        metric_value(
            &metrics,
            "backhaul_agent_quota_refusals_total{transport=\"mqtt\"}"
        )
        .unwrap()
            >= 2.0
    );
    let readyz = agent.get("/readyz");
    assert_eq!(readyz.status(), 503);
    assert!(readyz.text().unwrap().contains("quota"));
    assert_eq!(agent.status()["quota"]["exceeded"], true);

    // MQTT 3.1.1 cannot say "full": the PUBACK is held back while there is no room.
    let (mut v311, _) = V4Client::connect(v4_options(agent.mqtt_addr(), "scanner-q4")).unwrap();
    let held_event = pick(&unique_id("q4"), "SO-1");
    let held = v311
        .publish_within(
            "scans/scanner-q4",
            1,
            to_bytes(&held_event),
            Duration::from_millis(1500),
        )
        .unwrap();
    assert!(held.is_none(), "no PUBACK while the quota is full");
    assert!(!log_by_id(&agent).contains_key(id_of(&held_event)));

    // Room again. The real path is the relay acknowledging forwarded events, which deletes
    // them from the log; that arrives with the forwarder and relay work. Until then the
    // operator's path: restart with a larger quota on the same state directory.
    agent.restart_with(|options| options.max_bytes = Some("64 MiB".into()));
    assert_eq!(agent.get("/readyz").status(), 200);
    assert_eq!(agent.metric("backhaul_agent_log_quota_exceeded"), Some(0.0));
    assert_eq!(
        agent.log_events().len() as u64,
        accepted,
        "nothing acknowledged was lost"
    );

    // The WMS retries the refused request as it was: what was stored is a duplicate, the rest
    // is accepted now.
    let (status, body) = answer(agent.post_events(&json!(refused_batch), None));
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["duplicates"].as_u64().unwrap(), fitted);
    assert_eq!(body["accepted"].as_u64().unwrap(), refused);
    let new = pick(&unique_id("q"), "SO-1");
    let (status, _) = answer(agent.post_events(&new, None));
    assert_eq!(status, 202);

    // The scanners re-send what was not acknowledged, and now it is.
    let (mut v5, _) = V5Client::connect(v5_options(agent.mqtt_addr(), "scanner-q5")).unwrap();
    let ack = v5
        .publish("scans/scanner-q5", 1, to_bytes(&mqtt_event))
        .unwrap();
    assert!(ack.is_success(), "{ack:?}");
    let (mut v311, _) = V4Client::connect(v4_options(agent.mqtt_addr(), "scanner-q4")).unwrap();
    v311.publish("scans/scanner-q4", 1, to_bytes(&held_event))
        .unwrap();

    let log = log_by_id(&agent);
    assert_eq!(log.len() as u64, accepted + refused + 3);
    for event in &refused_batch {
        assert!(log.contains_key(id_of(event)));
    }
    assert_stored_as_sent(&mqtt_event, &log[id_of(&mqtt_event)], Some("scanner-q5"));
    assert_stored_as_sent(&held_event, &log[id_of(&held_event)], Some("scanner-q4"));
}

/// A POST of events made of nothing but unknown fields: each answer lists 20 violations and
/// counts the rest, so the answer and the reject store stay small however the body is built.
#[test]
fn a_flood_of_violations_gets_a_bounded_answer() {
    let agent = AgentProcess::start_default();
    let events: Vec<Value> = (0..150)
        .map(|n| {
            let mut event = pick(&unique_id("flood"), "SO-1");
            for i in 0..1500 {
                event[format!("u{i}")] = json!(1);
            }
            let size = event.to_string().len();
            assert!(
                (14_000..16_384).contains(&size),
                "event {n} is {size} bytes"
            );
            event
        })
        .collect();
    let body = serde_json::to_vec(&events).unwrap();
    let response = agent.post_events_raw(body.clone(), None);
    let text = response.text().unwrap();
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["rejected"], 150, "{}", &text[..text.len().min(500)]);
    for result in answer["results"].as_array().unwrap() {
        let violations = result["violations"].as_array().unwrap();
        assert_eq!(violations.len(), 21);
        let last = violations[20]["message"].as_str().unwrap();
        assert!(
            last.starts_with("event: ") && last.contains("more violations not listed"),
            "{last}"
        );
    }
    eprintln!(
        "a POST of {} bytes answered with {} bytes",
        body.len(),
        text.len()
    );
    assert!(
        text.len() < body.len(),
        "the answer ({} bytes) is larger than the request",
        text.len()
    );
    // Rejects are stored behind the answer: wait for them. Past 1 MiB waiting for the writer
    // (a slow disk, a busy machine) a reject is answered and counted as not kept instead of
    // queued, so every one is either stored or counted.
    let stored = backhaul_tests::poll_until(Duration::from_secs(30), || {
        let status = agent.status();
        let (kept, shed) = (
            status["rejects_stored"].as_u64().unwrap_or(0),
            status["rejects_not_kept"].as_u64().unwrap_or(0),
        );
        (kept + shed == 150 && kept > 0).then_some(())
    });
    assert!(stored.is_some(), "{}", agent.status());
}

/// `backhaul-agent tail | head -1`: once the reader is gone the command ends quietly, like any
/// Unix tool, instead of panicking.
#[test]
fn tail_ends_quietly_when_its_reader_goes_away() {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicBool, Ordering};
    let agent = std::sync::Arc::new(AgentProcess::start_default());
    let mut tail = std::process::Command::new(backhaul_tests::binary("backhaul-agent"))
        .args(["tail", "--url", &agent.admin_url()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("backhaul-agent tail starts");
    // Events keep arriving, for tail to print before and after its reader goes.
    let posting = std::sync::Arc::new(AtomicBool::new(true));
    let poster = {
        let (agent, posting) = (agent.clone(), posting.clone());
        std::thread::spawn(move || {
            while posting.load(Ordering::Relaxed) {
                agent.post_events(&pick(&unique_id("tail"), "SO-1"), None);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let stdout = tail.stdout.take().expect("a pipe");
    let mut lines = std::io::BufReader::new(stdout).lines();
    let line = lines.next().expect("a line").expect("readable");
    assert!(line.contains("\"id\""), "{line}");
    drop(lines);
    let ended =
        backhaul_tests::poll_until(Duration::from_secs(30), || tail.try_wait().ok().flatten());
    posting.store(false, Ordering::Relaxed);
    poster.join().expect("the posting thread");
    assert!(
        ended.is_some(),
        "tail kept running after its reader went away"
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut tail.stderr.take().expect("stderr"), &mut stderr).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
}
