//! The configuration vocabulary both services share: loading a TOML file so that every error
//! names the file, the key and what was expected; secrets that come from a file, an
//! environment variable or systemd credentials and never print; and byte sizes with units.

use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

/// A configuration problem, precise enough to fix without reading the source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read the configuration: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}{line}: {message}", line = line_suffix(*.line))]
    Syntax {
        file: PathBuf,
        line: Option<usize>,
        message: String,
    },
    #[error("{file}{line}: key `{key}`: {message}", line = line_suffix(*.line))]
    Key {
        file: PathBuf,
        line: Option<usize>,
        key: String,
        message: String,
    },
}

fn line_suffix(line: Option<usize>) -> String {
    line.map(|l| format!(":{l}")).unwrap_or_default()
}

impl ConfigError {
    /// A value that parsed but breaks a rule the type cannot express.
    pub fn invalid(file: &Path, key: &str, expected: impl fmt::Display) -> ConfigError {
        ConfigError::Key {
            file: file.to_path_buf(),
            line: None,
            key: key.to_string(),
            message: format!("expected {expected}"),
        }
    }
}

/// Reads and deserializes a TOML file; unknown keys are errors when `T` denies them.
pub fn load_toml_file<T: DeserializeOwned>(file: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        file: file.to_path_buf(),
        source,
    })?;
    parse_toml(file, &text)
}

/// Deserializes TOML text; `file` is only used to name the source in errors.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> Result<T, ConfigError> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
        file: file.to_path_buf(),
        line: line_of(e.span()),
        message: e.message().trim().to_string(),
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.message().trim().to_string();
        if key == "." || key.is_empty() {
            ConfigError::Syntax {
                file: file.to_path_buf(),
                line: line_of(inner.span()),
                message,
            }
        } else {
            ConfigError::Key {
                file: file.to_path_buf(),
                line: line_of(inner.span()),
                key,
                message,
            }
        }
    })
}

/// Where a secret comes from: `{ file = "..." }` (a path, where `$CREDENTIALS_DIRECTORY` is
/// expanded for systemd's `LoadCredential=`), `{ env = "VAR" }`, or `{ value = "..." }`.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretSource {
    File(String),
    Env(String),
    Value(String),
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::File(path) => write!(f, "file {path:?}"),
            SecretSource::Env(var) => write!(f, "env {var:?}"),
            SecretSource::Value(_) => f.write_str("inline value"),
        }
    }
}

impl SecretSource {
    /// Reads the secret; the error says where it looked, never what it found.
    pub fn resolve(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Value(value) => Ok(Secret(value.clone())),
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret)
                .map_err(|_| format!("the environment variable {var} is not set")),
            SecretSource::File(path) => {
                let path = expand_credentials_dir(path)?;
                std::fs::read_to_string(&path)
                    .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
                    .map_err(|e| format!("cannot read the secret file {}: {e}", path.display()))
            }
        }
    }
}

fn expand_credentials_dir(path: &str) -> Result<PathBuf, String> {
    for pattern in ["${CREDENTIALS_DIRECTORY}", "$CREDENTIALS_DIRECTORY"] {
        if path.contains(pattern) {
            let dir = std::env::var("CREDENTIALS_DIRECTORY").map_err(|_| {
                format!(
                    "{path} names $CREDENTIALS_DIRECTORY, which is not set (systemd sets it \
                     for units with LoadCredential=)"
                )
            })?;
            return Ok(PathBuf::from(path.replace(pattern, &dir)));
        }
    }
    Ok(PathBuf::from(path))
}

