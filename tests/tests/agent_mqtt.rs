//! The agent's MQTT endpoint, run as the real binary and spoken to by real clients: rumqttc
//! (3.1.1 and 5) and Mosquitto's `mosquitto_pub`, which nobody here wrote.
//!
//! What a scanner relies on: an acknowledged event is in the log exactly as sent, a refused
//! one comes back with the reason, sessions and client ids behave as MQTT says, a broken or
//! hostile client cannot disturb the others, and only configured users get in.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess, metric_value};
use backhaul_tests::events::{
    assert_stored_as_sent, id_of, one_of_each, pick, rule_cases, to_bytes, unique_id,
};
use backhaul_tests::mosquitto::client_binary;
use backhaul_tests::mqtt::{V4Client, V5Client, v4_options, v5_options};
use backhaul_tests::poll_until;
use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as V5Code, PubAckReason};
use serde_json::Value;

/// The log as a map from event id to the stored record; an id twice is a failure.
fn log_by_id(agent: &AgentProcess) -> HashMap<String, Value> {
    let mut map = HashMap::new();
    for event in agent.log_events() {
        let id = id_of(&event).to_string();
        if let Some(first) = map.insert(id.clone(), event) {
            panic!("event {id} is in the log twice; first: {first}");
        }
    }
    map
}

/// Waits until every id is in the log (QoS 0 has no acknowledgement to wait for).
fn wait_until_logged(agent: &AgentProcess, ids: &[String]) -> HashMap<String, Value> {
    let mut missing = Vec::new();
    poll_until(Duration::from_secs(20), || {
        let log = log_by_id(agent);
        missing = ids
            .iter()
            .filter(|id| !log.contains_key(*id))
            .cloned()
            .collect();
        missing.is_empty().then_some(log)
    })
    .unwrap_or_else(|| panic!("never logged: {missing:?}"))
}

/// Checks each sent event against the log, field by field.
#[track_caller]
fn assert_all_logged(agent: &AgentProcess, sent: &[(Value, String)]) {
    let ids: Vec<String> = sent.iter().map(|(e, _)| id_of(e).to_string()).collect();
    let log = wait_until_logged(agent, &ids);
    for (event, device) in sent {
        assert_stored_as_sent(event, &log[id_of(event)], Some(device));
    }
}

#[test]
fn rumqttc_v311_events_at_qos_0_1_2_are_logged_as_sent() {
    let agent = AgentProcess::start_default();
    let device = "scanner-v311";
    let (mut client, connack) = V4Client::connect(v4_options(agent.mqtt_addr(), device)).unwrap();
    assert_eq!(connack.code, rumqttc::ConnectReturnCode::Success);
    let mut sent = Vec::new();
    for qos in [0u8, 1, 2] {
        for event in one_of_each(&format!("v4q{qos}")) {
            client
                .publish(&format!("scans/{device}"), qos, to_bytes(&event))
                .unwrap_or_else(|e| panic!("QoS {qos} publish of {event}: {e}"));
            // Acknowledged (QoS 1 and 2): it must be in the log already, with no waiting.
            if qos > 0 {
                let log = log_by_id(&agent);
                assert!(log.contains_key(id_of(&event)), "acked but not logged");
            }
            sent.push((event, device.to_string()));
        }
    }
    client.disconnect();
    assert_all_logged(&agent, &sent);
    assert_eq!(agent.log_events().len(), 15);
}

#[test]
fn rumqttc_v5_events_at_qos_0_1_2_are_logged_as_sent() {
    let agent = AgentProcess::start_default();
    let device = "scanner-v5";
    let (mut client, connack) = V5Client::connect(v5_options(agent.mqtt_addr(), device)).unwrap();
    assert_eq!(connack.code, V5Code::Success);
    let mut sent = Vec::new();
    for qos in [0u8, 1, 2] {
        for event in one_of_each(&format!("v5q{qos}")) {
            let ack = client
                .publish(&format!("scans/{device}"), qos, to_bytes(&event))
                .unwrap_or_else(|e| panic!("QoS {qos} publish of {event}: {e}"));
            assert!(ack.is_success(), "QoS {qos}: {ack:?}");
            if qos > 0 {
                assert!(log_by_id(&agent).contains_key(id_of(&event)));
            }
            sent.push((event, device.to_string()));
        }
    }
    client.disconnect();
    assert_all_logged(&agent, &sent);
    assert_eq!(agent.log_events().len(), 15);
}

