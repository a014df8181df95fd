//! Per-site identity: with `security.site_keys` on the relay and `uplink.site_key` on each
//! agent, a batch is stored only when its site's key signed it, whatever the broker lets
//! through, and an agent deletes events only on an acknowledgement signed with its key; the
//! relay's embedded broker takes only the logins it is given.

use std::time::Duration;

use backhaul_events::signing::SiteKeys;
use backhaul_events::{AckFrame, Epoch};
use backhaul_tests::agent::{AgentOptions, AgentProcess, metric_value};
use backhaul_tests::events::{pick, unique_id};
use backhaul_tests::mosquitto::Mosquitto;
use backhaul_tests::poll_until;
use backhaul_tests::relay::RelayProcess;
use serde_json::Value;

const KEY_A: &str = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a7988";
const KEY_B: &str = "a0b1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9f";

fn secret_file(dir: &std::path::Path, name: &str, text: &str) -> toml_edit::Value {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    format!("{{ file = {:?} }}", path.display().to_string())
        .parse()
        .unwrap()
}

fn agent(broker_port: u16, site: &str, key: Option<toml_edit::Value>) -> AgentProcess {
    let mut options = AgentOptions::default()
        .uplink("127.0.0.1", broker_port)
        .set("site", site)
        .set(
            "uplink.client_id",
            format!("agent-{site}-{}", unique_id("c")),
        )
        .set("uplink.linger_ms", 10)
        .set("uplink.ack_timeout_secs", 2);
    if let Some(key) = key {
        options = options.set("uplink.site_key", key);
    }
    AgentProcess::start(options)
}

fn post(agent: &AgentProcess, prefix: &str, n: usize) -> Vec<String> {
    let events: Vec<Value> = (0..n).map(|_| pick(&unique_id(prefix), "SO-1")).collect();
    let ids = events
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
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

#[test]
fn only_frames_signed_by_their_sites_key_are_stored() {
    let dir = tempfile::tempdir().unwrap();
    let keys = secret_file(
        dir.path(),
        "site-keys.toml",
        &format!("wh-a = \"{KEY_A}\"\nwh-b = \"{KEY_B}\"\n"),
    );
    let broker_port = backhaul_tests::free_port();
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker_port,
        true,
        None,
        &[("security.site_keys", keys)],
    );
    let key_a = || Some(secret_file(dir.path(), "a.key", KEY_A));

    // Site A with its own key: stored, acknowledged, delivered.
    let site_a = agent(broker_port, "wh-a", key_a());
    let good = post(&site_a, "signed", 20);
    let drained = poll_until(Duration::from_secs(30), || {
        (backlog(&site_a) == 0).then_some(())
    });
    assert!(drained.is_some(), "{}", site_a.status());

    // Site B's name with site A's key, a site the relay has no key for, and no key at all:
    // nothing stored, nothing acknowledged, each counted by its reason.
    let impostor = agent(broker_port, "wh-b", key_a());
    let stranger = agent(broker_port, "wh-c", key_a());
    let unsigned = agent(broker_port, "wh-a", None);
    // The unsigned agent shares site A's name: its log is its own, its events are not.
    post(&impostor, "impostor", 5);
    post(&stranger, "stranger", 5);
    post(&unsigned, "unsigned", 5);
    let reasons = ["bad_signature", "unknown_site", "unsigned"];
    let counted = poll_until(Duration::from_secs(30), || {
        let metrics = relay.metrics();
        reasons
            .iter()
            .all(|reason| {
                metric_value(
                    &metrics,
                    &format!("backhaul_relay_batches_refused_total{{reason=\"{reason}\"}}"),
                )
                .unwrap_or(0.0)
                    >= 1.0
            })
            .then_some(())
    });
    assert!(counted.is_some(), "{}", relay.metrics());
    for refused in [&impostor, &stranger, &unsigned] {
        assert_eq!(backlog(refused), 5, "{}", refused.status());
        // Connected to the broker, but nothing moves: the agent says so.
        let stalled = poll_until(Duration::from_secs(30), || {
            (refused.status()["link"]["state"] == "stalled").then_some(())
        });
        assert!(stalled.is_some(), "{}", refused.status());
    }
    let ledger = relay.ledger();
    let stored: Vec<&str> = ledger.iter().filter_map(|l| l["id"].as_str()).collect();
    assert_eq!(stored.len(), good.len(), "only site A's signed events");
    for id in &good {
        assert!(stored.contains(&id.as_str()), "{id}");
    }
    assert!(relay.ledger().iter().all(|l| l["site"] == "wh-a"));
}

