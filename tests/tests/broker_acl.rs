//! The broker configuration of `config/mosquitto/`, run by a real Mosquitto as shipped (only its
//! paths and its listeners' ports changed) with a CA, a broker certificate and site certificates
//! made by openssl: a site's certificate publishes only on its own site's topics and reads only
//! its own acks, outcomes and refusals; only certificates of the CA and the relay's login get in,
//! and a site cannot take another site's client id; and through that broker the relay refuses a
//! batch on site B's topic signed with site A's key, while a real agent with its own certificate
//! and key gets its events into the ledger and its acks and outcomes back.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use backhaul_events::topics::{
    ALL_BATCHES_FILTER, ALL_REFUSAL_ACKS_FILTER, ALL_TALLIES_FILTER, acks_topic, batches_topic,
    outcomes_topic, refusal_acks_topic, refusals_topic, tally_topic,
};
use backhaul_tests::agent::{AgentProcess, metric_value};
use backhaul_tests::events::{pick, unique_id};
use backhaul_tests::mosquitto::{Mosquitto, broker_program};
use backhaul_tests::mqtt::{V4Client, V5Client, v4_options, v5_options};
use backhaul_tests::pipeline::agent_options;
use backhaul_tests::relay::RelayProcess;
use backhaul_tests::{example_config, poll_until};
use rumqttc::v5::mqttbytes::v5::PubAckReason;
use serde_json::Value;
use tempfile::TempDir;

