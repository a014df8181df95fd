//! Starts the relay's parts (embedded broker when configured, outbox, intake, connector, admin
//! HTTP) and stops them on SIGINT or SIGTERM.

use std::net::ToSocketAddrs;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::admin::{AdminState, router};
use crate::config::LoadedRelayConfig;
use crate::intake::Intake;
use crate::ledger::Ledger;
use crate::metrics::RelayMetrics;
use crate::outbox::Outbox;

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
        tokio::task::spawn_blocking(move || crate::broker::start(listen, max)).await??;
    }
    let state_dir = config.state_dir.clone();
    let cache = config.outbox.cache_size.0 as usize;
    let outbox = tokio::task::spawn_blocking(move || Outbox::open(&state_dir, cache)).await??;
    tracing::info!(path = %outbox.path().display(), depth = outbox.depth(), "outbox open");
    let metrics = RelayMetrics::new();
    let stop = CancellationToken::new();
    let stored = Arc::new(tokio::sync::Notify::new());

    let mut connector = None;
    if let Some(ledger) = &config.sink.ledger {
        let path = ledger.path.clone();
        let ledger_outbox = outbox.clone();
        let ledger =
            tokio::task::spawn_blocking(move || Ledger::open(&path, &ledger_outbox)).await??;
        connector = Some(tokio::spawn(ledger.run(
            outbox.clone(),
            metrics.clone(),
            stored.clone(),
            stop.clone(),
        )));
    }

    let intake = Intake {
        broker: config.broker.clone(),
        password: loaded.broker_password.clone(),
        outbox: outbox.clone(),
        metrics: metrics.clone(),
        stored,
    };
    let intake_task = tokio::spawn(intake.run(stop.clone()));

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
    let admin = tokio::spawn(async move {
        axum::serve(listener, router(AdminState { outbox, metrics }))
            .with_graceful_shutdown(async move { admin_stop.cancelled().await })
            .await
    });

    let signal = crate::shutdown::signalled().await?;
    tracing::info!(signal, "relay stopping");
    stop.cancel();
    let _ = intake_task.await;
    if let Some(task) = connector {
        let _ = task.await;
    }
    let _ = admin.await;
    tracing::info!("relay stopped");
    Ok(())
}
