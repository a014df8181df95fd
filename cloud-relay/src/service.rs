//! Starts the relay's parts from a loaded configuration and stops them on a signal.

use crate::config::LoadedRelayConfig;

pub async fn run(loaded: LoadedRelayConfig) -> anyhow::Result<()> {
    tracing::info!(config = %loaded.file.display(), "relay starting");
    let signal = crate::shutdown::signalled().await?;
    tracing::info!(signal, "relay stopping");
    Ok(())
}