#[test]
fn an_agent_deletes_nothing_on_an_acknowledgement_not_signed_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let key = format!("{{ file = {:?} }}", {
        let path = dir.path().join("a.key");
        std::fs::write(&path, KEY_A).unwrap();
        path.display().to_string()
    });
    let site = agent(broker.port(), "wh-a", Some(key.parse().unwrap()));
    post(&site, "held", 5);
    let connected = poll_until(Duration::from_secs(30), || {
        (site.status()["link"]["batches_sent"].as_u64() >= Some(1)).then_some(())
    });
    assert!(connected.is_some(), "{}", site.status());
    let epoch_hex = site.status()["epoch"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let epoch = Epoch(u128::from_str_radix(&epoch_hex, 16).expect("a hex epoch"));
    let ack = AckFrame {
        site: "wh-a".into(),
        epoch,
        acked_through: 5,
        refused: None,
        outcomes: Vec::new(),
    }
    .encode()
    .unwrap();
    let publish = |payload: Vec<u8>| {
        let mut options = rumqttc::MqttOptions::new("forger", "127.0.0.1", broker.port());
        options.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut connection) = rumqttc::Client::new(options, 10);
        client
            .publish(
                "backhaul/v1/sites/wh-a/acks",
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .unwrap();
        for event in connection.iter().take(10) {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) = event {
                break;
            }
        }
    };

    // Unsigned, and signed with another site's key: ignored, counted, nothing deleted.
    publish(ack.clone());
    publish(SiteKeys::from_hex(&[KEY_B]).unwrap().seal(&ack));
    let ignored = poll_until(Duration::from_secs(30), || {
        (site.metric("backhaul_agent_relay_frames_unsigned_total")? >= 2.0).then_some(())
    });
    assert!(ignored.is_some(), "{}", site.metrics());
    assert_eq!(backlog(&site), 5, "a forged acknowledgement deleted events");

    // Signed with the site's key: the events are deleted.
    publish(SiteKeys::from_hex(&[KEY_A]).unwrap().seal(&ack));
    let deleted = poll_until(Duration::from_secs(30), || {
        (backlog(&site) == 0).then_some(())
    });
    assert!(deleted.is_some(), "{}", site.status());
}

#[test]
fn the_embedded_broker_takes_only_its_configured_logins() {
    let dir = tempfile::tempdir().unwrap();
    let broker_port = backhaul_tests::free_port();
    let _relay = RelayProcess::start(dir.path(), broker_port, true);
    let connect = |login: Option<(&str, &str)>| -> Result<(), String> {
        let mut options = rumqttc::MqttOptions::new(unique_id("probe"), "127.0.0.1", broker_port);
        options.set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        let (_client, mut connection) = rumqttc::Client::new(options, 10);
        match connection.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(ack))))
                if ack.code == rumqttc::ConnectReturnCode::Success =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    };
    let (user, password) = backhaul_tests::BROKER_LOGIN;
    connect(Some((user, password))).expect("the configured login connects");
    assert!(connect(None).is_err(), "an anonymous client connected");
    assert!(
        connect(Some((user, "not-the-password"))).is_err(),
        "a wrong password connected"
    );
    assert!(
        connect(Some(("someone-else", password))).is_err(),
        "an unknown user connected"
    );
}

