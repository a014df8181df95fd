//! The relay's admin HTTP: `/healthz`, `/readyz`, `/metrics`, `/v1/status`, `/v1/sites` and
//! the dead-letter queue (`/v1/dlq...`), whose answers and requests are the types of
//! `backhaul_events::admin`, and which token each of them needs.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::extract::{Path, Query};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use backhaul_events::admin::{
    DeadLetter, DeadLetterSummary, DeadLettersAnswer, DiscardAnswer, DiscardRequest, ErrorAnswer,
    RelayStatus, ReplayAnswer, ReplayRequest, SiteSummary, SitesAnswer,
};
use backhaul_events::admin_access;
use backhaul_events::config::{AdminAccess, AdminRight};
use serde::Deserialize;

use crate::metrics::RelayMetrics;
use crate::outbox::{Outbox, SiteRecord};
use crate::trace::AttemptLog;

#[derive(Clone)]
pub struct AdminState {
    pub outbox: Arc<dyn Outbox>,
    pub metrics: Arc<RelayMetrics>,
    /// Wakes the delivery engine after a replay.
    pub wake: Arc<tokio::sync::Notify>,
    /// The delivery engine's attempts of events still waiting.
    pub attempts: Arc<AttemptLog>,
    /// The connector, asked what the ERP holds when reconciling.
    pub erp: Arc<crate::connector::Connector>,
    /// `outbox.trace_days`: how far back the relay knows what became of delivered events.
    pub trace_days: u64,
    /// One reconciliation at a time: each reads a site's whole window and asks the ERP.
    pub reconciling: Arc<tokio::sync::Semaphore>,
}

/// The admin API: health for anyone who can reach it, reads for a read token, dead-letter
/// replay and discard for the write token (`[admin]` in config/relay.toml).
pub fn router(state: AdminState, access: Arc<AdminAccess>) -> Router {
    let reads = Router::new()
        .route("/metrics", get(metrics))
        .route("/v1/sites", get(sites))
        .route("/v1/status", get(status))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/{id}", get(dlq_show))
        .route("/v1/events/{id}", get(event_trace))
        .route("/v1/sites/{site}/delivered", get(site_delivered))
        .route("/v1/reconcile", get(reconcile));
    let writes = Router::new()
        .route("/v1/dlq/replay", post(dlq_replay))
        .route("/v1/dlq/discard", post(dlq_discard));
    Router::new()
        .merge(admin_access::require(
            reads,
            access.clone(),
            AdminRight::Read,
        ))
        .merge(admin_access::require(writes, access, AdminRight::Write))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
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
        state.metrics.render(state.outbox.as_ref()),
    )
        .into_response()
}

/// One site's line of `/v1/sites`. The record is taken apart without `..`, so a counter added
/// to it does not compile until it is put on the wire here (or deliberately left out).
fn site_summary(record: SiteRecord) -> SiteSummary {
    let outbox_depth = record.outbox_depth();
    let SiteRecord {
        site,
        epoch,
        highest_seq,
        last_seen_ms,
        events_stored,
        events_duplicate,
        events_delivered,
        events_dead_lettered,
        events_discarded,
        // The numbering of refusals is the outbox's bookkeeping, not the operator's.
        refusals_numbered: _,
        refusals_unacknowledged,
    } = record;
    SiteSummary {
        site,
        epoch,
        highest_seq,
        last_seen_ms,
        events_stored,
        events_duplicate,
        events_delivered,
        events_dead_lettered,
        events_discarded,
        refusals_unacknowledged,
        outbox_depth,
    }
}

async fn sites(State(state): State<AdminState>) -> Response {
    let answer = SitesAnswer {
        sites: state.outbox.sites().into_iter().map(site_summary).collect(),
    };
    axum::Json(answer).into_response()
}

async fn status(State(state): State<AdminState>) -> Response {
    let outbox = state.outbox.clone();
    let depth = tokio::task::spawn_blocking(move || outbox.depth())
        .await
        .unwrap_or(0);
    let metrics = &state.metrics;
    let held_bytes = state.outbox.held_bytes();
    let answer = RelayStatus {
        broker_connected: metrics.broker_connected.get() == 1,
        outbox_depth: depth,
        outbox_path: state.outbox.location(),
        outbox_bytes: held_bytes,
        outbox_max_bytes: state.outbox.max_bytes(),
        outbox_full: held_bytes >= state.outbox.max_bytes(),
        batches_received: metrics.batches_received.get(),
        events_received: metrics.events_received.get(),
        events_duplicate: metrics.events_duplicate.get(),
        events_delivered: metrics.events_delivered.get(),
        sites: state.outbox.sites().len() as u64,
        dlq_events: state.outbox.dead_letter_count(),
        events_dead_lettered: metrics.events_dead_lettered.get(),
        delivery_retries: metrics.delivery_retries.get(),
        delivery_paused: metrics.delivery_paused.get() == 1,
    };
    axum::Json(answer).into_response()
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let answer = ErrorAnswer {
        error: message.into(),
    };
    (status, axum::Json(answer)).into_response()
}