fn mosquitto_pub(agent: &AgentProcess, args: &[&str]) -> std::process::Output {
    Command::new(client_binary("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &agent.mqtt_port().to_string()])
        .args(args)
        .output()
        .expect("run mosquitto_pub")
}

#[test]
fn mosquitto_pub_events_at_v311_v5_qos_1_2_are_logged_as_sent() {
    let agent = AgentProcess::start_default();
    let mut sent = Vec::new();
    for version in ["mqttv311", "mqttv5"] {
        for qos in ["1", "2"] {
            let device = format!("mp-{version}-q{qos}");
            for event in one_of_each(&format!("mp{}q{qos}", &version[4..])) {
                let payload = serde_json::to_string(&event).unwrap();
                let topic = format!("scans/{device}");
                let out = mosquitto_pub(
                    &agent,
                    &[
                        "-V", version, "-q", qos, "-i", &device, "-t", &topic, "-m", &payload,
                    ],
                );
                assert!(
                    out.status.success(),
                    "mosquitto_pub -V {version} -q {qos}: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                // mosquitto_pub exits once its PUBACK/PUBCOMP arrived: the event is logged.
                assert!(log_by_id(&agent).contains_key(id_of(&event)));
                sent.push((event, device.clone()));
            }
        }
    }
    assert_all_logged(&agent, &sent);
    assert_eq!(agent.log_events().len(), 20);

    // An invalid event: MQTT 5 puts the reason into the PUBACK, which mosquitto_pub shows.
    let bad = serde_json::to_string(&pick(&unique_id("mp"), "SO-1"))
        .unwrap()
        .replace("\"qty\":\"2\"", "\"qty\":\"0\"");
    let out = mosquitto_pub(
        &agent,
        &[
            "-V",
            "mqttv5",
            "-q",
            "1",
            "-d",
            "-t",
            "scans/mp-bad",
            "-m",
            &bad,
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.to_lowercase().contains("payload format invalid"),
        "mosquitto_pub output: {text}"
    );
    assert_eq!(agent.log_events().len(), 20);
}

#[test]
fn mqtt5_puback_names_every_broken_rule() {
    let agent = AgentProcess::start_default();
    let device = "scanner-rules-5";
    let (mut client, _) = V5Client::connect(v5_options(agent.mqtt_addr(), device)).unwrap();
    let topic = format!("scans/{device}");
    let cases = rule_cases();
    for (i, case) in cases.iter().enumerate() {
        // QoS 2 answers in the PUBREC the same way; try it on every other case.
        let qos = if i % 2 == 0 { 1 } else { 2 };
        let ack = client.publish(&topic, qos, case.payload.clone()).unwrap();
        assert_eq!(
            ack.reason,
            PubAckReason::PayloadFormatInvalid,
            "{}: {ack:?}",
            case.name
        );
        let reason = ack.reason_string.unwrap_or_default();
        let parts: Vec<String> = reason.split("; ").map(str::to_string).collect();
        assert!(
            case.matches(&parts),
            "{}: reason string {reason:?}, expected {:?}",
            case.name,
            case.expected
        );
    }
    // The documented example of the README, word for word.
    let zero = to_bytes(&pick(&unique_id("r5"), "SO-1")).to_vec();
    let zero = String::from_utf8(zero)
        .unwrap()
        .replace("\"qty\":\"2\"", "\"qty\":\"0\"");
    let ack = client.publish(&topic, 1, zero).unwrap();
    assert_eq!(
        ack.reason_string.as_deref(),
        Some("qty: must be greater than 0 for pick")
    );

    // Bad input never blocks good input: the same connection goes on being served.
    let good = pick(&unique_id("r5"), "SO-2");
    assert!(
        client
            .publish(&topic, 1, to_bytes(&good))
            .unwrap()
            .is_success()
    );
    let log = agent.log_events();
    assert_eq!(log.len(), 1, "only the valid event is logged: {log:?}");
    assert_stored_as_sent(&good, &log[0], Some(device));

    // Every refusal is counted and kept for inspection with its violations.
    let refused = cases.len() + 1;
    let metrics = agent.metrics();
    assert_eq!(
        metric_value(
            &metrics,
            "backhaul_agent_events_rejected_total{transport=\"mqtt\"}"
        ),
        Some(refused as f64),
        "{metrics}"
    );
    let rejects = agent.rejects();
    assert_eq!(rejects.len(), refused);
    assert!(rejects.iter().all(|r| r["transport"] == "mqtt"
        && r["sender"].as_str().unwrap().contains(device)
        && !r["violations"].as_array().unwrap().is_empty()));
}

#[test]
fn mqtt311_client_learns_each_reason_on_its_rejects_topic() {
    let agent = AgentProcess::start_default();
    let device = "scanner-rules-4";
    let (mut client, _) = V4Client::connect(v4_options(agent.mqtt_addr(), device)).unwrap();
    assert!(client.subscribe(&format!("rejects/{device}")).unwrap());
    // Another scanner's rejects are not for this one.
    assert!(!client.subscribe("rejects/scanner-other").unwrap());
    let topic = format!("scans/{device}");
    for case in rule_cases() {
        // 3.1.1 has no reason codes: the PUBACK comes, and the reason arrives as a notice.
        client.publish(&topic, 1, case.payload.clone()).unwrap();
        let notice = client
            .next_message(Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{}: no notice on rejects/{device}", case.name));
        assert_eq!(notice.topic, format!("rejects/{device}"));
        let notice: Value = serde_json::from_slice(&notice.payload).unwrap();
        assert_eq!(notice["topic"], topic, "{}: {notice}", case.name);
        let sent_id = serde_json::from_slice::<Value>(&case.payload)
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string));
        if let Some(id) = sent_id.filter(|id| id.len() <= 64) {
            assert_eq!(notice["id"], id.as_str(), "{}: {notice}", case.name);
        }
        let violations = notice["violations"].as_array().unwrap();
        let messages: Vec<String> = violations
            .iter()
            .map(|v| v["message"].as_str().unwrap().to_string())
            .collect();
        assert!(
            case.matches(&messages),
            "{}: notice {notice}, expected {:?}",
            case.name,
            case.expected
        );
        let fields: Vec<&str> = violations
            .iter()
            .map(|v| v["field"].as_str().unwrap())
            .collect();
        assert_eq!(fields, case.fields(), "{}", case.name);
        assert!(violations.iter().all(|v| v["rule"].as_str().is_some()));
    }
    assert!(agent.log_events().is_empty());
}

/// A pick the agent refuses: `qty: must be greater than 0 for pick`.
fn refused_pick(prefix: &str) -> Value {
    let mut pick = pick(&unique_id(prefix), "SO-1");
    pick["qty"] = serde_json::json!(0);
    pick
}

#[test]
fn the_sender_gets_the_notice_when_its_client_id_is_not_the_topics_device() {
    // A handheld (client id handheld-3) scanning at a dock door publishes to that door's
    // topic. It may only subscribe to rejects/handheld-3, so that is where it must learn why
    // its event was refused.
    let agent = AgentProcess::start_default();
    let (mut handheld, _) = V4Client::connect(v4_options(agent.mqtt_addr(), "handheld-3")).unwrap();
    assert!(handheld.subscribe("rejects/handheld-3").unwrap());
    let bad = refused_pick("hh");
    handheld
        .publish("scans/dock-door-1", 1, to_bytes(&bad))
        .unwrap();
    let notice = handheld
        .next_message(Duration::from_secs(10))
        .expect("a notice on rejects/handheld-3");
    assert_eq!(notice.topic, "rejects/handheld-3");
    let notice: Value = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice["id"], id_of(&bad));
    assert_eq!(notice["topic"], "scans/dock-door-1");
    assert_eq!(
        notice["violations"][0]["message"],
        "qty: must be greater than 0 for pick"
    );
}

#[test]
fn topics_outside_the_pattern_and_other_devices_topics_are_refused() {
    let agent = AgentProcess::start(AgentOptions::default().own_device_topic_only(true));
    let (mut client, _) = V5Client::connect(v5_options(agent.mqtt_addr(), "scanner-1")).unwrap();
    let event = pick(&unique_id("topic"), "SO-1");

    let ack = client
        .publish("other/scanner-1", 1, to_bytes(&event))
        .unwrap();
    assert_eq!(ack.reason, PubAckReason::TopicNameInvalid);
    assert_eq!(
        ack.reason_string.as_deref(),
        Some("topic: \"other/scanner-1\" does not match \"scans/{device}\"")
    );
    let ack = client
        .publish("scans/scanner-2", 1, to_bytes(&event))
        .unwrap();
    assert_eq!(ack.reason, PubAckReason::NotAuthorized);
    assert!(
        ack.reason_string
            .as_deref()
            .unwrap()
            .contains("may only publish to its own device topic"),
        "{ack:?}"
    );
    assert!(agent.log_events().is_empty());
    let ack = client
        .publish("scans/scanner-1", 1, to_bytes(&event))
        .unwrap();
    assert!(ack.is_success(), "{ack:?}");
    assert_eq!(log_by_id(&agent).len(), 1);
}

#[test]
fn a_persistent_session_is_present_on_reconnect() {
    let agent = AgentProcess::start_default();

    let mut options = v4_options(agent.mqtt_addr(), "persistent-311");
    options.set_clean_session(false);
    let (client, connack) = V4Client::connect(options.clone()).unwrap();
    assert!(!connack.session_present, "a new session is not present");
    client.disconnect();
    let (client, connack) = V4Client::connect(options.clone()).unwrap();
    assert!(connack.session_present, "3.1.1 clean session off: present");
    client.disconnect();
    options.set_clean_session(true);
    let (client, connack) = V4Client::connect(options).unwrap();
    assert!(!connack.session_present, "clean session drops it");
    client.disconnect();

    let mut options = v5_options(agent.mqtt_addr(), "persistent-5");
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(3600));
    let (client, connack) = V5Client::connect(options.clone()).unwrap();
    assert!(!connack.session_present);
    client.disconnect();
    let (client, connack) = V5Client::connect(options).unwrap();
    assert!(
        connack.session_present,
        "MQTT 5 clean start off, expiry 3600"
    );
    client.disconnect();

    // "Never expires" is capped at the documented mqtt.max_session_expiry_secs, a week.
    let mut options = v5_options(agent.mqtt_addr(), "persistent-forever");
    options.set_clean_start(false);
    options.set_session_expiry_interval(Some(u32::MAX));
    let (client, connack) = V5Client::connect(options).unwrap();
    let granted = connack.properties.and_then(|p| p.session_expiry_interval);
    assert_eq!(granted, Some(7 * 24 * 3600));
    client.disconnect();
}

#[test]
fn a_second_connection_with_the_same_client_id_takes_over() {
    let agent = AgentProcess::start_default();
    let topic = "scans/bystander";
    let (mut bystander, _) = V4Client::connect(v4_options(agent.mqtt_addr(), "bystander")).unwrap();
    let mut acked = Vec::new();
    let publish_bystander = |bystander: &mut V4Client, acked: &mut Vec<Value>| {
        let event = pick(&unique_id("by"), "SO-9");
        bystander.publish(topic, 1, to_bytes(&event)).unwrap();
        acked.push(event);
    };
    publish_bystander(&mut bystander, &mut acked);

    // MQTT 5: the first connection is told why it is closed.
    let (mut first, _) = V5Client::connect(v5_options(agent.mqtt_addr(), "twin-5")).unwrap();
    assert!(
        first
            .publish("scans/twin-5", 1, to_bytes(&pick(&unique_id("tw"), "SO-3")))
            .unwrap()
            .is_success()
    );
    let (mut second, _) = V5Client::connect(v5_options(agent.mqtt_addr(), "twin-5")).unwrap();
    let closed = first
        .wait_closed(Duration::from_secs(10))
        .expect("the first connection is closed");
    assert!(
        format!("{closed:?}").contains("SessionTakenOver"),
        "first connection closed with {closed:?}"
    );
    publish_bystander(&mut bystander, &mut acked);
    let event = pick(&unique_id("tw"), "SO-3");
    assert!(
        second
            .publish("scans/twin-5", 1, to_bytes(&event))
            .unwrap()
            .is_success()
    );
    acked.push(event);

    // MQTT 3.1.1 has no DISCONNECT from the server: the socket is just closed.
    let (mut first, _) = V4Client::connect(v4_options(agent.mqtt_addr(), "twin-4")).unwrap();
    let (mut second4, _) = V4Client::connect(v4_options(agent.mqtt_addr(), "twin-4")).unwrap();
    assert!(
        first.wait_closed(Duration::from_secs(10)).is_some(),
        "the first 3.1.1 connection is closed"
    );
    let event = pick(&unique_id("tw"), "SO-4");
    second4
        .publish("scans/twin-4", 1, to_bytes(&event))
        .unwrap();
    acked.push(event);
    publish_bystander(&mut bystander, &mut acked);

    let log = log_by_id(&agent);
    for event in &acked {
        assert!(log.contains_key(id_of(event)), "{event}");
    }
}

/// A CONNECT for MQTT 3.1.1 with client id `g`, clean session, keep-alive 60 s.
const CONNECT_311: [u8; 15] = [
    0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C, 0x00, 0x01, b'g',
];

/// Writes bytes and waits for the agent to close the connection; returns what it answered.
fn send_and_expect_close(addr: std::net::SocketAddr, chunks: &[&[u8]]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    for chunk in chunks {
        stream.write_all(chunk).unwrap();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return answer,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return answer,
            Err(e) => panic!("the agent kept a protocol breaker connected: {e}"),
        }
    }
}

