//! The scanners' MQTT endpoint. The agent is the broker scanners talk to, so that a PUBACK
//! (QoS 1) or PUBREC (QoS 2) can mean "on the warehouse server's disk": each publish is
//! acknowledged only after the log's flush that holds it.
//!
//! What it owns: accepting connections (with a limit), authentication, sessions (client id
//! takeover, session-present, QoS 2 state across reconnects, expiry of the ones whose client
//! stays away), keep-alive, validation of each payload, and the `rejects/{client id}` topic
//! through which the connection that published learns why its event was refused.

pub mod codec;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backhaul_events::event::parse_event;
use backhaul_events::log_rate::LogRate;
use bytes::{Bytes, BytesMut};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::log::{Appended, EventLog, LogError, RejectRecord};
use crate::metrics::{AgentMetrics, MQTT};
use crate::passwd::MqttUsers;
use codec::{AckReason, CodecError, ConnectRefusal, DisconnectReason, Incoming, Outgoing, Version};

/// How many publishes of one connection may wait for their flush before the connection is not
/// read further.
const MAX_PENDING_PER_CONNECTION: usize = 1000;
/// How many payload bytes of one connection may wait for their flush before the connection is
/// not read further: a thousand small events in flight, but not a thousand of the largest.
const MAX_PENDING_BYTES_PER_CONNECTION: usize = 2 << 20;
/// Refused input one connection may send, in bytes a second, once its burst is spent; past
/// it the connection is read no further until it is back within the rate. A client sending
/// nothing but refused events must not take the CPU that validates everyone else's.
const REFUSED_BYTES_PER_SEC: f64 = 512.0 * 1024.0;
const REFUSED_BURST_BYTES: f64 = 2.0 * 1024.0 * 1024.0;
/// How long a socket may take from its accept to a complete CONNECT (and TLS handshake).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Sockets that have not sent their CONNECT yet, at most. They have their own budget, apart
/// from `mqtt.max_connections`, so that sockets opened and left idle (a port scanner, a
/// hostile device, a client stuck in its TLS setup) never keep logged-in scanners out.
const PENDING_CONNECTS: usize = 256;
/// Sockets without a CONNECT yet from one source address, at most: room for a whole site's
/// scanners reconnecting at once behind one address, while one address alone cannot take
/// the budget.
const PENDING_CONNECTS_PER_ADDRESS: usize = 64;
const REJECTS_PREFIX: &str = "rejects/";
/// Lines about connections closed for breaking the rules, sockets evicted and events
/// rejected: a hostile client can cause thousands a second.
static CLOSED_CONNECTIONS: LogRate = LogRate::per_ten_seconds();
static PENDING_EVICTIONS: LogRate = LogRate::per_ten_seconds();
static REJECTED_EVENTS: LogRate = LogRate::per_ten_seconds();
/// `mqtt.max_session_expiry_secs` when the configuration does not set it.
pub const DEFAULT_MAX_SESSION_EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);
/// The largest expiry an MQTT 5 CONNACK can grant: one more means "never expires".
pub const MAX_SESSION_EXPIRY_SECS: u64 = u32::MAX as u64 - 1;

/// Settings of the endpoint, from `[mqtt]` in the configuration.
#[derive(Clone)]
pub struct MqttSettings {
    /// TLS for every connection when set.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    pub topic: String,
    pub max_connections: usize,
    pub max_packet_size: usize,
    pub max_keep_alive_secs: u16,
    pub own_device_topic_only: bool,
    pub users: MqttUsers,
    /// `mqtt.max_session_expiry_secs`: the longest a persistent session outlives its
    /// connection.
    pub max_session_expiry: Duration,
}

/// Session state that outlives one connection of a client id.
#[derive(Default)]
struct Session {
    /// QoS 2 packet ids whose PUBREC went out and whose PUBREL has not arrived.
    awaiting_release: HashSet<u16>,
    /// How long the state is kept once the client disconnects; zero for a clean session.
    expiry: Duration,
    /// The connection using this session now, to take it over.
    active: Option<(u64, CancellationToken)>,
    /// When the last connection ended, while no connection uses the session.
    left_at: Option<Instant>,
    /// The client subscribed to its rejects topic: a resumed session keeps the subscription,
    /// as session-present promises.
    rejects_subscribed: bool,
}

impl Session {
    fn persistent(&self) -> bool {
        !self.expiry.is_zero()
    }

    /// Whether a scanner that stayed away has let the session run out: it is freed, not
    /// resumed, so a renamed or retired scanner does not hold its state forever.
    fn expired(&self, now: Instant) -> bool {
        self.active.is_none()
            && self
                .left_at
                .is_some_and(|left| now.saturating_duration_since(left) >= self.expiry)
    }
}

/// A place among `mqtt.max_connections`, taken before a connection's task starts and given
/// back when that task ends however it ends, so a burst of connects cannot pass the limit.
struct ConnectionSlot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
}

