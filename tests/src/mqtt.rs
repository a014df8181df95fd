//! Blocking MQTT 3.1.1 and 5 clients (rumqttc) that publish one message at a time and wait
//! for its acknowledgement, so a test knows exactly which events were acknowledged, and that
//! keep any message they receive (reject notices) for the test to read.

// rumqttc's own error types are returned as they are, so tests can match on the refusal codes;
// their size does not matter here.
#![allow(clippy::result_large_err)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::poll_until;

/// How long a CONNECT may take to be answered.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an acknowledgement may take (a flush is milliseconds; this only bounds a hang).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// MQTT 3.1.1 options for the agent at `addr`: 30 s keep-alive, clean session.
pub fn v4_options(addr: SocketAddr, client_id: &str) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(256 * 1024, 256 * 1024);
    options
}

/// MQTT 5 options for the agent at `addr`: 30 s keep-alive, clean start.
pub fn v5_options(addr: SocketAddr, client_id: &str) -> rumqttc::v5::MqttOptions {
    let mut options = rumqttc::v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options
}

pub fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

pub fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// An MQTT 3.1.1 client, driven by the calling thread.
pub struct V4Client {
    client: rumqttc::Client,
    connection: rumqttc::Connection,
    received: VecDeque<rumqttc::Publish>,
}

impl V4Client {
    /// Connects and returns the client with the broker's CONNACK.
    pub fn connect(
        options: rumqttc::MqttOptions,
    ) -> Result<(V4Client, rumqttc::ConnAck), rumqttc::ConnectionError> {
        let (client, connection) = rumqttc::Client::new(options, 16);
        let mut this = V4Client {
            client,
            connection,
            received: VecDeque::new(),
        };
        let connack = this.wait_for(CONNECT_TIMEOUT, |event| match event {
            rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(connack)) => Some(connack.clone()),
            _ => None,
        })?;
        Ok((this, connack))
    }

    /// Connects, trying again (with a fresh client each time) until `timeout`.
    pub fn connect_retrying(options: &rumqttc::MqttOptions, timeout: Duration) -> V4Client {
        let mut last_error = None;
        poll_until(timeout, || match V4Client::connect(options.clone()) {
            Ok((client, _)) => Some(client),
            Err(e) => {
                last_error = Some(e);
                None
            }
        })
        .unwrap_or_else(|| panic!("no MQTT connection within {timeout:?}: {last_error:?}"))
    }

    /// Publishes and waits until the message is acknowledged: PUBACK for QoS 1, PUBCOMP for
    /// QoS 2, written to the socket for QoS 0.
    pub fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        payload: impl Into<Vec<u8>>,
    ) -> Result<(), rumqttc::ConnectionError> {
        self.publish_within(topic, qos, payload, ACK_TIMEOUT)?
            .ok_or_else(|| rumqttc::ConnectionError::Io(timed_out(ACK_TIMEOUT)))
    }

    /// Like [`V4Client::publish`], but `Ok(false)` when no acknowledgement came within
    /// `timeout` (the message then stays in flight; [`V4Client::wait_ack`] waits on).
    pub fn publish_within(
        &mut self,
        topic: &str,
        qos: u8,
        payload: impl Into<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Option<()>, rumqttc::ConnectionError> {
        self.client
            .publish(topic, qos_v4(qos), false, payload)
            .expect("the event loop takes requests");
        self.wait_ack(qos, timeout)
    }

    /// Waits for the acknowledgement of a publish at `qos`; `Ok(None)` on timeout.
    pub fn wait_ack(
        &mut self,
        qos: u8,
        timeout: Duration,
    ) -> Result<Option<()>, rumqttc::ConnectionError> {
        self.poll_for(timeout, |event| match (qos, event) {
            (0, rumqttc::Event::Outgoing(rumqttc::Outgoing::Publish(_)))
            | (1, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
            | (2, rumqttc::Event::Incoming(rumqttc::Packet::PubComp(_))) => Some(()),
            _ => None,
        })
    }

    /// Subscribes (QoS 0) and returns whether the broker granted it.
    pub fn subscribe(&mut self, filter: &str) -> Result<bool, rumqttc::ConnectionError> {
        self.client
            .subscribe(filter, rumqttc::QoS::AtMostOnce)
            .expect("the event loop takes requests");
        self.wait_for(ACK_TIMEOUT, |event| match event {
            rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack)) => Some(
                ack.return_codes
                    .iter()
                    .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            ),
            _ => None,
        })
    }

    /// The next message received (kept while waiting for acks), waiting up to `timeout`.
    pub fn next_message(&mut self, timeout: Duration) -> Option<rumqttc::Publish> {
        if let Some(message) = self.received.pop_front() {
            return Some(message);
        }
        let _ = self.poll_for(timeout, |event| match event {
            rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)) => Some(()),
            _ => None,
        });
        self.received.pop_front()
    }

    /// Waits until the connection fails or is closed, and returns why; `None` on timeout.
    pub fn wait_closed(&mut self, timeout: Duration) -> Option<rumqttc::ConnectionError> {
        self.poll_for(timeout, |_| None::<()>).err()
    }

    /// Sends DISCONNECT and waits until it is written.
    pub fn disconnect(mut self) {
        let _ = self.client.disconnect();
        let _ = self.poll_for(CONNECT_TIMEOUT, |event| match event {
            rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Some(()),
            _ => None,
        });
    }

    /// Like `poll_for`, with a timeout reported as an I/O error of kind `TimedOut`.
    fn wait_for<T>(
        &mut self,
        timeout: Duration,
        want: impl FnMut(&rumqttc::Event) -> Option<T>,
    ) -> Result<T, rumqttc::ConnectionError> {
        self.poll_for(timeout, want)?
            .ok_or_else(|| rumqttc::ConnectionError::Io(timed_out(timeout)))
    }

    /// Drives the connection until `want` picks an event, keeping received messages.
    /// `Ok(None)`: the timeout passed first.
    fn poll_for<T>(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&rumqttc::Event) -> Option<T>,
    ) -> Result<Option<T>, rumqttc::ConnectionError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.connection.recv_timeout(left) {
                Ok(Ok(event)) => {
                    if let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = &event {
                        self.received.push_back(p.clone());
                    }
                    if let Some(found) = want(&event) {
                        return Ok(Some(found));
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(None),
            }
        }
    }
}