/// Appends MQTT's variable-length "remaining length".
fn push_remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return;
        }
    }
}

#[test]
fn a_publish_sent_together_with_its_connect_is_acknowledged() {
    // A client may send packets right after CONNECT without waiting for the CONNACK; here
    // both arrive in one write, as they would from a client that pipelines.
    let agent = AgentProcess::start_default();
    let event = pick(&unique_id("pipe"), "SO-1");
    let payload = to_bytes(&event);
    let topic = b"scans/pipelined";
    let mut bytes = CONNECT_311.to_vec();
    bytes.push(0x32); // PUBLISH, QoS 1
    push_remaining_length(2 + topic.len() + 2 + payload.len(), &mut bytes);
    bytes.extend_from_slice(&[0x00, topic.len() as u8]);
    bytes.extend_from_slice(topic);
    bytes.extend_from_slice(&[0x00, 0x01]); // packet id 1
    bytes.extend_from_slice(&payload);

    let mut stream = TcpStream::connect(agent.mqtt_addr()).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(&bytes).unwrap();
    let mut answer = [0u8; 8];
    stream
        .read_exact(&mut answer)
        .expect("CONNACK and PUBACK within 10 s");
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00, 0x40, 0x02, 0x00, 0x01]);
    let log = log_by_id(&agent);
    assert_stored_as_sent(&event, &log[id_of(&event)], Some("pipelined"));
}