const SITE_A: &str = "site-a";
const SITE_B: &str = "site-b";
const KEY_A: &str = "1f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a79881f2e3d4c5b6a7988";
const KEY_B: &str = "a0b1c2d3e4f5061728394a5b6c7d8e9fa0b1c2d3e4f5061728394a5b6c7d8e9f";
/// The relays' login in the broker's password file, as backhaul.conf describes it.
const RELAY_USER: &str = "relay";
const RELAY_PASSWORD: &str = "relay-broker-test-password";
/// How long messages, metrics and agents may take to show what a test waits for.
const TIMEOUT: Duration = Duration::from_secs(30);

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run openssl ({e}): install Debian's openssl (cargo xtask test does)")
        });
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A new P-256 key `{name}.key` and its certificate `{name}.pem` for `subject`, signed by the
/// CA of `dir` with the extensions given, as backhaul.conf tells an operator to make them.
fn sign(dir: &Path, name: &str, subject: &str, extensions: &str) {
    let (key, csr, ext, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.ext"),
        format!("{name}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            subject,
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    std::fs::write(dir.join(&ext), extensions).expect("write the extensions file");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca_certificates/backhaul-ca.pem",
            "-CAkey",
            "backhaul-ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// A self-signed certificate `{name}.pem` for `subject`, from no CA the broker knows.
fn self_signed(dir: &Path, name: &str, subject: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            subject,
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// Makes `dir` and everything in it readable by every user: Mosquitto started as root drops to
/// the mosquitto user before it reads its certificates, key, password file and ACL.
fn make_readable(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read the directory") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            make_readable(&path);
        } else {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))
                .expect("chmod a file");
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .expect("chmod a directory");
}

/// config/mosquitto/backhaul.conf with its paths (/etc/mosquitto/ → `etc`) and its two
/// listeners' ports changed, and nothing else: asserts that exactly those lines changed.
fn as_shipped(etc: &Path, tls_port: u16, plain_port: u16) -> String {
    let file = example_config("mosquitto/backhaul.conf");
    let shipped = std::fs::read_to_string(&file).expect("config/mosquitto/backhaul.conf");
    let etc = format!("{}/", etc.display());
    let (mut listeners, mut paths) = (0, 0);
    let mut text = String::new();
    for line in shipped.lines() {
        let line = match line {
            "listener 8883" => {
                listeners += 1;
                format!("listener {tls_port}")
            }
            "listener 1883 127.0.0.1" => {
                listeners += 1;
                format!("listener {plain_port} 127.0.0.1")
            }
            _ if !line.starts_with('#') && line.contains("/etc/mosquitto/") => {
                paths += 1;
                line.replace("/etc/mosquitto/", &etc)
            }
            _ => line.to_string(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    assert_eq!(
        listeners,
        2,
        "{} no longer has the lines `listener 8883` and `listener 1883 127.0.0.1`",
        file.display()
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("listener ")).count(),
        2,
        "{} has listeners this test does not know",
        file.display()
    );
    assert_eq!(
        paths,
        5,
        "{} no longer names exactly the five files under /etc/mosquitto/ this test provides \
         (CA, certificate, key, password file, ACL)",
        file.display()
    );
    text
}

/// Mosquitto on the shipped configuration, with `etc` standing in for /etc/mosquitto: the CA
/// (`ca_certificates/backhaul-ca.pem`), the broker's certificate for 127.0.0.1
/// (`certs/backhaul-broker.pem`), the shipped ACL, a password file with the relay's login, and
/// beside them site certificates (`sites/{site}.pem`) and one from a stranger CA.
struct Broker {
    _mosquitto: Mosquitto,
    etc: TempDir,
    tls_port: u16,
    plain_port: u16,
}

impl Broker {
    fn start() -> Broker {
        let etc = tempfile::Builder::new()
            .prefix("backhaul-broker-acl-")
            .tempdir()
            .expect("a temporary directory");
        let dir = etc.path();
        for sub in ["ca_certificates", "certs", "sites", "stranger"] {
            std::fs::create_dir(dir.join(sub)).expect("create a directory");
        }
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=Backhaul site CA",
                "-keyout",
                "backhaul-ca.key",
                "-out",
                "ca_certificates/backhaul-ca.pem",
            ],
        );
        sign(
            dir,
            "certs/backhaul-broker",
            "/CN=127.0.0.1",
            "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        );
        for site in [SITE_A, SITE_B] {
            sign(
                dir,
                &format!("sites/{site}"),
                &format!("/CN={site}"),
                "extendedKeyUsage=clientAuth\n",
            );
        }
        // Site B's name on a certificate the broker's CA did not sign.
        self_signed(dir, "stranger/site-b", &format!("/CN={SITE_B}"));
        std::fs::copy(
            example_config("mosquitto/backhaul.acl"),
            dir.join("backhaul.acl"),
        )
        .expect("copy config/mosquitto/backhaul.acl");
        let passwd = Command::new(broker_program("mosquitto_passwd"))
            .args(["-c", "-b"])
            .arg(dir.join("backhaul.passwd"))
            .args([RELAY_USER, RELAY_PASSWORD])
            .output()
            .expect("run mosquitto_passwd");
        assert!(
            passwd.status.success(),
            "mosquitto_passwd: {}",
            String::from_utf8_lossy(&passwd.stderr)
        );
        make_readable(dir);
        let (mosquitto, ports) =
            Mosquitto::start_with_config_file(2, |ports| as_shipped(dir, ports[0], ports[1]));
        Broker {
            _mosquitto: mosquitto,
            etc,
            tls_port: ports[0],
            plain_port: ports[1],
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.etc.path().join(name)
    }

    fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    /// TLS to the broker, trusting its CA, with the certificate and key `{name}.pem`/`.key`.
    fn tls(&self, certificate: Option<&str>) -> rumqttc::Transport {
        let client_auth = certificate.map(|name| {
            (
                self.read(&format!("{name}.pem")),
                self.read(&format!("{name}.key")),
            )
        });
        rumqttc::Transport::tls(
            self.read("ca_certificates/backhaul-ca.pem"),
            client_auth,
            None,
        )
    }

    fn tls_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.tls_port))
    }

    fn site_v4_options(&self, certificate: Option<&str>, client_id: &str) -> rumqttc::MqttOptions {
        let mut options = v4_options(self.tls_addr(), client_id);
        options.set_transport(self.tls(certificate));
        options
    }

    /// An MQTT 3.1.1 client over TLS with the certificate of `site`.
    fn site_v4(&self, site: &str, client_id: &str) -> V4Client {
        let options = self.site_v4_options(Some(&format!("sites/{site}")), client_id);
        V4Client::connect_retrying(&options, TIMEOUT)
    }

    /// An MQTT 5 client over TLS with the certificate of `site`.
    fn site_v5(&self, site: &str, client_id: &str) -> V5Client {
        let mut options = v5_options(self.tls_addr(), client_id);
        options.set_transport(self.tls(Some(&format!("sites/{site}"))));
        V5Client::connect_retrying(&options, TIMEOUT)
    }

    /// MQTT 3.1.1 options for the loopback listener, with `login` if any.
    fn plain_options(&self, client_id: &str, login: Option<(&str, &str)>) -> rumqttc::MqttOptions {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.plain_port));
        let mut options = v4_options(addr, client_id);
        if let Some((user, password)) = login {
            options.set_credentials(user, password);
        }
        options
    }

    /// An MQTT 3.1.1 client on the loopback listener with the relays' login.
    fn relay_v4(&self, client_id: &str) -> V4Client {
        let options = self.plain_options(client_id, Some((RELAY_USER, RELAY_PASSWORD)));
        V4Client::connect_retrying(&options, TIMEOUT)
    }

    /// An MQTT 5 client on the loopback listener with the relays' login.
    fn relay_v5(&self, client_id: &str) -> V5Client {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.plain_port));
        let mut options = v5_options(addr, client_id);
        options.set_credentials(RELAY_USER, RELAY_PASSWORD);
        V5Client::connect_retrying(&options, TIMEOUT)
    }
}