/// How an MQTT 5 broker answered a publish: the reason code of the PUBACK (QoS 1) or PUBREC
/// (QoS 2), and its reason string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct V5Ack {
    pub reason: rumqttc::v5::mqttbytes::v5::PubAckReason,
    pub reason_string: Option<String>,
}

impl V5Ack {
    pub fn is_success(&self) -> bool {
        self.reason == rumqttc::v5::mqttbytes::v5::PubAckReason::Success
    }
}

fn rec_to_ack(
    reason: rumqttc::v5::mqttbytes::v5::PubRecReason,
) -> rumqttc::v5::mqttbytes::v5::PubAckReason {
    use rumqttc::v5::mqttbytes::v5::{PubAckReason as A, PubRecReason as R};
    match reason {
        R::Success => A::Success,
        R::NoMatchingSubscribers => A::NoMatchingSubscribers,
        R::UnspecifiedError => A::UnspecifiedError,
        R::ImplementationSpecificError => A::ImplementationSpecificError,
        R::NotAuthorized => A::NotAuthorized,
        R::TopicNameInvalid => A::TopicNameInvalid,
        R::PacketIdentifierInUse => A::PacketIdentifierInUse,
        R::QuotaExceeded => A::QuotaExceeded,
        R::PayloadFormatInvalid => A::PayloadFormatInvalid,
    }
}

/// An MQTT 5 client, driven by the calling thread.
pub struct V5Client {
    client: rumqttc::v5::Client,
    connection: rumqttc::v5::Connection,
    received: VecDeque<rumqttc::v5::mqttbytes::v5::Publish>,
}