impl ConnectionSlot {
    fn new(permit: OwnedSemaphorePermit, gauge: &Gauge) -> ConnectionSlot {
        gauge.inc();
        ConnectionSlot {
            _permit: permit,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Sockets still waiting for their CONNECT. When the budget (or an address's share of it) is
/// full, a new socket still gets in: the oldest socket of the address holding the most is
/// closed instead. A flood from a few addresses so only ever displaces itself, and a scanner
/// that connects and logs in at once never finds the door shut.
#[derive(Default)]
struct PendingSockets {
    next_id: u64,
    /// By age (ids only grow): the address and the signal that closes the socket.
    sockets: std::collections::BTreeMap<u64, (IpAddr, CancellationToken)>,
    by_address: HashMap<IpAddr, usize>,
}

impl PendingSockets {
    /// Registers a socket from `address`; returns its id, its eviction signal, and whether an
    /// older socket had to make room for it.
    fn admit(&mut self, address: IpAddr) -> (u64, CancellationToken, bool) {
        let own = self.by_address.get(&address).copied().unwrap_or(0);
        let mut evicted = false;
        if own >= PENDING_CONNECTS_PER_ADDRESS {
            evicted = self.evict_oldest_of(address);
        } else if self.sockets.len() >= PENDING_CONNECTS {
            let busiest = self
                .by_address
                .iter()
                .max_by_key(|(_, count)| **count)
                .map(|(address, _)| *address);
            if let Some(busiest) = busiest {
                evicted = self.evict_oldest_of(busiest);
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let evict = CancellationToken::new();
        self.sockets.insert(id, (address, evict.clone()));
        *self.by_address.entry(address).or_insert(0) += 1;
        (id, evict, evicted)
    }

    fn evict_oldest_of(&mut self, address: IpAddr) -> bool {
        let oldest = self
            .sockets
            .iter()
            .find(|(_, (from, _))| *from == address)
            .map(|(id, _)| *id);
        match oldest {
            Some(id) => {
                if let Some((_, evict)) = self.remove(id) {
                    evict.cancel();
                }
                true
            }
            None => false,
        }
    }

    fn remove(&mut self, id: u64) -> Option<(IpAddr, CancellationToken)> {
        let (address, evict) = self.sockets.remove(&id)?;
        if let Some(count) = self.by_address.get_mut(&address) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.by_address.remove(&address);
            }
        }
        Some((address, evict))
    }
}

/// A socket's place among those waiting for their CONNECT; given back when dropped.
struct PendingSlot {
    id: u64,
    /// Cancelled when a newer socket needed the place.
    evicted: CancellationToken,
    registry: Arc<Mutex<PendingSockets>>,
}

impl PendingSlot {
    fn take(endpoint: &Endpoint, address: IpAddr) -> PendingSlot {
        let (id, evicted, made_room) = match endpoint.pending.lock() {
            Ok(mut registry) => registry.admit(address),
            // A poisoned registry cannot account: the socket still gets its deadline.
            Err(_) => (u64::MAX, CancellationToken::new(), false),
        };
        if made_room {
            endpoint.metrics.mqtt_pending_evicted.inc();
            backhaul_events::rate_limited!(
                PENDING_EVICTIONS,
                warn,
                %address,
                "an MQTT socket that had not sent its CONNECT was closed to make room for a new one: \
                 too many sockets are open without logging in"
            );
        }
        PendingSlot {
            id,
            evicted,
            registry: endpoint.pending.clone(),
        }
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.remove(self.id);
        }
    }
}

/// Everything the connections share.
pub struct Endpoint {
    settings: MqttSettings,
    log: EventLog,
    metrics: Arc<AgentMetrics>,
    sessions: Mutex<HashMap<String, Session>>,
    next_connection: AtomicU64,
    /// One permit per connection that may be open: `mqtt.max_connections`, taken once the
    /// CONNECT is read.
    connection_slots: Arc<Semaphore>,
    /// Sockets still waiting for their CONNECT.
    pending: Arc<Mutex<PendingSockets>>,
}

impl Endpoint {
    pub fn new(settings: MqttSettings, log: EventLog, metrics: Arc<AgentMetrics>) -> Arc<Endpoint> {
        let slots = settings.max_connections.min(Semaphore::MAX_PERMITS);
        Arc::new(Endpoint {
            settings,
            log,
            metrics,
            sessions: Mutex::new(HashMap::new()),
            next_connection: AtomicU64::new(1),
            connection_slots: Arc::new(Semaphore::new(slots)),
            pending: Arc::new(Mutex::new(PendingSockets::default())),
        })
    }

    fn max_session_expiry(&self) -> Duration {
        let secs = self.settings.max_session_expiry.as_secs();
        Duration::from_secs(secs.clamp(1, MAX_SESSION_EXPIRY_SECS))
    }

    /// Connections holding a place among `mqtt.max_connections`, from their CONNECT on.
    pub fn connected_clients(&self) -> u64 {
        let slots = self.settings.max_connections.min(Semaphore::MAX_PERMITS);
        slots.saturating_sub(self.connection_slots.available_permits()) as u64
    }

    /// Frees every session whose client has stayed away longer than its expiry.
    fn expire_sessions(&self) {
        let now = Instant::now();
        let Ok(mut sessions) = self.sessions.lock() else {
            return;
        };
        sessions.retain(|client_id, session| {
            let expired = session.expired(now);
            if expired {
                log_expired(client_id, session);
            }
            !expired
        });
    }

    /// Accepts connections until `shutdown` is cancelled.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        // A session is also checked when its client comes back; the sweep is for the clients
        // that never do, so it need not be prompt, only bounded.
        let sweep_every = (self.max_session_expiry() / 4)
            .clamp(Duration::from_millis(250), Duration::from_secs(15));
        let mut sweep = tokio::time::interval(sweep_every);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = sweep.tick() => {
                    self.expire_sessions();
                    continue;
                }
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: pause instead of spinning.
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // Until its CONNECT arrives a socket holds only a place among the pending ones,
            // taken here before the task is spawned so a burst cannot pass the budget.
            let pending = PendingSlot::take(&self, peer.ip());
            let _ = stream.set_nodelay(true);
            let endpoint = self.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let stream: Option<Box<dyn ClientStream>> = match &endpoint.settings.tls {
                    None => Some(Box::new(stream)),
                    Some(acceptor) => {
                        let evicted = pending.evicted.clone();
                        let handshake =
                            tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(stream));
                        tokio::select! {
                            handshake = handshake => match handshake {
                                Ok(Ok(tls)) => Some(Box::new(tls)),
                                Ok(Err(e)) => {
                                    endpoint.metrics.mqtt_protocol_errors.inc();
                                    backhaul_events::rate_limited!(CLOSED_CONNECTIONS, warn, %peer, error = %e, "MQTT TLS handshake failed");
                                    None
                                }
                                Err(_) => {
                                    endpoint.metrics.mqtt_protocol_errors.inc();
                                    backhaul_events::rate_limited!(CLOSED_CONNECTIONS, warn, %peer, "MQTT TLS handshake timed out after {CONNECT_TIMEOUT:?}");
                                    None
                                }
                            },
                            () = evicted.cancelled() => None,
                        }
                    }
                };
                if let Some(stream) = stream {
                    endpoint.handle(stream, peer, shutdown, pending).await;
                }
            });
        }
    }

    async fn handle(
        self: &Arc<Self>,
        stream: Box<dyn ClientStream>,
        peer: SocketAddr,
        shutdown: CancellationToken,
        pending: PendingSlot,
    ) {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let mut connection = Connection {
            endpoint: self.clone(),
            stream,
            pending_slot: Some(pending),
            slot: None,
            rejects_to: None,
            resume_rejects: false,
            peer,
            id,
            version: Version::V311,
            client_id: String::new(),
            keep_alive: Duration::from_secs(u64::from(self.settings.max_keep_alive_secs)),
            read_buf: BytesMut::with_capacity(16 * 1024),
            write_buf: BytesMut::with_capacity(4 * 1024),
            pending: VecDeque::new(),
            pending_sizes: VecDeque::new(),
            pending_bytes: 0,
            refused: RefusedPace::new(),
            cancel: CancellationToken::new(),
        };
        let outcome = connection.run(shutdown).await;
        connection.release_session();
        match outcome {
            Ok(Closed::ByClient) => {
                tracing::debug!(client = %connection.client_id, %peer, "MQTT client disconnected")
            }
            Ok(Closed::TakenOver) => tracing::info!(
                client = %connection.client_id, %peer,
                "MQTT connection closed: the same client id connected again (session taken over)"
            ),
            Ok(Closed::Shutdown) => {}
            // Counted and reported (rate-limited) where the room was made.
            Ok(Closed::Evicted) => {}
            Ok(Closed::Violation(reason)) | Err(reason) => {
                self.metrics.mqtt_protocol_errors.inc();
                backhaul_events::rate_limited!(CLOSED_CONNECTIONS, warn, client = %connection.client_id, %peer, version = connection.version.name(), "MQTT connection closed: {reason}");
            }
        }
    }

    /// The device a publish topic names, or why the topic is refused.
    fn device_of(&self, topic: &str, client_id: &str) -> Result<String, AckReason> {
        let pattern = &self.settings.topic;
        let device = device_in_topic(pattern, topic).ok_or_else(|| {
            let shown: String = topic.chars().take(64).collect();
            AckReason::TopicNameInvalid(format!("topic: {shown:?} does not match {pattern:?}"))
        })?;
        // The topic's device becomes the event's device: the same rules apply.
        let chars = device.chars().count();
        if chars > backhaul_events::MAX_STRING_CHARS {
            return Err(AckReason::TopicNameInvalid(format!(
                "topic: the device must be at most {} characters (got {chars})",
                backhaul_events::MAX_STRING_CHARS
            )));
        }
        if device.chars().any(char::is_control) {
            return Err(AckReason::TopicNameInvalid(
                "topic: the device must not contain control characters".into(),
            ));
        }
        if self.settings.own_device_topic_only && device != client_id {
            return Err(AckReason::NotAuthorized(format!(
                "topic: client {client_id:?} may only publish to its own device topic, not to device {device:?}"
            )));
        }
        Ok(device.to_string())
    }
}

