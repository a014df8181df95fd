//! `cargo xtask bench [NAME]`: which benchmarks exist, building what they measure in release,
//! and where their results go (`<target dir>/bench/`).
//!
//! `cargo xtask` itself is a debug build; a debug load generator would measure itself. So a
//! debug xtask builds the release binaries (its own release build included) and hands the run
//! to `<target dir>/release/xtask` with the same arguments.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::{cargo, drain, erp_bench, hostile, ingest, run, tryton, workspace_root};

/// Every benchmark `cargo xtask bench` (= `all`) runs, in order.
pub const BENCHES: &[&str] = &["ingest", "drain", "erp"];
/// Benchmarks that run only when named: `hostile` measures the agent's defences against
/// hostile clients, not its speed.
pub const NAMED_ONLY: &[&str] = &["hostile"];

/// Set in the environment of the release xtask a debug xtask hands the run to.
const HANDED_OVER: &str = "BACKHAUL_BENCH_HANDED_OVER";

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub which: String,
    pub publishers: Vec<usize>,
    pub warmup: Duration,
    pub measure: Duration,
    pub window: Option<usize>,
    pub batch_events: Option<usize>,
    pub drain_events: u64,
    pub protocol: Option<String>,
    pub erp_events: usize,
    /// drain: the outboxes compared (`redb`, `postgres`).
    pub outbox: Vec<String>,
    /// drain: relay counts, one PostgreSQL drain each.
    pub relays: Vec<usize>,
}

/// The cargo target directory: `$CARGO_TARGET_DIR` when set, else `<workspace>/target`.
pub fn target_dir() -> anyhow::Result<PathBuf> {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                Ok(dir)
            } else {
                Ok(std::env::current_dir()
                    .context("the current directory")?
                    .join(dir))
            }
        }
        _ => Ok(workspace_root().join("target")),
    }
}

pub fn bench(options: BenchOptions) -> anyhow::Result<()> {
    let selected: Vec<&str> = match options.which.as_str() {
        "all" => BENCHES.to_vec(),
        name => match BENCHES.iter().chain(NAMED_ONLY).find(|b| **b == name) {
            Some(b) => vec![*b],
            None => bail!(
                "no benchmark named {name:?}; there is: all ({}), {}",
                BENCHES.join(", "),
                NAMED_ONLY.join(", ")
            ),
        },
    };
    if options.publishers.is_empty() || options.publishers.contains(&0) {
        bail!("--publishers needs counts of at least 1, such as 1,10,100");
    }
    if options.window == Some(0) {
        bail!("--window must be at least 1");
    }
    if selected.contains(&"drain") {
        drain::check_options(&options)?;
    }
    if selected.contains(&"ingest") || selected.contains(&"drain") {
        ingest::find_mosquitto()?;
    }
    if selected.contains(&"erp") {
        tryton::ensure_tryton()?;
    }
    let target = target_dir()?;
    let release = target.join("release");
    let handed_over = std::env::var_os(HANDED_OVER).is_some();
    if !handed_over {
        run(
            "cargo build --release (agent, relay and xtask)",
            cargo().args([
                "build",
                "--release",
                "-p",
                "backhaul-agent",
                "-p",
                "backhaul-relay",
                "-p",
                "xtask",
                "--bins",
            ]),
        )?;
        if cfg!(debug_assertions) {
            let xtask = release.join(format!("xtask{}", std::env::consts::EXE_SUFFIX));
            eprintln!(
                "xtask: running the benchmark in the release build {}",
                xtask.display()
            );
            let status = Command::new(&xtask)
                .args(std::env::args_os().skip(1))
                .env(HANDED_OVER, "1")
                .current_dir(workspace_root())
                .status()
                .with_context(|| format!("cannot start {}", xtask.display()))?;
            if !status.success() {
                bail!("the benchmark failed ({status})");
            }
            return Ok(());
        }
    }
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    let result: anyhow::Result<()> = runtime.block_on(async {
        let work = async {
            for name in &selected {
                match *name {
                    "ingest" => ingest::run(&options, &release, &out_dir).await?,
                    "drain" => drain::run(&options, &release, &out_dir).await?,
                    "erp" => erp_bench::run(&options, &release, &out_dir).await?,
                    "hostile" => hostile::run(&options, &release, &out_dir).await?,
                    other => bail!("benchmark {other:?} is listed but not wired up"),
                }
            }
            anyhow::Ok(())
        };
        // Ctrl-C ends the run through the normal error path, so every guard kills its child.
        tokio::select! {
            outcome = work => outcome,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        }
    });
    // Do not wait for tasks still blocked on a socket of a killed broker.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result?;
    eprintln!(
        "xtask: benchmarks done in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A binary of this workspace in `dir`, which must have been built.
pub fn binary(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --release -p backhaul-agent -p backhaul-relay --bins`",
            path.display()
        );
    }
    Ok(path)
}