/// A frame of a site's earlier epoch, replayed after the site's agent started a new log, is
/// refused and never acknowledged: its signature is still good, so only the epoch tells.
#[test]
fn a_replayed_frame_of_an_old_epoch_is_refused_without_an_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Mosquitto::start();
    let keys = secret_file(
        dir.path(),
        "site-keys.toml",
        &format!("wh-a = \"{KEY_A}\"\n"),
    );
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker.port(),
        false,
        None,
        &[("security.site_keys", keys)],
    );

    // A listener on the site's topics, as someone on the broker's network would be.
    let mut options = rumqttc::MqttOptions::new("listener", "127.0.0.1", broker.port());
    options.set_max_packet_size(8 << 20, 8 << 20);
    let (spy, mut connection) = rumqttc::Client::new(options, 100);
    spy.subscribe("backhaul/v1/sites/wh-a/+", rumqttc::QoS::AtLeastOnce)
        .unwrap();
    let (seen_tx, seen) = std::sync::mpsc::channel::<(String, Vec<u8>)>();
    std::thread::spawn(move || {
        for event in connection.iter() {
            match event {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if seen_tx.send((p.topic, p.payload.to_vec())).is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    });
    let keys_a = SiteKeys::from_hex(&[KEY_A]).unwrap();
    let acked_epochs = |frames: &[(String, Vec<u8>)]| -> Vec<Epoch> {
        frames
            .iter()
            .filter(|(topic, _)| topic.ends_with("/acks"))
            .filter_map(|(_, payload)| {
                let frame = keys_a.open(payload).ok()?;
                AckFrame::decode(frame, 8 << 20).ok().map(|ack| ack.epoch)
            })
            .collect()
    };
    let mut frames = Vec::new();
    let take = |frames: &mut Vec<(String, Vec<u8>)>| {
        while let Ok(frame) = seen.try_recv() {
            frames.push(frame);
        }
    };
    let key_a = || Some(secret_file(dir.path(), "a.key", KEY_A));

    // Epoch 1: three events, forwarded and acknowledged, the batch frame captured.
    let mut site = agent(broker.port(), "wh-a", key_a());
    post(&site, "first", 3);
    let old_epoch = Epoch(
        u128::from_str_radix(site.status()["epoch"].as_str().unwrap(), 16).expect("a hex epoch"),
    );
    let captured = poll_until(Duration::from_secs(30), || {
        take(&mut frames);
        let acked = acked_epochs(&frames).contains(&old_epoch) && backlog(&site) == 0;
        let batch = frames
            .iter()
            .find(|(topic, _)| topic.ends_with("/batches"))
            .map(|(_, payload)| payload.clone());
        batch.filter(|_| acked)
    })
    .expect("a batch of the first epoch, stored and acknowledged");

    // The site's log is rebuilt (a new disk, say): a new epoch, two more events.
    site.kill9();
    std::fs::remove_dir_all(site.state_dir()).unwrap();
    site.restart();
    let new_epoch = site.status()["epoch"].as_str().unwrap().to_string();
    assert_ne!(
        new_epoch,
        format!("{old_epoch}"),
        "a rebuilt log starts a new epoch"
    );
    post(&site, "second", 2);
    let drained = poll_until(Duration::from_secs(30), || {
        (backlog(&site) == 0).then_some(())
    });
    assert!(drained.is_some(), "{}", site.status());
    assert_eq!(relay.ledger().len(), 5);

    // The captured frame of the first epoch, published again.
    take(&mut frames);
    let acks_before = acked_epochs(&frames).len();
    spy.publish(
        "backhaul/v1/sites/wh-a/batches",
        rumqttc::QoS::AtLeastOnce,
        false,
        captured,
    )
    .unwrap();
    let counted = poll_until(Duration::from_secs(30), || {
        metric_value(
            &relay.metrics(),
            "backhaul_relay_batches_refused_total{reason=\"old_epoch\"}",
        )
        .filter(|n| *n >= 1.0)
    });
    assert!(counted.is_some(), "{}", relay.metrics());
    // The new epoch still moves, and its acknowledgement comes after the refusal: had the
    // replay been acknowledged, that acknowledgement would have come first.
    post(&site, "third", 1);
    let moved = poll_until(Duration::from_secs(30), || {
        (backlog(&site) == 0).then_some(())
    });
    assert!(moved.is_some(), "{}", site.status());
    let after = poll_until(Duration::from_secs(10), || {
        take(&mut frames);
        let epochs = acked_epochs(&frames);
        (epochs.len() > acks_before).then(|| epochs[acks_before..].to_vec())
    })
    .expect("the new epoch's acknowledgement");
    assert!(
        !after.contains(&old_epoch),
        "the replayed frame was acknowledged: {after:?}"
    );
    assert_eq!(
        relay.ledger().len(),
        6,
        "nothing of the replay stored twice"
    );
    assert!(
        relay.log_tail().contains("moved on to a newer epoch"),
        "{}",
        relay.log_tail()
    );
}