/// What `client` receives, as (topic, payload), until `done` holds for all of it; panics when
/// it does not within [`TIMEOUT`].
fn receive_until(
    client: &mut V4Client,
    done: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    let mut received = Vec::new();
    let complete = poll_until(TIMEOUT, || {
        if let Some(message) = client.next_message(Duration::from_millis(100)) {
            let payload = String::from_utf8_lossy(&message.payload).into_owned();
            received.push((message.topic, payload));
        }
        done(&received).then_some(())
    });
    assert!(
        complete.is_some(),
        "what was expected did not all arrive; received {received:?}"
    );
    received
}

fn topics(received: &[(String, String)]) -> Vec<&str> {
    received.iter().map(|(topic, _)| topic.as_str()).collect()
}

#[test]
fn a_site_certificate_publishes_only_on_its_own_sites_topics() {
    let broker = Broker::start();
    let mut relay = broker.relay_v4("relay-watching");
    for filter in [
        ALL_BATCHES_FILTER,
        ALL_REFUSAL_ACKS_FILTER,
        ALL_TALLIES_FILTER,
    ] {
        assert!(
            relay.subscribe(filter).expect("a SUBACK"),
            "the relay's subscription to {filter} was refused"
        );
    }

    // Over MQTT 5 the broker says so: site A's certificate may not publish site B's batches or
    // refusal acknowledgements, nor the relay's answers, not even on its own topics.
    let mut site_a = broker.site_v5(SITE_A, "probe-a");
    for forbidden in [
        batches_topic(SITE_B),
        refusal_acks_topic(SITE_B),
        tally_topic(SITE_B),
        acks_topic(SITE_A),
        outcomes_topic(SITE_A),
        refusals_topic(SITE_A),
        acks_topic(SITE_B),
    ] {
        let ack = site_a
            .publish(&forbidden, 1, "forged over MQTT 5")
            .expect("a PUBACK");
        assert_eq!(
            ack.reason,
            PubAckReason::NotAuthorized,
            "site A's certificate published on {forbidden}"
        );
    }
    for own in [
        batches_topic(SITE_A),
        refusal_acks_topic(SITE_A),
        tally_topic(SITE_A),
    ] {
        let ack = site_a
            .publish(&own, 1, "own, over MQTT 5")
            .expect("a PUBACK");
        assert!(ack.is_success(), "site A's publish on {own}: {ack:?}");
    }
    site_a.disconnect();

    // MQTT 3.1.1 has no reason codes: the broker acknowledges a denied publish like any other,
    // and drops it.
    let mut site_a = broker.site_v4(SITE_A, "probe-a");
    for forbidden in [batches_topic(SITE_B), refusal_acks_topic(SITE_B)] {
        site_a
            .publish(&forbidden, 1, "forged over MQTT 3.1.1")
            .expect("acknowledged all the same");
    }
    site_a
        .publish(&batches_topic(SITE_A), 1, "own, over MQTT 3.1.1")
        .expect("a PUBACK");
    site_a.disconnect();

    // The relay gets one publisher's messages in the order they were published, so once the
    // last of site A's own has arrived, a forged one that got through would have come before.
    let received = receive_until(&mut relay, |received| received.len() >= 4);
    let own = |topic: &str, payload: &str| (topic.to_string(), payload.to_string());
    assert_eq!(
        received,
        vec![
            own(&batches_topic(SITE_A), "own, over MQTT 5"),
            own(&refusal_acks_topic(SITE_A), "own, over MQTT 5"),
            own(&tally_topic(SITE_A), "own, over MQTT 5"),
            own(&batches_topic(SITE_A), "own, over MQTT 3.1.1"),
        ],
        "the relay's login received something site A's certificate may not publish"
    );

    // The relays' login answers sites; it cannot write as one.
    let mut relay_v5 = broker.relay_v5("relay-probing");
    let ack = relay_v5
        .publish(&batches_topic(SITE_A), 1, "a batch from the relay")
        .expect("a PUBACK");
    assert_eq!(ack.reason, PubAckReason::NotAuthorized, "{ack:?}");
    let ack = relay_v5
        .publish(&acks_topic(SITE_A), 1, "an ack")
        .expect("a PUBACK");
    assert!(
        ack.reason != PubAckReason::NotAuthorized,
        "the relay may not answer site A: {ack:?}"
    );
}

