//! The systemd units: they pass `systemd-analyze verify`, score "OK" or better on
//! `systemd-analyze security`, and the real binaries speak the notify protocol (readiness once
//! listening, watchdog pings, stopping on SIGTERM) to a fake NOTIFY_SOCKET.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use backhaul_tests::agent::AgentOptions;
use backhaul_tests::{ChildGuard, binary};

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../systemd")
        .join(name)
}

/// The unit with its ExecStart pointing at the binary built here, since nothing is installed.
fn unit_with_built_binary(dir: &Path, service: &str) -> PathBuf {
    let text = std::fs::read_to_string(unit(&format!("backhaul-{service}.service"))).unwrap();
    let built = binary(&format!("backhaul-{service}"));
    let text = text.replace(
        &format!("/usr/bin/backhaul-{service}"),
        &built.display().to_string(),
    );
    let path = dir.join(format!("backhaul-{service}.service"));
    std::fs::write(&path, text).unwrap();
    path
}

fn systemd_analyze(args: &[&str]) -> (bool, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze is missing: install Debian's systemd");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn units_verify_and_score_ok_or_better() {
    let dir = tempfile::tempdir().unwrap();
    for service in ["agent", "relay"] {
        let path = unit_with_built_binary(dir.path(), service);
        let (ok, text) = systemd_analyze(&["verify", &path.to_string_lossy()]);
        assert!(
            ok && text.trim().is_empty(),
            "systemd-analyze verify backhaul-{service}.service:\n{text}"
        );
        let (_, text) = systemd_analyze(&["security", "--offline=true", &path.to_string_lossy()]);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
        println!(
            "backhaul-{service}.service: {}",
            line.trim_start_matches('→').trim()
        );
        let score: f64 = line
            .split(':')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the score of {line:?}"));
        // systemd calls 0-2.0 "SAFE" and up to 4.9 "OK"; stay well inside.
        assert!(
            score <= 3.0,
            "backhaul-{service}.service exposure {score}: {line}"
        );
    }
}

#[test]
fn the_agent_speaks_the_notify_protocol() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // An agent config written by the same helper the other tests use, started by hand here
    // so that its environment can carry the notify socket.
    let mut agent = backhaul_tests::agent::AgentProcess::start(AgentOptions::default());
    let config = agent.config_path();
    agent.kill9();
    let mut child = ChildGuard::spawn(
        "backhaul-agent",
        Command::new(binary("backhaul-agent"))
            .args(["run", "--config", &config.to_string_lossy()])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .stderr(std::process::Stdio::null()),
    );
    let mut messages = Vec::new();
    let wait_for = |wanted: &str, messages: &mut Vec<String>| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            if let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                let found = message.lines().any(|l| l == wanted);
                messages.push(message);
                if found {
                    return;
                }
            }
        }
        panic!("no {wanted} from the agent; got {messages:?}");
    };
    wait_for("READY=1", &mut messages);
    wait_for("WATCHDOG=1", &mut messages);
    wait_for("WATCHDOG=1", &mut messages);
    let status = child
        .terminate(Duration::from_secs(20))
        .expect("the agent stops on SIGTERM");
    wait_for("STOPPING=1", &mut messages);
    assert!(status.success(), "exit status {status}");
}