enum Closed {
    ByClient,
    TakenOver,
    Shutdown,
    /// Closed before its CONNECT to make room for a newer socket.
    Evicted,
    /// The client broke the protocol where MQTT says the connection must close (a wildcard in
    /// a PUBLISH topic, a packet over the announced maximum): answered, then closed.
    Violation(String),
}

type PendingAck = Pin<Box<dyn Future<Output = Option<Outgoing>> + Send>>;

/// A client's byte stream: plain TCP or TLS.
trait ClientStream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> ClientStream for T {}

struct Connection {
    endpoint: Arc<Endpoint>,
    stream: Box<dyn ClientStream>,
    peer: SocketAddr,
    id: u64,
    version: Version,
    client_id: String,
    keep_alive: Duration,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// The socket's place among those waiting for their CONNECT, until it is read.
    pending_slot: Option<PendingSlot>,
    /// The connection's place among `mqtt.max_connections`, once its CONNECT is read.
    slot: Option<ConnectionSlot>,
    /// Where this connection's reject notices go, once it subscribed to its rejects topic.
    rejects_to: Option<mpsc::Sender<Outgoing>>,
    /// The resumed session had the rejects subscription.
    resume_rejects: bool,
    /// Answers to publishes, in the order the publishes arrived; each resolves after its flush.
    pending: VecDeque<PendingAck>,
    /// The payload bytes of each waiting answer's publish, in the same order, and their sum.
    pending_sizes: VecDeque<usize>,
    pending_bytes: usize,
    /// How much refused input this connection has sent lately.
    refused: RefusedPace,
    /// Cancelled when another connection takes this client id over.
    cancel: CancellationToken,
}