#[test]
fn a_site_certificate_reads_only_its_own_sites_acks_outcomes_and_refusals() {
    let broker = Broker::start();
    // Site A subscribes to everything of site B's it can name. Mosquitto (2.0.11 at least)
    // grants each SUBSCRIBE and checks read rights on every message it would deliver, so what
    // counts is what arrives, not the SUBACK.
    let mut site_a = broker.site_v4(SITE_A, "reader-a");
    let everything_of_b = [
        acks_topic(SITE_B),
        outcomes_topic(SITE_B),
        refusals_topic(SITE_B),
        "backhaul/v1/sites/+/acks".to_string(),
        "backhaul/v1/sites/#".to_string(),
        "#".to_string(),
    ];
    let own_of = |site: &str| [acks_topic(site), outcomes_topic(site), refusals_topic(site)];
    for filter in everything_of_b.iter().chain(&own_of(SITE_A)) {
        site_a.subscribe(filter).expect("a SUBACK");
    }
    let mut site_b = broker.site_v4(SITE_B, "reader-b");
    for filter in own_of(SITE_B) {
        site_b.subscribe(&filter).expect("a SUBACK");
    }

    // The relay answers site B, then site A.
    let mut relay = broker.relay_v4("relay-answering");
    for site in [SITE_B, SITE_A] {
        for topic in own_of(site) {
            relay
                .publish(&topic, 1, format!("for {site}"))
                .expect("a PUBACK");
        }
    }

    // Site B gets its own three.
    let received_b = receive_until(&mut site_b, |received| received.len() >= 3);
    assert_eq!(
        topics(&received_b),
        own_of(SITE_B)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
    );
    // Site A gets its own (several times over its overlapping filters) until the last one the
    // relay published; site B's, published before, would have come first.
    let last = refusals_topic(SITE_A);
    let received_a = receive_until(&mut site_a, |received| {
        received.iter().any(|(topic, _)| *topic == last)
    });
    for (topic, payload) in &received_a {
        assert!(
            own_of(SITE_A).contains(topic) && payload == "for site-a",
            "site A's certificate read {topic}: {payload}; it received {received_a:?}"
        );
    }
    for topic in own_of(SITE_A) {
        assert!(
            topics(&received_a).contains(&topic.as_str()),
            "site A did not get {topic}: {received_a:?}"
        );
    }
}

