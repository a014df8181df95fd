//! Translation between MQTT 3.1.1 / 5.0 packets (rumqttc's codec) and the few packet kinds the
//! scanner endpoint speaks, so the connection logic is written once for both versions.

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, v4};
use rumqttc::v5::mqttbytes::{self as m5, v5};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

impl Version {
    pub fn name(self) -> &'static str {
        match self {
            Version::V311 => "3.1.1",
            Version::V5 => "5.0",
        }
    }
}

/// A packet from a client.
#[derive(Debug)]
pub enum Incoming {
    Connect {
        client_id: String,
        clean_start: bool,
        keep_alive: u16,
        login: Option<(String, String)>,
        /// MQTT 5 session expiry; `None` on 3.1.1.
        session_expiry: Option<u32>,
    },
    Publish {
        topic: String,
        qos: u8,
        pkid: u16,
        payload: Bytes,
    },
    PubRel {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    Unsubscribe {
        pkid: u16,
        count: usize,
    },
    PingReq,
    Disconnect,
    /// Acknowledgements of our QoS 0 publishes cannot happen; anything else we ignore.
    Ignored(&'static str),
}

/// Why a publish was not taken as a success; carried in MQTT 5 reason codes and strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckReason {
    Success,
    PayloadFormatInvalid(String),
    QuotaExceeded(String),
    NotAuthorized(String),
    TopicNameInvalid(String),
    Unspecified(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    BadCredentials,
    BadClientId,
    ServerUnavailable,
    /// A protocol level other than 3.1.1 (4) and 5.
    UnsupportedProtocolVersion,
}

/// A packet to a client.
#[derive(Debug)]
pub enum Outgoing {
    ConnAck {
        session_present: bool,
        refusal: Option<ConnectRefusal>,
        /// MQTT 5: the keep-alive the server imposes, when it differs from the client's.
        server_keep_alive: Option<u16>,
        /// MQTT 5: the session expiry the server grants, when it differs from the client's.
        session_expiry: Option<u32>,
        assigned_client_id: Option<String>,
        max_packet_size: u32,
    },
    PubAck {
        pkid: u16,
        reason: AckReason,
    },
    PubRec {
        pkid: u16,
        reason: AckReason,
    },
    PubComp {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        granted: Vec<bool>,
    },
    UnsubAck {
        pkid: u16,
        count: usize,
    },
    PingResp,
    /// A QoS 0 message to the client (rejects of its events).
    Publish {
        topic: String,
        payload: Bytes,
    },
    /// MQTT 5 only; on 3.1.1 the connection is just closed.
    Disconnect {
        reason: DisconnectReason,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    SessionTakenOver,
    ServerShuttingDown,
    KeepAliveTimeout,
    ProtocolError,
    /// A PUBLISH topic with a wildcard or NUL (0x90).
    TopicNameInvalid,
    /// A packet over the maximum packet size the CONNACK announced (0x95).
    PacketTooLarge,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("the first packet must be CONNECT")]
    NotConnect,
    #[error("unsupported MQTT protocol level {0} (3.1.1 and 5.0 are supported)")]
    UnsupportedLevel(u8),
    #[error("packet of {0} bytes is over the maximum packet size")]
    TooLarge(usize),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Looks at a buffered CONNECT to find the protocol version. `Ok(None)`: more bytes needed.
pub fn connect_version(buf: &[u8], max: usize) -> Result<Option<Version>, CodecError> {
    // Refuse a first packet that is not a CONNECT from its first byte, instead of waiting for
    // as many bytes as its length field asks for (for "GET / HTTP/1.1", until the timeout).
    if buf.first().is_some_and(|b| b >> 4 != 1) {
        return Err(CodecError::NotConnect);
    }
    let frame_length = match m4::check(buf.iter(), max) {
        Ok(header) => header.frame_length(),
        Err(m4::Error::InsufficientBytes(_)) => return Ok(None),
        Err(m4::Error::PayloadSizeLimitExceeded(n)) => return Err(CodecError::TooLarge(n)),
        Err(e) => return Err(CodecError::Malformed(e.to_string())),
    };
    // Only the CONNECT's own bytes: what follows it is the next packet, and whether it has
    // arrived yet must not change the answer.
    let buf = buf.get(..frame_length).unwrap_or(buf);
    if buf.first().map(|b| b >> 4) != Some(1) {
        return Err(CodecError::NotConnect);
    }
    // The remaining-length varint ends at the first byte without its top bit.
    let varint_end = buf[1..]
        .iter()
        .position(|b| b & 0x80 == 0)
        .ok_or_else(|| CodecError::Malformed("bad remaining length".into()))?;
    let header = 1 + varint_end + 1;
    if buf.get(header..header + 6) != Some(&[0, 4, b'M', b'Q', b'T', b'T'][..]) {
        return Err(CodecError::Malformed(
            "not an MQTT 3.1.1 or 5.0 CONNECT (protocol name is not MQTT)".into(),
        ));
    }
    match buf.get(header + 6) {
        Some(4) => Ok(Some(Version::V311)),
        Some(5) => Ok(Some(Version::V5)),
        Some(level) => Err(CodecError::UnsupportedLevel(*level)),
        None => Err(CodecError::Malformed("truncated CONNECT".into())),
    }
}

fn qos4(q: m4::QoS) -> u8 {
    q as u8
}

fn qos5(q: m5::QoS) -> u8 {
    q as u8
}

/// Reads one packet; `Ok(None)` when the buffer holds no complete packet yet.
pub fn read(
    version: Version,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Incoming>, CodecError> {
    let buffered = buf.len();
    match read_packet(version, buf, max) {
        // rumqttc takes a whole packet off the buffer before reading inside it: "more bytes
        // needed" once bytes are gone means a field ran past the end of its packet. Taken for
        // more bytes, the packet would vanish unanswered and the packets after it would wait
        // for the client's next read.
        Ok(None) if buf.len() != buffered => Err(CodecError::Malformed(
            "a field runs past the end of its packet".into(),
        )),
        // MQTT 3.1.1 §3.10.3 and 5 §3.10.3: a protocol violation. Answered, its 5.0 UNSUBACK
        // would hold no reason code, which clients cannot read.
        Ok(Some(Incoming::Unsubscribe { count: 0, .. })) => Err(CodecError::Malformed(
            "an UNSUBSCRIBE without a topic filter".into(),
        )),
        result => result,
    }
}

fn read_packet(
    version: Version,
    buf: &mut BytesMut,
    max: usize,
) -> Result<Option<Incoming>, CodecError> {
    match version {
        Version::V311 => match v4::Packet::read(buf, max) {
            Ok(packet) => Ok(Some(from_v4(packet))),
            Err(m4::Error::InsufficientBytes(_)) => Ok(None),
            Err(m4::Error::PayloadSizeLimitExceeded(n)) => Err(CodecError::TooLarge(n)),
            Err(e) => Err(CodecError::Malformed(e.to_string())),
        },
        Version::V5 => {
            // rumqttc refuses the normal two-byte MQTT 5 DISCONNECT; take it here.
            if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0x00 {
                buf.advance(2);
                return Ok(Some(Incoming::Disconnect));
            }
            match v5::Packet::read(buf, Some(max as u32)) {
                Ok(packet) => Ok(Some(from_v5(packet))),
                Err(m5::Error::InsufficientBytes(_)) => Ok(None),
                Err(m5::Error::PayloadSizeLimitExceeded { pkt_size, .. }) => {
                    Err(CodecError::TooLarge(pkt_size))
                }
                Err(e) => Err(CodecError::Malformed(e.to_string())),
            }
        }
    }
}

fn from_v4(packet: v4::Packet) -> Incoming {
    match packet {
        v4::Packet::Connect(c) => Incoming::Connect {
            client_id: c.client_id,
            clean_start: c.clean_session,
            keep_alive: c.keep_alive,
            login: c.login.map(|l| (l.username, l.password)),
            session_expiry: None,
        },
        v4::Packet::Publish(p) => Incoming::Publish {
            topic: p.topic,
            qos: qos4(p.qos),
            pkid: p.pkid,
            payload: p.payload,
        },
        v4::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
        v4::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| f.path).collect(),
        },
        v4::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            count: u.topics.len(),
        },
        v4::Packet::PingReq => Incoming::PingReq,
        v4::Packet::Disconnect => Incoming::Disconnect,
        v4::Packet::PubAck(_) => Incoming::Ignored("PUBACK"),
        v4::Packet::PubRec(_) => Incoming::Ignored("PUBREC"),
        v4::Packet::PubComp(_) => Incoming::Ignored("PUBCOMP"),
        _ => Incoming::Ignored("a server-to-client packet"),
    }
}

fn from_v5(packet: v5::Packet) -> Incoming {
    match packet {
        v5::Packet::Connect(c, _will, login) => Incoming::Connect {
            client_id: c.client_id,
            clean_start: c.clean_start,
            keep_alive: c.keep_alive,
            login: login.map(|l| (l.username, l.password)),
            session_expiry: Some(
                c.properties
                    .and_then(|p| p.session_expiry_interval)
                    .unwrap_or(0),
            ),
        },
        v5::Packet::Publish(p) => Incoming::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            qos: qos5(p.qos),
            pkid: p.pkid,
            payload: p.payload,
        },
        v5::Packet::PubRel(r) => Incoming::PubRel { pkid: r.pkid },
        v5::Packet::Subscribe(s) => Incoming::Subscribe {
            pkid: s.pkid,
            filters: s.filters.into_iter().map(|f| f.path).collect(),
        },
        v5::Packet::Unsubscribe(u) => Incoming::Unsubscribe {
            pkid: u.pkid,
            count: u.filters.len(),
        },
        v5::Packet::PingReq(_) => Incoming::PingReq,
        v5::Packet::Disconnect(_) => Incoming::Disconnect,
        v5::Packet::PubAck(_) => Incoming::Ignored("PUBACK"),
        v5::Packet::PubRec(_) => Incoming::Ignored("PUBREC"),
        v5::Packet::PubComp(_) => Incoming::Ignored("PUBCOMP"),
        v5::Packet::Auth(_) => Incoming::Ignored("AUTH"),
        _ => Incoming::Ignored("a server-to-client packet"),
    }
}

