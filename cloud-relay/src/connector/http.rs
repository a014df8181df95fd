//! The generic HTTP connector, for ERPs with a REST API: one POST per event of the canonical
//! JSON to a URL per event type, with an `Idempotency-Key` header holding the event id, and
//! bearer, basic or OAuth2 client-credentials authentication.
//!
//! Answers: 2xx posted; 409 already there (posted); 408, 425, 429 and 5xx transient (with
//! Retry-After when given); any other 4xx permanent, with the ERP's answer as the reason.
//!
//! A `[sink.http.body.TYPE]` table replaces the canonical JSON of that type's events with a
//! body of the ERP's own shape: see [`super::body`].

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use backhaul_events::config::{ConfigError, Secret, SecretSource};
use backhaul_events::{EventType, StampedEvent};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use serde::Deserialize;
use tokio::sync::Mutex;

use super::Delivery;
use super::body::{BodyMapping, BodyValue};

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
    /// A body mapping per event type (keys as in `urls`); a type without one is posted as its
    /// canonical JSON.
    #[serde(default)]
    pub body: BTreeMap<String, BTreeMap<String, BodyValue>>,
    /// Where `backhaul-relay reconcile` asks whether the ERP holds an event: `{id}` (and
    /// `{site}`) are filled in, percent-encoded; a 2xx answer means it does, 404 or 410 that
    /// it does not. Without it, reconciliation cannot ask this ERP.
    #[serde(default)]
    pub lookup_url: Option<String>,
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
        if let Some(lookup) = &self.lookup_url
            && (!(lookup.starts_with("http://") || lookup.starts_with("https://"))
                || !lookup.contains("{id}"))
        {
            return Err(ConfigError::invalid(
                file,
                "sink.http.lookup_url",
                "an http:// or https:// URL template with {id} where the event id goes \
                 (and {site} if the ERP needs it)",
            ));
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
        self.body_mappings()
            .map_err(|(key, expected)| ConfigError::invalid(file, &key, expected))?;
        Ok(())
    }

    /// The body mappings, compiled; an error names the key and what was expected.
    fn body_mappings(&self) -> Result<BTreeMap<EventType, BodyMapping>, (String, String)> {
        super::body::compile(&self.body)
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
    bodies: BTreeMap<EventType, BodyMapping>,
}

