//! The whole forwarding pipeline as the end-to-end suites drive it, and the checks they close
//! with. This module owns:
//!
//! - [`Pipeline`]: Mosquitto, a [`TcpProxy`] in front of it standing for the agent's WAN link,
//!   the relay (on the broker directly, as in the cloud) and one agent with quick reactions
//!   ([`agent_options`]), optionally with the memory of agent and relay sampled;
//! - fleets of simulated [`Scanner`]s: starting them, waiting for their acknowledgements,
//!   collecting the acknowledged ids;
//! - the checks of the promise on what reached the ledger or the ERP: every acknowledged id
//!   arrived exactly once, in order ([`assert_delivered`], [`assert_once_in_order`]); each was
//!   posted to the stand-in ERP with success exactly once, counted by arrival
//!   ([`assert_posted_once`]); and nothing is left in any buffer ([`Pipeline::assert_drained`],
//!   [`assert_agent_drained`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use serde_json::Value;

use crate::agent::{AgentOptions, AgentProcess};
use crate::erp_standin::ErpStandIn;
use crate::mosquitto::Mosquitto;
use crate::poll_until;
use crate::proxy::TcpProxy;
use crate::relay::RelayProcess;
use crate::rss::{MemoryReport, RssSampler};
use crate::scanner::{Scanner, pick_event};
use crate::sim::{SimOptions, SimProcess};

/// How long the pipeline may take to deliver every acknowledged event once the faults are over.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the agent's log and the relay's outbox may take to drain once everything arrived.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The agent of `site` with its uplink on the broker at `broker_port`, reacting faster than the
/// production defaults so that each scenario takes seconds.
pub fn agent_options(site: &str, broker_port: u16) -> AgentOptions {
    AgentOptions::default()
        .uplink("127.0.0.1", broker_port)
        .set("site", site)
        .set("uplink.client_id", format!("agent-{site}-{broker_port}"))
        .set("uplink.ack_timeout_secs", 3)
        .set("uplink.keep_alive_secs", 5)
        .set("uplink.reconnect_min_ms", 50)
        .set("uplink.reconnect_max_ms", 1000)
        .set("uplink.linger_ms", 10)
}

// ---------------------------------------------------------------------------------------------
// The pipeline
// ---------------------------------------------------------------------------------------------

/// Mosquitto, the proxy in front of it (the agent's WAN link), the relay on the broker directly
/// and one agent, each a real process.
pub struct Pipeline {
    pub site: String,
    pub broker: Mosquitto,
    pub proxy: TcpProxy,
    pub relay: RelayProcess,
    pub agent: AgentProcess,
    rss: Option<RssSampler>,
    _dir: tempfile::TempDir,
}

impl Pipeline {
    /// The pipeline of `site` with the relay's example configuration (its ledger as the sink).
    pub fn start(site: &str) -> Pipeline {
        Pipeline::start_with(site, |o| o, None, &[])
    }

    /// The pipeline of `site`, with the agent's [`agent_options`] passed through `agent`, the
    /// relay's `[sink.ledger]` replaced by `sink` (TOML of another connector) when given, and
    /// `relay_settings` set by dotted path (see [`RelayProcess::start_with`]).
    pub fn start_with(
        site: &str,
        agent: impl FnOnce(AgentOptions) -> AgentOptions,
        sink: Option<&str>,
        relay_settings: &[(&str, toml_edit::Value)],
    ) -> Pipeline {
        let dir = tempfile::tempdir().unwrap();
        let broker = Mosquitto::start();
        let proxy = TcpProxy::start(broker.addr());
        let relay = RelayProcess::start_with(
            &dir.path().join("relay"),
            broker.port(),
            false,
            sink,
            relay_settings,
        );
        let agent = AgentProcess::start(agent(agent_options(site, proxy.port())));
        Pipeline {
            site: site.to_string(),
            broker,
            proxy,
            relay,
            agent,
            rss: None,
            _dir: dir,
        }
    }

    /// Samples the resident memory of the agent and the relay every `interval` from now on.
    pub fn sample_memory(&mut self, interval: Duration) {
        self.rss = Some(RssSampler::start(interval));
        self.track();
    }

    /// Tells the memory sampler, if any, the current pids (after a restart).
    pub fn track(&self) {
        let Some(rss) = &self.rss else {
            return;
        };
        if let Some(pid) = self.agent.pid() {
            rss.track("agent", pid);
        }
        if let Some(pid) = self.relay.pid() {
            rss.track("relay", pid);
        }
    }

    /// Stops the memory sampler started by [`Pipeline::sample_memory`] and reports.
    pub fn memory_report(&mut self) -> MemoryReport {
        self.rss
            .as_mut()
            .expect("the pipeline samples memory (Pipeline::sample_memory)")
            .finish()
    }

    /// `backhaul-sim` publishing to the agent.
    pub fn sim(&self, options: SimOptions) -> SimProcess {
        SimProcess::start(self.agent.mqtt_addr(), &options)
    }

    pub fn ledger(&self) -> Vec<Value> {
        self.relay.ledger()
    }

