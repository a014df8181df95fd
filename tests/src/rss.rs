//! Resident memory of the processes under test, sampled from `/proc/PID/status` (VmRSS) in a
//! background thread, to show that memory stays flat whatever the backlog: the peak of the last
//! third of a run against the peak of its first third.
//!
//! A process that is restarted keeps its name; the test tells the sampler its new pid.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One process's samples: time since the sampler started, resident KiB.
type Samples = Vec<(Duration, u64)>;

pub struct RssSampler {
    started: Instant,
    stop: Arc<AtomicBool>,
    pids: Arc<Mutex<BTreeMap<String, u32>>>,
    samples: Arc<Mutex<BTreeMap<String, Samples>>>,
    handle: Option<JoinHandle<()>>,
}

/// The resident memory of a process now, in KiB (None when it is gone).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

impl RssSampler {
    /// Samples every tracked process every `interval`.
    pub fn start(interval: Duration) -> RssSampler {
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let pids: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
        let samples: Arc<Mutex<BTreeMap<String, Samples>>> = Arc::default();
        let (t_stop, t_pids, t_samples) = (stop.clone(), pids.clone(), samples.clone());
        let handle = std::thread::spawn(move || {
            while !t_stop.load(Ordering::SeqCst) {
                let tracked: Vec<(String, u32)> = t_pids
                    .lock()
                    .map(|p| p.iter().map(|(n, p)| (n.clone(), *p)).collect())
                    .unwrap_or_default();
                let at = started.elapsed();
                for (name, pid) in tracked {
                    if let Some(kib) = vm_rss_kib(pid)
                        && let Ok(mut all) = t_samples.lock()
                    {
                        all.entry(name).or_default().push((at, kib));
                    }
                }
                std::thread::sleep(interval);
            }
        });
        RssSampler {
            started,
            stop,
            pids,
            samples,
            handle: Some(handle),
        }
    }

    /// Samples `pid` under `name` from now on (a restarted process: the same name, a new pid).
    pub fn track(&self, name: &str, pid: u32) {
        if let Ok(mut pids) = self.pids.lock() {
            pids.insert(name.to_string(), pid);
        }
    }

    /// Stops sampling and compares the first and last third of the run, per process.
    pub fn finish(&mut self) -> MemoryReport {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
        let run = self.started.elapsed();
        let third = run / 3;
        let samples = self.samples.lock().map(|s| s.clone()).unwrap_or_default();
        let processes = samples
            .into_iter()
            .map(|(name, list)| {
                let peak = |keep: &dyn Fn(Duration) -> bool| {
                    list.iter()
                        .filter(|(at, _)| keep(*at))
                        .map(|(_, kib)| *kib)
                        .max()
                        .unwrap_or(0)
                };
                ProcessMemory {
                    first_third_peak_kib: peak(&|at| at <= third),
                    last_third_peak_kib: peak(&|at| at >= run - third),
                    peak_kib: peak(&|_| true),
                    samples: list.len(),
                    name,
                }
            })
            .collect();
        MemoryReport { run, processes }
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[derive(Debug, Clone)]
pub struct ProcessMemory {
    pub name: String,
    pub first_third_peak_kib: u64,
    pub last_third_peak_kib: u64,
    pub peak_kib: u64,
    pub samples: usize,
}

#[derive(Debug, Clone)]
pub struct MemoryReport {
    pub run: Duration,
    pub processes: Vec<ProcessMemory>,
}

impl MemoryReport {
    pub fn process(&self, name: &str) -> Option<&ProcessMemory> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// Memory stayed flat: for every process, the last third's peak is at most `factor` times
    /// the first third's peak plus `slack_mib` (allocator and page-cache warm-up), and each
    /// third has samples.
    pub fn assert_flat(&self, factor: f64, slack_mib: u64) {
        assert!(!self.processes.is_empty(), "no memory samples were taken");
        for p in &self.processes {
            assert!(
                p.first_third_peak_kib > 0 && p.last_third_peak_kib > 0,
                "{}: no samples in the first or last third of the run: {self}",
                p.name
            );
            let limit = (p.first_third_peak_kib as f64 * factor) as u64 + slack_mib * 1024;
            assert!(
                p.last_third_peak_kib <= limit,
                "{}: memory grew: last third peak {} KiB > {limit} KiB ({factor} x first third \
                 peak {} KiB + {slack_mib} MiB): {self}",
                p.name,
                p.last_third_peak_kib,
                p.first_third_peak_kib
            );
        }
    }
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RSS over {:.0} s:", self.run.as_secs_f64())?;
        for p in &self.processes {
            write!(
                f,
                " {} first third {:.1} MiB, last third {:.1} MiB, peak {:.1} MiB ({} samples);",
                p.name,
                p.first_third_peak_kib as f64 / 1024.0,
                p.last_third_peak_kib as f64 / 1024.0,
                p.peak_kib as f64 / 1024.0,
                p.samples
            )?;
        }
        Ok(())
    }
}
