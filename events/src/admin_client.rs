//! A small blocking client for the services' admin APIs, shared by the `status`, `rejects`,
//! `tail`, `sites` and `dlq` commands of both binaries (feature `admin-client`). It decodes
//! answers into the types of [`crate::admin`], so an answer without a field the command needs
//! is an error that names the field.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::admin::ErrorAnswer;
use crate::config::Secret;

/// Why an admin request failed, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach {url}: {source} (is the service running, and is --url right?)")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("{url} answered HTTP {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url} answered HTTP {status} without JSON: {source}")]
    NotJson {
        url: String,
        status: u16,
        source: reqwest::Error,
    },
    // The cause (which field, where) follows in the error chain the binaries print.
    #[error(
        "{url} answered JSON this command does not understand \
         (is the service the same version as this command?)"
    )]
    Unexpected {
        url: String,
        source: serde_path_to_error::Error<serde_json::Error>,
    },
    #[error("cannot start the HTTP client: {0}")]
    Setup(String),
}

/// Where an operator command finds a service's admin API, and the token it sends there.
#[derive(Debug, Clone)]
pub struct AdminTarget {
    /// Like `http://127.0.0.1:8788`.
    pub url: String,
    pub token: Option<Secret>,
}

/// The environment variable an operator command takes its admin token from.
pub const TOKEN_ENV: &str = "BACKHAUL_ADMIN_TOKEN";

impl AdminTarget {
    /// The target of a command: the URL from `--url`, else from the service's configuration,
    /// else `default_url`; the token from `--token-file`, else from [`TOKEN_ENV`], else the
    /// configuration's own (its write token when it has one). `config` is the URL and token
    /// read from `--config`, when given.
    pub fn choose(
        url: Option<String>,
        token_file: Option<&std::path::Path>,
        config: Option<(String, Option<Secret>)>,
        default_url: &str,
    ) -> Result<AdminTarget, AdminError> {
        let (config_url, config_token) = config.unzip();
        let url = url
            .or(config_url)
            .unwrap_or_else(|| default_url.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = if let Some(path) = token_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                AdminError::Setup(format!(
                    "cannot read the token file {} (--token-file): {e}",
                    path.display()
                ))
            })?;
            Some(Secret::new(text.trim_end_matches(['\n', '\r'])))
        } else if let Ok(token) = std::env::var(TOKEN_ENV) {
            Some(Secret::new(token))
        } else {
            config_token.flatten()
        };
        Ok(AdminTarget { url, token })
    }
}

/// Blocking over the async client, so the binaries need no second HTTP stack.
pub struct AdminClient {
    runtime: tokio::runtime::Runtime,
    inner: reqwest::Client,
    base: String,
    token: Option<Secret>,
}

impl AdminClient {
    /// A client for the service whose admin API is at `target`.
    pub fn new(target: &AdminTarget) -> Result<AdminClient, AdminError> {
        AdminClient::with_timeout(target, Duration::from_secs(30))
    }

    /// A client that waits up to `timeout` for each answer, for the commands that make the
    /// service work longer than a status read (a reconciliation).
    pub fn with_timeout(
        target: &AdminTarget,
        timeout: Duration,
    ) -> Result<AdminClient, AdminError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| AdminError::Setup(e.to_string()))?;
        let inner = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| AdminError::Setup(e.to_string()))?;
        Ok(AdminClient {
            runtime,
            inner,
            base: target.url.trim_end_matches('/').to_string(),
            token: target.token.clone(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// GETs `path` (like `/v1/status`) and returns its JSON as it was sent, for `--json`.
    pub fn get(&self, path: &str) -> Result<Value, AdminError> {
        let url = self.url(path);
        let request = self.authorized(self.inner.get(&url));
        self.runtime
            .block_on(async { read(&url, request.send().await).await })
    }

    /// GETs `path` and decodes the answer into one of the [`crate::admin`] types.
    pub fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, AdminError> {
        let answer = self.get(path)?;
        self.decode(path, &answer)
    }

    /// POSTs `body` as JSON to `path` and decodes the answer.
    pub fn post_json<B, T>(&self, path: &str, body: &B) -> Result<T, AdminError>
    where
        B: Serialize + ?Sized,
        T: DeserializeOwned,
    {
        let url = self.url(path);
        let request = self.authorized(self.inner.post(&url)).json(body);
        let answer = self
            .runtime
            .block_on(async { read(&url, request.send().await).await })?;
        self.decode(path, &answer)
    }

    /// Decodes an answer `get` returned from `path`, for a command that needs both what was
    /// sent and its fields.
    pub fn decode<T: DeserializeOwned>(&self, path: &str, answer: &Value) -> Result<T, AdminError> {
        serde_path_to_error::deserialize(answer).map_err(|source| AdminError::Unexpected {
            url: self.url(path),
            source,
        })
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token.expose()),
            None => request,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

async fn read(
    url: &str,
    sent: Result<reqwest::Response, reqwest::Error>,
) -> Result<Value, AdminError> {
    let response = sent.map_err(|source| AdminError::Unreachable {
        url: url.to_string(),
        source,
    })?;
    let status = response.status().as_u16();
    let body: Value = response
        .json()
        .await
        .map_err(|source| AdminError::NotJson {
            url: url.to_string(),
            status,
            source,
        })?;
    if !(200..300).contains(&status) {
        let message = ErrorAnswer::deserialize(&body)
            .map(|answer| answer.error)
            .unwrap_or_else(|_| format!("(no message) {body}"));
        return Err(AdminError::Refused {
            url: url.to_string(),
            status,
            message,
        });
    }
    Ok(body)
}

/// "12s ago", "5m ago", "3h ago" or "never", from a time in ms since the Unix epoch.
pub fn age(ms: Option<i64>) -> String {
    let Some(ms) = ms.filter(|ms| *ms > 0) else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let secs = (now - ms).max(0) / 1000;
    match secs {
        0..=119 => format!("{secs}s ago"),
        120..=7199 => format!("{}m ago", secs / 60),
        _ => format!("{}h ago", secs / 3600),
    }
}

/// Lets an operator command end quietly when what reads its output goes away (`| head`), as
/// Unix tools do, instead of panicking on the next line it prints. Only for the commands that
/// print: the services keep SIGPIPE ignored, because a peer closing a socket is not a reason
/// to stop.
pub fn end_quietly_on_closed_pipe() {
    // SAFETY: setting a signal's disposition to the default, at the start of a
    // single-threaded command before anything else runs, touches no Rust state.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