    /// Waits until the agent reports its link up (`up`) or anything but up.
    pub fn wait_link(&self, up: bool) {
        let reached = poll_until(Duration::from_secs(30), || {
            let status = self.agent.status();
            ((status["link"]["state"] == "up") == up).then_some(())
        });
        assert!(
            reached.is_some(),
            "the agent's link never went {}: {}",
            if up { "up" } else { "down" },
            self.agent.status()
        );
    }

    /// Nothing is left in any buffer: the agent's backlog is empty, and so is the relay's
    /// outbox (`backhaul-relay status --json` and the site's line of `/v1/sites`); nothing was
    /// dead-lettered.
    pub fn assert_drained(&self) {
        assert_agent_drained(&self.agent);
        let relay = poll_until(DRAIN_TIMEOUT, || {
            let status = self.relay.status();
            (status["outbox_depth"] == 0).then_some(status)
        });
        assert!(
            relay.is_some(),
            "the relay's outbox never drained: {}\n{}",
            self.relay.status(),
            self.relay.log_tail()
        );
        let sites = self.relay.sites();
        let line = sites["sites"]
            .as_array()
            .and_then(|list| list.iter().find(|s| s["site"] == self.site.as_str()))
            .unwrap_or_else(|| panic!("the relay does not list site {}: {sites}", self.site));
        assert_eq!(line["outbox_depth"], 0, "{line}");
        let status = self.relay.status();
        assert_eq!(
            status["dlq_events"], 0,
            "nothing was dead-lettered: {status}"
        );
    }
}

/// The agent's log drains: no event in its backlog, none in flight.
pub fn assert_agent_drained(agent: &AgentProcess) {
    let drained = poll_until(DRAIN_TIMEOUT, || {
        let status = agent.status();
        (status["backlog"]["events"] == 0 && status["link"]["events_in_flight"] == 0)
            .then_some(status)
    });
    assert!(
        drained.is_some(),
        "the agent's log never drained: {}",
        agent.status()
    );
}

// ---------------------------------------------------------------------------------------------
// Scanners
// ---------------------------------------------------------------------------------------------

/// `count` scanners of `site` (devices `{site}-scanner-{i}`) publishing picks to `agent`, each
/// `per_second` events a second.
pub fn start_scanners(
    agent: &AgentProcess,
    site: &str,
    count: usize,
    per_second: u32,
) -> Vec<Scanner> {
    (0..count)
        .map(|i| {
            Scanner::start(
                agent.mqtt_addr(),
                &format!("{site}-scanner-{i}"),
                per_second,
                pick_event,
            )
        })
        .collect()
}

/// Waits until the scanners have `more` further acknowledgements (they keep running).
pub fn wait_for_scanner_acks(scanners: &[Scanner], more: usize, timeout: Duration) {
    let acked = || scanners.iter().map(Scanner::acked_count).sum::<usize>();
    let start = acked();
    let reached = poll_until(timeout, || (acked() >= start + more).then_some(()));
    assert!(
        reached.is_some(),
        "the scanners stalled at {} acknowledgements (wanted {more} more than {start} within \
         {timeout:?})",
        acked()
    );
}

/// Stops the scanners and returns every id they had acknowledged.
pub fn stop_scanners(scanners: Vec<Scanner>) -> Vec<String> {
    scanners.into_iter().flat_map(Scanner::stop).collect()
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// The ordering key of a delivered event, as the promise defines it: the order for picks and
/// ships, the sku and location for the rest.
pub fn ordering_key(event: &Value) -> String {
    match (event["type"].as_str(), event["order"].as_str()) {
        (Some("pick" | "ship"), Some(order)) => format!("order {order}"),
        _ => format!(
            "stock {} @ {}",
            event["sku"].as_str().unwrap_or(""),
            event["location"].as_str().unwrap_or("")
        ),
    }
}

/// Which events must arrive in the order the agent logged them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Order {
    /// All of a site's events (a single writer such as the ledger keeps the log's order).
    PerSite,
    /// The events of one ordering key ([`ordering_key`]), as the promise requires of any sink.
    PerKey,
}

/// What a delivery check found.
#[derive(Debug)]
pub struct Delivered {
    /// Acknowledged ids.
    pub acked: usize,
    /// The delivered records (ledger lines or ERP effects), in the order they arrived.
    pub records: Vec<Value>,
    /// Ordering keys (as [`Order`] counts them) among the records.
    pub keys: usize,
}

/// The ids in `records` (ledger lines or ERP effects), checking that none is there twice and
/// that sequence numbers rise in each site's log epoch, per key as `order` says. Returns the
/// ids and the number of ordering keys.
pub fn assert_once_in_order(
    scenario: &str,
    records: &[Value],
    order: Order,
) -> (HashSet<String>, usize) {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut last: BTreeMap<(String, String, String), u64> = BTreeMap::new();
    for record in records {
        let id = record["id"].as_str().expect("a delivered event has an id");
        *seen.entry(id).or_default() += 1;
        let key = (
            record["site"].as_str().unwrap_or_default().to_string(),
            record["epoch"].as_str().unwrap_or_default().to_string(),
            match order {
                Order::PerSite => String::new(),
                Order::PerKey => ordering_key(record),
            },
        );
        let seq = record["seq"].as_u64().expect("a delivered event has a seq");
        if let Some(previous) = last.insert(key.clone(), seq) {
            assert!(
                seq > previous,
                "{scenario}: {key:?}: seq {seq} ({id}) arrived after seq {previous}"
            );
        }
    }
    assert_none_twice(scenario, &seen, "arrived");
    let ids = seen.into_keys().map(str::to_string).collect();
    (ids, last.len())
}

