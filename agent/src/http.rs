//! The agent's HTTP side: on the ingest listener (`[http]`), `POST /v1/events` for the WMS (202
//! only after the flush); on the admin listener (`[admin]`, loopback by default, a read token
//! when set), `/metrics`, `/v1/status`, `/v1/rejects`, `/v1/log` and `/v1/tail`, whose answers
//! are the types of `backhaul_events::admin`. Both answer `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use backhaul_events::admin::{
    self, AgentStatus, Backlog, ByTransport, EventsAnswer, Ingest, LogFile, MqttListener, Quota,
    RejectsAnswer,
};
use backhaul_events::admin_access;
use backhaul_events::config::{AdminAccess, AdminRight, Secret};
use backhaul_events::event::{MAX_EVENT_BYTES, parse_event_value};
use backhaul_events::{Event, Violation};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::log::{Appended, EventLog, LogError, RejectRecord, RejectsPage, now_ms};
use crate::metrics::{AgentMetrics, HTTP, MQTT, SITE_BROKER, TransportLabel};
use crate::mqtt::Endpoint;

/// The most events one request may carry.
pub const MAX_EVENTS_PER_REQUEST: usize = 1000;
/// How long a producer refused for a full quota should wait before retrying.
const RETRY_AFTER_SECS: u64 = 5;

#[derive(Clone)]
pub struct HttpState {
    pub site: String,
    pub log: EventLog,
    pub metrics: Arc<AgentMetrics>,
    pub mqtt: Option<Arc<Endpoint>>,
    pub mqtt_listen: Option<String>,
    pub token: Option<Secret>,
    pub started: Instant,
    pub link: Option<crate::forward::SharedLinkStatus>,
    pub site_broker: Option<crate::site_broker::SharedSiteBrokerStatus>,
}

/// Room for a full array of maximal events and its punctuation.
const BODY_LIMIT: usize = MAX_EVENTS_PER_REQUEST * (MAX_EVENT_BYTES + 2) + 1024;
/// Request bodies the ingest listener holds in memory at once, at most, in KiB. A request
/// over it is answered 503 with Retry-After before its body is read: a few clients posting
/// the largest bodies must not take the memory the log and MQTT need.
const BODIES_IN_MEMORY_KIB: u32 = 64 * 1024;

/// The ingest listener (`[http]`): what the WMS needs, and nothing that hands events out.
pub fn ingest_router(state: HttpState) -> Router {
    let bodies = Arc::new(Semaphore::new(BODIES_IN_MEMORY_KIB as usize));
    Router::new()
        .route(
            "/v1/events",
            post(post_events).layer(middleware::from_fn_with_state(bodies, reserve_body_memory)),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}

/// Takes the request body's share of [`BODIES_IN_MEMORY_KIB`] (its `Content-Length`, or the
/// largest body allowed when it has none) for as long as the request is handled.
async fn reserve_body_memory(
    State(bodies): State<Arc<Semaphore>>,
    request: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(BODY_LIMIT)
        .min(BODY_LIMIT);
    let kib = (declared.div_ceil(1024).max(1) as u32).min(BODIES_IN_MEMORY_KIB);
    let Ok(_reserved) = bodies.try_acquire_many(kib) else {
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "the agent holds {} MiB of request bodies in memory at once and that is in use; \
                 retry shortly",
                BODIES_IN_MEMORY_KIB / 1024
            ),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    };
    next.run(request).await
}

/// The admin listener (`[admin]`): health for anyone who can reach it, everything that shows
/// events or the agent's state for a read token.
pub fn admin_router(state: HttpState, access: Arc<AdminAccess>) -> Router {
    let reads = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/rejects", get(rejects))
        .route("/v1/log", get(read_log))
        .route("/v1/tail", get(tail));
    admin_access::require(reads, access, AdminRight::Read)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let answer = admin::ErrorAnswer {
        error: message.into(),
    };
    (status, axum::Json(answer)).into_response()
}

fn violations_json(violations: &[Violation]) -> Vec<Value> {
    violations
        .iter()
        .map(|v| json!({"field": v.field, "rule": v.rule, "message": v.to_string()}))
        .collect()
}

