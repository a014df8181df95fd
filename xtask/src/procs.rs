//! Processes the benchmarks start and watch: child processes killed when their guard is dropped
//! (also on error and Ctrl-C), free loopback ports, and readings from `/proc` (resident memory
//! and CPU time).

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context, bail};

/// A child process with its output in a log file; SIGKILLed and reaped when dropped (the
/// test harness's guard does that, and the termination; this adds the log and errors that
/// name it).
pub struct ChildGuard {
    log: PathBuf,
    inner: Option<backhaul_tests::ChildGuard>,
}

impl ChildGuard {
    /// Starts `command` with stdout and stderr appended to `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> anyhow::Result<ChildGuard> {
        let out = File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out
            .try_clone()
            .with_context(|| format!("cannot reopen {}", log.display()))?;
        command.stdout(out).stderr(err);
        let inner = backhaul_tests::ChildGuard::try_spawn(name, command)
            .with_context(|| format!("cannot start {name} ({:?})", command.get_program()))?;
        Ok(ChildGuard {
            log: log.to_path_buf(),
            inner: Some(inner),
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner
            .as_ref()
            .map_or(0, backhaul_tests::ChildGuard::pid)
    }

    /// Fails, with the end of the child's log, when the child has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(inner) = self.inner.as_mut() else {
            bail!("the process was already stopped");
        };
        if let Some(status) = inner.child.try_wait().context("waitpid")? {
            bail!(
                "{} exited ({status}); the end of its log {}:\n{}",
                inner.name,
                self.log.display(),
                log_tail(&self.log, 20)
            );
        }
        Ok(())
    }

    /// SIGKILL, like a power cut to the process, and wait for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut inner) = self.inner.take() {
            inner.kill9();
        }
    }

    /// SIGTERM, then up to `timeout` for the process to exit (SIGKILL after that).
    /// Returns the exit status, or `None` when it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<Option<ExitStatus>> {
        let Some(mut inner) = self.inner.take() else {
            return Ok(None);
        };
        if let Some(status) = inner.child.try_wait().context("waitpid")? {
            return Ok(Some(status));
        }
        let status = inner.terminate(timeout);
        if status.is_none() {
            inner.kill9();
        }
        Ok(status)
    }
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read it: {e})"),
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding an ephemeral port")?;
    listener
        .local_addr()
        .context("the ephemeral port's address")
}

/// Resident memory now and its peak (`VmRSS`, `VmHWM`) of a process, in KiB.
pub fn memory_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{path} has no {name}"))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("{path}: cannot read {line:?}"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) a process has used so far, in seconds. `pid` 0 means this process.
pub fn cpu_seconds(pid: u32, ticks_per_second: f64) -> anyhow::Result<f64> {
    let path = if pid == 0 {
        "/proc/self/stat".to_string()
    } else {
        format!("/proc/{pid}/stat")
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    Ok(parse_stat(&text, &path)?.1 / ticks_per_second)
}

/// CPU time used so far by the threads of a process, in seconds, summed by thread name (so
/// all `tokio-rt-worker`s are one entry). Threads that ended are no longer counted.
pub fn thread_cpu_seconds(
    pid: u32,
    ticks_per_second: f64,
) -> anyhow::Result<BTreeMap<String, f64>> {
    let dir = format!("/proc/{pid}/task");
    let mut by_name = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        let path = entry
            .with_context(|| format!("cannot list {dir}"))?
            .path()
            .join("stat");
        // A thread may end between the listing and the read.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (name, ticks) = parse_stat(&text, &path.display().to_string())?;
        *by_name.entry(name).or_insert(0.0) += ticks / ticks_per_second;
    }
    Ok(by_name)
}

/// The name and utime + stime (in ticks) from a `stat` file of `/proc`.
fn parse_stat(text: &str, path: &str) -> anyhow::Result<(String, f64)> {
    // The name may hold spaces and parentheses: it ends at the last ')'.
    let (head, rest) = text
        .rsplit_once(')')
        .with_context(|| format!("{path} is not in the expected format"))?;
    let name = head
        .split_once('(')
        .map(|(_, n)| n)
        .unwrap_or("")
        .to_string();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc_pid_stat(5) (utime, stime) are at 11 and 12 after the name.
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has too few fields"))?
            .parse()
            .with_context(|| format!("{path}: field {} is not a number", i + 3))
    };
    Ok((name, (ticks(11)? + ticks(12)?) as f64))
}

/// CPU time all processes of the machine have used so far (everything but idle and iowait),
/// in seconds, from the first line of `/proc/stat`.
pub fn machine_busy_seconds(ticks_per_second: f64) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/stat").context("cannot read /proc/stat")?;
    let line = text
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("/proc/stat has no `cpu` line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<u64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("/proc/stat: cannot read {line:?}"))?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Ok(total.saturating_sub(idle) as f64 / ticks_per_second)
}

/// Clock ticks per second for `/proc/*/stat` (`getconf CLK_TCK`, 100 on Linux when unknown).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}
