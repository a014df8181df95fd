//! Waiting for the signals that ask a service to stop (SIGINT from a terminal, SIGTERM from
//! systemd).

/// Resolves when SIGINT or SIGTERM arrives; returns the signal's name.
pub async fn signalled() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(tokio::select! {
        _ = interrupt.recv() => "SIGINT",
        _ = terminate.recv() => "SIGTERM",
    })
}