/// Panics naming the ids (up to ten) that `counts` has more than once.
fn assert_none_twice(scenario: &str, counts: &HashMap<&str, usize>, what: &str) {
    let twice: Vec<(&&str, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "{scenario}: {} events {what} more than once, e.g. {:?}",
        twice.len(),
        &twice[..twice.len().min(10)]
    );
}

/// Waits until every acknowledged id is among the delivered `records` (ledger lines or ERP
/// effects), then checks that each arrived once, in order as `order` says.
pub fn assert_delivered(
    scenario: &str,
    acked: &[String],
    records: impl Fn() -> Vec<Value>,
    relay: &RelayProcess,
    order: Order,
) -> Delivered {
    let wanted: HashSet<&str> = acked.iter().map(String::as_str).collect();
    assert_eq!(
        wanted.len(),
        acked.len(),
        "an id was acknowledged twice to the producer"
    );
    let ids = |list: &[Value]| -> HashSet<String> {
        list.iter()
            .filter_map(|r| r["id"].as_str().map(str::to_string))
            .collect()
    };
    let complete = poll_until(DELIVERY_TIMEOUT, || {
        let list = records();
        let have = ids(&list);
        wanted.iter().all(|id| have.contains(*id)).then_some(list)
    });
    let list = complete.unwrap_or_else(|| {
        let have = ids(&records());
        let missing: Vec<&&str> = wanted.iter().filter(|id| !have.contains(**id)).collect();
        panic!(
            "{scenario}: {} of {} acknowledged events never arrived, e.g. {:?}\nrelay: {}\n{}",
            missing.len(),
            wanted.len(),
            &missing[..missing.len().min(10)],
            relay.status(),
            relay.log_tail()
        )
    });
    let (_, keys) = assert_once_in_order(scenario, &list, order);
    let delivered = Delivered {
        acked: acked.len(),
        records: list,
        keys,
    };
    println!(
        "{scenario}: acknowledged {}, delivered {} ({} ordering keys, each in log order), \
         lost 0, duplicated 0",
        delivered.acked,
        delivered.records.len(),
        delivered.keys
    );
    delivered
}

/// Each acknowledged event was posted to the stand-in ERP with success exactly once, counted
/// by arrival: every request the stand-in answered 2xx counts, including a repeated
/// `Idempotency-Key` it answered 200 without a second effect, so a re-post after success shows
/// as a second post. Failed attempts (500, 503, 429, a request held and closed unanswered) may
/// come before the one success; no event, acknowledged or not, has two. And every effect the
/// ERP holds comes from exactly one request, one it answered 2xx.
///
/// Call it once the relay's outbox has drained, so that no post is still to come.
pub fn assert_posted_once(scenario: &str, erp: &ErpStandIn, acked: &[String]) {
    let requests = erp.requests();
    let effects = erp.effects();
    let succeeded = |status: u16| (200..300).contains(&status);
    let mut posts: HashMap<&str, usize> = HashMap::new();
    for request in requests.iter().filter(|r| succeeded(r.status)) {
        let id = request.body["id"]
            .as_str()
            .unwrap_or_else(|| panic!("{scenario}: a post without an event id: {}", request.text));
        *posts.entry(id).or_default() += 1;
    }
    assert_none_twice(scenario, &posts, "were posted with success");
    let unposted: Vec<&String> = acked
        .iter()
        .filter(|id| !posts.contains_key(id.as_str()))
        .collect();
    assert!(
        unposted.is_empty(),
        "{scenario}: {} acknowledged events were never answered 2xx by the ERP, e.g. {:?}",
        unposted.len(),
        &unposted[..unposted.len().min(10)]
    );
    let mut made_by = vec![0usize; effects.len()];
    for request in &requests {
        let Some(index) = request.effect else {
            continue;
        };
        assert!(
            succeeded(request.status),
            "{scenario}: the ERP holds effect {index} ({}) of a request it answered {}",
            request.key,
            request.status
        );
        made_by[index] += 1;
    }
    let unexplained: Vec<(usize, &usize)> = made_by
        .iter()
        .enumerate()
        .filter(|(_, n)| **n != 1)
        .collect();
    assert!(
        unexplained.is_empty(),
        "{scenario}: effects not made by exactly one request (index, requests): {:?}",
        &unexplained[..unexplained.len().min(10)]
    );
    println!(
        "{scenario}: {} requests to the ERP, {} answered 2xx, one per event; {} effects, each \
         from a 2xx answer",
        requests.len(),
        posts.len(),
        effects.len()
    );
}
