//! `cargo xtask fuzz`: runs the cargo-fuzz targets under `fuzz/` for a number of seconds each,
//! prints a table (executions, coverage, crashes) and writes it as JSON to
//! `target/fuzz/summary.json`; `cargo xtask test` runs the same, seconds-long, as a smoke
//! (`target/fuzz/smoke-summary.json`).
//! Also owns installing the cargo tools the checks need (cargo-fuzz, cargo-deny) under
//! `target/tools` when they are not on the PATH.
//!
//! Everything a run makes stays under `target/fuzz/`: the build, the working corpus (the
//! committed seeds in `fuzz/corpus/<target>` are read, never written), logs and the inputs that
//! crashed.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};

/// Every fuzz target, in the order they run.
pub const TARGETS: &[&str] = &[
    "event_parse",
    "mqtt_packets",
    "frames",
    "tryton_rpc",
    "config",
];

/// Memory one target may use before libFuzzer calls it a crash (out of memory).
const RSS_LIMIT_MB: u32 = 2048;
/// Seconds one input may take before libFuzzer calls it a crash (a hang).
const INPUT_TIMEOUT_SECS: u32 = 10;
/// More codegen units than cargo-fuzz's default of one: a much shorter build for slightly
/// slower fuzzing.
const CODEGEN_UNITS: &str = "16";

/// How the targets are built and where the run's summary goes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Optimized, with AddressSanitizer, debug assertions and overflow checks: for finding bugs.
    Full,
    /// Unoptimized, without a sanitizer (debug assertions and overflow checks stay): a build
    /// about a quarter of the full one's cost, for the seconds-long smoke of `cargo xtask test`.
    Smoke,
}

impl Build {
    fn summary_name(self) -> &'static str {
        match self {
            Build::Full => "summary.json",
            Build::Smoke => "smoke-summary.json",
        }
    }
}

/// What one target's run came to.
struct TargetRun {
    target: String,
    executions: Option<u64>,
    cov: Option<u64>,
    ft: Option<u64>,
    corpus: Option<u64>,
    /// Inputs libFuzzer wrote as crashes, hangs, out-of-memory or leaks.
    artifacts: Vec<PathBuf>,
    /// libFuzzer ended badly without writing an input (it did not start, say).
    failed: Option<String>,
    seconds: f64,
    log: PathBuf,
}

