//! A real PostgreSQL server (Debian's `postgresql` package) as a child process of the test:
//! its own cluster made with `initdb` in a temporary directory, on a free loopback port, that a
//! test can SIGKILL and start again on the same data, like a database machine's power cut.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::{ChildGuard, free_port, poll_until};

const INSTALL_HINT: &str = "install Debian's postgresql (cargo xtask test does)";
/// The role and database the relays use.
pub const DATABASE: &str = "backhaul";

/// The directory of `initdb` and `postgres`: Debian keeps them per major version; the newest
/// is taken. `None` when the server is not installed.
pub fn find_bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| {
            dir.filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").is_file() && bin.join("postgres").is_file())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions.pop()
}

fn bin_dir() -> PathBuf {
    find_bin_dir().unwrap_or_else(|| {
        panic!("PostgreSQL's initdb not found under /usr/lib/postgresql: {INSTALL_HINT}")
    })
}

/// PostgreSQL refuses to run as root: as root, the server runs as the package's `postgres`
/// user, with `setpriv` exec'ing it in place so that killing the child kills the server.
pub fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("setpriv");
        command
            .args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
            .arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Whether this process runs as root, where PostgreSQL must run as its own user.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A PostgreSQL server of this test. Killed when dropped.
pub struct Postgres {
    dir: TempDir,
    port: u16,
    bin: PathBuf,
    child: Option<ChildGuard>,
}

impl Postgres {
    /// A new cluster with a `backhaul` role and database, started.
    pub fn start() -> Postgres {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("backhaul-postgres-test-")
            .tempdir()
            .expect("a temporary directory");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(
                status.success(),
                "cannot give the test's cluster directory to postgres"
            );
        }
        let output = as_server_user(&bin.join("initdb"))
            .args([
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--username",
                DATABASE,
            ])
            .arg("-D")
            .arg(dir.path().join("data"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}: {INSTALL_HINT}"));
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut server = Postgres {
            dir,
            port: free_port(),
            bin,
            child: None,
        };
        server.restart();
        let mut client = postgres::Client::connect(&server.url_of("postgres"), postgres::NoTls)
            .expect("connect to the test's PostgreSQL");
        client
            .batch_execute(&format!("CREATE DATABASE {DATABASE}"))
            .expect("create the relays' database");
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Connection parameters for the relays' database (no password: the cluster trusts
    /// loopback).
    pub fn url(&self) -> String {
        self.url_of(DATABASE)
    }

    fn url_of(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={DATABASE} dbname={dbname} connect_timeout=5",
            self.port
        )
    }

    /// A client of the relays' database, for what a test checks in it.
    pub fn client(&self) -> postgres::Client {
        postgres::Client::connect(&self.url(), postgres::NoTls).expect("connect to PostgreSQL")
    }

    /// SIGKILL: the server stops at once, as in a power cut, without a checkpoint.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill9();
        }
    }

    /// Starts the server (again) on the same data and port, and waits until it answers.
    pub fn restart(&mut self) {
        self.kill9();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("postgres log file");
        let child = ChildGuard::spawn(
            "postgres",
            as_server_user(&self.bin.join("postgres"))
                .arg("-D")
                .arg(self.dir.path().join("data"))
                .args(["-p", &self.port.to_string()])
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "unix_socket_directories="])
                .args(["-c", "max_connections=200"])
                .stdout(Stdio::null())
                .stderr(log),
        );
        self.child = Some(child);
        let url = self.url_of("postgres");
        let up = poll_until(Duration::from_secs(60), || {
            postgres::Client::connect(&url, postgres::NoTls)
                .ok()
                .map(|_| ())
        });
        assert!(up.is_some(), "PostgreSQL did not start:\n{}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- postgres log ----\n{}\n----", self.log());
        }
    }
}