impl Connection {
    async fn run(&mut self, shutdown: CancellationToken) -> Result<Closed, String> {
        let evicted = match &self.pending_slot {
            Some(slot) => slot.evicted.clone(),
            None => CancellationToken::new(),
        };
        let connect = tokio::select! {
            connect = tokio::time::timeout(CONNECT_TIMEOUT, self.read_connect()) => connect,
            () = evicted.cancelled() => return Ok(Closed::Evicted),
        };
        let connect = match connect {
            Err(_) => return Err(format!("no CONNECT within {CONNECT_TIMEOUT:?}")),
            Ok(Ok(Some(packet))) => packet,
            Ok(Ok(None)) => return Ok(Closed::ByClient),
            Ok(Err(e)) => return Err(e),
        };
        if !self.accept_connect(connect).await? {
            return Ok(Closed::ByClient);
        }
        let (reject_tx, mut reject_rx) = mpsc::channel::<Outgoing>(64);
        if self.resume_rejects {
            self.rejects_to = Some(reject_tx.clone());
        }
        let mut last_heard = Instant::now();
        let mut closing: Option<Closed> = None;
        // Packets that arrived together with the CONNECT (a client need not wait for the
        // CONNACK) are already buffered: take them now, not only after the next read.
        if !self.read_buf.is_empty() {
            closing = self.handle_buffered(&reject_tx)?;
        }
        loop {
            // A closing connection still answers what it already took in, so every publish
            // that reached the log gets its acknowledgement if the socket is still there.
            // Checked first: the packets that came with the CONNECT may already close it.
            if let Some(closed) = &closing
                && self.pending.is_empty()
            {
                if matches!(closed, Closed::Shutdown) {
                    self.queue(Outgoing::Disconnect {
                        reason: DisconnectReason::ServerShuttingDown,
                    });
                }
                let _ = self.flush().await;
                return Ok(closing.take().unwrap_or(Closed::ByClient));
            }
            let paused_until = self.refused.paused_until(Instant::now());
            let can_read = closing.is_none()
                && paused_until.is_none()
                && self.pending.len() < MAX_PENDING_PER_CONNECTION
                && self.pending_bytes < MAX_PENDING_BYTES_PER_CONNECTION;
            let keep_alive_deadline = last_heard + self.keep_alive + self.keep_alive / 2;
            let front = async {
                match self.pending.front_mut() {
                    Some(ack) => ack.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                answer = front => {
                    self.pending.pop_front();
                    let size = self.pending_sizes.pop_front().unwrap_or(0);
                    self.pending_bytes = self.pending_bytes.saturating_sub(size);
                    if let Some(packet) = answer {
                        self.queue(packet);
                    }
                    // Write acks in bursts: only flush when no further answer is ready.
                    if self.pending.front().is_none() || self.write_buf.len() > 32 * 1024 {
                        self.flush().await?;
                    }
                }
                notice = reject_rx.recv() => {
                    if let Some(packet) = notice {
                        self.queue(packet);
                        self.flush().await?;
                    }
                }
                _ = self.cancel.cancelled(), if closing.is_none() => {
                    self.queue(Outgoing::Disconnect { reason: DisconnectReason::SessionTakenOver });
                    closing = Some(Closed::TakenOver);
                }
                _ = shutdown.cancelled(), if closing.is_none() => {
                    closing = Some(Closed::Shutdown);
                }
                _ = tokio::time::sleep_until(paused_until.unwrap_or(keep_alive_deadline)), if closing.is_none() && paused_until.is_some() => {
                    // Pausing is not silence: what the client sent meanwhile is still there.
                    last_heard = Instant::now();
                }
                _ = tokio::time::sleep_until(keep_alive_deadline), if closing.is_none() => {
                    self.queue(Outgoing::Disconnect { reason: DisconnectReason::KeepAliveTimeout });
                    let _ = self.flush().await;
                    return Err(format!("keep-alive timeout: nothing heard for {:?}", last_heard.elapsed()));
                }
                read = self.stream.read_buf(&mut self.read_buf), if can_read => {
                    match read {
                        Ok(0) => closing = Some(Closed::ByClient),
                        Ok(_) => {
                            last_heard = Instant::now();
                            if let Some(closed) = self.handle_buffered(&reject_tx)? {
                                closing = Some(closed);
                            }
                        }
                        Err(e) => return Err(format!("read failed: {e}")),
                    }
                }
            }
        }
    }

    async fn read_connect(&mut self) -> Result<Option<Incoming>, String> {
        let max = self.endpoint.settings.max_packet_size;
        loop {
            match codec::connect_version(&self.read_buf, max) {
                Ok(Some(version)) => {
                    self.version = version;
                    return match codec::read(version, &mut self.read_buf, max) {
                        Ok(Some(packet @ Incoming::Connect { .. })) => Ok(Some(packet)),
                        Ok(_) => Err("the first packet must be CONNECT".into()),
                        Err(e) => Err(e.to_string()),
                    };
                }
                Ok(None) => {}
                Err(CodecError::UnsupportedLevel(level)) => {
                    // MQTT 3.1.1 §3.1.2.2: answer return code 0x01, then close. A 3.1.1
                    // CONNACK is what a client of any level can read.
                    let mut out = BytesMut::new();
                    let ack = Outgoing::ConnAck {
                        session_present: false,
                        refusal: Some(ConnectRefusal::UnsupportedProtocolVersion),
                        server_keep_alive: None,
                        session_expiry: None,
                        assigned_client_id: None,
                        max_packet_size: max as u32,
                    };
                    if codec::write(Version::V311, ack, &mut out).is_ok() {
                        let _ = self.stream.write_all(&out).await;
                        let _ = self.stream.flush().await;
                    }
                    return Err(CodecError::UnsupportedLevel(level).to_string());
                }
                Err(e) => return Err(e.to_string()),
            }
            match self.stream.read_buf(&mut self.read_buf).await {
                Ok(0) => return Ok(None),
                Ok(_) => {}
                Err(e) => return Err(format!("read failed: {e}")),
            }
        }
    }

    /// Checks credentials, sets up the session and answers CONNACK. `Ok(false)`: refused.
    async fn accept_connect(&mut self, connect: Incoming) -> Result<bool, String> {
        let Incoming::Connect {
            client_id,
            clean_start,
            keep_alive,
            login,
            session_expiry,
        } = connect
        else {
            return Err("the first packet must be CONNECT".into());
        };
        let settings = &self.endpoint.settings;
        let max_packet_size = settings.max_packet_size as u32;
        let refuse = |refusal| Outgoing::ConnAck {
            session_present: false,
            refusal: Some(refusal),
            server_keep_alive: None,
            session_expiry: None,
            assigned_client_id: None,
            max_packet_size,
        };
        // The CONNECT is here: the socket leaves the pending ones and takes a connection's
        // place, if one is free (atomically, so a burst never passes the cap).
        self.pending_slot = None;
        let Ok(permit) = self.endpoint.connection_slots.clone().try_acquire_owned() else {
            let max = settings.max_connections;
            self.queue(refuse(ConnectRefusal::ServerUnavailable));
            self.flush().await?;
            tracing::warn!(client = %client_id, peer = %self.peer, max, "MQTT connection refused: too many connections");
            return Ok(false);
        };
        self.slot = Some(ConnectionSlot::new(
            permit,
            &self.endpoint.metrics.mqtt_connections,
        ));
        if !settings.users.is_empty() {
            let ok = login
                .as_ref()
                .is_some_and(|(user, password)| settings.users.check(user, password.as_bytes()));
            if !ok {
                self.queue(refuse(ConnectRefusal::BadCredentials));
                self.flush().await?;
                tracing::warn!(client = %client_id, peer = %self.peer, user = login.as_ref().map(|l| l.0.as_str()).unwrap_or(""), "MQTT connection refused: bad username or password");
                return Ok(false);
            }
        }
        let max_expiry = self.endpoint.max_session_expiry();
        let (expiry, capped) = match session_expiry {
            None if clean_start => (Duration::ZERO, None),
            None => (max_expiry, None),
            // u32::MAX, "never expires", is capped like any other ask.
            Some(asked) => {
                let granted = Duration::from_secs(u64::from(asked)).min(max_expiry);
                let granted_secs = u32::try_from(granted.as_secs()).unwrap_or(u32::MAX - 1);
                (granted, (granted_secs != asked).then_some(granted_secs))
            }
        };
        let persistent = !expiry.is_zero();
        let mut assigned = None;
        let client_id = if client_id.is_empty() {
            if persistent && self.version == Version::V311 {
                self.queue(refuse(ConnectRefusal::BadClientId));
                self.flush().await?;
                return Err("an empty client id needs clean session".into());
            }
            let generated = format!("auto-{:016x}", rand::random::<u64>());
            assigned = Some(generated.clone());
            generated
        } else {
            client_id
        };
        self.client_id = client_id.clone();
        let max_keep_alive = settings.max_keep_alive_secs;
        let granted = if keep_alive == 0 || keep_alive > max_keep_alive {
            max_keep_alive
        } else {
            keep_alive
        };
        self.keep_alive = Duration::from_secs(u64::from(granted));
        let session_present = {
            let mut sessions = self
                .endpoint
                .sessions
                .lock()
                .map_err(|_| "session table poisoned")?;
            let session = sessions.entry(client_id.clone()).or_default();
            if session.expired(Instant::now()) {
                log_expired(&client_id, session);
                *session = Session::default();
            }
            if let Some((_, previous)) = session.active.take() {
                previous.cancel();
            }
            let present =
                !clean_start && (session.persistent() || !session.awaiting_release.is_empty());
            if clean_start {
                session.awaiting_release.clear();
                session.rejects_subscribed = false;
            }
            self.resume_rejects = present && session.rejects_subscribed;
            session.expiry = expiry;
            session.left_at = None;
            session.active = Some((self.id, self.cancel.clone()));
            present
        };
        self.queue(Outgoing::ConnAck {
            session_present,
            refusal: None,
            server_keep_alive: (granted != keep_alive).then_some(granted),
            session_expiry: capped,
            assigned_client_id: assigned,
            max_packet_size,
        });
        self.flush().await?;
        tracing::debug!(client = %client_id, peer = %self.peer, version = self.version.name(), session_present, "MQTT client connected");
        Ok(true)
    }

    /// Drops the session unless it is persistent (then its expiry starts now), and leaves the
    /// reject subscriptions.
    fn release_session(&self) {
        if let Ok(mut sessions) = self.endpoint.sessions.lock()
            && let Some(session) = sessions.get_mut(&self.client_id)
            && session
                .active
                .as_ref()
                .is_some_and(|(id, _)| *id == self.id)
        {
            session.active = None;
            if session.persistent() {
                session.left_at = Some(Instant::now());
            } else {
                sessions.remove(&self.client_id);
            }
        }
    }

    fn handle_buffered(
        &mut self,
        reject_tx: &mpsc::Sender<Outgoing>,
    ) -> Result<Option<Closed>, String> {
        let max = self.endpoint.settings.max_packet_size;
        loop {
            let packet = match codec::read(self.version, &mut self.read_buf, max) {
                Ok(Some(packet)) => packet,
                Ok(None) => return Ok(None),
                Err(e @ CodecError::TooLarge(_)) => {
                    // MQTT 5 §3.2.2.3.6: DISCONNECT 0x95 before closing.
                    self.queue(Outgoing::Disconnect {
                        reason: DisconnectReason::PacketTooLarge,
                    });
                    self.read_buf.clear();
                    return Ok(Some(Closed::Violation(e.to_string())));
                }
                Err(e) => return Err(e.to_string()),
            };
            match packet {
                Incoming::Publish { topic, .. } if topic.contains(['+', '#', '\0']) => {
                    // MQTT 3.1.1 §3.3.2.1 and 5 §3.3.2.1: a protocol violation that closes
                    // the connection, not a refused event.
                    self.queue(Outgoing::Disconnect {
                        reason: DisconnectReason::TopicNameInvalid,
                    });
                    self.read_buf.clear();
                    return Ok(Some(Closed::Violation(format!(
                        "PUBLISH topic {:?} holds a wildcard or NUL",
                        topic.chars().take(64).collect::<String>()
                    ))));
                }
                Incoming::Publish {
                    topic,
                    qos,
                    pkid,
                    payload,
                } => {
                    self.publish(topic, qos, pkid, payload)?;
                }
                Incoming::PubRel { pkid } => {
                    if let Ok(mut sessions) = self.endpoint.sessions.lock()
                        && let Some(session) = sessions.get_mut(&self.client_id)
                    {
                        session.awaiting_release.remove(&pkid);
                    }
                    self.answer_in_order(Outgoing::PubComp { pkid });
                }
                Incoming::Subscribe { pkid, filters } => {
                    let own = format!("{REJECTS_PREFIX}{}", self.client_id);
                    let granted: Vec<bool> = filters.iter().map(|f| *f == own).collect();
                    if granted.iter().any(|g| *g) {
                        self.rejects_to = Some(reject_tx.clone());
                        self.set_rejects_subscribed(true);
                    }
                    for filter in filters.iter().filter(|f| **f != own) {
                        tracing::info!(client = %self.client_id, filter, "MQTT subscription refused: only {own:?} may be subscribed to");
                    }
                    self.answer_in_order(Outgoing::SubAck { pkid, granted });
                }
                Incoming::Unsubscribe { pkid, count } => {
                    self.rejects_to = None;
                    self.set_rejects_subscribed(false);
                    self.answer_in_order(Outgoing::UnsubAck { pkid, count });
                }
                Incoming::PingReq => self.answer_in_order(Outgoing::PingResp),
                Incoming::Disconnect => return Ok(Some(Closed::ByClient)),
                Incoming::Connect { .. } => return Err("a second CONNECT on one connection".into()),
                Incoming::Ignored(_) => {}
            }
        }
    }

    /// Answers that need no flush still go out behind the acks already waiting.
    fn answer_in_order(&mut self, packet: Outgoing) {
        self.wait_for(0, Box::pin(std::future::ready(Some(packet))));
    }

    /// Queues the answer to a publish of `payload_bytes`, behind those already waiting.
    fn wait_for(&mut self, payload_bytes: usize, answer: PendingAck) {
        self.pending.push_back(answer);
        self.pending_sizes.push_back(payload_bytes);
        self.pending_bytes += payload_bytes;
    }

    fn publish(&mut self, topic: String, qos: u8, pkid: u16, payload: Bytes) -> Result<(), String> {
        let payload_bytes = payload.len();
        let ack = move |reason: AckReason| match qos {
            0 => None,
            1 => Some(Outgoing::PubAck { pkid, reason }),
            _ => Some(Outgoing::PubRec { pkid, reason }),
        };
        if qos == 2 {
            let already = self
                .endpoint
                .sessions
                .lock()
                .map(|s| {
                    s.get(&self.client_id)
                        .is_some_and(|s| s.awaiting_release.contains(&pkid))
                })
                .unwrap_or(false);
            if already {
                // A re-sent QoS 2 publish whose PUBREC was lost: it is in the log already.
                self.answer_in_order(Outgoing::PubRec {
                    pkid,
                    reason: AckReason::Success,
                });
                return Ok(());
            }
        }
        let endpoint = self.endpoint.clone();
        let device = match endpoint.device_of(&topic, &self.client_id) {
            Ok(device) => device,
            Err(reason) => {
                let text = match &reason {
                    AckReason::TopicNameInvalid(t) | AckReason::NotAuthorized(t) => t.clone(),
                    _ => String::new(),
                };
                let violation =
                    backhaul_events::Violation::new("topic", text.trim_start_matches("topic: "));
                let sender = format!("mqtt client {} topic {}", self.client_id, topic);
                let stored = endpoint.log.record_reject(RejectRecord::new(
                    "mqtt",
                    sender,
                    &payload,
                    vec![violation.clone()],
                ));
                endpoint.metrics.rejected.get_or_create(&MQTT).inc();
                self.refused.charge(payload_bytes, Instant::now());
                let notify = self.notifier();
                self.wait_for(
                    payload_bytes,
                    Box::pin(async move {
                        if let Err(e) = stored.await {
                            tracing::error!(error = %e, "a reject could not be stored");
                        }
                        notify(reject_notice(None, &topic, &[violation]));
                        ack(reason)
                    }),
                );
                return Ok(());
            }
        };
        match parse_event(&payload) {
            Ok(mut event) => {
                if event.device.is_none() {
                    event.device = Some(device);
                }
                let id = event.id.clone();
                let appended = endpoint.log.append(vec![event.clone()]);
                let version = self.version;
                let client_id = self.client_id.clone();
                self.wait_for(payload_bytes, Box::pin(async move {
                    let mut appended = appended.await;
                    loop {
                        match appended.as_deref() {
                            Ok([Appended::Stored { .. }]) => {
                                endpoint.metrics.accepted.get_or_create(&MQTT).inc();
                                break;
                            }
                            Ok([Appended::Duplicate { .. }]) => {
                                endpoint.metrics.duplicates.get_or_create(&MQTT).inc();
                                break;
                            }
                            Ok(_) if version == Version::V5 => {
                                endpoint.metrics.quota_refusals.get_or_create(&MQTT).inc();
                                return ack(AckReason::QuotaExceeded(format!(
                                    "event {id}: the agent's disk quota is full; keep the event and retry"
                                )));
                            }
                            Ok(_) => {
                                // MQTT 3.1.1 has no way to say "full": hold the answer (and
                                // with it this connection) until there is room again.
                                endpoint.metrics.quota_refusals.get_or_create(&MQTT).inc();
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                appended = endpoint.log.append(vec![event.clone()]).await;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, id = %id, "event could not be logged");
                                return match version {
                                    Version::V5 => ack(AckReason::Unspecified(format!("event {id}: not stored: {e}"))),
                                    // Without an ack the client re-sends after reconnecting.
                                    Version::V311 => None,
                                };
                            }
                        }
                    }
                    if qos == 2
                        && let Ok(mut sessions) = endpoint.sessions.lock()
                            && let Some(session) = sessions.get_mut(&client_id) {
                                session.awaiting_release.insert(pkid);
                            }
                    ack(AckReason::Success)
                }));
            }
            Err(violations) => {
                let sender = format!("mqtt client {} topic {}", self.client_id, topic);
                let id = event_id_hint(&payload);
                let notice = reject_notice(id.as_deref(), &topic, &violations.0);
                let text = violations.to_string();
                let stored = endpoint.log.record_reject(RejectRecord::new(
                    "mqtt",
                    sender,
                    &payload,
                    violations.0,
                ));
                endpoint.metrics.rejected.get_or_create(&MQTT).inc();
                backhaul_events::rate_limited!(REJECTED_EVENTS, info, client = %self.client_id, event = id.as_deref().unwrap_or(""), reasons = %text, "MQTT event rejected");
                self.refused.charge(payload_bytes, Instant::now());
                let notify = self.notifier();
                self.wait_for(
                    payload_bytes,
                    Box::pin(async move {
                        if let Err(e) = stored.await {
                            tracing::error!(error = %e, "a reject could not be stored");
                        }
                        notify(notice);
                        ack(AckReason::PayloadFormatInvalid(text))
                    }),
                );
            }
        }
        Ok(())
    }

