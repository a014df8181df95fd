//! The relay's configuration file: its shape, defaults and the checks made at start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backhaul_events::config::{
    AdminAccess, AdminDefaults, AdminListenerConfig, ByteSize, ConfigError, Secret, SecretSource,
    load_toml_file,
};
use backhaul_events::signing::Keyring;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Where the outbox lives.
    pub state_dir: PathBuf,
    pub broker: BrokerConfig,
    #[serde(default)]
    pub outbox: OutboxConfig,
    pub sink: SinkConfig,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub security: SecurityConfig,
}

/// `[security]`: who may write as which site.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// The sites' keys, a TOML table of site id = hex key (or two while rotating). With it,
    /// every frame from a site must be signed with its key, and unknown sites are refused.
    pub site_keys: Option<SecretSource>,
}

/// How the outbox drains to the connector.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Connector calls in flight at once (the ledger always uses one).
    pub concurrency: usize,
    /// Events in one connector call at most, each the head of a different ordering key.
    pub max_batch: usize,
    /// Token-bucket rate limit in events per second, and the burst it allows.
    pub rate_per_sec: f64,
    pub burst: u32,
    /// Retry back-off of a key after a transient failure: starts here, doubles with jitter.
    pub retry_min_ms: u64,
    pub retry_max_ms: u64,
    /// After this many calls in a row fail transiently, the connector pauses and probes with
    /// one event at a time instead of hammering the ERP.
    pub pause_after_failures: u32,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            concurrency: 4,
            max_batch: 50,
            rate_per_sec: 100.0,
            burst: 200,
            retry_min_ms: 1000,
            retry_max_ms: 300_000,
            pause_after_failures: 5,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub host: String,
    pub port: u16,
    /// Start an in-process broker on `host:port` so one machine needs nothing else.
    #[serde(default)]
    pub embedded: bool,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<SecretSource>,
    /// When set, subscribe through `$share/{group}/...` so several relays split the sites.
    #[serde(default)]
    pub shared_group: Option<String>,
    /// Largest batch frame accepted.
    #[serde(default = "default_max_frame_size")]
    pub max_frame_size: ByteSize,
    /// With `embedded`, the logins the embedded broker takes (the agents'); it takes no
    /// anonymous client.
    #[serde(default)]
    pub users: Vec<BrokerUser>,
}

/// One login of the embedded broker.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerUser {
    pub username: String,
    pub password: SecretSource,
}

/// The username of the login the relay makes for itself on its embedded broker when the file
/// names none; its password is new at every start.
pub const EMBEDDED_SELF_USERNAME: &str = "backhaul-relay-self";

fn default_client_id() -> String {
    "backhaul-relay".into()
}