fn authorized(state: &HttpState, headers: &HeaderMap) -> bool {
    let Some(token) = &state.token else {
        return true;
    };
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    token.matches(given)
}

async fn post_events(
    State(state): State<HttpState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !authorized(&state, &headers) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "a bearer token is required: send `Authorization: Bearer <token>`",
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let text = body.trim_ascii_start();
    let items: Vec<&RawValue> = if text.first() == Some(&b'[') {
        match serde_json::from_slice(text) {
            Ok(items) => items,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not a valid JSON array: {e}"),
                );
            }
        }
    } else {
        match serde_json::from_slice(text) {
            Ok(item) => vec![item],
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not valid JSON: {e}"),
                );
            }
        }
    };
    if items.is_empty() {
        return error(StatusCode::BAD_REQUEST, "the array holds no events");
    }
    if items.len() > MAX_EVENTS_PER_REQUEST {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "at most {MAX_EVENTS_PER_REQUEST} events per request (got {})",
                items.len()
            ),
        );
    }
    let mut results: Vec<Value> = Vec::with_capacity(items.len());
    let mut valid: Vec<(usize, Event)> = Vec::new();
    let mut rejected = 0usize;
    for (index, raw) in items.iter().enumerate() {
        match parse_event_value(raw) {
            Ok(event) => {
                results.push(Value::Null);
                valid.push((index, event));
            }
            Err(violations) => {
                rejected += 1;
                let id = serde_json::from_str::<Value>(raw.get())
                    .ok()
                    .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string));
                results.push(json!({
                    "index": index, "id": id, "status": "rejected",
                    "violations": violations_json(&violations.0),
                }));
                state.metrics.rejected.get_or_create(&HTTP).inc();
                // The reject store is for inspection; its write need not hold up the answer.
                drop(state.log.record_reject(RejectRecord::new(
                    "http",
                    format!("http {peer}"),
                    raw.get().as_bytes(),
                    violations.0,
                )));
            }
        }
    }
    let mut accepted = 0usize;
    let mut duplicates = 0usize;
    let mut refused = 0usize;
    if !valid.is_empty() {
        let events = valid.iter().map(|(_, e)| e.clone()).collect();
        let outcomes = match state.log.append(events).await {
            Ok(outcomes) => outcomes,
            Err(e) => {
                tracing::error!(error = %e, "events from HTTP could not be logged");
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("the events were not stored: {e}"),
                );
            }
        };
        for ((index, event), outcome) in valid.iter().zip(outcomes) {
            results[*index] = match outcome {
                Appended::Stored { seq } => {
                    accepted += 1;
                    json!({"index": index, "id": event.id, "status": "accepted", "seq": seq})
                }
                Appended::Duplicate { seq } => {
                    duplicates += 1;
                    json!({"index": index, "id": event.id, "status": "duplicate", "seq": seq})
                }
                Appended::QuotaExceeded => {
                    refused += 1;
                    json!({"index": index, "id": event.id, "status": "refused",
                           "reason": "the agent's disk quota is full; retry later"})
                }
            };
        }
        state
            .metrics
            .accepted
            .get_or_create(&HTTP)
            .inc_by(accepted as u64);
        state
            .metrics
            .duplicates
            .get_or_create(&HTTP)
            .inc_by(duplicates as u64);
        state
            .metrics
            .quota_refusals
            .get_or_create(&HTTP)
            .inc_by(refused as u64);
    }
    let body = json!({
        "accepted": accepted, "duplicates": duplicates, "rejected": rejected, "refused": refused,
        "results": results,
    });
    if refused > 0 {
        let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        return response;
    }
    if accepted + duplicates == 0 {
        let mut body = body;
        body["error"] = json!(if items.len() == 1 {
            "the event was refused"
        } else {
            "every event was refused"
        });
        if items.len() == 1 {
            body["violations"] = body["results"][0]["violations"].clone();
        }
        return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
    }
    (StatusCode::ACCEPTED, axum::Json(body)).into_response()
}