#[test]
fn only_the_cas_certificates_and_the_relay_login_get_in_and_no_site_takes_anothers_client_id() {
    let broker = Broker::start();

    // The TLS listener: no certificate, or one the CA did not sign (whatever its CN says), is
    // no connection.
    for (certificate, what) in [
        (None, "no certificate"),
        (Some("stranger/site-b"), "a certificate of another CA"),
    ] {
        let options = broker.site_v4_options(certificate, "intruder");
        assert!(
            V4Client::connect(options).is_err(),
            "a client with {what} connected over TLS"
        );
    }
    // The loopback listener: no login, a wrong password or a user not in the password file is
    // refused as not authorised.
    for login in [
        None,
        Some((RELAY_USER, "not-the-password")),
        Some((SITE_A, "")),
    ] {
        match V4Client::connect(broker.plain_options("intruder", login)) {
            Err(rumqttc::ConnectionError::ConnectionRefused(
                rumqttc::ConnectReturnCode::NotAuthorized,
            )) => {}
            Err(other) => panic!("{login:?}: refused, but not as not authorised: {other}"),
            Ok(_) => panic!("{login:?} connected to the loopback listener"),
        }
    }

    // The client id is the site: site A's certificate connecting with site B's agent's client
    // id does not disconnect site B. (The broker closes a client it replaces while it handles
    // the new CONNECT, before its CONNACK.)
    let agent_b_id = "backhaul-agent-site-b-uplink";
    let mut site_b = broker.site_v4(SITE_B, agent_b_id);
    let site_a = broker.site_v4(SITE_A, agent_b_id);
    site_b
        .publish(&batches_topic(SITE_B), 1, "still connected")
        .expect("site B is still connected after site A took its client id");
    site_a.disconnect();

    // A second connection with site B's certificate (a copied one), whatever its client id,
    // closes the first.
    let _copy = broker.site_v4(SITE_B, "another-client-id");
    assert!(
        site_b.wait_closed(TIMEOUT).is_some(),
        "two connections with one site's certificate are open at once"
    );
}

fn secret_file(dir: &Path, name: &str, text: &str) -> toml_edit::Value {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a secret file");
    format!("{{ file = {:?} }}", path.display().to_string())
        .parse()
        .expect("an inline table")
}

/// A real agent of `site` on the broker's TLS listener with the certificate of `certificate`
/// and the site key `key`.
fn agent(broker: &Broker, site: &str, certificate: &str, key: toml_edit::Value) -> AgentProcess {
    let tls: toml_edit::Value = format!(
        "{{ ca_file = {:?}, client_cert_file = {:?}, client_key_file = {:?} }}",
        broker
            .path("ca_certificates/backhaul-ca.pem")
            .display()
            .to_string(),
        broker
            .path(&format!("sites/{certificate}.pem"))
            .display()
            .to_string(),
        broker
            .path(&format!("sites/{certificate}.key"))
            .display()
            .to_string(),
    )
    .parse()
    .expect("an inline table");
    AgentProcess::start(
        agent_options(site, broker.tls_port)
            .set("uplink.tls", tls)
            .set("uplink.site_key", key)
            .set("uplink.ack_timeout_secs", 2),
    )
}

