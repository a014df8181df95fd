//! The generic HTTP connector, for ERPs with a REST API: one POST per event of the canonical
//! JSON to a URL per event type, with an `Idempotency-Key` header holding the event id, and
//! bearer, basic or OAuth2 client-credentials authentication.
//!
//! Answers: 2xx posted; 409 already there (posted); 408, 425, 429 and 5xx transient (with
//! Retry-After when given); any other 4xx permanent, with the ERP's answer as the reason.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use backhaul_events::config::{ConfigError, Secret, SecretSource};
use backhaul_events::{EventType, StampedEvent};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::Delivery;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where events go, unless `urls` names a URL for their type.
    #[serde(default)]
    pub url: Option<String>,
    /// A URL per event type: keys `pick`, `ship`, `receive`, `adjust`, `count`.
    #[serde(default)]
    pub urls: BTreeMap<String, String>,
    /// Time allowed for one request, answer included.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub auth: Option<HttpAuth>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// `{ bearer = { token = {...} } }`, `{ basic = { username = "...", password = {...} } }` or
/// `{ oauth2 = { token_url = "...", client_id = "...", client_secret = {...}, scope = "..." } }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum HttpAuth {
    Bearer {
        token: SecretSource,
    },
    Basic {
        username: String,
        password: SecretSource,
    },
    Oauth2 {
        token_url: String,
        client_id: String,
        client_secret: SecretSource,
        #[serde(default)]
        scope: Option<String>,
    },
}

impl HttpConfig {
    pub fn check(&self, file: &Path) -> Result<(), ConfigError> {
        for key in self.urls.keys() {
            if key.parse::<EventType>().is_err() {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sink.http.urls.{key}"),
                    "an event type: pick, ship, receive, adjust or count",
                ));
            }
        }
        for kind in EventType::ALL {
            if self.url_for(kind).is_none() {
                return Err(ConfigError::invalid(
                    file,
                    "sink.http.url",
                    format!(
                        "a URL for every event type (none for {kind}); set url, or urls.{kind}"
                    ),
                ));
            }
        }
        for (key, url) in self
            .url
            .iter()
            .map(|u| ("url".to_string(), u))
            .chain(self.urls.iter().map(|(k, u)| (format!("urls.{k}"), u)))
        {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sink.http.{key}"),
                    "an http:// or https:// URL",
                ));
            }
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                file,
                "sink.http.timeout_ms",
                "at least 1",
            ));
        }
        self.resolve_auth().map_err(|(key, e)| {
            ConfigError::invalid(
                file,
                &format!("sink.http.auth.{key}"),
                format!("a readable secret: {e}"),
            )
        })?;
        Ok(())
    }

    fn url_for(&self, kind: EventType) -> Option<&str> {
        self.urls
            .get(kind.as_str())
            .or(self.url.as_ref())
            .map(String::as_str)
    }

    fn resolve_auth(&self) -> Result<Option<ResolvedAuth>, (&'static str, String)> {
        Ok(match &self.auth {
            None => None,
            Some(HttpAuth::Bearer { token }) => Some(ResolvedAuth::Bearer(
                token.resolve().map_err(|e| ("bearer.token", e))?,
            )),
            Some(HttpAuth::Basic { username, password }) => Some(ResolvedAuth::Basic(
                username.clone(),
                password.resolve().map_err(|e| ("basic.password", e))?,
            )),
            Some(HttpAuth::Oauth2 {
                token_url,
                client_id,
                client_secret,
                scope,
            }) => Some(ResolvedAuth::Oauth2 {
                token_url: token_url.clone(),
                client_id: client_id.clone(),
                client_secret: client_secret
                    .resolve()
                    .map_err(|e| ("oauth2.client_secret", e))?,
                scope: scope.clone(),
            }),
        })
    }
}

enum ResolvedAuth {
    Bearer(Secret),
    Basic(String, Secret),
    Oauth2 {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        scope: Option<String>,
    },
}

struct CachedToken {
    value: String,
    renew_at: Instant,
}

pub struct HttpConnector {
    config: HttpConfig,
    client: reqwest::Client,
    auth: Option<ResolvedAuth>,
    token: Mutex<Option<CachedToken>>,
}

impl HttpConnector {
    pub fn new(config: &HttpConfig) -> anyhow::Result<HttpConnector> {
        let auth = config
            .resolve_auth()
            .map_err(|(key, e)| anyhow::anyhow!("sink.http.auth.{key}: {e}"))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(concat!("backhaul-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpConnector {
            config: config.clone(),
            client,
            auth,
            token: Mutex::new(None),
        })
    }

    /// Posts the events concurrently (they belong to different ordering keys).
    pub async fn deliver(&self, events: &[StampedEvent]) -> Vec<Delivery> {
        let posts = events.iter().map(|event| self.post(event));
        futures_join_all(posts).await
    }

