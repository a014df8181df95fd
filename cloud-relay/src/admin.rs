//! The relay's admin HTTP: `/healthz`, `/readyz`, `/metrics` and `/v1/sites`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::metrics::RelayMetrics;
use crate::outbox::Outbox;

#[derive(Clone)]
pub struct AdminState {
    pub outbox: Arc<Outbox>,
    pub metrics: Arc<RelayMetrics>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/sites", get(sites))
        .route("/v1/status", get(status))
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
        "batches_received": state.metrics.batches_received.get(),
        "events_received": state.metrics.events_received.get(),
        "events_duplicate": state.metrics.events_duplicate.get(),
        "events_delivered": state.metrics.events_delivered.get(),
        "sites": state.outbox.sites().len(),
    }))
    .into_response()
}