fn reason_string(text: &str) -> Option<String> {
    // Reason strings travel in every ack; keep them short.
    Some(text.chars().take(512).collect())
}

fn puback_reason_v5(reason: &AckReason) -> (v5::PubAckReason, Option<String>) {
    match reason {
        AckReason::Success => (v5::PubAckReason::Success, None),
        AckReason::PayloadFormatInvalid(s) => {
            (v5::PubAckReason::PayloadFormatInvalid, reason_string(s))
        }
        AckReason::QuotaExceeded(s) => (v5::PubAckReason::QuotaExceeded, reason_string(s)),
        AckReason::NotAuthorized(s) => (v5::PubAckReason::NotAuthorized, reason_string(s)),
        AckReason::TopicNameInvalid(s) => (v5::PubAckReason::TopicNameInvalid, reason_string(s)),
        AckReason::Unspecified(s) => (v5::PubAckReason::UnspecifiedError, reason_string(s)),
    }
}

fn pubrec_reason_v5(reason: &AckReason) -> (v5::PubRecReason, Option<String>) {
    let (ack, text) = puback_reason_v5(reason);
    let rec = match ack {
        v5::PubAckReason::Success => v5::PubRecReason::Success,
        v5::PubAckReason::PayloadFormatInvalid => v5::PubRecReason::PayloadFormatInvalid,
        v5::PubAckReason::QuotaExceeded => v5::PubRecReason::QuotaExceeded,
        v5::PubAckReason::NotAuthorized => v5::PubRecReason::NotAuthorized,
        v5::PubAckReason::TopicNameInvalid => v5::PubRecReason::TopicNameInvalid,
        _ => v5::PubRecReason::UnspecifiedError,
    };
    (rec, text)
}

