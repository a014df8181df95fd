//! Starts the relay's parts (embedded broker when configured, outbox, intake, connector, admin
//! HTTP), supervises them, and stops them on SIGINT or SIGTERM, or with an error as soon as
//! one of them ends on its own. The admin listener bounds how many connections it holds and how
//! long a slow or silent client may hold one (`[admin]` in config/relay.toml).

use std::net::ToSocketAddrs;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminState, router};
use crate::config::LoadedRelayConfig;
use backhaul_events::http_listener::{ConnectionLimits, serve};
use backhaul_events::service::{Heartbeats, Supervisor};

use crate::config::OutboxBackend;
use crate::connector::Connector;
use crate::connector::http::HttpConnector;
use crate::connector::ledger::Ledger;
use crate::connector::tryton::TrytonConnector;
use crate::engine::Engine;
use crate::intake::Intake;
use crate::metrics::RelayMetrics;
use crate::outbox::postgres::{PgOptions, PgOutbox};
use crate::outbox::{Outbox, OutboxOptions, RedbOutbox};

/// How many of the oldest waiting events the delivery engine sees, grouped by ordering key.
/// Enough that keys held back by retries leave plenty to deliver; about 100 bytes each.
const FRONTIER_EVENTS: usize = 100_000;
/// How long the tasks may take to finish once a stop is asked for.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(loaded: LoadedRelayConfig) -> anyhow::Result<()> {
    let config = loaded.config.clone();
    tracing::info!(config = %loaded.file.display(), "relay starting");
    if config.broker.embedded {
        let listen = (config.broker.host.as_str(), config.broker.port)
            .to_socket_addrs()
            .with_context(|| format!("broker.host {:?} does not resolve", config.broker.host))?
            .next()
            .with_context(|| format!("broker.host {:?} does not resolve", config.broker.host))?;
        let max = config.broker.max_frame_size.0 as usize;
        let logins = loaded
            .embedded_logins
            .iter()
            .map(|(user, password)| (user.clone(), password.expose().to_string()))
            .collect();
        tokio::task::spawn_blocking(move || crate::broker::start(listen, max, logins)).await??;
    }
    let state_dir = config.state_dir.clone();
    let options = OutboxOptions {
        cache_size: config.outbox.cache_size.0 as usize,
        dedup_ids: config.outbox.dedup_ids,
        frontier_events: FRONTIER_EVENTS,
        max_bytes: config.outbox.max_bytes.0,
        keep_batches: config.outbox.trace_days > 0,
    };
    let outbox: Arc<dyn Outbox> = match config.outbox.backend {
        OutboxBackend::Redb => {
            tokio::task::spawn_blocking(move || RedbOutbox::open(&state_dir, options)).await??
        }
        OutboxBackend::Postgres => {
            let options = PgOptions {
                url: config.outbox.url.clone().unwrap_or_default(),
                password: loaded.outbox_password.clone(),
                relay_id: config.broker.client_id.clone(),
                lease: Duration::from_secs(config.outbox.lease_secs),
                max_bytes: config.outbox.max_bytes.0,
                connections: config.outbox.connections,
                keep_batches: config.outbox.trace_days > 0,
            };
            tokio::task::spawn_blocking(move || PgOutbox::open(options)).await??
        }
    };
    tracing::info!(location = %outbox.location(), depth = outbox.depth(), "outbox open");
    let metrics = RelayMetrics::new();
    let stop = CancellationToken::new();
    let stored = Arc::new(tokio::sync::Notify::new());

    let connector = Arc::new(build_connector(&config, &outbox).await?);
    let heartbeats = Heartbeats::default();
    let mut tasks = Supervisor::default();
    let (outcomes_tx, outcomes_rx) = tokio::sync::mpsc::channel(1024);
    let attempts = Arc::new(crate::trace::AttemptLog::default());
    let engine = Engine {
        outbox: outbox.clone(),
        sink: connector.clone(),
        config: config.delivery.clone(),
        metrics: metrics.clone(),
        outcomes: outcomes_tx,
        wake: stored.clone(),
        heartbeat: heartbeats.register("delivery engine"),
        attempts: attempts.clone(),
        trace_retention: (config.outbox.trace_days > 0)
            .then(|| Duration::from_secs(config.outbox.trace_days * 86_400)),
    };
    tasks.spawn("delivery engine", engine.run(stop.clone()));

    let intake = Intake {
        broker: config.broker.clone(),
        login: loaded.broker_login.clone(),
        outbox: outbox.clone(),
        metrics: metrics.clone(),
        stored: stored.clone(),
        outcomes: outcomes_rx,
        heartbeat: heartbeats.register("batch intake"),
        keys: loaded.site_keys.clone(),
    };
    tasks.spawn("batch intake", intake.run(stop.clone()));

    let listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for admin HTTP on {} (admin.listen)",
                config.admin.listen
            )
        })?;
    tracing::info!(listen = %config.admin.listen, "relay admin listening");
    let admin_stop = stop.clone();
    let releasing = outbox.clone();
    let app = router(
        AdminState {
            outbox,
            metrics,
            wake: stored,
            attempts,
            erp: connector,
            trace_days: config.outbox.trace_days,
            reconciling: Arc::new(tokio::sync::Semaphore::new(1)),
        },
        Arc::new(loaded.admin_access.clone()),
    );
    let limits = ConnectionLimits::from(&config.admin);
    let serve = serve(listener, app, limits, admin_stop);
    tasks.spawn("admin HTTP", async move {
        serve.await;
        anyhow::Ok(())
    });

    // Everything is open and bound: tell systemd.
    let watchdog = backhaul_events::service::notify_ready(heartbeats);
    let ended = tasks.run_until_signal().await;
    backhaul_events::service::notify_stopping(watchdog);
    stop.cancel();
    match ended {
        Ok(signal) => tracing::info!(signal, "relay stopping"),
        Err(e) => {
            tracing::error!("relay stopping: {e:#}");
            tasks.drain(STOP_TIMEOUT).await;
            return Err(e);
        }
    }
    if !tasks.drain(STOP_TIMEOUT).await {
        tracing::warn!("stopped before every task finished");
    }
    // Keys this relay held go to the other relays now rather than when their leases run out.
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || releasing.release()).await {
        tracing::warn!(error = %e, "the keys this relay held could not be handed back; they pass to other relays when their leases run out");
    }
    tracing::info!("relay stopped");
    Ok(())
}

async fn build_connector(
    config: &crate::config::RelayConfig,
    outbox: &Arc<dyn Outbox>,
) -> anyhow::Result<Connector> {
    if let Some(ledger) = &config.sink.ledger {
        let path = ledger.path.clone();
        let outbox = outbox.clone();
        let ledger =
            tokio::task::spawn_blocking(move || Ledger::open(&path, outbox.as_ref())).await??;
        return Ok(Connector::Ledger(tokio::sync::Mutex::new(ledger)));
    }
    if let Some(http) = &config.sink.http {
        return Ok(Connector::Http(Box::new(HttpConnector::new(http)?)));
    }
    if let Some(tryton) = &config.sink.tryton {
        let password = tryton
            .password
            .resolve()
            .map_err(|e| anyhow::anyhow!("sink.tryton.password: {e}"))?;
        return Ok(Connector::Tryton(TrytonConnector::new(tryton, password)?));
    }
    if let Some(epcis) = &config.sink.epcis {
        return Ok(Connector::Epcis(Box::new(
            crate::connector::epcis::EpcisConnector::new(epcis)?,
        )));
    }
    anyhow::bail!("no connector is configured (sink)")
}
