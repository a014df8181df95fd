//! The agent's configuration file: its shape, defaults and the checks made at start.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use backhaul_events::config::{
    AdminAccess, AdminDefaults, AdminListenerConfig, ByteSize, ConfigError, Secret, SecretSource,
    check_listener_limits, load_toml_file,
};
use backhaul_events::signing::SiteKeys;
use backhaul_events::topics::check_site_id;
use serde::{Deserialize, Deserializer};

use crate::mqtt::{DEFAULT_MAX_SESSION_EXPIRY, MAX_SESSION_EXPIRY_SECS};
use crate::passwd::MqttUsers;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This warehouse's id; it names topics, metrics and every event's `site`.
    pub site: String,
    /// Where the durable log and the reject store live.
    pub state_dir: PathBuf,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    /// The broker batches go to; without this section the agent only keeps events.
    pub uplink: Option<UplinkConfig>,
    /// A broker the site's scanners already publish to: the agent subscribes there too.
    pub site_broker: Option<SiteBrokerConfig>,
}

/// A site broker the agent takes scans from as a subscriber, with a persistent session and
/// an acknowledgement only once each message is durable in the log.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteBrokerConfig {
    pub host: String,
    pub port: u16,
    /// The broker keeps the agent's session, and the messages not yet acknowledged, under this
    /// id: it must stay the same across restarts. Defaults to `backhaul-agent-{site}`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// Topic the scanners publish to; `{device}` is one level, the scanner's id.
    #[serde(default = "default_site_topic")]
    pub topic: String,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
    /// Largest message taken; larger ones are refused by the broker's client library.
    #[serde(default = "default_site_packet")]
    pub max_packet_size: ByteSize,
}

impl SiteBrokerConfig {
    /// The client id used at the site broker: `client_id`, or `backhaul-agent-{site}`. This
    /// default is the one agents have always used: the broker holds the persistent session's
    /// unacknowledged scans under it, and a new default would strand them at an upgrade.
    pub fn client_id(&self, site: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("backhaul-agent-{site}"))
    }
}

fn default_site_topic() -> String {
    "scans/{device}".into()
}

fn default_site_packet() -> ByteSize {
    ByteSize(64 << 10)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    pub host: String,
    pub port: u16,
    /// The MQTT version spoken to the broker.
    #[serde(default)]
    pub protocol: UplinkProtocol,
    /// Unique per agent; defaults to `backhaul-agent-{site}-uplink`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// This site's key (64 hex digits or more): batches are signed with it, and what the relay
    /// sends back must be signed with it. Set it on both sides (`security.site_keys` on the
    /// relay), or on neither.
    #[serde(default)]
    pub site_key: Option<SecretSource>,
    #[serde(default)]
    pub tls: Option<UplinkTls>,
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u16,
    /// At most this many events in one batch.
    #[serde(default = "default_batch_max_events")]
    pub batch_max_events: usize,
    /// At most about this many bytes of events in one batch (one event is always sent).
    #[serde(default = "default_batch_max_bytes")]
    pub batch_max_bytes: ByteSize,
    /// How batches are written: `zstd` (the default, a fraction of the events' size on the
    /// wire) or `none`, for relays older than compressed batches.
    #[serde(default)]
    pub compression: backhaul_events::Compression,
    /// How long a partly filled batch waits for more events before it is sent.
    #[serde(default = "default_linger_ms")]
    pub linger_ms: u64,
    /// Batches sent and not yet acknowledged by the relay.
    #[serde(default = "default_window")]
    pub window: usize,
    /// When no acknowledgement has come for this long while batches are in flight, every
    /// unacknowledged batch is sent again.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout_secs: u64,
    /// Reconnect back-off: the first wait, doubled with jitter up to the cap.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
}

impl UplinkConfig {
    /// The client id used at the uplink's broker: `client_id`, or `backhaul-agent-{site}-uplink`,
    /// distinct from the site broker's default so that both can share one broker without
    /// taking each other's session over. The uplink's session is a clean one, so a changed
    /// default strands nothing at the broker.
    pub fn client_id(&self, site: &str) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("backhaul-agent-{site}-uplink"))
    }
}

