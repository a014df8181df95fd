//! The relay's admin HTTP: `/healthz`, `/readyz`, `/metrics` and `/v1/sites`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::{Path, Query};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use crate::metrics::RelayMetrics;
use crate::outbox::Outbox;

#[derive(Clone)]
pub struct AdminState {
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<RelayMetrics>,
    /// Wakes the delivery engine after a replay.
    pub wake: Arc<tokio::sync::Notify>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/sites", get(sites))
        .route("/v1/status", get(status))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/{id}", get(dlq_show))
        .route("/v1/dlq/replay", post(dlq_replay))
        .route("/v1/dlq/discard", post(dlq_discard))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if state.metrics.broker_connected.get() == 1 {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not subscribed to the broker\n",
        )
            .into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(&state.outbox),
    )
        .into_response()
}

async fn sites(State(state): State<AdminState>) -> Response {
    let sites: Vec<_> = state
        .outbox
        .sites()
        .into_iter()
        .map(|s| {
            json!({
                "site": s.site, "epoch": s.epoch, "highest_seq": s.highest_seq,
                "last_seen_ms": s.last_seen_ms, "events_stored": s.events_stored,
                "events_duplicate": s.events_duplicate, "events_delivered": s.events_delivered,
                "events_dead_lettered": s.events_dead_lettered,
                "refusals_unacknowledged": s.refusals_unacknowledged,
                "outbox_depth": s.outbox_depth(),
            })
        })
        .collect();
    axum::Json(json!({ "sites": sites })).into_response()
}

async fn status(State(state): State<AdminState>) -> Response {
    let outbox = state.outbox.clone();
    let depth = tokio::task::spawn_blocking(move || outbox.depth())
        .await
        .unwrap_or(0);
    axum::Json(json!({
        "broker_connected": state.metrics.broker_connected.get() == 1,
        "outbox_depth": depth,
        "outbox_path": state.outbox.path().display().to_string(),
        "outbox_bytes": state.outbox.held_bytes(),
        "outbox_max_bytes": state.outbox.max_bytes(),
        "outbox_full": state.outbox.held_bytes() >= state.outbox.max_bytes(),
        "batches_received": state.metrics.batches_received.get(),
        "events_received": state.metrics.events_received.get(),
        "events_duplicate": state.metrics.events_duplicate.get(),
        "events_delivered": state.metrics.events_delivered.get(),
        "sites": state.outbox.sites().len(),
        "dlq_events": state.outbox.dead_letter_count(),
        "events_dead_lettered": state.metrics.events_dead_lettered.get(),
        "delivery_retries": state.metrics.delivery_retries.get(),
        "delivery_paused": state.metrics.delivery_paused.get() == 1,
    }))
    .into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        axum::Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    after: Option<u64>,
    limit: Option<usize>,
}

async fn dlq_list(State(state): State<AdminState>, Query(query): Query<ListQuery>) -> Response {
    let outbox = state.outbox.clone();
    let (after, limit) = (
        query.after.unwrap_or(0),
        query.limit.unwrap_or(100).min(10_000),
    );
    match tokio::task::spawn_blocking(move || outbox.dead_letters(after, limit)).await {
        Ok(Ok(letters)) => {
            let total = state.outbox.dead_letter_count();
            let items: Vec<_> = letters
                .iter()
                .map(|l| {
                    json!({
                        "id": l.id, "site": l.event.site, "event_id": l.event.event.id,
                        "type": l.event.event.kind, "seq": l.event.seq, "at_ms": l.at_ms,
                        "attempts": l.attempts, "reason": l.reason,
                    })
                })
                .collect();
            axum::Json(json!({"total": total, "dead_letters": items})).into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn dlq_show(State(state): State<AdminState>, Path(id): Path<u64>) -> Response {
    let outbox = state.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.dead_letters(id.saturating_sub(1), 1)).await {
        Ok(Ok(letters)) => match letters.into_iter().find(|l| l.id == id) {
            Some(l) => axum::Json(json!({
                "id": l.id, "reason": l.reason, "at_ms": l.at_ms, "attempts": l.attempts,
                "event": l.event.to_json(),
            }))
            .into_response(),
            None => (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": format!("no dead letter {id}")})),
            )
                .into_response(),
        },
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct Selection {
    #[serde(default)]
    ids: Vec<u64>,
    #[serde(default)]
    all: bool,
}

async fn dlq_replay(
    State(state): State<AdminState>,
    axum::Json(selection): axum::Json<Selection>,
) -> Response {
    if !selection.all && selection.ids.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "name dead letters in \"ids\", or set \"all\": true"})),
        )
            .into_response();
    }
    let outbox = state.outbox.clone();
    let ids = (!selection.all).then_some(selection.ids);
    match tokio::task::spawn_blocking(move || outbox.replay(ids.as_deref())).await {
        Ok(Ok(replayed)) => {
            state.wake.notify_one();
            tracing::info!(count = replayed.len(), "dead letters replayed");
            axum::Json(json!({"replayed": replayed})).into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn dlq_discard(
    State(state): State<AdminState>,
    axum::Json(selection): axum::Json<Selection>,
) -> Response {
    if selection.ids.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "name the dead letters to discard in \"ids\""})),
        )
            .into_response();
    }
    let outbox = state.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.discard(&selection.ids)).await {
        Ok(Ok(discarded)) => {
            tracing::info!(ids = ?discarded, "dead letters discarded");
            axum::Json(json!({"discarded": discarded})).into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}
