//! MQTT over TLS to the agent, with certificates made by openssl and `mosquitto_pub` as the
//! client: a client that trusts the agent's CA is served; with `client_ca_file` set, only a
//! client presenting a certificate from that CA gets in.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::mosquitto::client_binary;
use backhaul_tests::poll_until;

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is missing: install Debian's openssl");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=backhaul-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
    );
    for (name, subject) in [("server", "/CN=127.0.0.1"), ("client", "/CN=scanner-tls")] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            "subjectAltName=IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }
}

fn publish(agent: &AgentProcess, dir: &Path, id: &str, client_cert: bool) -> (bool, String) {
    let event = format!(
        r#"{{"v":1,"id":"{id}","type":"count","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"location":"L"}}"#
    );
    let mut command = Command::new(client_binary("mosquitto_pub"));
    command
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &agent.mqtt_port().to_string(),
            "-i",
            "scanner-tls",
            "-q",
            "1",
        ])
        .args(["-t", "scans/scanner-tls", "-m", &event])
        .arg("--cafile")
        .arg(dir.join("ca.pem"));
    if client_cert {
        command
            .arg("--cert")
            .arg(dir.join("client.pem"))
            .arg("--key")
            .arg(dir.join("client.key"));
    }
    let output = command.output().expect("run mosquitto_pub");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn logged(agent: &AgentProcess, id: &str) -> bool {
    poll_until(Duration::from_secs(10), || {
        agent
            .log_events()
            .iter()
            .any(|e| e["id"] == id)
            .then_some(())
    })
    .is_some()
}

#[test]
fn scanners_publish_over_tls_and_client_certificates_are_enforced() {
    let certs = tempfile::tempdir().unwrap();
    make_certificates(certs.path());
    let path = |name: &str| certs.path().join(name).display().to_string();

    let agent = AgentProcess::start(
        AgentOptions::default()
            .set("mqtt.tls.cert_file", path("server.pem"))
            .set("mqtt.tls.key_file", path("server.key")),
    );
    let (ok, output) = publish(&agent, certs.path(), "tls-1", false);
    assert!(ok, "TLS publish failed: {output}\n{}", agent.stderr());
    assert!(
        logged(&agent, "tls-1"),
        "the event sent over TLS is not in the log"
    );
    drop(agent);

    let agent = AgentProcess::start(
        AgentOptions::default()
            .set("mqtt.tls.cert_file", path("server.pem"))
            .set("mqtt.tls.key_file", path("server.key"))
            .set("mqtt.tls.client_ca_file", path("ca.pem")),
    );
    let (ok, output) = publish(&agent, certs.path(), "tls-2", false);
    assert!(!ok, "a client without a certificate got in: {output}");
    let (ok, output) = publish(&agent, certs.path(), "tls-3", true);
    assert!(
        ok,
        "a client with a certificate was refused: {output}\n{}",
        agent.stderr()
    );
    assert!(logged(&agent, "tls-3"));
    assert!(!agent.log_events().iter().any(|e| e["id"] == "tls-2"));
    assert!(
        agent.stderr().contains("MQTT TLS handshake failed"),
        "the refused handshake was not logged"
    );
}