fn internal(e: impl std::fmt::Display) -> Response {
    refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
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
            let answer = DeadLettersAnswer {
                total: state.outbox.dead_letter_count(),
                dead_letters: letters
                    .into_iter()
                    .map(|l| DeadLetterSummary {
                        id: l.id,
                        site: l.event.site,
                        event_id: l.event.event.id,
                        kind: l.event.event.kind,
                        seq: l.event.seq,
                        at_ms: l.at_ms,
                        attempts: l.attempts,
                        reason: l.reason,
                    })
                    .collect(),
            };
            axum::Json(answer).into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn dlq_show(State(state): State<AdminState>, Path(id): Path<u64>) -> Response {
    let outbox = state.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.dead_letters(id.saturating_sub(1), 1)).await {
        Ok(Ok(letters)) => match letters.into_iter().find(|l| l.id == id) {
            Some(l) => axum::Json(DeadLetter {
                event: l.event.to_json(),
                id: l.id,
                reason: l.reason,
                at_ms: l.at_ms,
                attempts: l.attempts,
            })
            .into_response(),
            None => refuse(StatusCode::NOT_FOUND, format!("no dead letter {id}")),
        },
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct TraceQuery {
    site: Option<String>,
}

/// `GET /v1/events/{id}?site=S`: the event's trace at every site that has an event of that id
/// (or at `site`), as `{"traces": [...]}`; 404 when none is known.
async fn event_trace(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    Query(query): Query<TraceQuery>,
) -> Response {
    let (outbox, attempts) = (state.outbox.clone(), state.attempts.clone());
    let site = query.site.clone();
    let lookup = tokio::task::spawn_blocking(move || {
        crate::trace::trace(outbox.as_ref(), &attempts, site.as_deref(), &id).map(|t| (id, t))
    })
    .await;
    match lookup {
        Ok(Ok((id, traces))) if traces.is_empty() => refuse(
            StatusCode::NOT_FOUND,
            match query.site {
                Some(site) => format!(
                    "no event {id} of site {site} is waiting, or left the outbox within the \
                     trace retention (outbox.trace_days)"
                ),
                None => format!(
                    "no event {id} of any site is waiting, or left the outbox within the \
                     trace retention (outbox.trace_days)"
                ),
            },
        ),
        Ok(Ok((_, traces))) => axum::Json(serde_json::json!({ "traces": traces })).into_response(),
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

/// An answer of `GET /v1/sites/{site}/delivered` (the epoch as text: JSON readers lose a
/// 128-bit number).
#[derive(Debug, serde::Serialize, Deserialize)]
pub struct DeliveredAnswer {
    pub events: Vec<DeliveredEvent>,
    pub next_after: Option<String>,
}

#[derive(Debug, serde::Serialize, Deserialize)]
pub struct DeliveredEvent {
    pub site: String,
    pub epoch: String,
    pub seq: u64,
    pub received_at_ms: i64,
    pub event: backhaul_events::Event,
}

impl DeliveredEvent {
    fn of(stamped: backhaul_events::StampedEvent) -> DeliveredEvent {
        DeliveredEvent {
            site: stamped.site,
            epoch: stamped.epoch.to_string(),
            seq: stamped.seq,
            received_at_ms: stamped.received_at_ms,
            event: stamped.event,
        }
    }

    pub fn into_stamped(self) -> Result<backhaul_events::StampedEvent, String> {
        Ok(backhaul_events::StampedEvent {
            site: self.site,
            epoch: self.epoch.parse()?,
            seq: self.seq,
            received_at_ms: self.received_at_ms,
            event: self.event,
        })
    }
}

#[derive(Deserialize)]
struct DeliveredQuery {
    /// First and last calendar day (YYYY-MM-DD) of the events' own timestamps, inclusive.
    from: String,
    to: String,
    #[serde(default)]
    after: String,
    limit: Option<usize>,
}

/// `GET /v1/sites/{site}/delivered?from=DAY&to=DAY`: the site's events the ERP took whose
/// timestamps fall on those days, as far as the trace retention reaches, in pages by id
/// (`after`: the last id of the previous page, as `next_after` says).
async fn site_delivered(
    State(state): State<AdminState>,
    Path(site): Path<String>,
    Query(query): Query<DeliveredQuery>,
) -> Response {
    for (name, day) in [("from", &query.from), ("to", &query.to)] {
        if let Err(e) = crate::reconcile::parse_day(name, day) {
            return refuse(StatusCode::BAD_REQUEST, e);
        }
    }
    let limit = query.limit.unwrap_or(10_000).clamp(1, 100_000);
    let outbox = state.outbox.clone();
    let read = tokio::task::spawn_blocking(move || {
        outbox.site_traces(&site, &query.after, limit).map(|page| {
            let next_after = (page.len() == limit)
                .then(|| page.last().map(|t| t.event.event.id.clone()))
                .flatten();
            let events: Vec<_> = page
                .into_iter()
                .filter(|t| t.finished == crate::trace::Finished::Posted)
                .map(|t| t.event)
                .filter(|e| {
                    let day = e.event.ts.get(..10).unwrap_or_default();
                    day >= query.from.as_str() && day <= query.to.as_str()
                })
                .map(DeliveredEvent::of)
                .collect();
            (events, next_after)
        })
    })
    .await;
    match read {
        Ok(Ok((events, next_after))) => {
            axum::Json(DeliveredAnswer { events, next_after }).into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

#[derive(Deserialize)]
struct ReconcileQuery {
    site: String,
    from: String,
    to: String,
}

/// Days reconciled in one report at most.
const RECONCILE_MAX_DAYS: i64 = 366;

/// `GET /v1/reconcile?site=S&from=DAY&to=DAY`: the site's days side by side, from its
/// agent's tally to what the ERP holds, with every event that differs (see `reconcile`).
async fn reconcile(
    State(state): State<AdminState>,
    Query(query): Query<ReconcileQuery>,
) -> Response {
    use crate::reconcile::{ErpHoldings, Inputs, RelayState, parse_day, relay_side, report};
    if let Err(e) = backhaul_events::topics::check_site_id(&query.site) {
        return refuse(StatusCode::BAD_REQUEST, format!("site: expected {e}"));
    }
    let (from, to) = match (parse_day("from", &query.from), parse_day("to", &query.to)) {
        (Ok(from), Ok(to)) => (from, to),
        (Err(e), _) | (_, Err(e)) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    if to < from || (to - from).whole_days() >= RECONCILE_MAX_DAYS {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "to: a day from `from` to {} days after it (got {from} to {to})",
                RECONCILE_MAX_DAYS - 1
            ),
        );
    }
    let Ok(_running) = state.reconciling.clone().try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "a reconciliation is already running on this relay; ask again when it has finished"
                .to_string(),
        );
    };
    let outbox = state.outbox.clone();
    let site = query.site.clone();
    let days = crate::reconcile::day_number(from)..=crate::reconcile::day_number(to);
    let gathered = tokio::task::spawn_blocking(move || {
        let tally = outbox.tally(&site)?;
        let mut seen = std::collections::BTreeSet::new();
        let known = relay_side(outbox.as_ref(), &site, days, &mut seen)?;
        Ok::<_, crate::outbox::OutboxError>((tally, known, seen))
    })
    .await;
    let (tally, known, seen) = match gathered {
        Ok(Ok(gathered)) => gathered,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let posted: Vec<(String, String)> = known
        .iter()
        .filter_map(|k| match &k.state {
            RelayState::Posted { erp_ref } => Some((k.id.clone(), erp_ref.clone())),
            _ => None,
        })
        .collect();
    let erp = match state.erp.holdings(&query.site, &posted).await {
        Ok(holdings) => holdings,
        Err(e) => ErpHoldings::NotAvailable(format!("asking it failed: {e}")),
    };
    let quantities = state.erp.booked_quantities(&known).await;
    use crate::connector::Sink;
    let (erp_name, trace_days) = (state.erp.name(), state.trace_days);
    let site = query.site;
    let answer = tokio::task::spawn_blocking(move || {
        report(&Inputs {
            site: &site,
            from,
            to,
            tally: tally.as_ref(),
            known: &known,
            seen: &seen,
            erp_name,
            erp: &erp,
            trace_days,
            now_ms: crate::outbox::now_ms(),
            quantities,
        })
    })
    .await;
    match answer {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => internal(e),
    }
}

async fn dlq_replay(
    State(state): State<AdminState>,
    axum::Json(selection): axum::Json<ReplayRequest>,
) -> Response {
    if !selection.all && selection.ids.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "name dead letters in \"ids\", or set \"all\": true",
        );
    }
    let outbox = state.outbox.clone();
    let ids = (!selection.all).then_some(selection.ids);
    match tokio::task::spawn_blocking(move || outbox.replay(ids.as_deref())).await {
        Ok(Ok(replayed)) => {
            state.wake.notify_one();
            tracing::info!(count = replayed.len(), "dead letters replayed");
            axum::Json(ReplayAnswer { replayed }).into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}

async fn dlq_discard(
    State(state): State<AdminState>,
    axum::Json(selection): axum::Json<DiscardRequest>,
) -> Response {
    if selection.ids.is_empty() {
        return refuse(
            StatusCode::BAD_REQUEST,
            "name the dead letters to discard in \"ids\"",
        );
    }
    let outbox = state.outbox.clone();
    match tokio::task::spawn_blocking(move || outbox.discard(&selection.ids)).await {
        Ok(Ok(discarded)) => {
            tracing::info!(ids = ?discarded, "dead letters discarded");
            axum::Json(DiscardAnswer { discarded }).into_response()
        }
        Ok(Err(e)) => internal(e),
        Err(e) => internal(e),
    }
}
