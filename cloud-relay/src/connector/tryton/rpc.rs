//! Talking to Tryton over JSON-RPC: the session (login, `Authorization: Session ...`, one
//! fresh login after a 401), acknowledging user warnings, and sorting every answer, HTTP
//! status and transport failure into an `RpcError`; also the shapes values take on the wire
//! (records, Many2One and One2Many fields, decimals, quantities).
//!
//! An `RpcError` is not yet a `Delivery`: the same refusal means a setup problem when the
//! setup is being read and a bad event when its document is being posted, so the caller names
//! what it was doing (`RpcError::delivery`) or decides for itself.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use backhaul_events::config::Secret;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use reqwest::header::{AUTHORIZATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{Map, Value, json};

use super::{SETUP_RETRY, TrytonConfig, lock};
use crate::connector::Delivery;

/// The longest ERP message kept in a reason; Tryton's can be tens of kilobytes.
const MAX_REASON_CHARS: usize = 2000;
/// Warnings acknowledged for one call before giving up (each skip covers one warning).
const MAX_WARNINGS_PER_CALL: usize = 8;

/// What went wrong with one JSON-RPC call.
#[derive(Debug, Clone)]
pub enum RpcError {
    /// Worth retrying: busy, unreachable, timed out, rate limited, login refused.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Tryton (or a proxy before it) asks every caller to slow down: 429, 503.
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Tryton's `UserError`: its message.
    User(String),
    /// The request itself was wrong: `[text, traceback]`, 400, 403, 422.
    Request(String),
}

impl RpcError {
    pub(super) fn message(&self) -> &str {
        match self {
            RpcError::Transient { reason, .. } | RpcError::Throttled { reason, .. } => reason,
            RpcError::User(message) | RpcError::Request(message) => message,
        }
    }

    pub(super) fn delivery(&self, what: &str) -> Delivery {
        match self {
            RpcError::Transient {
                reason,
                retry_after,
            } => Delivery::Transient {
                reason: format!("{what}: {reason}"),
                retry_after: *retry_after,
            },
            RpcError::Throttled {
                reason,
                retry_after,
            } => Delivery::Throttled {
                reason: format!("{what}: {reason}"),
                retry_after: *retry_after,
            },
            RpcError::User(message) => Delivery::Permanent {
                reason: format!("Tryton refused {what}: {message}"),
            },
            RpcError::Request(message) => Delivery::Permanent {
                reason: format!(
                    "Tryton could not process {what} (a bug in the connector's request): {message}"
                ),
            },
        }
    }
}

