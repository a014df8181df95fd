//! `cargo xtask`: the project's own commands. `test` runs every check CI runs and installs what
//! the tests need; `demo` runs the whole pipeline on one machine; `bench` measures; `fuzz` runs
//! the fuzz targets.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod bench;
mod demo;
mod fuzz;
mod package;
mod procs;
mod tryton;

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Format check, clippy, and the whole test suite (installs Mosquitto when missing).
    Test {
        /// Also run the long soak scenarios.
        #[arg(long)]
        long: bool,
        /// Extra arguments for cargo-nextest (a test name filter, say).
        #[arg(trailing_var_arg = true)]
        nextest_args: Vec<String>,
    },
    /// Run the whole pipeline on this machine with a live view.
    Demo {
        /// Seconds the scanners publish; one site's link is cut for the middle third.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Events per second of each site's scanners.
        #[arg(long, default_value_t = 60)]
        rate: u32,
    },
    /// Measure speed and memory; prints a table and writes JSON under target/bench/.
    Bench {
        /// Which benchmark: ingest, drain, erp, all (those three), hostile, compare (Backhaul
        /// against a Mosquitto bridge, about ten minutes: not in all), or plots (the PNGs of
        /// BENCHMARKS.md under docs/bench/, from target/bench/compare.json and ingest.json).
        #[arg(default_value = "all")]
        which: String,
        /// Numbers of concurrent publishers, one run each.
        #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
        publishers: Vec<usize>,
        /// Seconds of warm-up before each measured window.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds measured per run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// ingest: QoS 1 publishes each publisher keeps in flight (default: 2000 / publishers,
        /// between 100 and 1000). drain: the agent's uplink.window (default: config/agent.toml).
        #[arg(long)]
        window: Option<usize>,
        /// drain: the agent's uplink.batch_max_events (default: config/agent.toml).
        #[arg(long)]
        batch_events: Option<usize>,
        /// drain: events the offline agent holds before its link is restored.
        #[arg(long, default_value_t = 1_000_000)]
        drain_events: u64,
        /// drain: the agent's uplink.protocol, "3.1.1" or "5" (default: config/agent.toml).
        /// The relay's embedded broker speaks 3.1.1 only, so "5" drains through Mosquitto alone.
        #[arg(long, value_parser = ["3.1.1", "5"])]
        protocol: Option<String>,
        /// erp: stock adjustments posted to Tryton by each client.
        #[arg(long, default_value_t = 1500)]
        erp_events: usize,
        /// drain: outboxes to compare, such as redb,postgres. With postgres, every drain runs
        /// through Mosquitto to relays delivering to a stand-in HTTP ERP.
        #[arg(long, value_delimiter = ',', default_value = "redb", value_parser = ["redb", "postgres"])]
        outbox: Vec<String>,
        /// drain: relays sharing the PostgreSQL outbox, one drain per count, such as 1,3.
        #[arg(long, value_delimiter = ',', default_value = "1")]
        relays: Vec<usize>,
        /// compare: the scenarios to run, of steady, peak, cut, kill, backlog.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "steady,peak,cut,kill,backlog"
        )]
        scenarios: Vec<String>,
        /// compare: seconds of steady load (scenario steady).
        #[arg(long, default_value_t = 20.0)]
        steady_seconds: f64,
        /// compare: events per second of the steady load (scenarios steady, cut and kill).
        #[arg(long, default_value_t = 1000.0)]
        steady_rate: f64,
        /// compare: seconds of peak ingest measured (scenario peak).
        #[arg(long, default_value_t = 5.0)]
        peak_seconds: f64,
        /// compare: publishers of the peak ingest (scenario peak).
        #[arg(long, default_value_t = 8)]
        peak_publishers: usize,
        /// compare: seconds the link is cut (scenarios cut and kill).
        #[arg(long, default_value_t = 60.0)]
        cut_seconds: f64,
        /// compare: events built up while the link is cut (scenario backlog).
        #[arg(long, default_value_t = 1_000_000)]
        backlog_events: u64,
        /// compare: also draw the plots under docs/bench/ (as `bench plots` does).
        #[arg(long)]
        plots: bool,
    },
    /// Build the Debian packages of both services (needs dpkg-deb, not cargo-deb).
    Package(package::PackageArgs),
    /// Run the fuzz targets under fuzz/ (needs the nightly toolchain; installs cargo-fuzz);
    /// prints a table and writes target/fuzz/summary.json. Fails when a target crashed.
    Fuzz {
        /// Seconds each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (repeatable): event_parse, mqtt_packets, frames, tryton_rpc, config.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// The cheap build `cargo xtask test` smokes with (unoptimized, no sanitizer).
        #[arg(long)]
        smoke: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Test { long, nextest_args } => test(long, &nextest_args),
        Task::Demo { seconds, rate } => demo::run(
            &workspace_root(),
            &tryton::target_dir(),
            std::time::Duration::from_secs(seconds.max(6)),
            rate.max(1),
        ),
        Task::Bench {
            which,
            publishers,
            warmup,
            seconds,
            window,
            batch_events,
            drain_events,
            protocol,
            erp_events,
            outbox,
            relays,
            scenarios,
            steady_seconds,
            steady_rate,
            peak_seconds,
            peak_publishers,
            cut_seconds,
            backlog_events,
            plots,
        } => seconds_arg("--warmup", warmup).and_then(|warmup| {
            let compare = bench::CompareOptions {
                steady: seconds_arg("--steady-seconds", steady_seconds)?,
                rate: steady_rate,
                peak: seconds_arg("--peak-seconds", peak_seconds)?,
                peak_publishers,
                cut: seconds_arg("--cut-seconds", cut_seconds)?,
                backlog_events,
                scenarios,
                plots,
            };
            bench::bench(bench::BenchOptions {
                which,
                publishers,
                warmup,
                measure: seconds_arg("--seconds", seconds)?,
                window,
                batch_events,
                drain_events,
                protocol,
                erp_events,
                outbox,
                relays,
                compare,
            })
        }),
        Task::Package(args) => package::run(&workspace_root(), args),
        Task::Fuzz {
            seconds,
            targets,
            smoke,
        } => fuzz::run(
            &workspace_root(),
            if smoke {
                fuzz::Build::Smoke
            } else {
                fuzz::Build::Full
            },
            seconds.max(1),
            &targets,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

fn run(step: &str, command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {step}");
    let status = command
        .status()
        .with_context(|| format!("{step}: cannot start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{step} failed ({status})");
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&dirs)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(program).is_file())
}

/// Installs Debian packages that provide the given programs, when any is missing.
fn ensure_debian_packages(needs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?} for the tests");
    let install = || -> anyhow::Result<()> {
        run(
            "apt-get update",
            Command::new("apt-get").args(["update", "-qq"]),
        )?;
        run(
            "apt-get install",
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    };
    install().with_context(|| {
        format!(
            "the tests need the Debian packages {} and they could not be installed; \
             install them with: sudo apt-get install {}",
            missing.join(", "),
            missing.join(" ")
        )
    })?;
    for (program, package) in needs {
        if !on_path(program) {
            bail!("{program} is still missing after installing the Debian package {package}");
        }
    }
    Ok(())
}

/// Installs GS1's epcis2.js SDK with npm under target/epcis-validator, where the EPCIS tests
/// validate every document the relay produced with it (xtask/epcis holds the script).
fn ensure_epcis_validator() -> anyhow::Result<()> {
    ensure_debian_packages(&[("node", "nodejs"), ("npm", "npm")])?;
    let root = workspace_root();
    let source = root.join("xtask/epcis");
    let dir = root.join("target/epcis-validator");
    let manifest = std::fs::read(source.join("package.json"))
        .context("xtask/epcis/package.json is missing")?;
    let installed = std::fs::read(dir.join("package.json")).ok();
    if installed.as_deref() == Some(manifest.as_slice())
        && dir.join("node_modules/epcis2.js").is_dir()
    {
        return Ok(());
    }
    // epcis2.js names the npm placeholder `fs@0.0.1-security`, which some registries do not
    // carry; node's own `fs` is what it uses, so an empty local package stands in for it.
    std::fs::create_dir_all(dir.join("empty-fs"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(
        dir.join("empty-fs/package.json"),
        r#"{"name":"fs","version":"0.0.1-security"}"#,
    )?;
    std::fs::copy(source.join("validate.js"), dir.join("validate.js"))?;
    std::fs::write(dir.join("package.json"), &manifest)?;
    run(
        "npm install epcis2.js (GS1's EPCIS 2.0 validator)",
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-save"])
            .current_dir(&dir),
    )
    .context(
        "the EPCIS tests validate documents with GS1's epcis2.js from the npm registry, and \
         it could not be installed; check that the npm registry is reachable",
    )
}

fn test(long: bool, nextest_args: &[String]) -> anyhow::Result<()> {
    if Command::new("cargo-nextest")
        .arg("--version")
        .output()
        .is_err()
        && cargo()
            .args(["nextest", "--version"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
    {
        bail!("cargo-nextest is missing: install it with `cargo install cargo-nextest --locked`");
    }
    run(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--check"]),
    )?;
    run(
        "cargo fmt --check (fuzz targets)",
        cargo().args(["fmt", "--check", "--manifest-path", "fuzz/Cargo.toml"]),
    )?;
    run(
        "cargo clippy",
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    ensure_debian_packages(&[
        ("mosquitto", "mosquitto"),
        ("mosquitto_pub", "mosquitto-clients"),
        ("systemd-analyze", "systemd"),
        ("promtool", "prometheus"),
        ("openssl", "openssl"),
        // The server itself (initdb, postgres) is under /usr/lib/postgresql/<version>/bin;
        // the package's common part puts pg_ctlcluster on the PATH.
        ("pg_ctlcluster", "postgresql"),
    ])?;
    tryton::ensure_tryton()?;
    ensure_epcis_validator()?;
    // The end-to-end tests start the real binaries, so they must be built first.
    run(
        "cargo build (binaries)",
        cargo().args(["build", "--workspace", "--bins"]),
    )?;
    // Licences, forbidden crates and sources of the dependency tree (deny.toml); advisories
    // need the internet and are checked elsewhere.
    let deny = fuzz::ensure_cargo_tool(&workspace_root(), "cargo-deny", "deny")?;
    let mut deny_check = cargo();
    deny_check.args([
        "deny",
        "--locked",
        "check",
        "--hide-inclusion-graph",
        "licenses",
        "bans",
        "sources",
    ]);
    fuzz::prepend_path(&mut deny_check, &deny);
    run("cargo deny check licenses bans sources", &mut deny_check)?;
    let mut nextest = cargo();
    nextest.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    if long {
        nextest.env("BACKHAUL_LONG_TESTS", "1");
    }
    nextest.args(nextest_args);
    run("cargo nextest run", &mut nextest)?;
    // A smoke of every fuzz target, on the cheap build (unoptimized, no sanitizer); the
    // committed seeds, crashes of the past among them, run first. Skipped when only some
    // tests were asked for.
    if nextest_args.is_empty() {
        fuzz::run(
            &workspace_root(),
            fuzz::Build::Smoke,
            FUZZ_SMOKE_SECONDS,
            &[],
        )?;
    }
    Ok(())
}

/// Seconds each fuzz target runs in `cargo xtask test`.
const FUZZ_SMOKE_SECONDS: u64 = 3;

fn seconds_arg(name: &str, seconds: f64) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero() || name == "--warmup")
        .with_context(|| format!("{name} {seconds}: expected a positive number of seconds"))
}