impl HttpConnector {
    pub fn new(config: &HttpConfig) -> anyhow::Result<HttpConnector> {
        let auth = config
            .resolve_auth()
            .map_err(|(key, e)| anyhow::anyhow!("sink.http.auth.{key}: {e}"))?;
        let bodies = config
            .body_mappings()
            .map_err(|(key, expected)| anyhow::anyhow!("{key}: expected {expected}"))?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(concat!("backhaul-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(HttpConnector {
            config: config.clone(),
            client,
            auth,
            token: Mutex::new(None),
            bodies,
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
        let body = match self.bodies.get(&event.event.kind) {
            None => event.to_json().to_string(),
            Some(mapping) => match mapping.render(event) {
                Ok(body) => body,
                Err(reason) => return Delivery::Permanent { reason },
            },
        };
        let mut request = self
            .client
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", event.event.id.as_str())
            .body(body);
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
        let excerpt = super::excerpt(response).await;
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

    /// Of the site's posted events (event id, the ERP's reference), those the ERP answers it
    /// does not hold at `lookup_url`, each with why; `None` without a `lookup_url`. Any other
    /// answer fails the whole lookup: a report must not guess.
    pub async fn missing(
        &self,
        site: &str,
        posted: &[(String, String)],
    ) -> Option<Result<HashMap<String, String>, String>> {
        let template = self.config.lookup_url.as_deref()?;
        let mut missing = HashMap::new();
        for chunk in posted.chunks(LOOKUPS_AT_ONCE) {
            let asked = chunk.iter().map(|(id, _)| self.lookup(template, site, id));
            for answer in join_all(asked).await {
                match answer {
                    Ok(None) => {}
                    Ok(Some((id, why))) => {
                        missing.insert(id, why);
                    }
                    Err(e) => return Some(Err(e)),
                }
            }
        }
        Some(Ok(missing))
    }

    /// `Ok(None)` when the ERP holds event `id`, `Ok(Some((id, why)))` when it says it does not.
    async fn lookup(
        &self,
        template: &str,
        site: &str,
        id: &str,
    ) -> Result<Option<(String, String)>, String> {
        let url = template
            .replace("{id}", &crate::cli::url_component(id))
            .replace("{site}", &crate::cli::url_component(site));
        let mut request = self.client.get(&url);
        if let Some(value) = self.authorization().await? {
            request = request.header(AUTHORIZATION, value);
        }
        let response = request
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = response.status();
        if status.is_success() {
            return Ok(None);
        }
        if status == StatusCode::NOT_FOUND || status == StatusCode::GONE {
            return Ok(Some((
                id.to_string(),
                format!("the ERP answers HTTP {} at {url}", status.as_u16()),
            )));
        }
        if status == StatusCode::UNAUTHORIZED {
            *self.token.lock().await = None;
        }
        Err(format!("GET {url}: HTTP {}", status.as_u16()))
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
    if matches!(code, 429 | 503) {
        // The ERP as a whole asks for less: every key waits, not just this one.
        Delivery::Throttled {
            reason,
            retry_after,
        }
    } else if matches!(code, 408 | 425) || status.is_server_error() {
        Delivery::Transient {
            reason,
            retry_after,
        }
    } else {
        Delivery::Permanent { reason }
    }
}

/// Retry-After in seconds (the HTTP-date form is rare from APIs and is treated as absent).
pub(crate) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Lookups `reconcile` has in flight at once.
const LOOKUPS_AT_ONCE: usize = 16;

async fn futures_join_all<F: std::future::Future<Output = Delivery>>(
    futures: impl Iterator<Item = F>,
) -> Vec<Delivery> {
    join_all(futures).await
}

/// Every future's output, in order, all of them polled together.
async fn join_all<T, F: std::future::Future<Output = T>>(
    futures: impl Iterator<Item = F>,
) -> Vec<T> {
    let futures: Vec<_> = futures.map(Box::pin).collect();
    let mut results: Vec<Option<T>> = (0..futures.len()).map(|_| None).collect();
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
    // Every future finished: each slot holds its output.
    results.into_iter().flatten().collect()
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

    use backhaul_events::config::parse_toml;
    use backhaul_events::event::parse_event;
    use backhaul_events::{Epoch, StampedEvent};

    fn config(text: &str) -> Result<HttpConfig, ConfigError> {
        let file = Path::new("relay.toml");
        let config: HttpConfig =
            parse_toml(file, &format!("url = \"http://erp.invalid/api\"\n{text}"))?;
        config.check(file)?;
        Ok(config)
    }

    fn config_error(text: &str) -> String {
        match config(text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    fn stamped(json: &str) -> StampedEvent {
        StampedEvent {
            site: "wh-east".into(),
            epoch: Epoch(0xabc),
            seq: 42,
            received_at_ms: 1_795_000_000_123,
            event: parse_event(json.as_bytes()).expect("a valid event"),
        }
    }

    fn pick() -> StampedEvent {
        stamped(
            r#"{"v":1,"id":"ev-1","type":"pick","ts":"2026-11-22T23:30:00-05:00","order":"SO-1",
                "line":3,"sku":"SKU-9","qty":"2.5","location":"A-01","attrs":{"color":"red"}}"#,
        )
    }

    /// Renders `event` with the mapping of its type in `text`.
    fn render(text: &str, event: &StampedEvent) -> String {
        let config = config(text).expect("a valid mapping");
        let mappings = config.body_mappings().expect("a valid mapping");
        mappings[&event.event.kind].render(event).expect("renders")
    }

    const EXAMPLE: &str = r#"
        [body.pick]
        "salesOrder" = "{order}"
        "line.number" = "{line:number}"
        "line.item" = "{sku}"
        "line.quantity" = "{qty:number}"
        "externalId" = "{id}"
        "postingDate" = "{ts:date}"
        "source" = "backhaul {site}"
    "#;

    #[test]
    fn a_mapping_nests_dotted_keys_and_makes_numbers_and_dates() {
        assert_eq!(
            render(EXAMPLE, &pick()),
            r#"{"externalId":"ev-1","line":{"item":"SKU-9","number":3,"quantity":2.5},"postingDate":"2026-11-22","salesOrder":"SO-1","source":"backhaul wh-east"}"#
        );
    }

    #[test]
    fn quantities_are_exact_json_numbers() {
        let mut event = pick();
        for qty in ["2.500", "1234567890.123456789012345678", "-0.0001", "7"] {
            event.event.qty = qty.parse().expect("a decimal");
            let body = render(
                "[body.pick]\nq = \"{qty:number}\"\ntext = \"{qty}\"\n",
                &event,
            );
            assert_eq!(body, format!(r#"{{"q":{qty},"text":"{qty}"}}"#));
            let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
            assert!(parsed["q"].is_number(), "{body}");
        }
    }

    #[test]
    fn dates_are_the_calendar_day_in_the_ts_own_offset() {
        for (ts, date) in [
            ("2026-11-22T23:30:00-05:00", "2026-11-22"),
            ("2026-11-23T01:30:00+02:00", "2026-11-23"),
            ("2026-11-22T00:00:00Z", "2026-11-22"),
            ("2026-12-31T23:59:59.999+14:00", "2026-12-31"),
        ] {
            let mut event = pick();
            event.event.ts = ts.into();
            let body = render("[body.pick]\nday = \"{ts:date}\"\nts = \"{ts}\"\n", &event);
            assert_eq!(body, format!(r#"{{"day":"{date}","ts":"{ts}"}}"#), "{ts}");
        }
        let mut event = pick();
        event.event.ts = "yesterday".into();
        let mappings = config("[body.pick]\nday = \"{ts:date}\"\n")
            .expect("valid")
            .body_mappings()
            .expect("valid");
        let error = mappings[&EventType::Pick].render(&event).unwrap_err();
        assert!(
            error.contains("\"yesterday\" is not an RFC 3339 time"),
            "{error}"
        );
    }

    #[test]
    fn keys_of_fields_the_event_lacks_are_left_out() {
        let event = stamped(
            r#"{"v":1,"id":"ev-2","type":"receive","ts":"2026-11-22T10:00:00Z","sku":"SKU-9","qty":1}"#,
        );
        let body = render(
            r#"
            [body.receive]
            "item" = "{sku}"
            "purchaseOrder" = "{po}"
            "line.number" = "{line:number}"
            "line.note" = "lot {lot} at {location}"
            "color" = "{attrs.color}"
            "unit" = "{uom}"
            "#,
            &event,
        );
        assert_eq!(body, r#"{"item":"SKU-9","unit":"EA"}"#);
        let body = render(
            "[body.receive]\n\"line.number\" = \"{line:number}\"\n",
            &event,
        );
        assert_eq!(body, "{}");
    }

    #[test]
    fn every_placeholder_renders() {
        let event = stamped(
            r#"{"v":1,"id":"ev-3","type":"ship","ts":"2026-11-22T10:00:00Z","device":"d-1",
                "order":"SO-2","line":7,"sku":"S","qty":"3","uom":"KG","location":"L","lot":"LOT",
                "serial":"SN","carrier":"UPS","tracking":"1Z","attrs":{"a b":"c"}}"#,
        );
        let body = render(
            r#"
            [body.ship]
            all = "{v}|{id}|{type}|{ts}|{device}|{order}|{line}|{sku}|{qty}|{uom}|{location}|{lot}|{serial}|{carrier}|{tracking}|{attrs.a b}|{site}|{epoch}|{seq}|{received_at_ms}"
            numbers = "{v:number} {line:number} {qty:number} {seq:number} {received_at_ms:number}"
            seq = "{seq:number}"
            at = "{received_at_ms:number}"
            v = "{v:number}"
            "#,
            &event,
        );
        assert_eq!(
            body,
            r#"{"all":"1|ev-3|ship|2026-11-22T10:00:00Z|d-1|SO-2|7|S|3|KG|L|LOT|SN|UPS|1Z|c|wh-east|00000000000000000000000000000abc|42|1795000000123","at":1795000000123,"numbers":"1 7 3 42 1795000000123","seq":42,"v":1}"#
        );
        let adjust = stamped(
            r#"{"v":1,"id":"ev-4","type":"adjust","ts":"2026-11-22T10:00:00Z","sku":"S","qty":-1,
                "reason":"damaged","location":"L"}"#,
        );
        assert_eq!(
            render("[body.adjust]\nwhy = \"{reason}\"\n", &adjust),
            r#"{"why":"damaged"}"#
        );
        let receive = stamped(
            r#"{"v":1,"id":"ev-5","type":"receive","ts":"2026-11-22T10:00:00Z","sku":"S","qty":1,"po":"PO-1"}"#,
        );
        assert_eq!(
            render("[body.receive]\npo = \"{po}\"\n", &receive),
            r#"{"po":"PO-1"}"#
        );
    }

    #[test]
    fn tables_constants_escapes_and_json_text() {
        let body = render(
            r#"
            [body.pick]
            company = 1
            draft = false
            note = "{{literal}} \"quoted\" {sku}"
            plain = "no placeholders"
            line.number = "{line:number}"
            [body.pick.header]
            order = "{order}"
            "#,
            &pick(),
        );
        assert_eq!(
            body,
            r#"{"company":1,"draft":false,"header":{"order":"SO-1"},"line":{"number":3},"note":"{literal} \"quoted\" SKU-9","plain":"no placeholders"}"#
        );
    }

    #[test]
    fn types_without_a_mapping_keep_the_canonical_json() {
        let config = config(EXAMPLE).expect("valid");
        let mappings = config.body_mappings().expect("valid");
        assert_eq!(mappings.keys().collect::<Vec<_>>(), [&EventType::Pick]);
        let config = self::config("").expect("valid");
        assert!(config.body_mappings().expect("valid").is_empty());
        let connector = HttpConnector::new(&config).expect("a connector");
        assert!(connector.bodies.is_empty());
    }

    #[test]
    fn bad_mappings_are_refused_at_start_naming_the_key() {
        let known = "v, id, type, ts, device, order, line, sku, qty, uom, location, lot, \
                     serial, reason, carrier, tracking, po, attrs.NAME, site, epoch, seq, \
                     received_at_ms";
        let cases: Vec<(&str, String)> = vec![
            (
                "[body.picks]\na = \"{id}\"\n",
                "key `sink.http.body.picks`: expected an event type: pick, ship, receive, \
                 adjust or count"
                    .into(),
            ),
            (
                "[body.pick]\n\"line.item\" = \"{skuu}\"\n",
                format!(
                    "key `sink.http.body.pick.\"line.item\"`: expected a known placeholder \
                     instead of {{skuu}}: one of {known}"
                ),
            ),
            (
                "[body.pick]\na = \"x {attrs.}\"\n",
                format!(
                    "key `sink.http.body.pick.a`: expected a known placeholder instead of \
                     {{attrs.}}: one of {known}"
                ),
            ),
            (
                "[body.pick]\nq = \"{qty:decimal}\"\n",
                "key `sink.http.body.pick.q`: expected a known conversion instead of \
                 {qty:decimal}: :number (on v, line, qty, seq, received_at_ms) or :date (on ts)"
                    .into(),
            ),
            (
                "[body.pick]\nitem = \"{sku:number}\"\n",
                "key `sink.http.body.pick.item`: expected :number only on a numeric field \
                 (v, line, qty, seq, received_at_ms), not in {sku:number}"
                    .into(),
            ),
            (
                "[body.pick]\nday = \"{received_at_ms:date}\"\n",
                "key `sink.http.body.pick.day`: expected :date only on ts, not in \
                 {received_at_ms:date}"
                    .into(),
            ),
            (
                "[body.pick]\n\"a\" = \"{id}\"\n\"a.b\" = \"{sku}\"\n",
                "key `sink.http.body.pick.\"a.b\"`: expected a body key that is a value or an \
                 object, not both: a is both"
                    .into(),
            ),
            (
                "[body.pick]\n\"a.b.c\" = \"{id}\"\n\"a.b\" = \"{sku}\"\n",
                "key `sink.http.body.pick.\"a.b.c\"`: expected a body key that is a value or \
                 an object, not both: a.b is both"
                    .into(),
            ),
            (
                "[body.pick]\n\"a.b\" = \"{id}\"\na.b = \"{sku}\"\n",
                "key `sink.http.body.pick.\"a.b\"`: expected each body key once: a.b is given \
                 twice"
                    .into(),
            ),
            (
                "[body.pick]\nnote = \"order {order\"\n",
                "key `sink.http.body.pick.note`: expected every { closed by a }: \"{order\" is \
                 not (write {{ for a literal {)"
                    .into(),
            ),
            (
                "[body.pick]\nnote = \"{order {sku}\"\n",
                "key `sink.http.body.pick.note`: expected every { closed by a }: \"{order \
                 {sku}\" is not (write {{ for a literal {)"
                    .into(),
            ),
            (
                "[body.pick]\nnote = \"{sku}}\"\n",
                "key `sink.http.body.pick.note`: expected a } only where it closes a \
                 placeholder (write }} for a literal })"
                    .into(),
            ),
            (
                "[body.pick]\n\"a..b\" = \"{id}\"\n",
                "key `sink.http.body.pick.\"a..b\"`: expected a body key of names separated \
                 by dots, none of them empty"
                    .into(),
            ),
            (
                "[body.pick]\n",
                "key `sink.http.body.pick`: expected at least one body key (leave the table \
                 out to post the canonical JSON)"
                    .into(),
            ),
        ];
        for (text, expected) in cases {
            let error = config_error(text);
            assert_eq!(error, format!("relay.toml: {expected}"), "{text}");
        }
        // Values the mapping cannot post are refused when the file is read.
        for (text, key) in [
            ("[body.pick]\nq = 1.5\n", "key `body.pick.q"),
            ("[body.pick]\nq = [\"{id}\"]\n", "key `body.pick.q"),
            ("[body.pick]\nq = 2026-11-22\n", "key `body.pick.q"),
        ] {
            let error = config_error(text);
            assert!(error.contains(key), "{text}: {error}");
        }
    }

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        let classify =
            |code: u16| classify(StatusCode::from_u16(code).unwrap(), None, "", None, "u");
        assert!(matches!(classify(201), Delivery::Posted { .. }));
        assert!(matches!(classify(409), Delivery::Posted { .. }));
        for code in [408, 425, 500, 502, 504] {
            assert!(
                matches!(classify(code), Delivery::Transient { .. }),
                "{code}"
            );
        }
        for code in [429, 503] {
            assert!(
                matches!(classify(code), Delivery::Throttled { .. }),
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
