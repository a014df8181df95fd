//! Fuzz target `mqtt_packets`: the scanner endpoint's MQTT codec, bytes in and packets out,
//! without sockets. The endpoint's connection logic is async and writes to the event log, so
//! what runs here is everything of it that reads client bytes: finding the protocol level of
//! the first packet (`connect_version`), framing the stream into packets at either level
//! (`read`, 3.1.1 and 5), the device in a publish topic, the event in a publish payload, and
//! writing the answers the endpoint gives to each packet (`write`).
//!
//! Input: one byte that chooses how the stream is cut into reads, then the client's stream.
//!
//! Asserts: no panic; the same stream gives the same packets and the same verdict whether it
//! arrives whole or cut into arbitrary reads (as TCP delivers it), at both protocol levels and
//! through the CONNECT sniffing the endpoint does first; a publish the codec reads, written
//! again by a client, reads back the same; every answer the endpoint writes to what it read
//! is a well-formed packet a client reads back with the same packet id and contents.

#![no_main]

use backhaul_agent::mqtt::codec::{
    self, AckReason, ConnectRefusal, DisconnectReason, Incoming, Outgoing, Version,
};
use backhaul_agent::mqtt::device_in_topic;
use backhaul_events::event::parse_event;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

/// `mqtt.max_packet_size` of the example configuration.
const MAX_PACKET: usize = 64 * 1024;
const TOPIC_PATTERN: &str = "scans/{device}";

/// What reading a stream came to: the packets (as their debug text) and how it ended.
#[derive(Debug, PartialEq, Eq)]
struct Reading {
    packets: Vec<String>,
    end: String,
}

/// Reads a stream at one protocol level, in reads of the given sizes (then the rest whole),
/// as the connection does after its CONNECT: every complete packet after each read.
fn read_stream(version: Version, stream: &[u8], cuts: &[usize]) -> (Reading, Vec<Incoming>) {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    let mut rest = stream;
    let mut cuts = cuts.iter();
    loop {
        let n = cuts.next().copied().unwrap_or(rest.len()).min(rest.len());
        let (chunk, after) = rest.split_at(n);
        rest = after;
        buf.extend_from_slice(chunk);
        loop {
            match codec::read(version, &mut buf, MAX_PACKET) {
                Ok(Some(packet)) => packets.push(packet),
                Ok(None) => break,
                Err(e) => {
                    let reading = Reading {
                        packets: packets.iter().map(|p| format!("{p:?}")).collect(),
                        end: format!("error: {e}"),
                    };
                    return (reading, packets);
                }
            }
        }
        if rest.is_empty() {
            let reading = Reading {
                packets: packets.iter().map(|p| format!("{p:?}")).collect(),
                end: format!("{} bytes left over", buf.len()),
            };
            return (reading, packets);
        }
    }
}

/// Sniffs the protocol level as the connection does, read by read, then reads the CONNECT.
fn sniff(stream: &[u8], cuts: &[usize]) -> String {
    let mut buf = BytesMut::new();
    let mut rest = stream;
    let mut cuts = cuts.iter();
    loop {
        let n = cuts.next().copied().unwrap_or(rest.len()).min(rest.len());
        let (chunk, after) = rest.split_at(n);
        rest = after;
        buf.extend_from_slice(chunk);
        match codec::connect_version(&buf, MAX_PACKET) {
            Ok(Some(version)) => {
                return match codec::read(version, &mut buf, MAX_PACKET) {
                    Ok(Some(packet @ Incoming::Connect { .. })) => {
                        format!("{version:?} {packet:?}")
                    }
                    Ok(other) => format!("{version:?} not a CONNECT: {other:?}"),
                    Err(e) => format!("{version:?} error: {e}"),
                };
            }
            Ok(None) if rest.is_empty() => return "incomplete".into(),
            Ok(None) => {}
            Err(e) => return format!("error: {e}"),
        }
    }
}

/// Read sizes from one byte: 1, 2, 3... bytes at a time, or pseudo-random sizes up to 64.
fn cuts(seed: u8, len: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut state = u32::from(seed) | 1;
    let mut total = 0;
    while total < len {
        let n = if seed < 8 {
            usize::from(seed) + 1
        } else {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 64) as usize + 1
        };
        cuts.push(n);
        total += n;
    }
    cuts
}

fn qos4(qos: u8) -> m4::QoS {
    match qos {
        0 => m4::QoS::AtMostOnce,
        1 => m4::QoS::AtLeastOnce,
        _ => m4::QoS::ExactlyOnce,
    }
}

