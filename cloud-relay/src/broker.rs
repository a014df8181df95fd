//! The embedded broker (rumqttd) for single-machine setups: one MQTT 3.1.1 listener in this
//! process, which takes only the configured logins. It keeps nothing on disk, which is safe here because agents drop events only when
//! the relay acknowledges them from its outbox, and re-send anything a broker lost.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Starts the broker on its own threads and waits until it accepts connections. It takes only
/// the `logins` (username → password); a client without one of them is closed at CONNECT.
pub fn start(
    listen: SocketAddr,
    max_packet_size: usize,
    logins: HashMap<String, String>,
) -> anyhow::Result<()> {
    if logins.is_empty() {
        anyhow::bail!("the embedded broker needs at least one login (broker.users)");
    }
    let connections = ConnectionSettings {
        // A socket that has not sent CONNECT by then is closed: it holds a connection slot.
        connection_timeout_ms: 5_000,
        max_payload_size: max_packet_size,
        max_inflight_count: 1000,
        auth: Some(logins),
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings {
        name: "backhaul-embedded".into(),
        listen,
        tls: None,
        next_connection_delay_ms: 1,
        connections,
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 10_000,
            max_outgoing_packet_count: 1000,
            // Memory, not disk: a small log per topic bounds the broker's footprint (each
            // site's batches topic holds up to 16 MiB, which is an agent's whole window of
            // 16 full 1 MiB batches before compression). A subscriber that falls behind
            // loses messages, which agents re-send.
            max_segment_size: 4 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("backhaul".to_string(), server)])),
        ..Default::default()
    };
    // Fail early and clearly when the port is taken: rumqttd only logs bind errors.
    std::net::TcpListener::bind(listen).map_err(|e| {
        anyhow::anyhow!(
            "the embedded broker cannot listen on {listen} (broker.host/broker.port): {e}"
        )
    })?;
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("the embedded broker did not start listening on {listen}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    tracing::info!(%listen, "embedded broker listening");
    Ok(())
}