#[test]
fn a_client_breaking_the_protocol_is_closed_and_others_are_unaffected() {
    let agent = AgentProcess::start_default();
    let addr = agent.mqtt_addr();
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut client, _) = V4Client::connect(v4_options(addr, "steady")).unwrap();
            let mut acked = Vec::new();
            while !stop.load(Ordering::Relaxed) || acked.len() < 50 {
                let event = pick(&unique_id("steady"), "SO-7");
                client
                    .publish("scans/steady", 1, to_bytes(&event))
                    .expect("the steady client is never disturbed");
                acked.push(id_of(&event).to_string());
            }
            client.disconnect();
            acked
        })
    };

    // Not MQTT at all.
    send_and_expect_close(addr, &[b"GET / HTTP/1.1\r\nHost: agent\r\n\r\n"]);
    send_and_expect_close(addr, &[&[0xFF; 64]]);
    // A good CONNECT, then a packet of the reserved type 0.
    let answer = send_and_expect_close(addr, &[&CONNECT_311, &[0x00, 0x00]]);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00], "CONNACK, then closed");
    // A good CONNECT, then a second CONNECT.
    let answer = send_and_expect_close(addr, &[&CONNECT_311, &CONNECT_311]);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00]);
    // A PUBLISH whose remaining length promises more than max_packet_size (64 KiB).
    send_and_expect_close(addr, &[&CONNECT_311, &[0x32, 0xFF, 0xFF, 0xFF, 0x7F]]);

    stop.store(true, Ordering::Relaxed);
    let acked = publisher.join().expect("publisher thread");
    let log = log_by_id(&agent);
    for id in &acked {
        assert!(log.contains_key(id), "{id} acked but not logged");
    }
    assert_eq!(log.len(), acked.len());
    let errors = agent
        .metric("backhaul_agent_mqtt_protocol_errors_total")
        .unwrap();
    assert!(errors >= 5.0, "protocol errors counted: {errors}");
}

#[test]
fn only_configured_users_get_in() {
    let agent = AgentProcess::start(
        AgentOptions::default()
            .user("scanner-07", "correct horse battery staple")
            .user("scanner-08", "tr0ub4dor&3"),
    );
    let addr = agent.mqtt_addr();

    let mut options = v4_options(addr, "scanner-07");
    options.set_credentials("scanner-07", "wrong");
    match V4Client::connect(options) {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("wrong password: {:?}", other.map(|(_, ack)| ack)),
    }
    // Another user's password is wrong too.
    let mut options = v4_options(addr, "scanner-07");
    options.set_credentials("scanner-07", "tr0ub4dor&3");
    assert!(matches!(
        V4Client::connect(options),
        Err(rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::BadUserNamePassword
        ))
    ));
    // No credentials at all.
    assert!(matches!(
        V4Client::connect(v4_options(addr, "anonymous")),
        Err(rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::BadUserNamePassword
        ))
    ));
    let mut options = v5_options(addr, "scanner-08");
    options.set_credentials("scanner-08", "wrong");
    match V5Client::connect(options) {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, V5Code::BadUserNamePassword)
        }
        other => panic!("wrong MQTT 5 password: {:?}", other.map(|(_, ack)| ack)),
    }
    let out = mosquitto_pub(
        &agent,
        &[
            "-u",
            "scanner-07",
            "-P",
            "nope",
            "-q",
            "1",
            "-t",
            "scans/x",
            "-m",
            "{}",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bad user name or password"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(agent.log_events().is_empty());

    // The right passwords, read from the credential files, work with both versions.
    let mut options = v4_options(addr, "scanner-07");
    options.set_credentials("scanner-07", "correct horse battery staple");
    let (mut client, _) = V4Client::connect(options).unwrap();
    let first = pick(&unique_id("auth"), "SO-1");
    client
        .publish("scans/scanner-07", 1, to_bytes(&first))
        .unwrap();
    let mut options = v5_options(addr, "scanner-08");
    options.set_credentials("scanner-08", "tr0ub4dor&3");
    let (mut client, _) = V5Client::connect(options).unwrap();
    let second = pick(&unique_id("auth"), "SO-2");
    assert!(
        client
            .publish("scans/scanner-08", 1, to_bytes(&second))
            .unwrap()
            .is_success()
    );
    let log = log_by_id(&agent);
    assert_eq!(log.len(), 2);
    assert_stored_as_sent(&first, &log[id_of(&first)], Some("scanner-07"));
    assert_stored_as_sent(&second, &log[id_of(&second)], Some("scanner-08"));
    // The passwords never reach the agent's own log.
    let stderr = agent.stderr();
    assert!(!stderr.contains("correct horse") && !stderr.contains("tr0ub4dor"));
}

#[test]
fn users_from_a_mosquitto_password_file_get_in() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("scanners.passwd");
    let passwd = backhaul_tests::mosquitto::broker_program("mosquitto_passwd");
    for (user, password) in [("scanner-11", "blue forklift"), ("scanner-12", "pallet-42")] {
        let mut command = Command::new(&passwd);
        command.arg("-b");
        if !file.exists() {
            command.arg("-c");
        }
        let made = command.arg(&file).args([user, password]).output().unwrap();
        assert!(made.status.success(), "{made:?}");
    }
    let agent = AgentProcess::start(
        AgentOptions::default()
            .user("scanner-07", "correct horse battery staple")
            .set("mqtt.password_file", file.display().to_string()),
    );
    let addr = agent.mqtt_addr();
    let mut options = v4_options(addr, "scanner-11");
    options.set_credentials("scanner-11", "pallet-42");
    assert!(matches!(
        V4Client::connect(options),
        Err(rumqttc::ConnectionError::ConnectionRefused(
            rumqttc::ConnectReturnCode::BadUserNamePassword
        ))
    ));
    let mut options = v4_options(addr, "scanner-11");
    options.set_credentials("scanner-11", "blue forklift");
    let (mut client, _) = V4Client::connect(options).unwrap();
    let first = pick(&unique_id("passwd"), "SO-1");
    client
        .publish("scans/scanner-11", 1, to_bytes(&first))
        .unwrap();
    let mut options = v5_options(addr, "scanner-12");
    options.set_credentials("scanner-12", "pallet-42");
    let (mut client, _) = V5Client::connect(options).unwrap();
    let second = pick(&unique_id("passwd"), "SO-2");
    assert!(
        client
            .publish("scans/scanner-12", 1, to_bytes(&second))
            .unwrap()
            .is_success()
    );
    // Users of the config file still get in next to those of the password file.
    let mut options = v4_options(addr, "scanner-07");
    options.set_credentials("scanner-07", "correct horse battery staple");
    assert!(V4Client::connect(options).is_ok());
    assert_eq!(agent.log_events().len(), 2);
}

