//! The scanner simulator `backhaul-sim` as a child process: steady load for the fault-injection
//! scenarios, with every acknowledged id in a file (what a commissioning engineer would run), and
//! its closing summary (published, acknowledged, refused) read back when it stops.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{ChildGuard, binary, poll_until};

/// What `backhaul-sim run` is told. The defaults: 4 devices, 150 events/s in all, MQTT 5, QoS 1,
/// no invalid events, until stopped.
#[derive(Debug, Clone)]
pub struct SimOptions {
    pub devices: u32,
    pub rate: f64,
    pub mqtt_version: &'static str,
    pub qos: u8,
    pub invalid_ratio: f64,
    pub device_prefix: String,
    pub count: Option<u64>,
    pub window: Option<usize>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            devices: 4,
            rate: 150.0,
            mqtt_version: "5",
            qos: 1,
            invalid_ratio: 0.0,
            device_prefix: "scanner".into(),
            count: None,
            window: None,
        }
    }
}

/// The closing line of a run: `published N  acknowledged N  refused N  reconnects N  in S s`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SimSummary {
    pub published: u64,
    pub acknowledged: u64,
    pub refused: u64,
    /// Events the agent refused for a full disk quota, which the simulator kept and re-sent.
    pub quota_retries: u64,
    pub reconnects: u64,
    pub seconds: f64,
}

/// A running `backhaul-sim run`; killed when dropped.
pub struct SimProcess {
    dir: TempDir,
    child: Option<ChildGuard>,
}

impl SimProcess {
    /// Starts the simulator against the agent's MQTT listener.
    pub fn start(agent: SocketAddr, options: &SimOptions) -> SimProcess {
        let dir = tempfile::Builder::new()
            .prefix("backhaul-sim-test-")
            .tempdir()
            .expect("a temporary directory");
        let stdout = std::fs::File::create(dir.path().join("sim.stdout")).expect("sim stdout");
        let stderr = std::fs::File::create(dir.path().join("sim.stderr")).expect("sim stderr");
        let mut command = Command::new(binary("backhaul-sim"));
        command
            .arg("run")
            .arg("--agent")
            .arg(agent.to_string())
            .arg("--devices")
            .arg(options.devices.to_string())
            .arg("--rate")
            .arg(options.rate.to_string())
            .arg("--mqtt-version")
            .arg(options.mqtt_version)
            .arg("--qos")
            .arg(options.qos.to_string())
            .arg("--invalid-ratio")
            .arg(options.invalid_ratio.to_string())
            .arg("--device-prefix")
            .arg(&options.device_prefix)
            .arg("--acked-file")
            .arg(dir.path().join("acked.txt"))
            .arg("--progress")
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(stderr));
        if let Some(count) = options.count {
            command.arg("--count").arg(count.to_string());
        }
        if let Some(window) = options.window {
            command.arg("--window").arg(window.to_string());
        }
        let child = ChildGuard::spawn("backhaul-sim", &mut command);
        SimProcess {
            dir,
            child: Some(child),
        }
    }

    /// The file of acknowledged ids (`--acked-file`).
    pub fn acked_path(&self) -> PathBuf {
        self.dir.path().join("acked.txt")
    }

    /// How many events were acknowledged so far (complete lines of the acked file).
    pub fn acked_count(&self) -> usize {
        std::fs::read(self.acked_path())
            .map(|bytes| bytes.iter().filter(|b| **b == b'\n').count())
            .unwrap_or(0)
    }

    /// Every acknowledged id, in the order the acknowledgements arrived.
    pub fn acked_ids(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.acked_path()).unwrap_or_default();
        // A line being written while this reads has no newline yet: leave it out.
        let complete = match text.rfind('\n') {
            Some(end) => &text[..=end],
            None => "",
        };
        complete.lines().map(str::to_string).collect()
    }

    /// The progress lines and the complaints the simulator printed.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sim.stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sim.stdout")).unwrap_or_default()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// Waits until `more` acknowledgements arrived beyond those there are now.
    pub fn wait_for_acks(&self, more: usize, timeout: Duration) {
        let start = self.acked_count();
        let reached = poll_until(timeout, || {
            (self.acked_count() >= start + more).then_some(())
        });
        assert!(
            reached.is_some(),
            "the simulator stalled at {} acknowledgements (wanted {} more within {timeout:?}); \
             its last lines:\n{}",
            self.acked_count(),
            more,
            tail(&self.stderr(), 15)
        );
    }

    /// Ctrl-C, as an operator stops a run: the simulator waits for the acknowledgements still in
    /// flight, prints its summary and exits.
    pub fn stop(&mut self) -> SimSummary {
        if let Some(child) = self.child.as_mut() {
            // A signal that lands between two of the simulator's waits for Ctrl-C can go
            // unseen: say it again until the process ends (it ignores repeats while it stops).
            let pid = child.pid().to_string();
            let _ = poll_until(Duration::from_secs(30), || {
                if let Ok(Some(_)) = child.child.try_wait() {
                    return Some(());
                }
                let _ = Command::new("kill").args(["-INT", &pid]).status();
                std::thread::sleep(Duration::from_millis(300));
                None
            });
        }
        self.wait(Duration::from_secs(5))
    }

    /// Waits for the simulator to end by itself (`--count`) and returns its summary.
    pub fn wait(&mut self, timeout: Duration) -> SimSummary {
        let mut child = self.child.take().expect("the simulator runs");
        let status = poll_until(timeout, || child.child.try_wait().ok().flatten());
        let status = status.unwrap_or_else(|| {
            child.kill9();
            panic!(
                "the simulator did not finish within {timeout:?}; its last lines:\n{}",
                tail(&self.stderr(), 15)
            )
        });
        assert!(
            status.success(),
            "the simulator failed ({status}):\n{}",
            tail(&self.stderr(), 15)
        );
        let stdout = self.stdout();
        parse_summary(&stdout)
            .unwrap_or_else(|| panic!("no summary line in the simulator's output:\n{stdout}"))
    }

    /// `backhaul-sim check --acked FILE --ledger LEDGER`, as an operator checks a run.
    pub fn check(&self, ledger: &Path) -> Output {
        Command::new(binary("backhaul-sim"))
            .arg("check")
            .arg("--acked")
            .arg(self.acked_path())
            .arg("--ledger")
            .arg(ledger)
            .output()
            .expect("run backhaul-sim check")
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Reads `published 10  acknowledged 9  refused 1  retried-for-quota 0  reconnects 0  in 2.0s
/// (4 acknowledged/s)`.
pub fn parse_summary(stdout: &str) -> Option<SimSummary> {
    let line = stdout.lines().rev().find(|l| l.starts_with("published "))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |name: &str| -> Option<&str> {
        let at = words.iter().position(|w| *w == name)?;
        words.get(at + 1).copied()
    };
    Some(SimSummary {
        published: after("published")?.parse().ok()?,
        acknowledged: after("acknowledged")?.parse().ok()?,
        refused: after("refused")?.parse().ok()?,
        quota_retries: after("retried-for-quota")
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
        reconnects: after("reconnects")?.parse().ok()?,
        seconds: after("in")?.trim_end_matches('s').parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_summary_line() {
        let out =
            "published 10  acknowledged 9  refused 1  reconnects 2  in 3.5s (3 acknowledged/s)\n";
        assert_eq!(
            parse_summary(out),
            Some(SimSummary {
                published: 10,
                acknowledged: 9,
                refused: 1,
                quota_retries: 0,
                reconnects: 2,
                seconds: 3.5
            })
        );
    }
}
