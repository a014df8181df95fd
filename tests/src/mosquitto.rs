//! A real Mosquitto broker as a child process, on a free port with its own configuration, for
//! tests that need a broker (the agent's uplink, the relay's intake) or a third-party client.

use std::fs::OpenOptions;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{ChildGuard, free_port, poll_until};

const INSTALL_HINT: &str = "install Debian's mosquitto (cargo xtask test does)";
const CLIENTS_HINT: &str = "install Debian's mosquitto-clients (cargo xtask test does)";

/// Finds a Mosquitto program on PATH or in /usr/sbin (where Debian puts the broker).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/bin")])
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// A program of the `mosquitto` package (the broker, `mosquitto_passwd`); panics with how to
/// install it when it is missing.
pub fn broker_program(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} not found: {INSTALL_HINT}"))
}

/// The `mosquitto` broker binary; panics with how to install it when it is missing.
pub fn mosquitto_binary() -> PathBuf {
    broker_program("mosquitto")
}

/// A Mosquitto client program (`mosquitto_pub`, `mosquitto_sub`); panics with how to install
/// it when it is missing.
pub fn client_binary(name: &str) -> PathBuf {
    find_program(name).unwrap_or_else(|| panic!("{name} not found: {CLIENTS_HINT}"))
}

/// A Mosquitto broker of this test. Killed when dropped.
pub struct Mosquitto {
    dir: TempDir,
    port: u16,
    extra_config: String,
    child: Option<ChildGuard>,
}

impl Mosquitto {
    /// Anonymous access, no persistence, large in-flight and queue limits.
    pub fn start() -> Mosquitto {
        Mosquitto::start_with_config("")
    }

    /// Like [`Mosquitto::start`], with more configuration lines appended (options given twice
    /// take the later value, so these can also override the defaults).
    pub fn start_with_config(extra_config: &str) -> Mosquitto {
        let dir = tempfile::Builder::new()
            .prefix("backhaul-mosquitto-test-")
            .tempdir()
            .expect("a temporary directory");
        let mut broker = Mosquitto {
            dir,
            port: free_port(),
            extra_config: extra_config.to_string(),
            child: None,
        };
        // Another test may take the port between free_port() and the broker's bind.
        for attempt in 1..=3 {
            broker.write_config();
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(_) if attempt < 3 => broker.port = free_port(),
                Err(log) => panic!("mosquitto did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// A broker on a configuration of the test's own, written exactly as `config` makes it
    /// from `ports` distinct free ports: nothing of [`Mosquitto::start`]'s is added (no
    /// anonymous listener, no limits, no log settings). Returns once the broker takes TCP
    /// connections on every one of them, with the ports; [`Mosquitto::port`] is the first.
    /// The broker's output goes to [`Mosquitto::log`].
    pub fn start_with_config_file(
        ports: usize,
        config: impl Fn(&[u16]) -> String,
    ) -> (Mosquitto, Vec<u16>) {
        assert!(ports >= 1, "a broker listens on at least one port");
        let dir = tempfile::Builder::new()
            .prefix("backhaul-mosquitto-test-")
            .tempdir()
            .expect("a temporary directory");
        let mut broker = Mosquitto {
            dir,
            port: 0,
            extra_config: String::new(),
            child: None,
        };
        // Another test may take a port between free_port() and the broker's bind.
        for attempt in 1..=3 {
            let mut chosen: Vec<u16> = Vec::with_capacity(ports);
            while chosen.len() < ports {
                let port = free_port();
                if !chosen.contains(&port) {
                    chosen.push(port);
                }
            }
            broker.port = chosen[0];
            std::fs::write(broker.config_path(), config(&chosen)).expect("write mosquitto.conf");
            let started = broker
                .spawn_and_wait()
                .and_then(|()| broker.wait_listening(&chosen[1..]));
            match started {
                Ok(()) => return (broker, chosen),
                Err(_) if attempt < 3 => broker.kill9(),
                Err(log) => panic!("mosquitto did not start:\n{log}"),
            }
        }
        unreachable!("the last attempt panics or returns")
    }

    /// Waits until the running broker takes TCP connections on each of `ports`.
    fn wait_listening(&mut self, ports: &[u16]) -> Result<(), String> {
        for &port in ports {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let up = poll_until(Duration::from_secs(20), || {
                if !self.is_running() {
                    return Some(Err("mosquitto exited".to_string()));
                }
                TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                    .ok()
                    .map(|_| Ok(()))
            });
            match up {
                Some(Ok(())) => {}
                Some(Err(exited)) => return Err(format!("{exited}; log:\n{}", self.log())),
                None => {
                    return Err(format!(
                        "mosquitto never listened on {addr}; log:\n{}",
                        self.log()
                    ));
                }
            }
        }
        Ok(())
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.log")
    }

    /// What the broker logged, over all its runs.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.child.try_wait(), Ok(None)))
    }

    /// SIGKILL; returns once the broker is gone. Everything it held in memory is lost.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
    }

    /// Starts the broker again on the same port and configuration (killing it first if it
    /// still runs), and waits until the port takes connections.
    pub fn restart(&mut self) {
        self.kill9();
        if let Err(log) = self.spawn_and_wait() {
            panic!("mosquitto did not restart:\n{log}");
        }
    }

    fn write_config(&self) {
        // Mosquitto's defaults (20 messages in flight and 1000 queued per client) would make
        // the broker drop or hold back messages in bursty tests; the limits are set high on
        // purpose so that what a test sees is the system under test, not broker throttling.
        let config = format!(
            "# Written by the Backhaul end-to-end tests.\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence false\n\
             max_inflight_messages 1000\n\
             max_queued_messages 1000000\n\
             max_queued_bytes 0\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             connection_messages true\n\
             log_timestamp_format %Y-%m-%dT%H:%M:%S\n\
             {extra}\n",
            port = self.port,
            extra = self.extra_config,
        );
        std::fs::write(self.config_path(), config).expect("write mosquitto.conf");
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("mosquitto log file");
        let stdout = log.try_clone().expect("mosquitto log file");
        let mut command = Command::new(mosquitto_binary());
        command
            .arg("-c")
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .stdout(Stdio::from(stdout))
            .stderr(Stdio::from(log));
        let mut child = ChildGuard::spawn("mosquitto", &mut command);
        let addr = self.addr();
        let up = poll_until(Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.child.try_wait() {
                return Some(Err(format!("mosquitto exited with {status}")));
            }
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .ok()
                .map(|_| Ok(()))
        });
        match up {
            Some(Ok(())) => {
                self.child = Some(child);
                Ok(())
            }
            Some(Err(exited)) => Err(format!("{exited}; log:\n{}", self.log())),
            None => Err(format!(
                "mosquitto never listened on {addr}; log:\n{}",
                self.log()
            )),
        }
    }

    /// The directory holding the broker's configuration and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "---- mosquitto log (last {} lines) ----\n{}\n----",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}