fn post(agent: &AgentProcess, prefix: &str, n: usize) -> Vec<String> {
    let events: Vec<Value> = (0..n).map(|_| pick(&unique_id(prefix), "SO-1")).collect();
    let ids = events
        .iter()
        .map(|e| e["id"].as_str().unwrap_or_default().to_string())
        .collect();
    let response = agent.post_events(&Value::Array(events), None);
    assert_eq!(response.status().as_u16(), 202);
    ids
}

fn backlog(agent: &AgentProcess) -> u64 {
    agent.status()["backlog"]["events"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

fn refused(relay: &RelayProcess, reason: &str) -> f64 {
    metric_value(
        &relay.metrics(),
        &format!("backhaul_relay_batches_refused_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

#[test]
fn the_relay_refuses_site_as_key_on_site_bs_topic_and_a_real_agent_gets_through() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let keys = secret_file(
        dir.path(),
        "site-keys",
        &format!("{SITE_A} = \"{KEY_A}\"\n{SITE_B} = \"{KEY_B}\"\n"),
    );
    let password: toml_edit::Value = format!("{{ value = {RELAY_PASSWORD:?} }}")
        .parse()
        .expect("an inline table");
    // The relay on the loopback listener with the relays' login; it is ready once subscribed.
    let relay = RelayProcess::start_with(
        &dir.path().join("relay"),
        broker.plain_port,
        false,
        None,
        &[
            ("broker.username", RELAY_USER.into()),
            ("broker.password", password),
            ("security.site_keys", keys),
        ],
    );
    let key_a = || secret_file(dir.path(), "a.key", KEY_A);

    // Site B's agent with site B's certificate but site A's key (a key copied to the wrong
    // server): the broker lets the batch onto site B's topic, the relay refuses it.
    let impostor = agent(&broker, SITE_B, SITE_B, key_a());
    post(&impostor, "b-with-a-key", 5);
    let counted = poll_until(TIMEOUT, || {
        (refused(&relay, "bad_signature") >= 1.0).then_some(())
    });
    assert!(
        counted.is_some(),
        "no bad_signature refusal: {}\n{}",
        relay.metrics(),
        impostor.status()
    );
    // Nothing acknowledged: the agent keeps its events, and says nothing moves.
    let stalled = poll_until(TIMEOUT, || {
        (impostor.status()["link"]["state"] == "stalled").then_some(())
    });
    assert!(stalled.is_some(), "{}", impostor.status());
    assert_eq!(backlog(&impostor), 5, "{}", impostor.status());
    assert!(relay.ledger().is_empty(), "{:?}", relay.ledger());

    // Site A's agent with its own certificate and key: stored, acknowledged, delivered, and
    // the ERP's outcomes back at the site.
    let site_a = agent(&broker, SITE_A, SITE_A, key_a());
    let good = post(&site_a, "a-own-key", 5);
    let drained = poll_until(TIMEOUT, || (backlog(&site_a) == 0).then_some(()));
    assert!(drained.is_some(), "{}", site_a.status());
    let outcomes = poll_until(TIMEOUT, || {
        (site_a.status()["link"]["erp_posted"].as_u64() >= Some(5)).then_some(())
    });
    assert!(outcomes.is_some(), "no outcomes: {}", site_a.status());
    let ledger = relay.ledger();
    let stored: Vec<&str> = ledger.iter().filter_map(|l| l["id"].as_str()).collect();
    assert_eq!(stored.len(), good.len(), "only site A's events: {ledger:?}");
    for id in &good {
        assert!(stored.contains(&id.as_str()), "{id} is not in the ledger");
    }
    assert!(ledger.iter().all(|l| l["site"] == SITE_A), "{ledger:?}");

    // Site B's agent still holds its events, refused for their signature and nothing else.
    assert_eq!(backlog(&impostor), 5, "{}", impostor.status());
    for reason in ["unknown_site", "unsigned"] {
        assert_eq!(refused(&relay, reason), 0.0, "{}", relay.metrics());
    }
}
