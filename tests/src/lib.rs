//! Support for the end-to-end tests: finding the real binaries, starting them as child
//! processes that die with the test, free ports, and polling with a deadline.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace's example configuration files, which the tests load so they never rot.
/// The login the relays of the tests give their embedded broker, and the agents use on it.
pub const BROKER_LOGIN: (&str, &str) = ("backhaul-agents", "embedded-broker-test-password");

pub fn example_config(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(name)
}

/// A binary of this workspace, built by `cargo build --workspace --bins` (which
/// `cargo xtask test` runs first).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first with `cargo build --workspace --bins` \
         (`cargo xtask test` does this)",
        path.display()
    );
    path
}

/// Runs a workspace binary to completion and returns its output.
pub fn run_binary(name: &str, args: &[&str]) -> Output {
    Command::new(binary(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"))
}

/// A free TCP port on the loopback interface.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}

/// `N` free ports, all different: each is held until all are chosen, so the kernel cannot hand
/// out one of them twice (as two calls of [`free_port`] in a row may).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("local address").port())
}

/// A child process that is killed when the guard is dropped, so a failing test leaves nothing
/// running.
pub struct ChildGuard {
    pub name: String,
    pub child: Child,
}

impl ChildGuard {
    pub fn spawn(name: &str, command: &mut Command) -> ChildGuard {
        Self::try_spawn(name, command).unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
    }

    /// Starts `command` with stdin closed; what the benchmarks use, which report failures
    /// rather than panic.
    pub fn try_spawn(name: &str, command: &mut Command) -> std::io::Result<ChildGuard> {
        let child = command.stdin(Stdio::null()).spawn()?;
        Ok(ChildGuard {
            name: name.to_string(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, like a power cut to the process, and wait for it to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `timeout` for the process to exit; returns its status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        poll_until(timeout, || self.child.try_wait().ok().flatten())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Calls `probe` until it returns `Some`, or gives up after `timeout`.
pub fn poll_until<T>(timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

pub mod agent;
pub mod epcis;
pub mod erp_standin;
pub mod events;
pub mod mosquitto;
pub mod mqtt;
pub mod pipeline;
pub mod postgres;
pub mod proxy;
pub mod relay;
pub mod rss;
pub mod scanner;
pub mod sim;
pub mod tryton;