async fn readyz(State(state): State<HttpState>) -> Response {
    let stats = state.log.stats();
    if stats.quota_exceeded {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the log's disk quota is full\n",
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(state): State<HttpState>) -> Response {
    let text = state.metrics.render(&state.log);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

fn by_transport(
    family: &prometheus_client::metrics::family::Family<
        TransportLabel,
        prometheus_client::metrics::counter::Counter,
    >,
) -> ByTransport {
    ByTransport {
        mqtt: family.get_or_create(&MQTT).get(),
        http: family.get_or_create(&HTTP).get(),
        site_broker: family.get_or_create(&SITE_BROKER).get(),
    }
}

// The conversions below take the internal records apart without `..`, so a field added to
// one of them does not compile until it is put on the wire here (or deliberately left out).

fn link_wire(link: &crate::forward::LinkStatus) -> admin::LinkStatus {
    let crate::forward::LinkStatus {
        state,
        since_ms,
        last_error,
        last_ack_ms,
        acked_through,
        batches_in_flight,
        events_in_flight,
        batches_sent,
        batches_resent,
        events_forwarded,
        reconnects,
        erp_posted,
    } = link;
    admin::LinkStatus {
        state: (*state).to_string(),
        since_ms: *since_ms,
        last_error: last_error.clone(),
        last_ack_ms: *last_ack_ms,
        acked_through: *acked_through,
        batches_in_flight: *batches_in_flight as u64,
        events_in_flight: *events_in_flight,
        batches_sent: *batches_sent,
        batches_resent: *batches_resent,
        events_forwarded: *events_forwarded,
        reconnects: *reconnects,
        erp_posted: *erp_posted,
    }
}

fn site_broker_wire(status: &crate::site_broker::SiteBrokerStatus) -> admin::SiteBrokerStatus {
    let crate::site_broker::SiteBrokerStatus {
        state,
        since_ms,
        last_error,
    } = status;
    admin::SiteBrokerStatus {
        state: (*state).to_string(),
        since_ms: *since_ms,
        last_error: last_error.clone(),
    }
}

fn reject_wire(id: u64, record: RejectRecord) -> admin::Reject {
    let RejectRecord {
        at_ms,
        transport,
        sender,
        payload,
        payload_truncated,
        violations,
    } = record;
    admin::Reject {
        id,
        at_ms,
        transport,
        sender,
        payload,
        payload_truncated,
        violations,
    }
}

/// The latest `limit` ERP refusals, newest first; none when the log cannot be read, because
/// the pages that show them must still answer.
async fn latest_refusals(log: &EventLog, limit: usize) -> Vec<admin::ErpRefusal> {
    let log = log.clone();
    tokio::task::spawn_blocking(move || log.erp_refusals(limit))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

async fn status(State(state): State<HttpState>) -> Response {
    let stats = state.log.stats();
    // The status page shows the latest few; /v1/rejects has them all.
    let erp_refusals = latest_refusals(&state.log, 20).await;
    let oldest_age = stats
        .oldest_received_at_ms
        .map(|t| (now_ms() - t).max(0) as f64 / 1000.0);
    let metrics = &state.metrics;
    let answer = AgentStatus {
        site: state.site.clone(),
        epoch: stats.epoch.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: state.started.elapsed().as_secs(),
        backlog: Backlog {
            events: stats.backlog_events,
            bytes: stats.backlog_bytes,
            oldest_seq: stats.oldest_seq,
            oldest_age_seconds: oldest_age,
            next_seq: stats.next_seq,
        },
        quota: Quota {
            max_bytes: stats.max_bytes,
            used_bytes: stats.backlog_bytes,
            rejects_bytes: stats.rejects_bytes,
            used_ratio: stats.backlog_bytes as f64 / stats.max_bytes.max(1) as f64,
            exceeded: stats.quota_exceeded,
        },
        log: LogFile {
            path: state.log.path().display().to_string(),
            file_bytes: stats.file_bytes,
            flushes: stats.flushes,
            compactions: stats.compactions,
        },
        ingest: Ingest {
            accepted: by_transport(&metrics.accepted),
            duplicates: by_transport(&metrics.duplicates),
            rejected: by_transport(&metrics.rejected),
            quota_refusals: by_transport(&metrics.quota_refusals),
        },
        mqtt: MqttListener {
            listen: state.mqtt_listen.clone(),
            connected_clients: state
                .mqtt
                .as_ref()
                .map(|m| m.connected_clients())
                .unwrap_or(0),
        },
        rejects_stored: stats.rejects_stored,
        rejects_not_kept: stats.rejects_not_kept,
        link: state
            .link
            .as_ref()
            .and_then(|l| l.lock().ok().map(|l| link_wire(&l))),
        erp_refusals_stored: stats.erp_refusals_stored,
        erp_refusals,
        site_broker: state
            .site_broker
            .as_ref()
            .and_then(|b| b.lock().ok().map(|b| site_broker_wire(&b))),
    };
    axum::Json(answer).into_response()
}

#[derive(Deserialize)]
struct RejectsQuery {
    limit: Option<usize>,
    /// Older than this id, newest first (the next page of a listing).
    before: Option<u64>,
    /// Newer than this id, oldest first (following new rejects).
    after: Option<u64>,
}

async fn rejects(State(state): State<HttpState>, Query(query): Query<RejectsQuery>) -> Response {
    // Rejects keep up to 16 KiB of payload each: a bounded page keeps the answer small.
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let page = match (query.before, query.after) {
        (Some(_), Some(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "before and after cannot be combined: page back with before, follow with after",
            );
        }
        (_, Some(after)) => RejectsPage::After(after),
        (before, None) => RejectsPage::Before(before.unwrap_or(u64::MAX)),
    };
    let state_for_read = state.clone();
    let read = tokio::task::spawn_blocking(move || state_for_read.log.rejects_page(page, limit))
        .await
        .map_err(|e| LogError::Storage(e.to_string()))
        .and_then(|r| r);
    match read {
        Ok(list) => {
            // The next page of a listing: older than the oldest shown, when the page was full.
            let next_before = match page {
                RejectsPage::Before(_) if list.len() == limit => list.last().map(|(id, _)| *id),
                _ => None,
            };
            let answer = RejectsAnswer {
                rejects: list
                    .into_iter()
                    .map(|(id, record)| reject_wire(id, record))
                    .collect(),
                next_before,
                erp_refusals: latest_refusals(&state.log, limit).await,
            };
            axum::Json(answer).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct LogQuery {
    from: Option<u64>,
    limit: Option<usize>,
}

/// Events still in the log, in sequence order, as stamped records.
async fn read_log(State(state): State<HttpState>, Query(query): Query<LogQuery>) -> Response {
    let from = query.from.unwrap_or(0);
    let limit = query.limit.unwrap_or(1000).min(100_000);
    let log = state.log.clone();
    let read = tokio::task::spawn_blocking(move || log.read_from(from, limit, usize::MAX)).await;
    match read {
        Ok(Ok(records)) => axum::Json(EventsAnswer {
            events: stamped_json(&state, records),
        })
        .into_response(),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

#[derive(Deserialize)]
struct TailQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

/// The latest accepted events (durable), after a sequence number, for `backhaul-agent tail`.
async fn tail(State(state): State<HttpState>, Query(query): Query<TailQuery>) -> Response {
    let records = state.log.recent(
        query.after.unwrap_or(0),
        query.limit.unwrap_or(1000).min(1000),
    );
    axum::Json(EventsAnswer {
        events: stamped_json(&state, records),
    })
    .into_response()
}

/// Logged events as the stamped JSON records the admin API answers with.
fn stamped_json(state: &HttpState, records: Vec<(u64, crate::log::LoggedEvent)>) -> Vec<Value> {
    let epoch = state.log.epoch();
    records
        .into_iter()
        .map(|(seq, record)| {
            backhaul_events::StampedEvent {
                site: state.site.clone(),
                epoch,
                seq,
                received_at_ms: record.received_at_ms,
                event: record.event,
            }
            .to_json()
        })
        .collect()
}
