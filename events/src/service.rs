//! What both services' processes share (feature `service`): structured logging, the
//! `check-config` and `run` command bodies, waiting for SIGINT/SIGTERM, and the systemd notify
//! protocol (readiness, watchdog, stopping).

use std::fmt::Debug;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::config::ConfigError;

/// Logs to stderr; `BACKHAUL_LOG` filters (default `info`), `BACKHAUL_LOG_FORMAT=json` gives
/// one JSON object per line for journald and log shippers.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BACKHAUL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let json = std::env::var("BACKHAUL_LOG_FORMAT").is_ok_and(|f| f == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `check-config`: prints the loaded configuration with secrets redacted, or the error.
pub fn check_config<T: Debug>(file: &Path, loaded: Result<T, ConfigError>) -> ExitCode {
    match loaded {
        Ok(config) => {
            // A closed stdout (`| head`) is not an error worth a panic.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}: OK", file.display());
            let _ = writeln!(out, "{config:#?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `run`: logging, the configuration (exit 2 when it is bad), then the service on a runtime.
pub fn run<T, F>(
    name: &str,
    loaded: Result<T, ConfigError>,
    service: impl FnOnce(T) -> F,
) -> ExitCode
where
    F: Future<Output = anyhow::Result<()>>,
{
    init_logging();
    let loaded = match loaded {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(service(loaded)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{name} stopped: {e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

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

/// Tells systemd (Type=notify) the service is ready, and feeds its watchdog from the runtime
/// so a wedged process gets restarted. Outside systemd this does nothing.
pub fn notify_ready() -> Option<tokio::task::JoinHandle<()>> {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    sd_notify::watchdog_enabled().map(|period| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        })
    })
}

/// Tells systemd the service is stopping, and stops feeding the watchdog.
pub fn notify_stopping(watchdog: Option<tokio::task::JoinHandle<()>>) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
}