/// Writes one packet. Errors mean a packet we built is unencodable: a bug, logged by the caller.
pub fn write(version: Version, packet: Outgoing, out: &mut BytesMut) -> Result<(), String> {
    match version {
        Version::V311 => write_v4(packet, out),
        Version::V5 => write_v5(packet, out),
    }
}

fn write_v4(packet: Outgoing, out: &mut BytesMut) -> Result<(), String> {
    let result = match packet {
        Outgoing::ConnAck {
            session_present,
            refusal,
            ..
        } => {
            let code = match refusal {
                None => v4::ConnectReturnCode::Success,
                Some(ConnectRefusal::BadCredentials) => v4::ConnectReturnCode::BadUserNamePassword,
                Some(ConnectRefusal::BadClientId) => v4::ConnectReturnCode::BadClientId,
                Some(ConnectRefusal::ServerUnavailable) => {
                    v4::ConnectReturnCode::ServiceUnavailable
                }
                Some(ConnectRefusal::UnsupportedProtocolVersion) => {
                    v4::ConnectReturnCode::RefusedProtocolVersion
                }
            };
            v4::ConnAck::new(code, session_present && refusal.is_none()).write(out)
        }
        // MQTT 3.1.1 acks carry no reason: the reason goes to the rejects topic instead.
        Outgoing::PubAck { pkid, .. } => v4::PubAck::new(pkid).write(out),
        Outgoing::PubRec { pkid, .. } => v4::PubRec::new(pkid).write(out),
        Outgoing::PubComp { pkid } => v4::PubComp::new(pkid).write(out),
        Outgoing::SubAck { pkid, granted } => v4::SubAck::new(
            pkid,
            granted
                .into_iter()
                .map(|ok| {
                    if ok {
                        v4::SubscribeReasonCode::Success(m4::QoS::AtMostOnce)
                    } else {
                        v4::SubscribeReasonCode::Failure
                    }
                })
                .collect(),
        )
        .write(out),
        Outgoing::UnsubAck { pkid, .. } => v4::UnsubAck::new(pkid).write(out),
        Outgoing::PingResp => v4::PingResp.write(out),
        Outgoing::Publish { topic, payload } => {
            v4::Publish::from_bytes(topic, m4::QoS::AtMostOnce, payload).write(out)
        }
        Outgoing::Disconnect { .. } => return Ok(()),
    };
    result.map(|_| ()).map_err(|e| e.to_string())
}