#[test]
fn connections_and_packets_over_the_limits_are_refused() {
    let agent = AgentProcess::start(
        AgentOptions::default()
            .set("mqtt.max_connections", 2)
            .set("mqtt.max_packet_size", "2 KiB"),
    );
    let addr = agent.mqtt_addr();
    let (first, _) = V4Client::connect(v4_options(addr, "limit-1")).unwrap();
    let (mut second, _) = V5Client::connect(v5_options(addr, "limit-2")).unwrap();
    match V4Client::connect(v4_options(addr, "limit-3")) {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::ServiceUnavailable)
        }
        other => panic!("a third 3.1.1 connection: {:?}", other.map(|(_, a)| a)),
    }
    match V5Client::connect(v5_options(addr, "limit-3")) {
        Err(rumqttc::v5::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, V5Code::ServerBusy)
        }
        other => panic!("a third MQTT 5 connection: {:?}", other.map(|(_, a)| a)),
    }
    // Room again once one leaves.
    first.disconnect();
    let mut third = poll_until(Duration::from_secs(10), || {
        V4Client::connect(v4_options(addr, "limit-3")).ok()
    })
    .expect("a connection is accepted once another one left")
    .0;

    // A publish over 2 KiB closes that connection and is not logged.
    let mut big = pick(&unique_id("big"), "SO-1");
    big["attrs"] = serde_json::json!({"note": "x".repeat(200), "more": "y".repeat(200)});
    let mut attrs = serde_json::Map::new();
    for i in 0..12 {
        attrs.insert(format!("note{i}"), Value::String("z".repeat(200)));
    }
    big["attrs"] = Value::Object(attrs);
    assert!(to_bytes(&big).len() > 2048);
    assert!(third.publish("scans/limit-3", 1, to_bytes(&big)).is_err());

    // The other connection is unaffected.
    let small = pick(&unique_id("small"), "SO-1");
    assert!(
        second
            .publish("scans/limit-2", 1, to_bytes(&small))
            .unwrap()
            .is_success()
    );
    let log = log_by_id(&agent);
    assert_eq!(log.len(), 1);
    assert!(log.contains_key(id_of(&small)));
}

/// A CONNECT for MQTT 3.1.1 with `client_id`, clean session, keep-alive 60 s.
fn connect_311(client_id: &str) -> Vec<u8> {
    let mut variable = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3C];
    variable.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    variable.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    push_remaining_length(variable.len(), &mut packet);
    packet.extend_from_slice(&variable);
    packet
}

