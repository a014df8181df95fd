//! Starts the agent's parts from a loaded configuration (log, MQTT endpoint, HTTP server,
//! forwarder, site broker), supervises them, and stops them in order on SIGINT or SIGTERM
//! (stop taking new work, answer what was taken in, then close the log), or with an error as
//! soon as one of them ends on its own, so that systemd restarts the agent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use backhaul_events::service::{Heartbeats, Supervisor};
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, LoadedAgentConfig};
use crate::forward::Forwarder;
use crate::http::{HttpState, admin_router, ingest_router};
use crate::log::{EventLog, LogOptions};
use crate::metrics::AgentMetrics;
use crate::mqtt::{Endpoint, MqttSettings};
use crate::site_broker::{SharedSiteBrokerStatus, SiteBrokerSource};
use backhaul_events::http_listener::{ConnectionLimits, serve};

/// How long in-flight acknowledgements may take to go out once a stop is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// The event log's settings from the agent's configuration.
pub fn log_options(config: &AgentConfig) -> LogOptions {
    LogOptions {
        dir: config.state_dir.clone(),
        max_bytes: config.log.max_bytes.0,
        cache_size: config.log.cache_size.0 as usize,
        group_commit_delay: Duration::from_millis(config.log.group_commit_delay_ms),
        group_commit_max_events: config.log.group_commit_max_events,
        max_rejects: config.log.max_rejects,
        tally_days: config.log.tally_days,
    }
}