/// The MQTT version of the uplink: `"3.1.1"` (the default) or `"5"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UplinkProtocol {
    #[default]
    V311,
    V5,
}

impl UplinkProtocol {
    const EXPECTED: &str = "expected \"3.1.1\" or \"5\" (the MQTT version spoken to the broker)";
}

impl<'de> Deserialize<'de> for UplinkProtocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // A string only: `protocol = 5` would read as a number and 3.1.1 cannot be one.
        let text = String::deserialize(d)
            .map_err(|_| serde::de::Error::custom(UplinkProtocol::EXPECTED))?;
        match text.as_str() {
            "3.1.1" => Ok(UplinkProtocol::V311),
            "5" => Ok(UplinkProtocol::V5),
            other => Err(serde::de::Error::custom(format!(
                "unknown MQTT version {other:?}: {}",
                UplinkProtocol::EXPECTED
            ))),
        }
    }
}

fn default_keep_alive() -> u16 {
    30
}
fn default_batch_max_events() -> usize {
    2000
}
fn default_batch_max_bytes() -> ByteSize {
    ByteSize(1 << 20)
}
fn default_linger_ms() -> u64 {
    20
}
fn default_window() -> usize {
    16
}
fn default_ack_timeout() -> u64 {
    30
}
fn default_reconnect_min() -> u64 {
    200
}
fn default_reconnect_max() -> u64 {
    5_000
}

/// TLS to the broker: the CA that signs the broker's certificate, and for mutual TLS the
/// agent's certificate and key (PEM files).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkTls {
    pub ca_file: PathBuf,
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Disk quota for events not yet acknowledged by the relay. When reached, producers are
    /// refused (back-pressure) and an alarm is raised; nothing acknowledged is deleted.
    pub max_bytes: ByteSize,
    /// A durable flush happens at most this long after the first event starts waiting.
    pub group_commit_delay_ms: u64,
    /// At most this many events go into one flush.
    pub group_commit_max_events: usize,
    /// Page cache of the log's database.
    pub cache_size: ByteSize,
    /// How many rejected events are kept for inspection; the oldest go first.
    pub max_rejects: u64,
    /// Days the daily tally of accepted events is kept, for reconciliation with the ERP
    /// (`backhaul-relay reconcile`): per day and event type, the count and the sequence
    /// numbers, a few dozen bytes a day.
    pub tally_days: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            max_bytes: ByteSize(10 << 30),
            group_commit_delay_ms: 2,
            group_commit_max_events: 4096,
            cache_size: ByteSize(16 << 20),
            max_rejects: 10_000,
            tally_days: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Where scanners connect (MQTT 3.1.1 and 5). Leave out `listen` to turn MQTT ingest off.
    pub listen: Option<SocketAddr>,
    /// Topic scanners publish to; `{device}` matches one topic level, the device id.
    pub topic: String,
    pub max_connections: usize,
    pub max_packet_size: ByteSize,
    /// Keep-alive asked of clients that ask for none (0), and the largest one granted.
    pub max_keep_alive_secs: u16,
    /// How long a persistent session (3.1.1 clean session off, MQTT 5 session expiry) is kept
    /// after its client disconnects; MQTT 5 clients asking for longer are granted this.
    pub max_session_expiry_secs: u64,
    /// When true, a client may only publish to the topic of its own client id.
    pub own_device_topic_only: bool,
    /// Usernames and passwords of scanners; with neither these nor `password_file`, anonymous
    /// clients are accepted.
    pub users: Vec<MqttUser>,
    /// A Mosquitto password file (made with `mosquitto_passwd`) with more users.
    pub password_file: Option<PathBuf>,
    /// TLS for scanners (PEM files); without it the endpoint speaks plain MQTT.
    pub tls: Option<MqttTls>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// The endpoint's certificate chain.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// When set, clients must present a certificate signed by this CA.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            listen: None,
            topic: "scans/{device}".into(),
            max_connections: 1000,
            max_packet_size: ByteSize(64 << 10),
            max_keep_alive_secs: 300,
            max_session_expiry_secs: DEFAULT_MAX_SESSION_EXPIRY.as_secs(),
            own_device_topic_only: false,
            users: Vec::new(),
            password_file: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttUser {
    pub username: String,
    pub password: SecretSource,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where the WMS posts events (`/healthz` and `/readyz` answer here too).
    pub listen: SocketAddr,
    /// Bearer token required on `POST /v1/events`; none means no authentication.
    pub token: Option<SecretSource>,
    /// Connections served at once; the ones over it are answered 503 and closed at once, so
    /// that slow clients cannot use up the process's file descriptors (MQTT shares them).
    pub max_connections: usize,
    /// A request's line and headers must arrive within this of the connection opening or of
    /// the previous answer, which also bounds how long a kept-alive connection stays idle.
    pub header_timeout_secs: u64,
    /// A request's body must arrive within this of its headers, however it trickles.
    pub body_timeout_secs: u64,
    /// A connection on which no byte moves either way for this long, while the agent is not
    /// working on one of its requests, is closed.
    pub idle_timeout_secs: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8787)),
            token: None,
            max_connections: 256,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            idle_timeout_secs: 60,
        }
    }
}