pub(super) struct Rpc {
    client: reqwest::Client,
    pub(super) endpoint: Url,
    username: String,
    password: Secret,
    context: Value,
    /// The `Authorization` header of the current session, when logged in.
    session: StdMutex<Option<Arc<str>>>,
    login_lock: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

/// One answer of the server, before retries.
#[derive(Debug)]
pub enum Answer {
    Result(Value),
    Unauthorized,
    Warning { name: String, message: String },
    Failed(RpcError),
}

impl Rpc {
    pub(super) fn new(
        config: &TrytonConfig,
        endpoint: Url,
        password: Secret,
    ) -> anyhow::Result<Rpc> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(10_000)))
            .build()?;
        Ok(Rpc {
            client,
            endpoint,
            username: config.username.clone(),
            password,
            context: json!({"company": config.company, "language": "en"}),
            session: StdMutex::new(None),
            login_lock: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
        })
    }

    /// Calls `method` with `params` and the context as the last parameter; logs in when
    /// needed, once more after a 401, and acknowledges user warnings.
    pub(super) async fn call(
        &self,
        method: &str,
        mut params: Vec<Value>,
    ) -> Result<Value, RpcError> {
        params.push(self.context.clone());
        let params = Value::Array(params);
        let mut relogged = false;
        let mut warnings = 0;
        loop {
            let auth = self.session().await?;
            match self.post(method, &params, Some(&auth)).await {
                Answer::Result(value) => return Ok(value),
                Answer::Failed(e) => return Err(e),
                Answer::Unauthorized if !relogged => {
                    relogged = true;
                    let mut session = lock(&self.session);
                    if session.as_ref() == Some(&auth) {
                        *session = None;
                    }
                }
                Answer::Unauthorized => {
                    return Err(RpcError::Transient {
                        reason: format!(
                            "Tryton answered 401 to {method} right after a fresh login of {:?}",
                            self.username
                        ),
                        retry_after: Some(SETUP_RETRY),
                    });
                }
                Answer::Warning { name, message } => {
                    warnings += 1;
                    if warnings > MAX_WARNINGS_PER_CALL {
                        return Err(RpcError::User(format!(
                            "warning after warning from {method}, the last: {}",
                            truncate(&message)
                        )));
                    }
                    let skip = json!([name, false, self.context]);
                    match self
                        .post("model.res.user.warning.skip", &skip, Some(&auth))
                        .await
                    {
                        Answer::Result(_) => {}
                        Answer::Unauthorized => {}
                        Answer::Warning { message, .. } => {
                            return Err(RpcError::Request(format!(
                                "acknowledging a warning raised another: {}",
                                truncate(&message)
                            )));
                        }
                        Answer::Failed(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// The current session's `Authorization` header, logging in first when there is none.
    async fn session(&self) -> Result<Arc<str>, RpcError> {
        if let Some(auth) = lock(&self.session).clone() {
            return Ok(auth);
        }
        let _one_login = self.login_lock.lock().await;
        if let Some(auth) = lock(&self.session).clone() {
            return Ok(auth);
        }
        let params = json!([self.username, {"password": self.password.expose()}, "en"]);
        let refused = |detail: &str| RpcError::Transient {
            reason: format!(
                "Tryton refused the login of {:?} ({detail}): check sink.tryton.username and \
                 password",
                self.username
            ),
            retry_after: Some(SETUP_RETRY),
        };
        let result = match self.post("common.db.login", &params, None).await {
            Answer::Result(result) => result,
            Answer::Unauthorized => return Err(refused("HTTP 401")),
            Answer::Warning { message, .. } => return Err(refused(&message)),
            Answer::Failed(RpcError::Transient {
                reason,
                retry_after,
            }) => {
                return Err(RpcError::Transient {
                    reason: format!("logging in: {reason}"),
                    retry_after,
                });
            }
            Answer::Failed(RpcError::Throttled {
                reason,
                retry_after,
            }) => {
                return Err(RpcError::Throttled {
                    reason: format!("logging in: {reason}"),
                    retry_after,
                });
            }
            Answer::Failed(e) => return Err(refused(e.message())),
        };
        let (Some(user_id), Some(token)) = (
            result.get(0).and_then(Value::as_i64),
            result.get(1).and_then(Value::as_str),
        ) else {
            return Err(refused(&format!(
                "unexpected answer {}",
                truncate(&result.to_string())
            )));
        };
        let credentials = format!("{}:{user_id}:{token}", self.username);
        let auth: Arc<str> = format!("Session {}", BASE64.encode(credentials.as_bytes())).into();
        *lock(&self.session) = Some(auth.clone());
        Ok(auth)
    }

    /// One HTTP request: `{"id", "method", "params"}` and nothing else (a `jsonrpc` member
    /// switches Tryton to HTML errors).
    async fn post(&self, method: &str, params: &Value, auth: Option<&str>) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"id": id, "method": method, "params": params});
        let mut request = self.client.post(self.endpoint.clone()).json(&body);
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::Failed(transport_error(method, &e)),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) => return Answer::Failed(transport_error(method, &e)),
        };
        read_answer(
            method,
            status.as_u16(),
            retry_after.as_deref(),
            &text,
            self.endpoint.as_str(),
        )
    }
}

/// Sorts one HTTP answer of Tryton's JSON-RPC: its status, `Retry-After` header and body
/// (sent to `endpoint`, for `method`). Takes bytes from the network, so it never panics and
/// keeps the reasons it quotes short. Public for the `tryton_rpc` fuzz target.
pub fn read_answer(
    method: &str,
    status: u16,
    retry_after: Option<&str>,
    text: &str,
    endpoint: &str,
) -> Answer {
    let retry_after = retry_after
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let Ok(status) = StatusCode::from_u16(status) else {
        return Answer::Failed(RpcError::Request(format!(
            "HTTP {status} to {method}: {}",
            html_text(text)
        )));
    };
    match status {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED => return Answer::Unauthorized,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
            return Answer::Failed(RpcError::Throttled {
                reason: format!(
                    "Tryton is asking for fewer requests (HTTP {}) to {method}",
                    status.as_u16()
                ),
                retry_after,
            });
        }
        StatusCode::NOT_FOUND => {
            return Answer::Failed(RpcError::Transient {
                reason: format!(
                    "Tryton answered 404 at {endpoint}: is sink.tryton.database a database the \
                     server was started with?"
                ),
                retry_after: Some(SETUP_RETRY),
            });
        }
        s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
            return Answer::Failed(RpcError::Transient {
                reason: format!(
                    "Tryton answered HTTP {} to {method}: {}",
                    s.as_u16(),
                    html_text(text)
                ),
                retry_after,
            });
        }
        s => {
            return Answer::Failed(RpcError::Request(format!(
                "HTTP {} to {method}: {}",
                s.as_u16(),
                html_text(text)
            )));
        }
    }
    let answer: Value = match serde_json::from_str(text) {
        Ok(answer) => answer,
        Err(e) => {
            return Answer::Failed(RpcError::Transient {
                reason: format!(
                    "Tryton's answer to {method} is not JSON ({e}): {}",
                    truncate(text)
                ),
                retry_after: None,
            });
        }
    };
    match answer.get("error") {
        None | Some(Value::Null) => match answer.get("result") {
            Some(result) => Answer::Result(result.clone()),
            None => Answer::Failed(RpcError::Request(format!(
                "Tryton's answer to {method} has neither result nor error"
            ))),
        },
        Some(error) => classify_error(method, error),
    }
}