pub async fn run(loaded: LoadedAgentConfig) -> anyhow::Result<()> {
    let config = loaded.config.clone();
    tracing::info!(site = %config.site, config = %loaded.file.display(), "agent starting");
    let options = log_options(&config);
    let log = tokio::task::spawn_blocking(move || EventLog::open(options))
        .await
        .context("the log could not be opened")??;
    let stats = log.stats();
    tracing::info!(
        path = %log.path().display(), epoch = %log.epoch(), backlog_events = stats.backlog_events,
        backlog_bytes = stats.backlog_bytes, "event log open"
    );
    let metrics = AgentMetrics::new();
    let flush_histogram = metrics.flush_seconds.clone();
    log.set_flush_observer(move |took, _| flush_histogram.observe(took.as_secs_f64()));

    let stop = CancellationToken::new();
    let heartbeats = Heartbeats::default();
    let mut tasks = Supervisor::default();
    log.set_heartbeat(heartbeats.register("log writer"));
    let (writer, writer_stop) = (log.clone(), stop.clone());
    tasks.spawn("log writer", async move {
        tokio::select! {
            _ = writer_stop.cancelled() => Ok(()),
            _ = writer.writer_ended() => {
                anyhow::bail!("the log writer stopped: nothing can be made durable")
            }
        }
    });
    let mut mqtt_endpoint = None;
    if let Some(listen) = config.mqtt.listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen for MQTT on {listen} (mqtt.listen)"))?;
        let tls = match &config.mqtt.tls {
            Some(tls) => Some(crate::mqtt::tls_acceptor(tls)?),
            None => None,
        };
        let endpoint = Endpoint::new(
            MqttSettings {
                tls,
                topic: config.mqtt.topic.clone(),
                max_connections: config.mqtt.max_connections,
                max_packet_size: config.mqtt.max_packet_size.0 as usize,
                max_keep_alive_secs: config.mqtt.max_keep_alive_secs,
                own_device_topic_only: config.mqtt.own_device_topic_only,
                users: loaded.mqtt_users.clone(),
                max_session_expiry: Duration::from_secs(config.mqtt.max_session_expiry_secs),
            },
            log.clone(),
            metrics.clone(),
        );
        tracing::info!(%listen, topic = %config.mqtt.topic, tls = config.mqtt.tls.is_some(), "MQTT endpoint listening");
        let serve = endpoint.clone().serve(listener, stop.clone());
        tasks.spawn("MQTT endpoint", async move {
            serve.await;
            anyhow::Ok(())
        });
        mqtt_endpoint = Some(endpoint);
    }

    let mut link = None;
    if let Some(uplink) = config.uplink.clone() {
        let (forwarder, status) = Forwarder::new(
            config.site.clone(),
            log.clone(),
            uplink,
            loaded.uplink_password.clone(),
            metrics.clone(),
        );
        let forwarder = forwarder
            .with_heartbeat(heartbeats.register("forwarder"))
            .with_site_key(loaded.site_key.clone());
        link = Some(status);
        tasks.spawn("forwarder", forwarder.run(stop.clone()));
    }

    let mut site_broker_status = None;
    if let Some(site_broker) = config.site_broker.clone() {
        let status = SharedSiteBrokerStatus::default();
        site_broker_status = Some(status.clone());
        tracing::info!(host = %site_broker.host, port = site_broker.port, topic = %site_broker.topic, "taking scans from the site broker");
        let source = SiteBrokerSource {
            site: config.site.clone(),
            config: site_broker,
            password: loaded.site_broker_password.clone(),
            log: log.clone(),
            metrics: metrics.clone(),
            status,
        };
        let run = source.run(stop.clone());
        tasks.spawn("site broker", async move {
            run.await;
            anyhow::Ok(())
        });
    }

    let http_listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for HTTP on {} (http.listen)",
                config.http.listen
            )
        })?;
    tracing::info!(
        listen = %config.http.listen, max_connections = config.http.max_connections,
        "HTTP ingest listening"
    );
    let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen for admin HTTP on {} (admin.listen)",
                config.admin.listen
            )
        })?;
    tracing::info!(listen = %config.admin.listen, "admin API listening");
    let state = HttpState {
        site: config.site.clone(),
        log: log.clone(),
        metrics: metrics.clone(),
        mqtt: mqtt_endpoint.clone(),
        mqtt_listen: config.mqtt.listen.map(|a| a.to_string()),
        token: loaded.http_token.clone(),
        started: Instant::now(),
        link,
        site_broker: site_broker_status,
    };
    let limits = ConnectionLimits {
        section: "http",
        max_connections: config.http.max_connections,
        header_timeout: Duration::from_secs(config.http.header_timeout_secs),
        body_timeout: Duration::from_secs(config.http.body_timeout_secs),
        idle_timeout: Duration::from_secs(config.http.idle_timeout_secs),
    };
    let admin = admin_router(state.clone(), Arc::new(loaded.admin_access.clone()));
    let serve_ingest = serve(http_listener, ingest_router(state), limits, stop.clone());
    tasks.spawn("HTTP ingest", async move {
        serve_ingest.await;
        anyhow::Ok(())
    });
    let serve_admin = serve(
        admin_listener,
        admin,
        ConnectionLimits::from(&config.admin),
        stop.clone(),
    );
    tasks.spawn("admin HTTP", async move {
        serve_admin.await;
        anyhow::Ok(())
    });

    // Everything is open and bound: tell systemd.
    let watchdog = backhaul_events::service::notify_ready(heartbeats);
    let ended = tasks.run_until_signal().await;
    backhaul_events::service::notify_stopping(watchdog);
    stop.cancel();
    let signal = match ended {
        Ok(signal) => signal,
        Err(e) => {
            tracing::error!("agent stopping: {e:#}");
            tasks.drain(DRAIN_TIMEOUT).await;
            return Err(e);
        }
    };
    tracing::info!(
        signal,
        "agent stopping: answering what was taken in, then closing the log"
    );
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        if let Some(endpoint) = &mqtt_endpoint {
            while endpoint.connected_clients() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
    if drained.is_err() || !tasks.drain(DRAIN_TIMEOUT).await {
        tracing::warn!(
            "stopped before every connection finished; unacknowledged events will be re-sent by their producers"
        );
    }
    tracing::info!("agent stopped");
    Ok(())
}