impl HttpConfig {
    fn check(&self, file: &Path) -> Result<(), ConfigError> {
        check_listener_limits(
            file,
            "http",
            self.max_connections,
            [
                ("header_timeout_secs", self.header_timeout_secs),
                ("body_timeout_secs", self.body_timeout_secs),
                ("idle_timeout_secs", self.idle_timeout_secs),
            ],
        )
    }
}

/// The agent's `[admin]` section; its admin API listens on 127.0.0.1:8789 unless told otherwise.
/// The agent has nothing an operator changes through it, so its write token only reads.
#[derive(Debug, Clone)]
pub struct AgentAdmin;

impl AdminDefaults for AgentAdmin {
    const PORT: u16 = 8789;
}

pub type AdminConfig = AdminListenerConfig<AgentAdmin>;

/// The configuration with its secrets read, ready to run.
#[derive(Debug, Clone)]
pub struct LoadedAgentConfig {
    pub file: PathBuf,
    pub config: AgentConfig,
    pub http_token: Option<Secret>,
    /// `admin.read_token` and `admin.write_token`, read.
    pub admin_access: AdminAccess,
    pub mqtt_users: MqttUsers,
    pub uplink_password: Option<Secret>,
    pub site_broker_password: Option<Secret>,
    /// `uplink.site_key`, read.
    pub site_key: Option<SiteKeys>,
}