    async fn post(&self, event: &StampedEvent) -> Delivery {
        let Some(url) = self.config.url_for(event.event.kind) else {
            return Delivery::Permanent {
                reason: format!("no URL is configured for {} events", event.event.kind),
            };
        };
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", event.event.id.as_str())
            .body(event.to_json().to_string());
        match self.authorization().await {
            Ok(Some(value)) => request = request.header(AUTHORIZATION, value),
            Ok(None) => {}
            Err(reason) => {
                return Delivery::Transient {
                    reason,
                    retry_after: None,
                };
            }
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) if e.is_timeout() => {
                return Delivery::Transient {
                    reason: format!("POST {url}: no answer within {} ms", self.config.timeout_ms),
                    retry_after: None,
                };
            }
            Err(e) => {
                return Delivery::Transient {
                    reason: format!("POST {url}: {e}"),
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = response.text().await.unwrap_or_default();
        let excerpt: String = body.chars().take(2000).collect();
        if status == StatusCode::UNAUTHORIZED
            && matches!(self.auth, Some(ResolvedAuth::Oauth2 { .. }))
        {
            // The token may have been revoked or expired early: fetch a new one next time.
            *self.token.lock().await = None;
            return Delivery::Transient {
                reason: format!("POST {url}: HTTP 401, renewing the OAuth2 token"),
                retry_after: None,
            };
        }
        classify(status, retry_after, &excerpt, location, url)
    }

    async fn authorization(&self) -> Result<Option<String>, String> {
        match &self.auth {
            None => Ok(None),
            Some(ResolvedAuth::Bearer(token)) => Ok(Some(format!("Bearer {}", token.expose()))),
            Some(ResolvedAuth::Basic(user, password)) => Ok(Some(format!(
                "Basic {}",
                BASE64.encode(format!("{user}:{}", password.expose()))
            ))),
            Some(ResolvedAuth::Oauth2 {
                token_url,
                client_id,
                client_secret,
                scope,
            }) => {
                let mut cached = self.token.lock().await;
                if let Some(token) = cached.as_ref().filter(|t| Instant::now() < t.renew_at) {
                    return Ok(Some(format!("Bearer {}", token.value)));
                }
                let mut form = format!(
                    "grant_type=client_credentials&client_id={}&client_secret={}",
                    form_encode(client_id),
                    form_encode(client_secret.expose())
                );
                if let Some(scope) = scope {
                    form.push_str(&format!("&scope={}", form_encode(scope)));
                }
                let response = self
                    .client
                    .post(token_url)
                    .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form)
                    .send()
                    .await
                    .map_err(|e| format!("OAuth2 token request to {token_url}: {e}"))?;
                let status = response.status();
                let body: serde_json::Value = response.json().await.map_err(|e| {
                    format!("OAuth2 token answer from {token_url} (HTTP {status}): {e}")
                })?;
                let Some(value) = body["access_token"].as_str() else {
                    return Err(format!(
                        "OAuth2 token answer from {token_url} (HTTP {status}) has no access_token"
                    ));
                };
                let lifetime = body["expires_in"].as_u64().unwrap_or(300);
                // Renew before it runs out, so no request goes out with an expiring token.
                let renew_at =
                    Instant::now() + Duration::from_secs(lifetime.saturating_mul(9) / 10);
                *cached = Some(CachedToken {
                    value: value.to_string(),
                    renew_at,
                });
                Ok(Some(format!("Bearer {value}")))
            }
        }
    }
}

fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &str,
    location: Option<String>,
    url: &str,
) -> Delivery {
    let code = status.as_u16();
    if status.is_success() {
        let erp_ref = location
            .or_else(|| {
                serde_json::from_str::<serde_json::Value>(body)
                    .ok()
                    .and_then(|v| {
                        v.get("id").map(|id| {
                            id.as_str()
                                .map(str::to_string)
                                .unwrap_or_else(|| id.to_string())
                        })
                    })
            })
            .unwrap_or_else(|| format!("HTTP {code}"));
        return Delivery::Posted { erp_ref };
    }
    if code == 409 {
        return Delivery::Posted {
            erp_ref: "already there (HTTP 409)".into(),
        };
    }
    let reason = if body.is_empty() {
        format!("POST {url}: HTTP {code}")
    } else {
        format!("POST {url}: HTTP {code}: {body}")
    };
    if matches!(code, 408 | 425 | 429) || status.is_server_error() {
        Delivery::Transient {
            reason,
            retry_after,
        }
    } else {
        Delivery::Permanent { reason }
    }
}

/// Retry-After in seconds (the HTTP-date form is rare from APIs and is treated as absent).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

async fn futures_join_all<F: std::future::Future<Output = Delivery>>(
    futures: impl Iterator<Item = F>,
) -> Vec<Delivery> {
    let futures: Vec<_> = futures.map(Box::pin).collect();
    let mut results: Vec<Option<Delivery>> = vec![None; futures.len()];
    let mut pending: Vec<(usize, std::pin::Pin<Box<F>>)> =
        futures.into_iter().enumerate().collect();
    std::future::poll_fn(|cx| {
        pending.retain_mut(|(index, future)| match future.as_mut().poll(cx) {
            std::task::Poll::Ready(result) => {
                results[*index] = Some(result);
                false
            }
            std::task::Poll::Pending => true,
        });
        if pending.is_empty() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or(Delivery::Transient {
                reason: "no result".into(),
                retry_after: None,
            })
        })
        .collect()
}

fn form_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        let classify =
            |code: u16| classify(StatusCode::from_u16(code).unwrap(), None, "", None, "u");
        assert!(matches!(classify(201), Delivery::Posted { .. }));
        assert!(matches!(classify(409), Delivery::Posted { .. }));
        for code in [408, 425, 429, 500, 502, 503, 504] {
            assert!(
                matches!(classify(code), Delivery::Transient { .. }),
                "{code}"
            );
        }
        for code in [400, 404, 422] {
            assert!(
                matches!(classify(code), Delivery::Permanent { .. }),
                "{code}"
            );
        }
    }

    #[test]
    fn form_fields_are_percent_encoded() {
        assert_eq!(form_encode("a b&c"), "a%20b%26c");
    }
}