impl V5Client {
    /// Connects and returns the client with the broker's CONNACK.
    pub fn connect(
        options: rumqttc::v5::MqttOptions,
    ) -> Result<(V5Client, rumqttc::v5::mqttbytes::v5::ConnAck), rumqttc::v5::ConnectionError> {
        let (client, connection) = rumqttc::v5::Client::new(options, 16);
        let mut this = V5Client {
            client,
            connection,
            received: VecDeque::new(),
        };
        let connack = this.wait_for(CONNECT_TIMEOUT, |event| match event {
            rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::ConnAck(connack)) => {
                Some(connack.clone())
            }
            _ => None,
        })?;
        Ok((this, connack))
    }

    /// Connects, trying again (with a fresh client each time) until `timeout`.
    pub fn connect_retrying(options: &rumqttc::v5::MqttOptions, timeout: Duration) -> V5Client {
        let mut last_error = None;
        poll_until(timeout, || match V5Client::connect(options.clone()) {
            Ok((client, _)) => Some(client),
            Err(e) => {
                last_error = Some(e);
                None
            }
        })
        .unwrap_or_else(|| panic!("no MQTT 5 connection within {timeout:?}: {last_error:?}"))
    }

    /// Publishes and waits for the answer: the PUBACK (QoS 1), the PUBREC and, when it is a
    /// success, the PUBCOMP (QoS 2), or the write to the socket (QoS 0, always a success).
    pub fn publish(
        &mut self,
        topic: &str,
        qos: u8,
        payload: impl Into<Vec<u8>>,
    ) -> Result<V5Ack, rumqttc::v5::ConnectionError> {
        use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
        use rumqttc::v5::{Event, Incoming};
        self.client
            .publish(topic, qos_v5(qos), false, payload.into())
            .expect("the event loop takes requests");
        let ack = self.wait_for(ACK_TIMEOUT, |event| match (qos, event) {
            (0, Event::Outgoing(rumqttc::Outgoing::Publish(_))) => Some(V5Ack {
                reason: PubAckReason::Success,
                reason_string: None,
            }),
            (1, Event::Incoming(Incoming::PubAck(ack))) => Some(V5Ack {
                reason: ack.reason,
                reason_string: ack
                    .properties
                    .as_ref()
                    .and_then(|p| p.reason_string.clone()),
            }),
            (2, Event::Incoming(Packet::PubRec(rec))) => Some(V5Ack {
                reason: rec_to_ack(rec.reason),
                reason_string: rec
                    .properties
                    .as_ref()
                    .and_then(|p| p.reason_string.clone()),
            }),
            _ => None,
        })?;
        if qos == 2 && ack.is_success() {
            self.wait_for(ACK_TIMEOUT, |event| match event {
                Event::Incoming(Incoming::PubComp(_)) => Some(()),
                _ => None,
            })?;
        }
        Ok(ack)
    }

    /// Subscribes (QoS 0) and returns whether the broker granted it.
    pub fn subscribe(&mut self, filter: &str) -> Result<bool, rumqttc::v5::ConnectionError> {
        use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
        self.client
            .subscribe(filter, qos_v5(0))
            .expect("the event loop takes requests");
        self.wait_for(ACK_TIMEOUT, |event| match event {
            rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::SubAck(ack)) => Some(
                ack.return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            ),
            _ => None,
        })
    }

    /// The next message received (kept while waiting for acks), waiting up to `timeout`.
    pub fn next_message(
        &mut self,
        timeout: Duration,
    ) -> Option<rumqttc::v5::mqttbytes::v5::Publish> {
        if let Some(message) = self.received.pop_front() {
            return Some(message);
        }
        let _ = self.poll_for(timeout, |event| match event {
            rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::Publish(_)) => Some(()),
            _ => None,
        });
        self.received.pop_front()
    }

    /// Waits until the connection fails or is closed, and returns why; `None` on timeout.
    pub fn wait_closed(&mut self, timeout: Duration) -> Option<rumqttc::v5::ConnectionError> {
        self.poll_for(timeout, |_| None::<()>).err()
    }

    /// Sends DISCONNECT and waits until it is written.
    pub fn disconnect(mut self) {
        let _ = self.client.disconnect();
        let _ = self.poll_for(CONNECT_TIMEOUT, |event| match event {
            rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Some(()),
            _ => None,
        });
    }

    /// Like `poll_for`, with a timeout reported as an I/O error of kind `TimedOut`.
    fn wait_for<T>(
        &mut self,
        timeout: Duration,
        want: impl FnMut(&rumqttc::v5::Event) -> Option<T>,
    ) -> Result<T, rumqttc::v5::ConnectionError> {
        self.poll_for(timeout, want)?
            .ok_or_else(|| rumqttc::v5::ConnectionError::Io(timed_out(timeout)))
    }

    /// Drives the connection until `want` picks an event, keeping received messages.
    /// `Ok(None)`: the timeout passed first.
    fn poll_for<T>(
        &mut self,
        timeout: Duration,
        mut want: impl FnMut(&rumqttc::v5::Event) -> Option<T>,
    ) -> Result<Option<T>, rumqttc::v5::ConnectionError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match self.connection.recv_timeout(left) {
                Ok(Ok(event)) => {
                    if let rumqttc::v5::Event::Incoming(rumqttc::v5::Incoming::Publish(p)) = &event
                    {
                        self.received.push_back(p.clone());
                    }
                    if let Some(found) = want(&event) {
                        return Ok(Some(found));
                    }
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(None),
            }
        }
    }
}

fn timed_out(timeout: Duration) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from the broker within {timeout:?}"),
    )
}