impl AgentConfig {
    /// Loads, checks and resolves the secrets of an agent configuration file.
    pub fn load(file: &Path) -> Result<LoadedAgentConfig, ConfigError> {
        let config: AgentConfig = load_toml_file(file)?;
        config.check(file)?;
        let admin_access = config.admin.load_access(file)?;
        let http_token = match &config.http.token {
            Some(source) => Some(source.resolve().map_err(|e| {
                ConfigError::invalid(file, "http.token", format!("a readable secret: {e}"))
            })?),
            None => None,
        };
        let mut mqtt_users = MqttUsers::default();
        for (i, user) in config.mqtt.users.iter().enumerate() {
            let secret = user.password.resolve().map_err(|e| {
                ConfigError::invalid(
                    file,
                    &format!("mqtt.users[{i}].password"),
                    format!("a readable secret: {e}"),
                )
            })?;
            mqtt_users.add_secret(&user.username, secret).map_err(|e| {
                ConfigError::invalid(
                    file,
                    &format!("mqtt.users[{i}].username"),
                    format!("each username once: {e}"),
                )
            })?;
        }
        if let Some(path) = &config.mqtt.password_file {
            let hashes = crate::passwd::load(path).map_err(|e| {
                ConfigError::invalid(
                    file,
                    "mqtt.password_file",
                    format!("a Mosquitto password file: {}: {e}", path.display()),
                )
            })?;
            mqtt_users.add_hashes(hashes).map_err(|e| {
                ConfigError::invalid(
                    file,
                    "mqtt.password_file",
                    format!("users not also in mqtt.users: {}: {e}", path.display()),
                )
            })?;
        }
        let uplink_password = match config.uplink.as_ref().and_then(|u| u.password.as_ref()) {
            Some(source) => Some(source.resolve().map_err(|e| {
                ConfigError::invalid(file, "uplink.password", format!("a readable secret: {e}"))
            })?),
            None => None,
        };
        let site_broker_password = match config
            .site_broker
            .as_ref()
            .and_then(|b| b.password.as_ref())
        {
            Some(source) => Some(source.resolve().map_err(|e| {
                ConfigError::invalid(
                    file,
                    "site_broker.password",
                    format!("a readable secret: {e}"),
                )
            })?),
            None => None,
        };
        let site_key = match config.uplink.as_ref().and_then(|u| u.site_key.as_ref()) {
            Some(source) => {
                let key = source.resolve().map_err(|e| {
                    ConfigError::invalid(file, "uplink.site_key", format!("a readable secret: {e}"))
                })?;
                Some(SiteKeys::from_hex(&[key.expose()]).map_err(|e| {
                    ConfigError::invalid(file, "uplink.site_key", e.replace("key 1: ", ""))
                })?)
            }
            None => None,
        };
        Ok(LoadedAgentConfig {
            file: file.to_path_buf(),
            config,
            http_token,
            admin_access,
            mqtt_users,
            uplink_password,
            site_broker_password,
            site_key,
        })
    }

    fn check(&self, file: &Path) -> Result<(), ConfigError> {
        check_site_id(&self.site).map_err(|e| ConfigError::invalid(file, "site", e))?;
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(file, "state_dir", "a directory path"));
        }
        let admin = self.admin.listen;
        if admin == self.http.listen || Some(admin) == self.mqtt.listen {
            return Err(ConfigError::invalid(
                file,
                "admin.listen",
                format!("an address of its own ({admin} is also http.listen or mqtt.listen)"),
            ));
        }
        if self.log.max_bytes.0 < 1 << 20 {
            return Err(ConfigError::invalid(
                file,
                "log.max_bytes",
                "at least 1 MiB",
            ));
        }
        if self.log.group_commit_delay_ms > 1000 {
            return Err(ConfigError::invalid(
                file,
                "log.group_commit_delay_ms",
                "at most 1000 (milliseconds); a few milliseconds is typical",
            ));
        }
        if self.log.group_commit_max_events == 0 {
            return Err(ConfigError::invalid(
                file,
                "log.group_commit_max_events",
                "at least 1",
            ));
        }
        if !(1..=366).contains(&self.log.tally_days) {
            return Err(ConfigError::invalid(
                file,
                "log.tally_days",
                "from 1 to 366 (days)",
            ));
        }
        check_device_topic(file, "mqtt.topic", &self.mqtt.topic)?;
        if let Some(site_broker) = &self.site_broker {
            if site_broker.host.is_empty() {
                return Err(ConfigError::invalid(
                    file,
                    "site_broker.host",
                    "a host name or address",
                ));
            }
            if site_broker.password.is_some() && site_broker.username.is_none() {
                return Err(ConfigError::invalid(
                    file,
                    "site_broker.username",
                    "a username when site_broker.password is set",
                ));
            }
            check_device_topic(file, "site_broker.topic", &site_broker.topic)?;
        }
        self.http.check(file)?;
        if self.mqtt.max_connections == 0 {
            return Err(ConfigError::invalid(
                file,
                "mqtt.max_connections",
                "at least 1",
            ));
        }
        if !(1..=MAX_SESSION_EXPIRY_SECS).contains(&self.mqtt.max_session_expiry_secs) {
            return Err(ConfigError::invalid(
                file,
                "mqtt.max_session_expiry_secs",
                format!("1 to {MAX_SESSION_EXPIRY_SECS} (seconds; 604800 is a week)"),
            ));
        }
        if let Some(uplink) = &self.uplink {
            uplink.check(file)?;
        }
        self.check_client_ids(file)?;
        let packet = self.mqtt.max_packet_size.0;
        if !(1024..=256 << 20).contains(&packet) {
            return Err(ConfigError::invalid(
                file,
                "mqtt.max_packet_size",
                "between 1 KiB and 256 MiB",
            ));
        }
        Ok(())
    }

    /// The uplink and the site broker on one broker must not share a client id: the broker
    /// would close one connection each time the other connects, and neither would keep a link.
    fn check_client_ids(&self, file: &Path) -> Result<(), ConfigError> {
        let (Some(uplink), Some(site_broker)) = (&self.uplink, &self.site_broker) else {
            return Ok(());
        };
        // Names are compared as written: resolving them here would make the check depend on
        // DNS at the time it runs.
        let same_broker =
            uplink.port == site_broker.port && uplink.host.eq_ignore_ascii_case(&site_broker.host);
        let id = uplink.client_id(&self.site);
        if !same_broker || id != site_broker.client_id(&self.site) {
            return Ok(());
        }
        let named = |key: &str, explicit: bool| {
            if explicit {
                key.to_string()
            } else {
                format!("{key} (by default)")
            }
        };
        Err(ConfigError::invalid(
            file,
            "site_broker.client_id",
            format!(
                "a client id other than uplink.client_id's: {} and {} are both {id:?} on {}:{}; \
                 a broker keeps one connection per client id, so the uplink and the site broker \
                 would keep taking each other's session over: give them different ids",
                named("uplink.client_id", uplink.client_id.is_some()),
                named("site_broker.client_id", site_broker.client_id.is_some()),
                uplink.host,
                uplink.port
            ),
        ))
    }
}