/// A resolved secret. It prints as `<redacted>` so it cannot leak into logs or config dumps.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret, in time that does not depend on where they differ.
    pub fn matches(&self, given: &str) -> bool {
        let expected = self.0.as_bytes();
        expected.len() == given.len()
            && expected
                .iter()
                .zip(given.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A number of bytes, written as an integer or with a unit: `"64 MiB"`, `"10GB"`, `"512k"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("{text:?} is not a size like 1048576, \"64 MiB\" or \"10 GB\""))?;
        let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1_000,
            "kib" => 1 << 10,
            "m" | "mb" => 1_000_000,
            "mib" => 1 << 20,
            "g" | "gb" => 1_000_000_000,
            "gib" => 1 << 30,
            "t" | "tb" => 1_000_000_000_000,
            "tib" => 1 << 40,
            other => {
                return Err(format!(
                    "unknown size unit {other:?}: expected B, kB, KiB, MB, MiB, GB, GiB, TB or TiB"
                ));
            }
        };
        number
            .checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("{text:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u64); 4] = [
            ("TiB", 1 << 40),
            ("GiB", 1 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
        ];
        for (name, size) in UNITS {
            if self.0 >= size && self.0.checked_rem(size) == Some(0) {
                return write!(f, "{} {name}", self.0 / size);
            }
        }
        write!(f, "{} B", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a size: a number of bytes or a string like \"64 MiB\"",
            )
        })? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(text) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
        }
    }
}

/// Catches a slip of a few zeros before it lets HTTP clients take the descriptors that the
/// process's other listeners and its storage need.
const MAX_LISTENER_CONNECTIONS: usize = 65_536;
/// A slow client held longer than an hour is not a client worth waiting for.
const MAX_LISTENER_TIMEOUT_SECS: u64 = 3600;

/// Checks the connection cap and the deadlines of an HTTP listener's section (`http` on the
/// agent, `admin` on the relay): `timeouts` are the keys' names after the section and their
/// values in seconds.
pub fn check_listener_limits(
    file: &Path,
    section: &str,
    max_connections: usize,
    timeouts: [(&str, u64); 3],
) -> Result<(), ConfigError> {
    if !(1..=MAX_LISTENER_CONNECTIONS).contains(&max_connections) {
        return Err(ConfigError::invalid(
            file,
            &format!("{section}.max_connections"),
            format!("1 to {MAX_LISTENER_CONNECTIONS} (connections served at once)"),
        ));
    }
    for (key, secs) in timeouts {
        if !(1..=MAX_LISTENER_TIMEOUT_SECS).contains(&secs) {
            return Err(ConfigError::invalid(
                file,
                &format!("{section}.{key}"),
                format!("1 to {MAX_LISTENER_TIMEOUT_SECS} (seconds)"),
            ));
        }
    }
    Ok(())
}

/// The admin listener of either service (`[admin]`): where the operator's API answers, who may
/// read it and who may change things, and the limits on its connections. `DEFAULT_PORT` is
/// the service's own ([`AdminDefaults`]: the agent's 8789, the relay's 8788); the default address is loopback, so
/// an admin API reachable from the network is always a choice written in the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default, bound(deserialize = "S: AdminDefaults"))]
pub struct AdminListenerConfig<S: AdminDefaults> {
    #[serde(skip)]
    service: PhantomData<S>,
    pub listen: SocketAddr,
    /// Bearer token that reads (status, events, rejects, dead letters, metrics).
    pub read_token: Option<SecretSource>,
    /// Bearer token that reads and changes (dead-letter replay and discard).
    pub write_token: Option<SecretSource>,
    /// Connections served at once; the ones over it are answered 503 and closed at once.
    pub max_connections: usize,
    /// A request's line and headers must arrive within this of the connection opening or of
    /// the previous answer, which also bounds how long a kept-alive connection stays idle.
    pub header_timeout_secs: u64,
    /// A request's body must arrive within this of its headers, however it trickles.
    pub body_timeout_secs: u64,
    /// A connection on which no byte moves either way for this long, while the service is not
    /// working on one of its requests, is closed.
    pub idle_timeout_secs: u64,
}

/// What differs between the services' admin listeners.
pub trait AdminDefaults: fmt::Debug + Clone {
    /// The loopback port the admin API listens on when `admin.listen` is left out.
    const PORT: u16;
}

impl<S: AdminDefaults> Default for AdminListenerConfig<S> {
    fn default() -> Self {
        AdminListenerConfig {
            service: PhantomData,
            listen: SocketAddr::from(([127, 0, 0, 1], S::PORT)),
            read_token: None,
            write_token: None,
            max_connections: 256,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            idle_timeout_secs: 60,
        }
    }
}

impl<S: AdminDefaults> AdminListenerConfig<S> {
    /// Checks the section's limits and reads its tokens. A listener off loopback without a
    /// read token is refused: anyone who reached it would read every event.
    pub fn load_access(&self, file: &Path) -> Result<AdminAccess, ConfigError> {
        check_listener_limits(
            file,
            "admin",
            self.max_connections,
            [
                ("header_timeout_secs", self.header_timeout_secs),
                ("body_timeout_secs", self.body_timeout_secs),
                ("idle_timeout_secs", self.idle_timeout_secs),
            ],
        )?;
        let read = |key: &str, source: &Option<SecretSource>| match source {
            Some(source) => match source.resolve() {
                Ok(token) if token.expose().is_empty() => {
                    Err(ConfigError::invalid(file, key, "a token that is not empty"))
                }
                Ok(token) => Ok(Some(token)),
                Err(e) => Err(ConfigError::invalid(
                    file,
                    key,
                    format!("a readable secret: {e}"),
                )),
            },
            None => Ok(None),
        };
        let access = AdminAccess {
            read: read("admin.read_token", &self.read_token)?,
            write: read("admin.write_token", &self.write_token)?,
        };
        if !self.listen.ip().is_loopback() && access.read.is_none() && access.write.is_none() {
            return Err(ConfigError::invalid(
                file,
                "admin.read_token",
                format!(
                    "a token, because admin.listen ({}) is not a loopback address and the admin \
                     API hands out every event to whoever reaches it (set admin.write_token too \
                     for dead-letter replay and discard)",
                    self.listen
                ),
            ));
        }
        Ok(access)
    }
}

/// What an admin request may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRight {
    Read,
    Write,
}

/// The admin API's tokens, read. With neither, every request may read and write (only allowed
/// on a loopback listener); otherwise a request needs a token, and writes need the write token.
#[derive(Debug, Clone, Default)]
pub struct AdminAccess {
    read: Option<Secret>,
    write: Option<Secret>,
}

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// No token, or one this service does not know: HTTP 401.
    Unauthenticated,
    /// A read token on a write: HTTP 403.
    ReadOnly,
}

impl AdminAccess {
    pub fn new(read: Option<Secret>, write: Option<Secret>) -> AdminAccess {
        AdminAccess { read, write }
    }

    /// Whether any token is required at all.
    pub fn is_open(&self) -> bool {
        self.read.is_none() && self.write.is_none()
    }

    /// Decides a request that presented `bearer` (the token after `Bearer `, if any).
    pub fn allows(&self, right: AdminRight, bearer: Option<&str>) -> Result<(), AdminRefusal> {
        if self.is_open() {
            return Ok(());
        }
        let given = bearer.ok_or(AdminRefusal::Unauthenticated)?;
        if self.write.as_ref().is_some_and(|t| t.matches(given)) {
            return Ok(());
        }
        if self.read.as_ref().is_some_and(|t| t.matches(given)) {
            return match right {
                AdminRight::Read => Ok(()),
                AdminRight::Write => Err(AdminRefusal::ReadOnly),
            };
        }
        Err(AdminRefusal::Unauthenticated)
    }

    /// The token an operator command on this machine sends: the write token when there is one,
    /// since it also reads.
    pub fn client_token(&self) -> Option<&Secret> {
        self.write.as_ref().or(self.read.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        #[allow(dead_code)]
        name: String,
        inner: Inner,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        size: ByteSize,
        #[allow(dead_code)]
        #[serde(default)]
        token: Option<SecretSource>,
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(ByteSize::parse("64 MiB"), Ok(ByteSize(64 << 20)));
        assert_eq!(ByteSize::parse("10GB"), Ok(ByteSize(10_000_000_000)));
        assert_eq!(ByteSize::parse("512"), Ok(ByteSize(512)));
        assert!(ByteSize::parse("12 parsecs").is_err());
        assert_eq!(ByteSize(64 << 20).to_string(), "64 MiB");
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let file = Path::new("agent.toml");
        let err = parse_toml::<Sample>(file, "name = \"x\"\n[inner]\nsize = \"3 parsecs\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agent.toml:3: key `inner.size`"), "{err}");
        assert!(err.contains("unknown size unit"), "{err}");

        let err = parse_toml::<Sample>(file, "name = \"x\"\n[inner]\nsize = 1\nsise = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `sise`"), "{err}");
        assert!(err.contains("key `inner"), "{err}");

        let err = parse_toml::<Sample>(file, "name = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `inner`"), "{err}");
    }

    #[test]
    fn secrets_never_print() {
        let secret = SecretSource::Value("hunter2".into()).resolve().unwrap();
        assert_eq!(format!("{secret:?}"), "<redacted>");
        assert!(!format!("{:?}", SecretSource::Value("hunter2".into())).contains("hunter2"));
    }

    #[test]
    fn secret_files_expand_the_credentials_directory() {
        let dir = std::env::temp_dir().join(format!("backhaul-cred-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "s3cret\n").unwrap();
        // SAFETY: this is the only test in the crate that touches this variable.
        unsafe { std::env::set_var("CREDENTIALS_DIRECTORY", &dir) };
        let secret = SecretSource::File("$CREDENTIALS_DIRECTORY/token".into())
            .resolve()
            .unwrap();
        assert_eq!(secret.expose(), "s3cret");
        let err = SecretSource::File("/nonexistent/token".into())
            .resolve()
            .unwrap_err();
        assert!(err.contains("/nonexistent/token"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