/// Opens `count` connections at once (threads released together), each sending its CONNECT,
/// and returns each CONNACK's return code with its socket, still open.
fn connect_burst(addr: std::net::SocketAddr, count: usize, prefix: &str) -> Vec<(u8, TcpStream)> {
    let start = Arc::new(std::sync::Barrier::new(count));
    let threads: Vec<_> = (0..count)
        .map(|i| {
            let start = start.clone();
            let connect = connect_311(&format!("{prefix}-{i}"));
            std::thread::spawn(move || {
                start.wait();
                let mut stream = TcpStream::connect(addr).expect("TCP connect");
                stream
                    .set_read_timeout(Some(Duration::from_secs(15)))
                    .unwrap();
                stream.write_all(&connect).expect("CONNECT written");
                let mut connack = [0u8; 4];
                stream
                    .read_exact(&mut connack)
                    .expect("a CONNACK within 15 s");
                assert_eq!(connack[..2], [0x20, 0x02], "not a CONNACK: {connack:?}");
                (connack[3], stream)
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("a connecting thread"))
        .collect()
}

#[test]
fn a_burst_of_connects_never_passes_max_connections() {
    const CAP: usize = 5;
    const BURST: usize = 40;
    let agent =
        AgentProcess::start(AgentOptions::default().set("mqtt.max_connections", CAP as i64));
    let addr = agent.mqtt_addr();
    let connected = |agent: &AgentProcess| agent.status()["mqtt"]["connected_clients"].as_u64();

    for round in 1..=2 {
        let answers = connect_burst(addr, BURST, &format!("burst{round}"));
        let accepted = answers.iter().filter(|(code, _)| *code == 0).count();
        // 3: "connection refused, server unavailable".
        let refused = answers.iter().filter(|(code, _)| *code == 3).count();
        assert_eq!(
            (accepted, refused),
            (CAP, BURST - CAP),
            "round {round}: {BURST} simultaneous CONNECTs with mqtt.max_connections = {CAP}: \
             return codes {:?}",
            answers.iter().map(|(code, _)| *code).collect::<Vec<_>>()
        );
        // The accepted ones are still connected, and counted as such.
        assert_eq!(connected(&agent), Some(CAP as u64), "round {round}");
        assert_eq!(
            agent.metric("backhaul_agent_mqtt_connections"),
            Some(CAP as f64),
            "round {round}"
        );

        // They leave; their places are free again for the next round.
        for (code, mut stream) in answers {
            if code == 0 {
                stream.write_all(&[0xE0, 0x00]).expect("DISCONNECT written");
            }
        }
        poll_until(Duration::from_secs(10), || {
            (connected(&agent) == Some(0)).then_some(())
        })
        .unwrap_or_else(|| panic!("round {round}: connections still counted after they left"));
    }
}

#[test]
fn persistent_sessions_expire_after_max_session_expiry() {
    let agent = AgentProcess::start(AgentOptions::default().set("mqtt.max_session_expiry_secs", 2));
    let addr = agent.mqtt_addr();
    let granted_expiry = |connack: &rumqttc::v5::mqttbytes::v5::ConnAck| -> Option<u32> {
        connack.properties.as_ref()?.session_expiry_interval
    };

    // MQTT 5: an expiry over the cap is granted the cap, and the CONNACK says so.
    let mut retired_5 = v5_options(addr, "retired-5");
    retired_5.set_clean_start(false);
    retired_5.set_session_expiry_interval(Some(3600));
    let (client, connack) = V5Client::connect(retired_5.clone()).unwrap();
    assert!(!connack.session_present);
    assert_eq!(granted_expiry(&connack), Some(2), "{connack:?}");
    client.disconnect();
    // Within the cap it is granted as asked, which the CONNACK then does not repeat.
    let mut short_5 = v5_options(addr, "short-5");
    short_5.set_clean_start(false);
    short_5.set_session_expiry_interval(Some(1));
    let (client, connack) = V5Client::connect(short_5).unwrap();
    assert_eq!(granted_expiry(&connack), None, "{connack:?}");
    client.disconnect();

    // MQTT 3.1.1: a session without clean session is still resumed within the expiry.
    let mut retired_311 = v4_options(addr, "retired-311");
    retired_311.set_clean_session(false);
    let (client, connack) = V4Client::connect(retired_311.clone()).unwrap();
    assert!(!connack.session_present);
    client.disconnect();
    let (client, connack) = V4Client::connect(retired_311.clone()).unwrap();
    assert!(connack.session_present, "resumed within the expiry");
    client.disconnect();

    // A client connected all along keeps its session: the expiry runs from the disconnect.
    let mut staying = v4_options(addr, "staying-311");
    staying.set_clean_session(false);
    let (staying_client, _) = V4Client::connect(staying.clone()).unwrap();

    // The sessions of clients that stay away are freed without them coming back.
    let gone = ["retired-5", "short-5", "retired-311"];
    let expired_in_log = |client: &str| {
        agent
            .stderr()
            .lines()
            .any(|line| line.contains("MQTT session expired") && line.contains(client))
    };
    poll_until(Duration::from_secs(30), || {
        gone.iter()
            .all(|client| expired_in_log(client))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the sessions of {gone:?} were never expired"));
    assert!(
        !expired_in_log("staying-311"),
        "a connected client's session expired"
    );

    // Coming back later, they start afresh.
    let (client, connack) = V4Client::connect(retired_311).unwrap();
    assert!(
        !connack.session_present,
        "3.1.1: an expired session resumed"
    );
    client.disconnect();
    let (client, connack) = V5Client::connect(retired_5).unwrap();
    assert!(
        !connack.session_present,
        "MQTT 5: an expired session resumed"
    );
    client.disconnect();

    staying_client.disconnect();
    let (client, connack) = V4Client::connect(staying).unwrap();
    assert!(
        connack.session_present,
        "the session of a client that stayed was lost"
    );
    client.disconnect();
}

/// A PUBLISH packet (QoS 1, packet id 1) in MQTT 3.1.1, or in 5 with an empty property list.
fn publish_packet(topic: &[u8], payload: &[u8], v5: bool) -> Vec<u8> {
    let mut variable = (topic.len() as u16).to_be_bytes().to_vec();
    variable.extend_from_slice(topic);
    variable.extend_from_slice(&[0x00, 0x01]);
    if v5 {
        variable.push(0x00);
    }
    variable.extend_from_slice(payload);
    let mut packet = vec![0x32];
    push_remaining_length(variable.len(), &mut packet);
    packet.extend_from_slice(&variable);
    packet
}

/// A CONNECT at any protocol level (5 gets an empty property list).
fn connect_at_level(level: u8, client_id: &str) -> Vec<u8> {
    let mut variable = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x3C];
    if level == 5 {
        variable.push(0x00);
    }
    variable.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    variable.extend_from_slice(client_id.as_bytes());
    let mut packet = vec![0x10];
    push_remaining_length(variable.len(), &mut packet);
    packet.extend_from_slice(&variable);
    packet
}

/// What MQTT requires of a server, for clients that break it: CONNACK 0x01 for a protocol
/// level it does not speak; the connection closed for a wildcard or NUL in a PUBLISH topic
/// (with DISCONNECT 0x90 in MQTT 5); DISCONNECT 0x95 before closing an MQTT 5 client over the
/// maximum packet size; and the event's device rules applied to the topic's device.
#[test]
fn hostile_topics_levels_and_sizes_get_the_answers_mqtt_requires() {
    let agent = AgentProcess::start(AgentOptions::default().set("mqtt.max_packet_size", "4 KiB"));
    let addr = agent.mqtt_addr();
    let good = to_bytes(&pick(&unique_id("hostile"), "SO-1"));

    // A DISCONNECT in the same write as its CONNECT closes the connection at once.
    let answer = send_and_expect_close(addr, &[&[connect_311("bye"), vec![0xE0, 0x00]].concat()]);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x00]);

    // Level 6 does not exist: return code 0x01 (unacceptable protocol version), then closed.
    let answer = send_and_expect_close(addr, &[&connect_at_level(6, "level-6")]);
    assert_eq!(answer, [0x20, 0x02, 0x00, 0x01]);

    // Wildcards and NUL in a PUBLISH topic close the connection, with no PUBACK.
    for topic in [&b"scans/a+b"[..], b"scans/#", b"scans/nul\0l"] {
        let connect = connect_311("wild");
        let answer = send_and_expect_close(addr, &[&connect, &publish_packet(topic, &good, false)]);
        assert_eq!(
            answer,
            [0x20, 0x02, 0x00, 0x00],
            "only the CONNACK for {topic:?}"
        );
        let connect = connect_at_level(5, "wild5");
        let answer = send_and_expect_close(addr, &[&connect, &publish_packet(topic, &good, true)]);
        assert!(
            answer.ends_with(&[0xE0, 0x02, 0x90, 0x00]),
            "DISCONNECT 0x90 for {topic:?}: {answer:?}"
        );
    }

    // Over max_packet_size in MQTT 5: DISCONNECT 0x95 (packet too large), then closed.
    let big = vec![b'x'; 5000];
    let answer = send_and_expect_close(
        addr,
        &[
            &connect_at_level(5, "too-big"),
            &publish_packet(b"scans/too-big", &big, true),
        ],
    );
    assert!(
        answer.ends_with(&[0xE0, 0x02, 0x95, 0x00]),
        "DISCONNECT 0x95: {answer:?}"
    );

    // The topic's device follows the event's device rules: at most 256 characters.
    let (mut client, _) = V5Client::connect(v5_options(addr, "long-device")).unwrap();
    let long_topic = format!("scans/{}", "d".repeat(300));
    let ack = client.publish(&long_topic, 1, good.clone()).unwrap();
    assert_eq!(ack.reason, PubAckReason::TopicNameInvalid, "{ack:?}");
    assert_eq!(
        ack.reason_string.as_deref(),
        Some("topic: the device must be at most 256 characters (got 300)")
    );
    let ack = client.publish("scans/ok-device", 1, good).unwrap();
    assert!(ack.is_success(), "{ack:?}");
    let log = log_by_id(&agent);
    assert_eq!(
        log.len(),
        1,
        "only the event under a valid device is logged"
    );
    assert!(log.values().all(|e| e["device"] == "ok-device"), "{log:?}");
}

/// Sockets opened and left idle (a port scanner, a hostile device) have their own small budget
/// and a short deadline: logged-in scanners are never refused because of them.
#[test]
fn idle_sockets_never_keep_logged_in_scanners_out() {
    const CAP: usize = 5;
    let agent =
        AgentProcess::start(AgentOptions::default().set("mqtt.max_connections", CAP as i64));
    let addr = agent.mqtt_addr();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // 320 sockets from five other loopback addresses, more than the agent keeps waiting for a
    // CONNECT (256, at most 64 from one address), none of which ever sends one.
    const IDLE: usize = 320;
    let idle: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..IDLE {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            let from = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i % 5) as u8);
            socket.bind((from, 0).into()).unwrap();
            held.push(
                socket
                    .connect(addr)
                    .await
                    .expect("the kernel accepts the socket"),
            );
        }
        held
    });

    // Every place among mqtt.max_connections is there for scanners that log in.
    let scanners: Vec<V4Client> = (0..CAP)
        .map(|i| {
            V4Client::connect(v4_options(addr, &format!("busy-{i}")))
                .unwrap_or_else(|e| {
                    panic!("scanner {i} refused while idle sockets are held: {e:?}")
                })
                .0
        })
        .collect();
    let mut ids = Vec::new();
    for (i, mut scanner) in scanners.into_iter().enumerate() {
        let event = pick(&unique_id("busy"), "SO-1");
        scanner
            .publish(&format!("scans/busy-{i}"), 1, to_bytes(&event))
            .expect("a PUBACK while idle sockets are held");
        ids.push(id_of(&event).to_string());
        scanner.disconnect();
    }
    wait_until_logged(&agent, &ids);

    // The agent closes every idle socket: the oldest of the busiest address whenever a newer
    // socket needs its place, the rest at the CONNECT deadline.
    let closed = rt.block_on(async {
        let mut closed = 0;
        for mut socket in idle {
            let mut buf = [0u8; 16];
            let read = tokio::time::timeout(
                Duration::from_secs(30),
                tokio::io::AsyncReadExt::read(&mut socket, &mut buf),
            )
            .await;
            if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
                closed += 1;
            }
        }
        closed
    });
    assert_eq!(closed, IDLE, "idle sockets the agent closed");
    let evicted = agent
        .metric("backhaul_agent_mqtt_pending_evicted_total")
        .unwrap_or(0.0);
    assert!(
        evicted > (IDLE - 256) as f64,
        "sockets closed to make room: {evicted}"
    );
    assert_eq!(agent.status()["mqtt"]["connected_clients"], 0);
}

