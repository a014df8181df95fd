//! Starts the agent's parts from a loaded configuration and stops them on a signal.

use axum::Router;
use axum::routing::get;

use crate::config::LoadedAgentConfig;
use crate::shutdown;

pub async fn run(loaded: LoadedAgentConfig) -> anyhow::Result<()> {
    let config = &loaded.config;
    tracing::info!(site = %config.site, config = %loaded.file.display(), "agent starting");
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for HTTP on {}: {e}", config.http.listen))?;
    let app = Router::new().route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            match shutdown::signalled().await {
                Ok(signal) => tracing::info!(signal, "agent stopping"),
                Err(e) => tracing::error!("cannot wait for signals: {e}"),
            }
        })
        .await?;
    Ok(())
}