/// Runs `targets` (all when empty) for `seconds` each; fails when any crashed.
pub fn run(root: &Path, build: Build, seconds: u64, targets: &[String]) -> anyhow::Result<()> {
    let targets: Vec<String> = if targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        for target in targets {
            if !TARGETS.contains(&target.as_str()) {
                bail!(
                    "no fuzz target {target:?}; the targets are {}",
                    TARGETS.join(", ")
                );
            }
        }
        targets.to_vec()
    };
    check_nightly()?;
    let cargo_fuzz = ensure_cargo_tool(root, "cargo-fuzz", "fuzz")?;
    let out = root.join("target/fuzz");
    std::fs::create_dir_all(out.join("logs"))
        .with_context(|| format!("cannot create {}", out.join("logs").display()))?;

    let started = Instant::now();
    let mut build_command = fuzz_command(root, &cargo_fuzz, build, "build");
    if targets.len() == 1 {
        build_command.arg(&targets[0]);
    }
    crate::run("cargo fuzz build", &mut build_command)?;
    let build_seconds = started.elapsed().as_secs_f64();
    eprintln!("xtask: fuzz targets built in {build_seconds:.0} s");

    let mut runs = Vec::new();
    for target in &targets {
        runs.push(run_target(root, &cargo_fuzz, build, target, seconds)?);
    }
    print_table(&runs);
    let summary = out.join(build.summary_name());
    let json = serde_json::json!({
        "build": match build {
            Build::Full => "release, AddressSanitizer",
            Build::Smoke => "dev, no sanitizer",
        },
        "seconds_per_target": seconds,
        "build_seconds": build_seconds,
        "targets": runs.iter().map(|r| serde_json::json!({
            "target": r.target,
            "executions": r.executions,
            "cov": r.cov,
            "ft": r.ft,
            "corpus": r.corpus,
            "crashes": r.artifacts.len(),
            "artifacts": r.artifacts,
            "failed": r.failed,
            "seconds": r.seconds,
            "log": r.log,
        })).collect::<Vec<_>>(),
    });
    std::fs::write(&summary, format!("{json:#}\n"))
        .with_context(|| format!("cannot write {}", summary.display()))?;
    eprintln!("xtask: fuzz summary in {}", summary.display());

    let bad: Vec<&TargetRun> = runs
        .iter()
        .filter(|r| !r.artifacts.is_empty() || r.failed.is_some())
        .collect();
    if bad.is_empty() {
        return Ok(());
    }
    for run in &bad {
        for artifact in &run.artifacts {
            eprintln!(
                "xtask: {} crashed on {}; reproduce with: cargo +nightly fuzz run {} {}",
                run.target,
                artifact.display(),
                run.target,
                artifact.display()
            );
        }
        if let Some(why) = &run.failed {
            eprintln!(
                "xtask: {} failed: {why} (log: {})",
                run.target,
                run.log.display()
            );
        }
    }
    eprintln!(
        "xtask: make each crash a regression test: a unit test with the input in the crate that \
         owns the code, and the input under fuzz/corpus/<target>/ (see fuzz/README.md)"
    );
    bail!(
        "fuzzing found problems in {}",
        bad.iter()
            .map(|r| r.target.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// `cargo +nightly fuzz <verb>` with the build settings every call must share, so that `run`
/// finds the targets `build` made instead of building them again. Both kinds of build share
/// one target folder (their profiles keep them apart).
fn fuzz_command(root: &Path, cargo_fuzz: &Path, build: Build, verb: &str) -> Command {
    let mut command = Command::new("cargo");
    command
        .current_dir(root)
        .args(["+nightly", "fuzz", verb, "--fuzz-dir", "fuzz"]);
    match build {
        Build::Full => command.args(["--codegen-units", CODEGEN_UNITS]),
        Build::Smoke => command.args(["--dev", "--sanitizer", "none"]),
    };
    command
        .arg("--target-dir")
        .arg(root.join("target/fuzz/build"));
    prepend_path(&mut command, cargo_fuzz);
    command
}

fn run_target(
    root: &Path,
    cargo_fuzz: &Path,
    build: Build,
    target: &str,
    seconds: u64,
) -> anyhow::Result<TargetRun> {
    let out = root.join("target/fuzz");
    let corpus = out.join("corpus").join(target);
    let artifacts = out.join("artifacts").join(target);
    for dir in [&corpus, &artifacts] {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let log_path = match build {
        Build::Full => out.join("logs").join(format!("{target}.log")),
        Build::Smoke => out.join("logs").join(format!("{target}-smoke.log")),
    };
    let mut log = std::fs::File::create(&log_path)
        .with_context(|| format!("cannot create {}", log_path.display()))?;

    let mut command = fuzz_command(root, cargo_fuzz, build, "run");
    // New inputs go to the first corpus folder; the committed seeds are only read.
    command
        .arg(target)
        .arg(&corpus)
        .arg(root.join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
        .arg(format!("-timeout={INPUT_TIMEOUT_SECS}"))
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    eprintln!(
        "xtask: fuzzing {target} for {seconds} s (log: {})",
        log_path.display()
    );
    let started = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot start cargo fuzz run {target}"))?;
    // libFuzzer reports on stderr; stdout (the target's own output) goes to the log as well.
    let stdout = child.stdout.take();
    let copy_stdout = std::thread::spawn(move || {
        let mut lines = Vec::new();
        if let Some(stdout) = stdout {
            lines.extend(BufReader::new(stdout).lines().map_while(Result::ok));
        }
        lines
    });
    let mut run = TargetRun {
        target: target.to_string(),
        executions: None,
        cov: None,
        ft: None,
        corpus: None,
        artifacts: Vec::new(),
        failed: None,
        seconds: 0.0,
        log: log_path.clone(),
    };
    let mut tail: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    if let Some(stderr) = child.stderr.take() {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = writeln!(log, "{line}");
            read_stats_line(&line, &mut run);
            if tail.len() == 40 {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("cargo fuzz run {target}"))?;
    for line in copy_stdout.join().unwrap_or_default() {
        let _ = writeln!(log, "{line}");
    }
    run.seconds = started.elapsed().as_secs_f64();
    if !status.success() && run.artifacts.is_empty() {
        run.failed = Some(format!("cargo fuzz run ended with {status}"));
    }
    if !status.success() {
        eprintln!("xtask: the last lines of {}:", log_path.display());
        for line in &tail {
            eprintln!("  {line}");
        }
    }
    Ok(run)
}

/// Takes what a line of libFuzzer's output tells: its status lines (`#123 pulse cov: 4 ft: 5
/// corp: 6/78b ...`), its final statistics and the inputs it wrote.
fn read_stats_line(line: &str, run: &mut TargetRun) {
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        match word {
            "cov:" => run.cov = words.next().and_then(|w| w.parse().ok()).or(run.cov),
            "ft:" => run.ft = words.next().and_then(|w| w.parse().ok()).or(run.ft),
            "corp:" => {
                run.corpus = words
                    .next()
                    .and_then(|w| w.split('/').next())
                    .and_then(|w| w.parse().ok())
                    .or(run.corpus)
            }
            _ => {}
        }
    }
    if let Some(n) = line.strip_prefix("stat::number_of_executed_units:") {
        run.executions = n.trim().parse().ok().or(run.executions);
    }
    // "Test unit written to <path>", also for slow inputs, which are not failures.
    if let Some((_, path)) = line.split_once("Test unit written to ") {
        let path = PathBuf::from(path.trim());
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if ["crash-", "timeout-", "oom-", "leak-"]
            .iter()
            .any(|kind| name.starts_with(kind))
        {
            run.artifacts.push(path);
        }
    }
}

fn print_table(runs: &[TargetRun]) {
    let show = |n: Option<u64>| n.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "{:<14} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "target", "executions", "cov", "ft", "corpus", "crashes", "seconds"
    );
    for run in runs {
        println!(
            "{:<14} {:>12} {:>8} {:>8} {:>8} {:>8} {:>8.0}",
            run.target,
            show(run.executions),
            show(run.cov),
            show(run.ft),
            show(run.corpus),
            if run.failed.is_some() && run.artifacts.is_empty() {
                "failed".to_string()
            } else {
                run.artifacts.len().to_string()
            },
            run.seconds
        );
    }
}

/// Fails with what to install when the nightly toolchain is not there: cargo-fuzz builds with
/// sanitizer and coverage flags only nightly takes.
fn check_nightly() -> anyhow::Result<()> {
    let ok = Command::new("cargo")
        .args(["+nightly", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "the fuzz targets need the nightly Rust toolchain (cargo-fuzz builds them with \
             sanitizers), through rustup: install it with `rustup toolchain install nightly`"
        );
    }
    Ok(())
}

/// The folder holding `cargo-<tool>`: the PATH's, or `target/tools/bin` after
/// `cargo install <package> --locked --root target/tools` when it is on neither.
pub fn ensure_cargo_tool(root: &Path, package: &str, subcommand: &str) -> anyhow::Result<PathBuf> {
    let binary = format!("cargo-{subcommand}");
    let tools = root.join("target/tools");
    let local = tools.join("bin");
    if local.join(&binary).is_file() {
        return Ok(local);
    }
    let dirs = std::env::var_os("PATH").unwrap_or_default();
    if let Some(dir) = std::env::split_paths(&dirs).find(|dir| dir.join(&binary).is_file()) {
        return Ok(dir);
    }
    eprintln!("xtask: installing {package} into {}", tools.display());
    let started = Instant::now();
    crate::run(
        &format!("cargo install {package}"),
        crate::cargo()
            .args(["install", package, "--locked", "--root"])
            .arg(&tools),
    )
    .with_context(|| {
        format!(
            "{package} is missing and could not be installed; install it with \
             `cargo install {package} --locked` (or put {binary} on the PATH)"
        )
    })?;
    eprintln!(
        "xtask: {package} installed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    if !local.join(&binary).is_file() {
        bail!("{binary} is still missing after installing {package}");
    }
    Ok(local)
}

/// Puts `dir` first on the command's PATH, so that `cargo <subcommand>` finds the tool there.
pub fn prepend_path(command: &mut Command, dir: &Path) {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::iter::once(dir.to_path_buf()).chain(std::env::split_paths(&path));
    if let Ok(joined) = std::env::join_paths(dirs) {
        command.env("PATH", joined);
    }
}