/// A reject notice goes to the session that published: not to another client that subscribes
/// under the name of the topic's device, and still to a persistent session resumed without
/// subscribing again (its CONNACK said the session, subscription included, was present).
#[test]
fn notices_go_to_the_publishing_session_only() {
    let agent = AgentProcess::start_default();
    let addr = agent.mqtt_addr();
    let bad = refused_pick("notice");

    let (mut impostor, _) = V4Client::connect(v4_options(addr, "dock-door-2")).unwrap();
    assert!(impostor.subscribe("rejects/dock-door-2").unwrap());
    let mut options = v4_options(addr, "handheld-9");
    options.set_clean_session(false);
    let (mut handheld, _) = V4Client::connect(options.clone()).unwrap();
    assert!(handheld.subscribe("rejects/handheld-9").unwrap());
    handheld.disconnect();

    // Back on its persistent session, without subscribing again.
    let (mut handheld, _) = V4Client::connect(options).unwrap();
    handheld
        .publish("scans/dock-door-2", 1, to_bytes(&bad))
        .unwrap();
    let notice = handheld
        .next_message(Duration::from_secs(10))
        .expect("the notice reaches the resumed session");
    assert_eq!(notice.topic, "rejects/handheld-9");
    let notice: Value = serde_json::from_slice(&notice.payload).unwrap();
    assert_eq!(notice["id"], id_of(&bad));
    // The other client, named like the topic's device, learned nothing of it; a notice of its
    // own publish proves its subscription works and that nothing came before it.
    let own = refused_pick("notice");
    impostor
        .publish("scans/dock-door-2", 1, to_bytes(&own))
        .unwrap();
    let first = impostor
        .next_message(Duration::from_secs(10))
        .expect("its own notice");
    let first: Value = serde_json::from_slice(&first.payload).unwrap();
    assert_eq!(first["id"], id_of(&own), "another session's notice leaked");
}