fn write_v5(packet: Outgoing, out: &mut BytesMut) -> Result<(), String> {
    let result = match packet {
        Outgoing::ConnAck {
            session_present,
            refusal,
            server_keep_alive,
            session_expiry,
            assigned_client_id,
            max_packet_size,
        } => {
            let code = match refusal {
                None => v5::ConnectReturnCode::Success,
                Some(ConnectRefusal::BadCredentials) => v5::ConnectReturnCode::BadUserNamePassword,
                Some(ConnectRefusal::BadClientId) => {
                    v5::ConnectReturnCode::ClientIdentifierNotValid
                }
                Some(ConnectRefusal::ServerUnavailable) => v5::ConnectReturnCode::ServerBusy,
                Some(ConnectRefusal::UnsupportedProtocolVersion) => {
                    v5::ConnectReturnCode::UnsupportedProtocolVersion
                }
            };
            let properties = v5::ConnAckProperties {
                session_expiry_interval: session_expiry,
                receive_max: Some(1000),
                max_qos: None,
                retain_available: Some(0),
                max_packet_size: Some(max_packet_size),
                assigned_client_identifier: assigned_client_id,
                topic_alias_max: Some(0),
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            };
            v5::ConnAck {
                session_present: session_present && refusal.is_none(),
                code,
                properties: Some(properties),
            }
            .write(out)
        }
        Outgoing::PubAck { pkid, reason } => {
            let (code, text) = puback_reason_v5(&reason);
            let mut ack = v5::PubAck::new(pkid, None);
            ack.reason = code;
            ack.properties = text.map(|reason_string| v5::PubAckProperties {
                reason_string: Some(reason_string),
                user_properties: Vec::new(),
            });
            ack.write(out)
        }
        Outgoing::PubRec { pkid, reason } => {
            let (code, text) = pubrec_reason_v5(&reason);
            let mut rec = v5::PubRec::new(pkid, None);
            rec.reason = code;
            rec.properties = text.map(|reason_string| v5::PubRecProperties {
                reason_string: Some(reason_string),
                user_properties: Vec::new(),
            });
            rec.write(out)
        }
        Outgoing::PubComp { pkid } => v5::PubComp::new(pkid, None).write(out),
        Outgoing::SubAck { pkid, granted } => v5::SubAck {
            pkid,
            return_codes: granted
                .into_iter()
                .map(|ok| {
                    if ok {
                        v5::SubscribeReasonCode::Success(m5::QoS::AtMostOnce)
                    } else {
                        v5::SubscribeReasonCode::NotAuthorized
                    }
                })
                .collect(),
            properties: None,
        }
        .write(out),
        Outgoing::UnsubAck { pkid, count } => v5::UnsubAck {
            pkid,
            reasons: vec![v5::UnsubAckReason::Success; count],
            properties: None,
        }
        .write(out),
        Outgoing::PingResp => v5::PingResp::write(out),
        Outgoing::Publish { topic, payload } => {
            v5::Publish::new(topic, m5::QoS::AtMostOnce, payload, None).write(out)
        }
        Outgoing::Disconnect { reason } => {
            let code = match reason {
                DisconnectReason::SessionTakenOver => v5::DisconnectReasonCode::SessionTakenOver,
                DisconnectReason::ServerShuttingDown => {
                    v5::DisconnectReasonCode::ServerShuttingDown
                }
                DisconnectReason::KeepAliveTimeout => v5::DisconnectReasonCode::KeepAliveTimeout,
                DisconnectReason::ProtocolError => v5::DisconnectReasonCode::ProtocolError,
                DisconnectReason::TopicNameInvalid => v5::DisconnectReasonCode::TopicNameInvalid,
                DisconnectReason::PacketTooLarge => v5::DisconnectReasonCode::PacketTooLarge,
            };
            // Written by hand: rumqttc 0.25's writer follows a reason code without properties
            // with a property length byte that its remaining length does not count
            // (E0 01 8E 00), a malformed packet clients fail to read. This is the reason code
            // and an empty property list, counted: E0 02 8E 00.
            out.extend_from_slice(&[0xE0, 0x02, code as u8, 0x00]);
            return Ok(());
        }
    };
    result.map(|_| ()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `mqtt_packets` fuzz target: a packet whose fields run past its end was
    /// taken off the buffer and then reported as "more bytes needed", so it vanished and the
    /// packets after it waited for the client's next read.
    #[test]
    fn a_field_past_the_end_of_its_packet_is_malformed() {
        // The fuzzer's input: a CONNACK without its property length, at level 5.
        let mut buf = BytesMut::from(&[0x2f, 0x02, 0x10, 0x0c, 0x2f, 0x02, 0x10, 0x0c][..]);
        assert!(matches!(
            read(Version::V5, &mut buf, 1024),
            Err(CodecError::Malformed(_))
        ));
        // A 5.0 PUBLISH to "a/b" without its property length, then a PINGREQ.
        let mut buf = BytesMut::from(&[0x30, 0x05, 0x00, 0x03, b'a', b'/', b'b', 0xc0, 0x00][..]);
        assert!(matches!(
            read(Version::V5, &mut buf, 1024),
            Err(CodecError::Malformed(_))
        ));
        // A packet cut by the network is still only incomplete, and nothing is taken.
        let mut buf = BytesMut::from(&[0x30, 0x06, 0x00, 0x03, b'a', b'/'][..]);
        assert!(matches!(read(Version::V5, &mut buf, 1024), Ok(None)));
        assert_eq!(buf.len(), 6);
        buf.extend_from_slice(b"b\x00");
        assert!(matches!(
            read(Version::V5, &mut buf, 1024),
            Ok(Some(Incoming::Publish { ref topic, .. })) if topic == "a/b"
        ));
    }

    /// Found by the `mqtt_packets` fuzz target: a CONNECT too short to hold its protocol name
    /// was read as 3.1.1 from the bytes after it when they had arrived with it, and refused as
    /// malformed when they had not.
    #[test]
    fn the_protocol_level_is_read_from_the_connect_alone() {
        let stream = [
            0x10, 0x04, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c,
        ];
        assert!(matches!(
            connect_version(&stream, 1024),
            Err(CodecError::Malformed(_))
        ));
        assert!(matches!(
            connect_version(&stream[..6], 1024),
            Err(CodecError::Malformed(_))
        ));
        let whole = [
            0x10, 0x0a, 0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x3c,
        ];
        assert!(matches!(
            connect_version(&whole, 1024),
            Ok(Some(Version::V5))
        ));
        assert!(matches!(connect_version(&whole[..11], 1024), Ok(None)));
    }

    /// Found by the `mqtt_packets` fuzz target: an UNSUBSCRIBE without a topic filter was
    /// answered with an UNSUBACK of no reason code, a packet MQTT 5 clients refuse to read.
    #[test]
    fn an_unsubscribe_without_a_filter_is_malformed() {
        // The fuzzer's input at level 5 (packet id 574, no properties), and the same at 3.1.1.
        let mut buf = BytesMut::from(&[0xac, 0x03, 0x02, 0x3e, 0x00][..]);
        assert!(matches!(
            read(Version::V5, &mut buf, 1024),
            Err(CodecError::Malformed(_))
        ));
        let mut buf = BytesMut::from(&[0xa2, 0x02, 0x02, 0x3e][..]);
        assert!(matches!(
            read(Version::V311, &mut buf, 1024),
            Err(CodecError::Malformed(_))
        ));
        let mut buf = BytesMut::from(&[0xa2, 0x05, 0x02, 0x3e, 0x00, 0x01, b'x'][..]);
        assert!(matches!(
            read(Version::V311, &mut buf, 1024),
            Ok(Some(Incoming::Unsubscribe {
                pkid: 574,
                count: 1
            }))
        ));
    }
}