/// A topic pattern with one whole `{device}` level and no wildcards.
fn check_device_topic(file: &Path, key: &str, topic: &str) -> Result<(), ConfigError> {
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.iter().filter(|l| **l == "{device}").count() != 1
        || topic.contains(['+', '#'])
        || levels
            .iter()
            .any(|l| l.is_empty() || (l.contains("{device}") && *l != "{device}"))
    {
        return Err(ConfigError::invalid(
            file,
            key,
            "a topic with exactly one whole level `{device}` and no wildcards, like \"scans/{device}\"",
        ));
    }
    Ok(())
}

impl UplinkConfig {
    fn check(&self, file: &Path) -> Result<(), ConfigError> {
        if self.host.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "uplink.host",
                "a host name or address",
            ));
        }
        if self.password.is_some() && self.username.is_none() {
            return Err(ConfigError::invalid(
                file,
                "uplink.username",
                "a username when uplink.password is set",
            ));
        }
        if !(1..=10_000).contains(&self.batch_max_events) {
            return Err(ConfigError::invalid(
                file,
                "uplink.batch_max_events",
                "1 to 10000",
            ));
        }
        if !(16 << 10..=4 << 20).contains(&self.batch_max_bytes.0) {
            return Err(ConfigError::invalid(
                file,
                "uplink.batch_max_bytes",
                "between 16 KiB and 4 MiB",
            ));
        }
        if !(1..=1000).contains(&self.window) {
            return Err(ConfigError::invalid(
                file,
                "uplink.window",
                "1 to 1000 batches",
            ));
        }
        if self.ack_timeout_secs == 0 {
            return Err(ConfigError::invalid(
                file,
                "uplink.ack_timeout_secs",
                "at least 1",
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_max_ms < self.reconnect_min_ms {
            return Err(ConfigError::invalid(
                file,
                "uplink.reconnect_max_ms",
                "reconnect_min_ms > 0 and reconnect_max_ms >= reconnect_min_ms",
            ));
        }
        if let Some(tls) = &self.tls
            && tls.client_cert_file.is_some() != tls.client_key_file.is_some()
        {
            return Err(ConfigError::invalid(
                file,
                "uplink.tls",
                "client_cert_file and client_key_file together, or neither",
            ));
        }
        Ok(())
    }
}