/// Clients that publish nothing but large refused events and never read their answers hold a
/// bounded share of the agent's memory (a connection is not read further while its answers
/// wait; rejects beyond what the disk keeps up with are answered and counted, not queued), and
/// a scanner's good events still get their PUBACKs.
#[test]
fn floods_of_refused_events_from_clients_that_never_read_stay_bounded() {
    const FLOODERS: usize = 8;
    const PUBLISHES_EACH: usize = 600;
    // Room for every reject, so each one is either kept or counted as not kept.
    let agent = AgentProcess::start(AgentOptions::default().set("log.max_rejects", 1_000_000i64));
    let addr = agent.mqtt_addr();
    let pid = agent.pid().expect("the agent runs");
    // ~16 KiB of unknown fields: refused, with as many violations as the agent reports.
    let mut refused = String::from(r#"{"v":1,"id":"flood","type":"pick""#);
    let mut field = 0;
    while refused.len() < 16 * 1024 - 32 {
        refused.push_str(&format!(r#","unknown_{field}":1"#));
        field += 1;
    }
    refused.push('}');
    let stop = Arc::new(AtomicBool::new(false));
    let flooders: Vec<_> = (0..FLOODERS)
        .map(|i| {
            let client_id = format!("flood-{i}");
            let publish = publish_packet(
                format!("scans/{client_id}").as_bytes(),
                refused.as_bytes(),
                false,
            );
            let stop = stop.clone();
            std::thread::spawn(move || -> usize {
                let Ok(mut stream) = TcpStream::connect(addr) else {
                    return 0;
                };
                // A write that cannot go on for 3 s means the agent stopped reading us.
                let _ = stream.set_write_timeout(Some(Duration::from_secs(3)));
                if stream.write_all(&connect_311(&client_id)).is_err() {
                    return 0;
                }
                let mut sent = 0;
                while sent < PUBLISHES_EACH && !stop.load(Ordering::SeqCst) {
                    if stream.write_all(&publish).is_err() {
                        break;
                    }
                    sent += 1;
                }
                // Held open, never read, until the test is done.
                while !stop.load(Ordering::SeqCst) {
                    std::thread::park_timeout(Duration::from_millis(50));
                }
                sent
            })
        })
        .collect();
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (peak, stop) = (peak.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if let Some(kib) = backhaul_tests::rss::vm_rss_kib(pid) {
                    peak.fetch_max(kib, Ordering::SeqCst);
                }
                std::thread::park_timeout(Duration::from_millis(20));
            }
        })
    };

    // A scanner publishing good events all the while gets every PUBACK.
    let (mut scanner, _) =
        V4Client::connect(v4_options(addr, "good-scanner")).expect("the scanner connects");
    let mut ids = Vec::new();
    for _ in 0..200 {
        let event = pick(&unique_id("good"), "SO-1");
        scanner
            .publish("scans/good-scanner", 1, to_bytes(&event))
            .expect("a PUBACK during the flood");
        ids.push(id_of(&event).to_string());
    }
    scanner.disconnect();
    wait_until_logged(&agent, &ids);
    // The flood has reached its bound: every flooder wrote all it had or was stopped being read.
    poll_until(Duration::from_secs(120), || {
        let rejected = agent.status()["ingest"]["rejected"]["mqtt"]
            .as_u64()
            .unwrap_or(0);
        (flooders.iter().all(|f| f.is_finished()) || rejected >= (FLOODERS * PUBLISHES_EACH) as u64)
            .then_some(())
    })
    .expect("the flooders are done writing within 120 s");
    let rejected = agent.status()["ingest"]["rejected"]["mqtt"]
        .as_u64()
        .unwrap_or(0);
    stop.store(true, Ordering::SeqCst);
    let sent: usize = flooders.into_iter().map(|f| f.join().unwrap_or(0)).sum();
    let _ = sampler.join();
    let peak_mib = peak.load(Ordering::SeqCst) / 1024;
    assert!(rejected > 0, "the flood's events were refused");
    assert!(
        peak_mib <= 128,
        "agent peak RSS {peak_mib} MiB while {FLOODERS} clients flooded {sent} refused 16 KiB events"
    );
    let (mut kept, mut not_kept) = (0, 0);
    poll_until(Duration::from_secs(60), || {
        let status = agent.status();
        kept = status["rejects_stored"].as_u64().unwrap_or(0);
        not_kept = status["rejects_not_kept"].as_u64().unwrap_or(0);
        let rejected = status["ingest"]["rejected"]["mqtt"].as_u64().unwrap_or(0);
        (kept + not_kept == rejected).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "every refusal is kept or counted: kept {kept}, not kept {not_kept}, refused {rejected}"
        )
    });
    eprintln!(
        "flood: {sent} publishes written, {rejected} refused, {kept} kept, {not_kept} not kept, peak RSS {peak_mib} MiB"
    );
}
