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

/// Arenas glibc's allocator keeps at most, unless `MALLOC_ARENA_MAX` says otherwise.
const MALLOC_ARENAS: i32 = 2;

/// Allocations from this size up get their own mapping, given back to the system when freed.
const MMAP_THRESHOLD: i32 = 128 << 10;

/// glibc gives every thread that allocates its own arena, up to eight per core, and keeps what
/// each arena once held: the blocking threads that write the log or the outbox then leave the
/// services' memory at its high-water mark times the arenas. Two arenas cut the relay's peak
/// from 299 to 209 MiB and the agent's from 54 to 44 MiB in the drain bench (1M events through
/// Mosquitto), with event rates within that run's noise.
///
/// glibc also raises its mapping threshold each time a large block is freed, up to 32 MiB, so
/// the frames and pages a drain allocates end up inside the arenas and stay there. A fixed
/// threshold of 128 KiB cut the relay's peak draining 5M events from 253 to 192 MiB (242 with
/// the embedded broker, from 300), at the same 131k events/s.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only sets an allocator parameter; called before any thread starts.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS);
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        // SAFETY: as above.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
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
    tune_malloc();
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

/// How long a pipeline task may go without a beat before the watchdog stops being fed. Every
/// task beats at least once a second; a slow disk flush may hold one up for a few.
const SILENT_AFTER: Duration = Duration::from_secs(10);

/// A pipeline task's sign of life: it beats each time round its loop, at least once a second
/// even when idle. The systemd watchdog is fed only while every registered task beats, so a
/// task that is wedged (not just dead) still gets the process restarted.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    name: &'static str,
    origin: std::time::Instant,
    last_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Heartbeat {
    /// A heartbeat nobody watches (tests, tools).
    pub fn detached(name: &'static str) -> Heartbeat {
        Heartbeat {
            name,
            origin: std::time::Instant::now(),
            last_ms: Default::default(),
        }
    }

    pub fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    fn silent_for(&self) -> Duration {
        let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
        self.origin
            .elapsed()
            .saturating_sub(Duration::from_millis(last))
    }
}

/// The heartbeats of a process's pipeline tasks.
#[derive(Debug, Clone, Default)]
pub struct Heartbeats {
    beats: std::sync::Arc<std::sync::Mutex<Vec<Heartbeat>>>,
}

impl Heartbeats {
    /// A heartbeat for the task `name`, beaten once now.
    pub fn register(&self, name: &'static str) -> Heartbeat {
        let heartbeat = Heartbeat::detached(name);
        heartbeat.beat();
        if let Ok(mut beats) = self.beats.lock() {
            beats.push(heartbeat.clone());
        }
        heartbeat
    }

    /// The tasks that have not beaten for longer than `within`, with how long.
    pub fn silent(&self, within: Duration) -> Vec<(&'static str, Duration)> {
        let Ok(beats) = self.beats.lock() else {
            return vec![("heartbeat registry", Duration::MAX)];
        };
        beats
            .iter()
            .map(|b| (b.name, b.silent_for()))
            .filter(|(_, silent)| *silent > within)
            .collect()
    }
}

/// Tells systemd (Type=notify) the service is ready, and feeds its watchdog while every
/// pipeline task beats, so a dead or wedged pipeline gets the process restarted. Outside
/// systemd this does nothing.
pub fn notify_ready(heartbeats: Heartbeats) -> Option<tokio::task::JoinHandle<()>> {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    sd_notify::watchdog_enabled().map(|period| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period / 2);
            let mut starved = false;
            loop {
                tick.tick().await;
                let silent = heartbeats.silent(SILENT_AFTER.max(period / 2));
                if silent.is_empty() {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    if starved {
                        tracing::info!("every pipeline task beats again: feeding the watchdog");
                    }
                    starved = false;
                } else if !starved {
                    starved = true;
                    let silent: Vec<String> = silent
                        .iter()
                        .map(|(name, for_)| format!("{name} ({} s)", for_.as_secs()))
                        .collect();
                    tracing::error!(silent = %silent.join(", "), "pipeline tasks stopped beating: no longer feeding the watchdog, so systemd restarts the service");
                }
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

/// The pipeline tasks of a service: the first one that ends before the service is asked to
/// stop, with an error, a panic or even success, stops the whole process with a non-zero
/// status, so that `Restart=on-failure` brings it back instead of a process that answers
/// "ready" while nothing moves.
#[derive(Default)]
pub struct Supervisor {
    tasks: tokio::task::JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl Supervisor {
    pub fn spawn<F, E>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<anyhow::Error>,
    {
        self.tasks
            .spawn(async move { (name, task.await.map_err(Into::into)) });
    }

    /// Waits for SIGINT or SIGTERM (`Ok` with the signal's name) or for a task to end before
    /// it was asked to (an error naming the task and why).
    pub async fn run_until_signal(&mut self) -> anyhow::Result<&'static str> {
        let signal = signalled();
        tokio::pin!(signal);
        tokio::select! {
            signal = &mut signal => Ok(signal?),
            ended = self.tasks.join_next() => match ended {
                // No tasks (nothing configured to run): only a signal ends the wait.
                None => Ok((&mut signal).await?),
                Some(Ok((name, Ok(())))) => {
                    anyhow::bail!("the {name} task ended on its own while the service was running")
                }
                Some(Ok((name, Err(e)))) => Err(e.context(format!("the {name} task failed"))),
                Some(Err(e)) => anyhow::bail!("a task panicked: {e}"),
            },
        }
    }

    /// After the stop was asked for: waits for every task to end, up to `timeout`; whether
    /// they all did.
    pub async fn drain(&mut self, timeout: Duration) -> bool {
        let all = async {
            while let Some(ended) = self.tasks.join_next().await {
                match ended {
                    Ok((name, Err(e))) => {
                        tracing::warn!("{name} ended with an error while stopping: {e:#}")
                    }
                    Err(e) if e.is_panic() => tracing::warn!("a task panicked while stopping: {e}"),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(timeout, all).await.is_ok()
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
