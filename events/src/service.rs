//! What both services' processes share (feature `service`): structured logging, the
//! `check-config` and `run` command bodies, waiting for SIGINT/SIGTERM, the systemd notify
//! protocol (readiness, watchdog, stopping), and the back-off between broker reconnects.

use std::fmt::Debug;
use std::future::Future;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

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

/// The wait between reconnect attempts: it starts at `min`, doubles after each failure up to
/// `max`, and each wait gets up to half again of random jitter, so the clients of one broker
/// do not all come back in step. rumqttc reconnects at once on the next poll; this is what
/// keeps it from hammering a broker that is down.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let min = min.max(Duration::from_millis(1));
        Backoff {
            min,
            max: max.max(min),
            next: min,
        }
    }

    /// After a success: the next failure waits `min` again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// The wait before the next attempt; the one after it is twice as long, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        let half_ms = u64::try_from(base.as_millis() / 2).unwrap_or(u64::MAX);
        base + Duration::from_millis(rand::random_range(0..=half_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_with_jitter_and_start_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let ms = |d: Duration| d.as_millis() as u64;
        let waits: Vec<u64> = (0..4).map(|_| ms(backoff.next_wait())).collect();
        for (wait, base) in waits.iter().zip([100, 200, 350, 350]) {
            assert!((base..=base + base / 2).contains(wait), "{waits:?}");
        }
        backoff.reset();
        assert!((100..=150).contains(&ms(backoff.next_wait())));
    }
}