fn qos5(qos: u8) -> m5::QoS {
    match qos {
        0 => m5::QoS::AtMostOnce,
        1 => m5::QoS::AtLeastOnce,
        _ => m5::QoS::ExactlyOnce,
    }
}

/// A publish the codec read, written again as a client writes it, reads back the same.
fn publish_round_trip(version: Version, topic: &str, qos: u8, pkid: u16, payload: &Bytes) {
    let mut out = BytesMut::new();
    match version {
        Version::V311 => {
            let mut publish = v4::Publish::from_bytes(topic, qos4(qos), payload.clone());
            publish.pkid = pkid;
            publish
                .write(&mut out)
                .expect("a client writes the publish");
        }
        Version::V5 => {
            let mut publish = v5::Publish::new(topic, qos5(qos), payload.clone(), None);
            publish.pkid = pkid;
            publish
                .write(&mut out)
                .expect("a client writes the publish");
        }
    }
    let written = out.len();
    match codec::read(version, &mut out, usize::MAX >> 8) {
        Ok(Some(Incoming::Publish {
            topic: t,
            qos: q,
            pkid: p,
            payload: body,
        })) => {
            assert_eq!((t.as_str(), q, p, &body), (topic, qos, pkid, payload));
            assert!(out.is_empty(), "{} of {written} bytes left", out.len());
        }
        other => panic!("a re-written publish reads as {other:?}"),
    }
}

/// The answers the endpoint gives to a packet, as far as they depend on the packet alone.
fn answers(packet: &Incoming, client_id: &str) -> Vec<Outgoing> {
    match packet {
        Incoming::Connect {
            client_id: asked,
            keep_alive,
            session_expiry,
            ..
        } => vec![
            Outgoing::ConnAck {
                session_present: false,
                refusal: None,
                server_keep_alive: Some(keep_alive.saturating_add(1)),
                session_expiry: *session_expiry,
                assigned_client_id: asked.is_empty().then(|| "auto-0123456789abcdef".into()),
                max_packet_size: MAX_PACKET as u32,
            },
            Outgoing::ConnAck {
                session_present: false,
                refusal: Some(ConnectRefusal::BadCredentials),
                server_keep_alive: None,
                session_expiry: None,
                assigned_client_id: None,
                max_packet_size: MAX_PACKET as u32,
            },
        ],
        Incoming::Publish {
            topic,
            qos,
            pkid,
            payload,
        } => {
            let reason = if topic.contains(['+', '#', '\0']) {
                return vec![Outgoing::Disconnect {
                    reason: DisconnectReason::TopicNameInvalid,
                }];
            } else if device_in_topic(TOPIC_PATTERN, topic).is_none() {
                AckReason::TopicNameInvalid(format!("topic: {topic:?} is not {TOPIC_PATTERN}"))
            } else {
                match parse_event(payload) {
                    Ok(_) => AckReason::Success,
                    Err(violations) => AckReason::PayloadFormatInvalid(violations.to_string()),
                }
            };
            let mut out = Vec::new();
            if reason != AckReason::Success {
                out.push(Outgoing::Publish {
                    topic: format!("rejects/{client_id}"),
                    payload: Bytes::from(format!("{reason:?}")),
                });
            }
            match qos {
                0 => {}
                1 => out.push(Outgoing::PubAck {
                    pkid: *pkid,
                    reason,
                }),
                _ => out.push(Outgoing::PubRec {
                    pkid: *pkid,
                    reason,
                }),
            }
            out
        }
        Incoming::PubRel { pkid } => vec![Outgoing::PubComp { pkid: *pkid }],
        Incoming::Subscribe { pkid, filters } => vec![Outgoing::SubAck {
            pkid: *pkid,
            granted: filters
                .iter()
                .map(|f| *f == format!("rejects/{client_id}"))
                .collect(),
        }],
        Incoming::Unsubscribe { pkid, count } => vec![Outgoing::UnsubAck {
            pkid: *pkid,
            count: *count,
        }],
        Incoming::PingReq => vec![Outgoing::PingResp],
        Incoming::Disconnect | Incoming::Ignored(_) => vec![Outgoing::Disconnect {
            reason: DisconnectReason::ProtocolError,
        }],
    }
}