    fn set_rejects_subscribed(&self, subscribed: bool) {
        if let Ok(mut sessions) = self.endpoint.sessions.lock()
            && let Some(session) = sessions.get_mut(&self.client_id)
        {
            session.rejects_subscribed = subscribed;
        }
    }

    /// Sends a reject notice to this connection, on `rejects/{its client id}`, if it
    /// subscribed there. Notices go to the session that published, never to another client
    /// that subscribes under the name of the topic's device or claims the same client id.
    fn notifier(&self) -> impl FnOnce(Bytes) + Send + 'static {
        let to = self.rejects_to.clone();
        let topic = format!("{REJECTS_PREFIX}{}", self.client_id);
        move |payload| {
            // QoS 0: a subscriber too slow to take the notice misses it; the reject store
            // keeps it anyway.
            if let Some(to) = to {
                let _ = to.try_send(Outgoing::Publish { topic, payload });
            }
        }
    }

    fn queue(&mut self, packet: Outgoing) {
        if let Err(e) = codec::write(self.version, packet, &mut self.write_buf) {
            tracing::error!(client = %self.client_id, "an MQTT answer could not be encoded: {e}");
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        if self.write_buf.is_empty() {
            return Ok(());
        }
        let result = self.stream.write_all(&self.write_buf).await;
        self.write_buf.clear();
        result.map_err(|e| format!("write failed: {e}"))
    }
}

