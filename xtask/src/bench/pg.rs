//! The throwaway PostgreSQL of `cargo xtask bench drain --outbox postgres`.
//!
//! What it owns: a cluster of Debian's `postgresql` package made with `initdb` in a directory
//! of the benchmark, started on a free loopback port with durable commits (`fsync` and
//! `synchronous_commit` on: the outbox is measured as it runs in production), a database per
//! drain made and dropped with `psql`, and the server's cost read from `/proc`: CPU of the
//! postmaster and every process it forked, and their memory as PSS (shared buffers are mapped
//! by every backend, so summing RSS would count them once per process).
//!
//! PostgreSQL refuses to run as root; as root the server runs as the package's `postgres`
//! user through `setpriv`, which execs in place, so the child's pid is the postmaster's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use backhaul_tests::postgres::{as_server_user, find_bin_dir, is_root};

use crate::procs::{ChildGuard, free_addr, log_tail};

/// The role the cluster is made with, which the relays log in as.
pub const ROLE: &str = "backhaul";
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Server settings given on the command line: durable commits, and no Unix socket (the
/// package's socket directory belongs to its own clusters).
const SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("unix_socket_directories", ""),
    ("fsync", "on"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "on"),
    ("max_connections", "200"),
];

/// A running server of the benchmark. SIGKILLed when dropped (its guard).
pub struct BenchPostgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    log: PathBuf,
    server: ChildGuard,
}

impl BenchPostgres {
    /// Makes a cluster in `dir/data` (the directory is created) and starts it.
    pub async fn start(dir: &Path) -> anyhow::Result<BenchPostgres> {
        let bin = bin_dir()?;
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir)
                .status()
                .context("cannot run chown")?;
            if !status.success() {
                bail!("cannot give {} to the postgres user", dir.display());
            }
        }
        let data = dir.join("data");
        // initdb's own sync of the empty cluster is skipped: the files it makes are not what
        // the benchmark measures, and the server below syncs every commit.
        let output = as_server_user(&bin.join("initdb"))
            .args([
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--username",
                ROLE,
            ])
            .arg("-D")
            .arg(&data)
            .output()
            .context("cannot run initdb")?;
        if !output.status.success() {
            bail!(
                "initdb failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let port = free_addr()?.port();
        let log = dir.join("postgres.log");
        let mut command = as_server_user(&bin.join("postgres"));
        command.arg("-D").arg(&data).args(["-p", &port.to_string()]);
        for (key, value) in SETTINGS {
            command.args(["-c", &format!("{key}={value}")]);
        }
        let server = ChildGuard::spawn("postgres", &mut command, &log)?;
        let mut pg = BenchPostgres {
            dir: dir.to_path_buf(),
            bin,
            port,
            log,
            server,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            pg.server.check_running()?;
            if pg.psql("postgres", "SELECT 1").is_ok() {
                return Ok(pg);
            }
            if Instant::now() > deadline {
                bail!(
                    "PostgreSQL did not answer within {STARTUP_TIMEOUT:?}; the end of {}:\n{}",
                    pg.log.display(),
                    log_tail(&pg.log, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn check_running(&mut self) -> anyhow::Result<()> {
        self.server.check_running()
    }

    /// A relay's `outbox.url` for `dbname` (no password: the cluster trusts loopback).
    pub fn url(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={ROLE} dbname={dbname} connect_timeout=5",
            self.port
        )
    }

    /// Runs SQL in `dbname` and returns psql's unaligned, tuples-only output.
    pub fn psql(&self, dbname: &str, sql: &str) -> anyhow::Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", ROLE])
            .args(["-d", dbname, "-c", sql])
            .output()
            .context("cannot run psql")?;
        if !output.status.success() {
            bail!(
                "psql {sql:?} in {dbname}: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }

    /// `SHOW name` in the maintenance database.
    pub fn show(&self, name: &str) -> String {
        self.psql("postgres", &format!("SHOW {name}"))
            .unwrap_or_else(|e| format!("? ({e})"))
    }

    /// CPU seconds of the server so far: the postmaster's, its children's that ended (which
    /// the kernel adds to the postmaster's `cutime`/`cstime` when it reaps them) and the live
    /// children's. A backend that starts or ends between two readings is thereby counted once.
    pub fn cpu_seconds(&self, ticks_per_second: f64) -> anyhow::Result<f64> {
        let mut ticks = 0u64;
        for pid in self.processes()? {
            if let Ok(stat) = read_stat(pid) {
                ticks += stat.utime + stat.stime + stat.cutime + stat.cstime;
            }
        }
        Ok(ticks as f64 / ticks_per_second)
    }

    /// Proportional set size of the server now (every process's share of the pages it maps,
    /// summed: shared buffers count once), KiB.
    pub fn pss_kib(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for pid in self.processes()? {
            // A backend may end between the listing and the read.
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) else {
                continue;
            };
            total += text
                .lines()
                .find_map(|line| line.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        Ok(total)
    }

    /// The postmaster and the processes it forked (checkpointer, WAL writer, backends...).
    fn processes(&self) -> anyhow::Result<Vec<u32>> {
        let postmaster = self.pid();
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").context("cannot list /proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<u32>().ok())
            else {
                continue;
            };
            if read_stat(pid).is_ok_and(|stat| stat.ppid == postmaster) {
                pids.push(pid);
            }
        }
        Ok(pids)
    }

    /// Stops the server (fast shutdown) and removes its data, keeping its log.
    pub fn stop_and_remove(mut self) -> anyhow::Result<()> {
        // SIGINT is PostgreSQL's fast shutdown: it does not wait for clients to leave.
        let _ = Command::new("kill")
            .args(["-INT", &self.pid().to_string()])
            .status();
        let _ = tokio::task::block_in_place(|| self.server.terminate(Duration::from_secs(60)));
        let data = self.dir.join("data");
        std::fs::remove_dir_all(&data).with_context(|| format!("cannot remove {}", data.display()))
    }
}

/// The fields of `/proc/PID/stat` the benchmark reads.
struct Stat {
    ppid: u32,
    utime: u64,
    stime: u64,
    cutime: u64,
    cstime: u64,
}

fn read_stat(pid: u32) -> anyhow::Result<Stat> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // The name may hold spaces and parentheses: it ends at the last ')'.
    let (_, rest) = text
        .rsplit_once(')')
        .with_context(|| format!("{path} is not in the expected format"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // proc_pid_stat(5) numbers fields from 1 with the pid; here 0 is field 3 (state).
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("{path} has too few fields"))?
            .parse()
            .with_context(|| format!("{path}: field {n} is not a number"))
    };
    Ok(Stat {
        ppid: u32::try_from(field(4)?).unwrap_or(0),
        utime: field(14)?,
        stime: field(15)?,
        cutime: field(16)?,
        cstime: field(17)?,
    })
}

/// The directory of `initdb` and `postgres`; installs Debian's package when none is there.
fn bin_dir() -> anyhow::Result<PathBuf> {
    if let Some(bin) = find_bin_dir() {
        return Ok(bin);
    }
    crate::ensure_debian_packages(&[("pg_ctlcluster", "postgresql")])?;
    find_bin_dir().context(
        "PostgreSQL's initdb is not under /usr/lib/postgresql even after installing Debian's postgresql",
    )
}

/// The server's major version, from the directory it runs from.
pub fn version() -> String {
    bin_dir()
        .ok()
        .and_then(|bin| {
            bin.parent()
                .and_then(Path::file_name)
                .map(|v| v.to_string_lossy().into_owned())
        })
        .unwrap_or_default()
}