/// What a client reads from an answer: the packet id it carries, or none.
fn client_reads(version: Version, answer: &Outgoing, bytes: &mut BytesMut) {
    let expected_pkid = match answer {
        Outgoing::PubAck { pkid, .. }
        | Outgoing::PubRec { pkid, .. }
        | Outgoing::PubComp { pkid }
        | Outgoing::SubAck { pkid, .. }
        | Outgoing::UnsubAck { pkid, .. } => Some(*pkid),
        _ => None,
    };
    match version {
        Version::V311 => {
            if matches!(answer, Outgoing::Disconnect { .. }) {
                assert!(bytes.is_empty(), "3.1.1 has no DISCONNECT from the server");
                return;
            }
            let packet = v4::Packet::read(bytes, usize::MAX >> 8)
                .unwrap_or_else(|e| panic!("a client cannot read {answer:?}: {e:?}"));
            let pkid = match (&packet, answer) {
                (v4::Packet::PubAck(p), Outgoing::PubAck { .. }) => Some(p.pkid),
                (v4::Packet::PubRec(p), Outgoing::PubRec { .. }) => Some(p.pkid),
                (v4::Packet::PubComp(p), Outgoing::PubComp { .. }) => Some(p.pkid),
                (v4::Packet::SubAck(s), Outgoing::SubAck { granted, .. }) => {
                    assert_eq!(s.return_codes.len(), granted.len());
                    Some(s.pkid)
                }
                (v4::Packet::UnsubAck(u), Outgoing::UnsubAck { .. }) => Some(u.pkid),
                (v4::Packet::PingResp, Outgoing::PingResp) => None,
                (v4::Packet::ConnAck(_), Outgoing::ConnAck { .. }) => None,
                (v4::Packet::Publish(p), Outgoing::Publish { topic, payload }) => {
                    assert_eq!((&p.topic, &p.payload), (topic, payload));
                    None
                }
                (packet, answer) => panic!("{answer:?} reads as {packet:?}"),
            };
            assert_eq!(pkid, expected_pkid);
        }
        Version::V5 => {
            let packet = v5::Packet::read(bytes, None)
                .unwrap_or_else(|e| panic!("a client cannot read {answer:?}: {e:?}"));
            let pkid = match (&packet, answer) {
                (v5::Packet::PubAck(p), Outgoing::PubAck { .. }) => Some(p.pkid),
                (v5::Packet::PubRec(p), Outgoing::PubRec { .. }) => Some(p.pkid),
                (v5::Packet::PubComp(p), Outgoing::PubComp { .. }) => Some(p.pkid),
                (v5::Packet::SubAck(s), Outgoing::SubAck { granted, .. }) => {
                    assert_eq!(s.return_codes.len(), granted.len());
                    Some(s.pkid)
                }
                (v5::Packet::UnsubAck(u), Outgoing::UnsubAck { count, .. }) => {
                    assert_eq!(u.reasons.len(), *count);
                    Some(u.pkid)
                }
                (v5::Packet::PingResp(_), Outgoing::PingResp) => None,
                (v5::Packet::ConnAck(_), Outgoing::ConnAck { .. }) => None,
                (v5::Packet::Disconnect(_), Outgoing::Disconnect { .. }) => None,
                (v5::Packet::Publish(p), Outgoing::Publish { topic, payload }) => {
                    assert_eq!((&p.topic[..], &p.payload), (topic.as_bytes(), payload));
                    None
                }
                (packet, answer) => panic!("{answer:?} reads as {packet:?}"),
            };
            assert_eq!(pkid, expected_pkid);
        }
    }
    assert!(bytes.is_empty(), "{} bytes after {answer:?}", bytes.len());
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let cuts = cuts(seed, stream.len());

    // The first packet: the level it asks for, whole or in pieces, alike.
    assert_eq!(sniff(stream, &[]), sniff(stream, &cuts));

    for version in [Version::V311, Version::V5] {
        let (whole, packets) = read_stream(version, stream, &[]);
        let (pieces, _) = read_stream(version, stream, &cuts);
        assert_eq!(whole, pieces, "{version:?} whole and in pieces differ");

        let mut client_id = String::from("scanner-1");
        for packet in &packets {
            match packet {
                Incoming::Connect { client_id: id, .. } => client_id.clone_from(id),
                Incoming::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                } => publish_round_trip(version, topic, *qos, *pkid, payload),
                _ => {}
            }
            // `write` takes the answer: the same answers again are what the client must see.
            let expected = answers(packet, &client_id);
            for (answer, expected) in answers(packet, &client_id).into_iter().zip(&expected) {
                let mut out = BytesMut::new();
                codec::write(version, answer, &mut out)
                    .unwrap_or_else(|e| panic!("{expected:?} cannot be written: {e}"));
                client_reads(version, expected, &mut out);
            }
        }
    }
});