fn log_expired(client_id: &str, session: &Session) {
    tracing::info!(
        client = %client_id,
        expiry_secs = session.expiry.as_secs(),
        "MQTT session expired: its client stayed away longer than the session expiry; its state is freed"
    );
}

/// The device a topic names under a pattern like `scans/{device}`, if the topic matches it.
pub fn device_in_topic<'t>(pattern: &str, topic: &'t str) -> Option<&'t str> {
    let pattern_levels: Vec<&str> = pattern.split('/').collect();
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.len() != pattern_levels.len() {
        return None;
    }
    let mut device = None;
    for (want, got) in pattern_levels.iter().zip(levels) {
        if *want == "{device}" {
            if got.is_empty() {
                return None;
            }
            device = Some(got);
        } else if *want != got {
            return None;
        }
    }
    device
}

/// The JSON a scanner receives on `rejects/{device}`.
fn reject_notice(
    id: Option<&str>,
    topic: &str,
    violations: &[backhaul_events::Violation],
) -> Bytes {
    let reasons: Vec<serde_json::Value> = violations
        .iter()
        .map(|v| serde_json::json!({"field": v.field, "rule": v.rule, "message": v.to_string()}))
        .collect();
    let notice = serde_json::json!({"id": id, "topic": topic, "violations": reasons});
    Bytes::from(notice.to_string())
}