/// Sorts Tryton's `error` member.
fn classify_error(method: &str, error: &Value) -> Answer {
    let kind = error.get(0).and_then(Value::as_str).unwrap_or_default();
    let args = error.get(1).unwrap_or(&Value::Null);
    let arg = |i: usize| args.get(i).and_then(Value::as_str).unwrap_or_default();
    match kind {
        "UserError" => {
            let (message, description) = (arg(0), arg(1));
            let text = if description.is_empty() {
                message.to_string()
            } else {
                format!("{message} ({description})")
            };
            Answer::Failed(RpcError::User(truncate(&text)))
        }
        "UserWarning" => Answer::Warning {
            name: arg(0).to_string(),
            message: arg(1).to_string(),
        },
        "ConcurrencyException" => Answer::Failed(RpcError::Transient {
            reason: format!("Tryton answered {kind} to {method}"),
            retry_after: None,
        }),
        "RateLimitException" => Answer::Failed(RpcError::Throttled {
            reason: format!("Tryton answered {kind} to {method}"),
            retry_after: None,
        }),
        "LoginException" => Answer::Unauthorized,
        text => {
            let text = if text.is_empty() {
                error.to_string()
            } else {
                text.to_string()
            };
            let lowered = text.to_ascii_lowercase();
            if lowered.contains("database is locked") || lowered.contains("could not serialize") {
                Answer::Failed(RpcError::Transient {
                    reason: format!("Tryton is busy ({}) for {method}", truncate(&text)),
                    retry_after: None,
                })
            } else {
                Answer::Failed(RpcError::Request(format!("{method}: {}", truncate(&text))))
            }
        }
    }
}

fn transport_error(method: &str, e: &reqwest::Error) -> RpcError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    RpcError::Transient {
        reason: format!("{method} {what}: {e}"),
        retry_after: None,
    }
}

/// The readable part of an HTML error page (Werkzeug puts it in the last `<p>`).
fn html_text(body: &str) -> String {
    let text = body
        .rsplit_once("<p>")
        .map(|(_, p)| p.split("</p>").next().unwrap_or(p))
        .unwrap_or(body)
        .trim();
    truncate(text)
}

pub(super) fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_REASON_CHARS {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(MAX_REASON_CHARS).collect();
        cut.push('…');
        cut
    }
}

/// The records of a `read` or `search_read` answer.
pub(super) fn records(value: &Value) -> Vec<&Map<String, Value>> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

/// A Many2One field (an id, or null).
pub(super) fn id_field(record: &Map<String, Value>, field: &str) -> Option<i64> {
    record.get(field).and_then(Value::as_i64)
}

/// A One2Many field (a list of ids).
pub(super) fn ids_field<'a>(
    record: &'a Map<String, Value>,
    field: &str,
) -> impl Iterator<Item = i64> + 'a {
    record
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_i64)
}

pub(super) fn decimal(text: &str) -> Value {
    json!({"__class__": "Decimal", "decimal": text})
}

/// Tryton's quantities are floats: the exact decimal text becomes the nearest float.
pub(super) fn quantity(text: &str) -> Value {
    text.parse::<f64>().map(|q| json!(q)).unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_transcript() {
        let token = "33ddc79f71ba8eb3e09118beb02051295c3c160f7b7a56e4e24654fc2a148d49";
        assert_eq!(
            BASE64.encode(format!("admin:1:{token}").as_bytes()),
            "YWRtaW46MTozM2RkYzc5ZjcxYmE4ZWIzZTA5MTE4YmViMDIwNTEyOTVjM2MxNjBmN2I3YTU2ZTRlMjQ2NTRmYzJhMTQ4ZDQ5"
        );
        assert_eq!(BASE64.encode(b"a"), "YQ==");
        assert_eq!(BASE64.encode(b"ab"), "YWI=");
        assert_eq!(BASE64.encode(b""), "");
    }

    #[test]
    fn errors_are_sorted() {
        let user = json!(["UserError", ["You can not call \"do\".", "", null]]);
        assert!(matches!(
            classify_error("m", &user),
            Answer::Failed(RpcError::User(m)) if m == "You can not call \"do\"."
        ));
        let warning = json!(["UserWarning", ["abc.done", "no origin", ""]]);
        assert!(matches!(
            classify_error("m", &warning),
            Answer::Warning { name, .. } if name == "abc.done"
        ));
        let bug = json!(["'foo'", ""]);
        assert!(matches!(
            classify_error("m", &bug),
            Answer::Failed(RpcError::Request(m)) if m.contains("'foo'")
        ));
    }
}