fn default_max_frame_size() -> ByteSize {
    ByteSize(8 << 20)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    /// Where the outbox lives: `redb`, a file on this relay's disk, or `postgres`, shared by
    /// every relay of the fleet.
    pub backend: OutboxBackend,
    /// The PostgreSQL connection (`backend = "postgres"`): a URL or key=value parameters,
    /// without the password.
    pub url: Option<String>,
    pub password: Option<SecretSource>,
    /// How long a relay that stopped renewing its lease keeps a key before another relay
    /// takes it over (`backend = "postgres"`): longer than a connector call may take.
    pub lease_secs: u64,
    /// Connections to PostgreSQL this relay opens at most.
    pub connections: usize,
    pub cache_size: ByteSize,
    /// How many event ids are remembered to drop repeats (about 130 bytes of disk and 9 of
    /// memory each).
    pub dedup_ids: u64,
    /// Days what became of each delivered or dead-lettered event is kept for `trace` (its
    /// attempts, the ERP's answers and reference); 0 keeps none.
    pub trace_days: u64,
    /// Disk cap for waiting events and dead letters. When reached, batches are refused and the
    /// agents keep their events until deliveries make room; nothing stored is dropped.
    pub max_bytes: ByteSize,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        OutboxConfig {
            backend: OutboxBackend::Redb,
            url: None,
            password: None,
            lease_secs: 30,
            connections: 4,
            cache_size: ByteSize(16 << 20),
            dedup_ids: 1_000_000,
            trace_days: 7,
            max_bytes: ByteSize(20 << 30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxBackend {
    Redb,
    Postgres,
}

/// Exactly one connector section: `[sink.ledger]`, `[sink.http]` or `[sink.tryton]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub ledger: Option<LedgerConfig>,
    pub http: Option<crate::connector::http::HttpConfig>,
    pub tryton: Option<crate::connector::tryton::TrytonConfig>,
    pub epcis: Option<crate::connector::epcis::EpcisConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// The JSONL file each event is appended to once.
    pub path: PathBuf,
}

/// The relay's `[admin]` section; its admin API listens on 127.0.0.1:8788 unless told otherwise.
#[derive(Debug, Clone)]
pub struct RelayAdmin;

impl AdminDefaults for RelayAdmin {
    const PORT: u16 = 8788;
}

pub type AdminConfig = AdminListenerConfig<RelayAdmin>;

/// The configuration with its secrets read, ready to run.
#[derive(Debug, Clone)]
pub struct LoadedRelayConfig {
    pub file: PathBuf,
    pub config: RelayConfig,
    /// The relay's own login to the broker: `broker.username` and `broker.password`, or with
    /// the embedded broker and no username, one made for this run.
    pub broker_login: Option<(String, Secret)>,
    /// The logins the embedded broker takes: `broker.users` and the relay's own.
    pub embedded_logins: HashMap<String, Secret>,
    /// `security.site_keys`, read.
    pub site_keys: Option<Arc<Keyring>>,
    /// `admin.read_token` and `admin.write_token`, read.
    pub admin_access: AdminAccess,
    /// `outbox.password`, read.
    pub outbox_password: Option<Secret>,
}

impl RelayConfig {
    /// Loads, checks and resolves the secrets of a relay configuration file.
    pub fn load(file: &Path) -> Result<LoadedRelayConfig, ConfigError> {
        let config: RelayConfig = load_toml_file(file)?;
        config.check(file)?;
        let admin_access = config.admin.load_access(file)?;
        let outbox_password = match &config.outbox.password {
            Some(source) => Some(source.resolve().map_err(|e| {
                ConfigError::invalid(file, "outbox.password", format!("a readable secret: {e}"))
            })?),
            None => None,
        };
        let broker_password = match &config.broker.password {
            Some(source) => Some(source.resolve().map_err(|e| {
                ConfigError::invalid(file, "broker.password", format!("a readable secret: {e}"))
            })?),
            None => None,
        };
        let mut broker_login = config
            .broker
            .username
            .clone()
            .map(|user| (user, broker_password.unwrap_or_else(|| Secret::new(""))));
        let mut embedded_logins = HashMap::new();
        for (i, user) in config.broker.users.iter().enumerate() {
            let password = user.password.resolve().map_err(|e| {
                ConfigError::invalid(
                    file,
                    &format!("broker.users[{i}].password"),
                    format!("a readable secret: {e}"),
                )
            })?;
            if password.expose().is_empty() {
                return Err(ConfigError::invalid(
                    file,
                    &format!("broker.users[{i}].password"),
                    "a password that is not empty",
                ));
            }
            let taken = embedded_logins.insert(user.username.clone(), password);
            if taken.is_some()
                || user.username == EMBEDDED_SELF_USERNAME
                || user.username.is_empty()
            {
                return Err(ConfigError::invalid(
                    file,
                    &format!("broker.users[{i}].username"),
                    format!(
                        "a username that is not empty, given once, and not \
                         {EMBEDDED_SELF_USERNAME:?} (the relay's own)"
                    ),
                ));
            }
        }
        if config.broker.embedded {
            let own = broker_login.get_or_insert_with(|| {
                let password = format!("{:032x}", rand::random::<u128>());
                (EMBEDDED_SELF_USERNAME.to_string(), Secret::new(password))
            });
            if embedded_logins.contains_key(&own.0) {
                return Err(ConfigError::invalid(
                    file,
                    "broker.username",
                    "a username that is not also in broker.users (the relay's own login)",
                ));
            }
            embedded_logins.insert(own.0.clone(), own.1.clone());
        }
        let site_keys = match &config.security.site_keys {
            Some(source) => {
                let text = source.resolve().map_err(|e| {
                    ConfigError::invalid(
                        file,
                        "security.site_keys",
                        format!("a readable secret: {e}"),
                    )
                })?;
                let ring = Keyring::from_toml(text.expose()).map_err(|e| {
                    ConfigError::invalid(
                        file,
                        "security.site_keys",
                        format!("site = hex key lines: {e}"),
                    )
                })?;
                Some(Arc::new(ring))
            }
            None => None,
        };
        Ok(LoadedRelayConfig {
            file: file.to_path_buf(),
            config,
            broker_login,
            embedded_logins,
            site_keys,
            admin_access,
            outbox_password,
        })
    }

    fn check(&self, file: &Path) -> Result<(), ConfigError> {
        if self.state_dir.as_os_str().is_empty() {
            return Err(ConfigError::invalid(file, "state_dir", "a directory path"));
        }
        match (self.outbox.backend, &self.outbox.url) {
            (OutboxBackend::Postgres, None) => {
                return Err(ConfigError::invalid(
                    file,
                    "outbox.url",
                    "the PostgreSQL connection with backend = \"postgres\", like \
                     \"postgresql://backhaul@db.example.com/backhaul\"",
                ));
            }
            (OutboxBackend::Redb, Some(_)) => {
                return Err(ConfigError::invalid(
                    file,
                    "outbox.url",
                    "no url with backend = \"redb\" (the outbox is a file in state_dir); set \
                     backend = \"postgres\" to use it",
                ));
            }
            (OutboxBackend::Postgres, Some(url)) => {
                if let Err(e) = url.parse::<postgres::Config>() {
                    return Err(ConfigError::invalid(
                        file,
                        "outbox.url",
                        format!("a PostgreSQL connection URL or key=value parameters: {e}"),
                    ));
                }
                if self.broker.shared_group.is_some() && self.sink.ledger.is_some() {
                    return Err(ConfigError::invalid(
                        file,
                        "sink.ledger",
                        "another connector when relays share batches (broker.shared_group): \
                         the ledger is a file on one relay's disk, and each relay would write \
                         its own",
                    ));
                }
            }
            (OutboxBackend::Redb, None) => {}
        }
        if !(5..=3600).contains(&self.outbox.lease_secs) {
            return Err(ConfigError::invalid(
                file,
                "outbox.lease_secs",
                "5 to 3600 (seconds; longer than a connector call may take)",
            ));
        }
        if !(2..=64).contains(&self.outbox.connections) {
            return Err(ConfigError::invalid(
                file,
                "outbox.connections",
                "2 to 64 (connections to PostgreSQL)",
            ));
        }
        if !(1..=1_000_000_000).contains(&self.outbox.dedup_ids) {
            return Err(ConfigError::invalid(
                file,
                "outbox.dedup_ids",
                "1 to 1000000000 (event ids remembered; about 9 bytes of memory each)",
            ));
        }
        if self.outbox.trace_days > 3660 {
            return Err(ConfigError::invalid(
                file,
                "outbox.trace_days",
                "0 to 3660 (days each delivered event's trace is kept; 0 keeps none)",
            ));
        }
        if self.outbox.max_bytes.0 < 64 << 10 {
            return Err(ConfigError::invalid(
                file,
                "outbox.max_bytes",
                "at least 64 KiB",
            ));
        }
        if self.broker.host.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "broker.host",
                "a host name or address",
            ));
        }
        if self.broker.client_id.is_empty() || self.broker.client_id.len() > 128 {
            return Err(ConfigError::invalid(
                file,
                "broker.client_id",
                "1 to 128 characters",
            ));
        }
        if let Some(group) = &self.broker.shared_group
            && (group.is_empty() || group.contains(['/', '+', '#']))
        {
            return Err(ConfigError::invalid(
                file,
                "broker.shared_group",
                "a name without '/', '+' or '#'",
            ));
        }
        if self.broker.embedded && self.broker.users.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "broker.users",
                "at least one login for the agents with broker.embedded = true (the embedded \
                 broker takes no anonymous client): users = [{ username = \"...\", password = \
                 { file = \"...\" } }]",
            ));
        }
        if !self.broker.embedded && !self.broker.users.is_empty() {
            return Err(ConfigError::invalid(
                file,
                "broker.users",
                "no users unless broker.embedded = true (an external broker keeps its own)",
            ));
        }
        if self.broker.password.is_some() && self.broker.username.is_none() {
            return Err(ConfigError::invalid(
                file,
                "broker.username",
                "a username when broker.password is set",
            ));
        }
        if !(64 << 10..=256 << 20).contains(&self.broker.max_frame_size.0) {
            return Err(ConfigError::invalid(
                file,
                "broker.max_frame_size",
                "between 64 KiB and 256 MiB",
            ));
        }
        let connectors = [
            self.sink.ledger.is_some(),
            self.sink.http.is_some(),
            self.sink.tryton.is_some(),
            self.sink.epcis.is_some(),
        ];
        if connectors.iter().filter(|c| **c).count() != 1 {
            return Err(ConfigError::invalid(
                file,
                "sink",
                "exactly one connector section: [sink.ledger], [sink.http], [sink.tryton] or \
                 [sink.epcis]",
            ));
        }
        if let Some(http) = &self.sink.http {
            http.check(file)?;
        }
        if let Some(epcis) = &self.sink.epcis {
            epcis.check(file)?;
        }
        let d = &self.delivery;
        if !(1..=256).contains(&d.concurrency) {
            return Err(ConfigError::invalid(
                file,
                "delivery.concurrency",
                "1 to 256",
            ));
        }
        if !(1..=10_000).contains(&d.max_batch) {
            return Err(ConfigError::invalid(
                file,
                "delivery.max_batch",
                "1 to 10000",
            ));
        }
        if d.rate_per_sec.is_nan() || d.rate_per_sec <= 0.0 || d.burst == 0 {
            return Err(ConfigError::invalid(
                file,
                "delivery.rate_per_sec",
                "a rate above 0 and a burst of at least 1",
            ));
        }
        if d.retry_min_ms == 0 || d.retry_max_ms < d.retry_min_ms {
            return Err(ConfigError::invalid(
                file,
                "delivery.retry_max_ms",
                "retry_min_ms > 0 and retry_max_ms >= retry_min_ms",
            ));
        }
        Ok(())
    }
}