/// The `id` of a refused payload, when one can be read, so the sender can match the notice.
fn event_id_hint(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct IdOnly {
        id: Option<serde_json::Value>,
    }
    let parsed: IdOnly = serde_json::from_slice(payload).ok()?;
    match parsed.id? {
        serde_json::Value::String(s) => Some(s.chars().take(64).collect()),
        _ => None,
    }
}

impl From<LogError> for AckReason {
    fn from(e: LogError) -> Self {
        AckReason::Unspecified(e.to_string())
    }
}

/// Builds the TLS acceptor of `[mqtt.tls]`; errors name the file and what is wrong with it.
pub fn tls_acceptor(tls: &crate::config::MqttTls) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use pki_types::pem::PemObject;
    use pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls;

    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_file)
        .and_then(|certs| certs.collect())
        .map_err(|e| anyhow::anyhow!("mqtt.tls.cert_file {}: {e}", tls.cert_file.display()))?;
    if certs.is_empty() {
        anyhow::bail!(
            "mqtt.tls.cert_file {}: no certificate in it",
            tls.cert_file.display()
        );
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_file)
        .map_err(|e| anyhow::anyhow!("mqtt.tls.key_file {}: {e}", tls.key_file.display()))?;
    // The provider is named, not taken from the process default, which is ambiguous when
    // several TLS stacks are linked in.
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| anyhow::anyhow!("mqtt.tls: {e}"))?;
    let builder = match &tls.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca_file) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| {
                anyhow::anyhow!("mqtt.tls.client_ca_file {}: {e}", ca_file.display())
            })? {
                let cert = cert.map_err(|e| {
                    anyhow::anyhow!("mqtt.tls.client_ca_file {}: {e}", ca_file.display())
                })?;
                roots.add(cert).map_err(|e| {
                    anyhow::anyhow!("mqtt.tls.client_ca_file {}: {e}", ca_file.display())
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            )
            .build()
            .map_err(|e| anyhow::anyhow!("mqtt.tls.client_ca_file {}: {e}", ca_file.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        anyhow::anyhow!("mqtt.tls: the certificate and key do not go together: {e}")
    })?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// A token bucket of refused input, in bytes: full at the start, spent by refused publishes,
/// refilled at [`REFUSED_BYTES_PER_SEC`].
struct RefusedPace {
    tokens: f64,
    at: Instant,
}

impl RefusedPace {
    fn new() -> RefusedPace {
        RefusedPace {
            tokens: REFUSED_BURST_BYTES,
            at: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * REFUSED_BYTES_PER_SEC;
        self.tokens = (self.tokens + earned).min(REFUSED_BURST_BYTES);
        self.at = now;
    }

    fn charge(&mut self, bytes: usize, now: Instant) {
        self.refill(now);
        self.tokens -= bytes as f64;
    }

    /// When the connection may be read again, if it is over its rate now.
    fn paused_until(&mut self, now: Instant) -> Option<Instant> {
        self.refill(now);
        (self.tokens < 0.0)
            .then(|| now + Duration::from_secs_f64(-self.tokens / REFUSED_BYTES_PER_SEC))
    }
}
