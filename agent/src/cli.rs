//! The agent's operator commands (`status`, `rejects`, `tail`): they read the admin API of a
//! running agent and answer "is it moving, what is stuck, and why" in a compact table, or JSON
//! for scripts.

use std::time::Duration;

use anyhow::anyhow;
use backhaul_events::admin::{AgentStatus, EventsAnswer, Reject, RejectsAnswer};
use backhaul_events::admin_client::{AdminClient, AdminTarget, age};
use serde_json::Value;

/// Where a command finds the agent and which token it sends: `--url`, else the admin address in
/// `--config`, else the default; `--token-file`, else `BACKHAUL_ADMIN_TOKEN`, else the
/// configuration's admin token.
pub fn admin_target(
    url: Option<String>,
    token_file: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<AdminTarget> {
    let from_config = match config {
        Some(file) => {
            let loaded = crate::config::AgentConfig::load(file)?;
            Some((
                format!("http://{}", loaded.config.admin.listen),
                loaded.admin_access.client_token().cloned(),
            ))
        }
        None => None,
    };
    Ok(AdminTarget::choose(
        url,
        token_file,
        from_config,
        "http://127.0.0.1:8789",
    )?)
}

fn bytes(n: u64) -> String {
    backhaul_events::config::ByteSize(n).to_string()
}

pub fn status(target: &AdminTarget, as_json: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(target)?;
    if as_json {
        let sent = client.get("/v1/status")?;
        println!("{}", serde_json::to_string_pretty(&sent)?);
        return Ok(());
    }
    let s: AgentStatus = client.get_json("/v1/status")?;
    let oldest = s
        .backlog
        .oldest_age_seconds
        .map(|a| format!("{a:.1}s"))
        .unwrap_or_else(|| "-".into());
    println!("site            {} (epoch {})", s.site, s.epoch);
    match &s.link {
        None => {
            println!("link            not configured (no [uplink]): events are only kept here")
        }
        Some(link) => {
            println!(
                "link            {} since {}{}",
                link.state,
                age(Some(link.since_ms)),
                link.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            );
            println!(
                "last ack        {}   acknowledged through seq {}   {} batches in flight",
                age(link.last_ack_ms),
                link.acked_through,
                link.batches_in_flight
            );
        }
    }
    println!(
        "backlog         {} events, {}, oldest {oldest}",
        s.backlog.events,
        bytes(s.backlog.bytes)
    );
    println!(
        "disk quota      {} of {} ({:.1}%){}",
        bytes(s.quota.used_bytes),
        bytes(s.quota.max_bytes),
        s.quota.used_ratio * 100.0,
        if s.quota.exceeded {
            "  FULL: producers are refused"
        } else {
            ""
        }
    );
    let ingest = &s.ingest;
    println!(
        "ingested        mqtt {} http {} site broker {}   duplicates {}   rejected {}   refused (quota) {}",
        ingest.accepted.mqtt,
        ingest.accepted.http,
        ingest.accepted.site_broker,
        ingest.duplicates.total(),
        ingest.rejected.total(),
        ingest.quota_refusals.total()
    );
    println!("mqtt clients    {}", s.mqtt.connected_clients);
    if let Some(broker) = &s.site_broker {
        println!(
            "site broker     {} since {}{}",
            broker.state,
            age(Some(broker.since_ms)),
            broker
                .last_error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
    }
    if let Some(link) = &s.link {
        println!(
            "ERP             {} posted since start, {} refusals kept (backhaul-agent rejects)",
            link.erp_posted, s.erp_refusals_stored
        );
        let hour_ago = backhaul_now_ms() - 3_600_000;
        for refusal in s
            .erp_refusals
            .iter()
            .filter(|r| r.reported_at_ms >= hour_ago)
        {
            println!("  refused       {}: {}", refusal.id, refusal.reason);
        }
    }
    Ok(())
}

fn backhaul_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn print_reject(r: &Reject) {
    let reasons: Vec<String> = r.violations.iter().map(ToString::to_string).collect();
    println!(
        "{:<10} {:<40} {}",
        age(Some(r.at_ms)),
        r.sender,
        reasons.join("; ")
    );
}

/// Rejected events (the edge) and ERP refusals (reported by the relay); `follow` keeps
/// printing new rejects as they come.
pub fn rejects(target: &AdminTarget, as_json: bool, follow: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(target)?;
    let first_path = "/v1/rejects?limit=100";
    let sent = client.get(first_path)?;
    if as_json && !follow {
        println!("{}", serde_json::to_string_pretty(&sent)?);
        return Ok(());
    }
    let answer: RejectsAnswer = client.decode(first_path, &sent)?;
    if as_json {
        // JSON lines from the start, oldest first, so a script can read every line.
        print_sent_lines(&sent, answer.rejects.len(), true);
    } else {
        println!(
            "rejected at the edge ({} shown, newest last):",
            answer.rejects.len()
        );
        for r in answer.rejects.iter().rev() {
            print_reject(r);
        }
        println!("refused by the ERP ({} shown):", answer.erp_refusals.len());
        for r in answer.erp_refusals.iter().rev() {
            println!(
                "{:<10} {:<40} {}",
                age(Some(r.reported_at_ms)),
                r.id,
                r.reason
            );
        }
    }
    if !follow {
        return Ok(());
    }
    // Follow by id, so a flood of more than a page a second shows every reject.
    let mut newest = answer.rejects.first().map(|r| r.id).unwrap_or(0);
    loop {
        let path = format!("/v1/rejects?after={newest}&limit=1000");
        let sent = client.get(&path)?;
        let page: RejectsAnswer = client.decode(&path, &sent)?;
        if let Some(last) = page.rejects.iter().map(|r| r.id).max() {
            newest = newest.max(last);
        }
        if as_json {
            print_sent_lines(&sent, page.rejects.len(), false);
        } else {
            page.rejects.iter().for_each(print_reject);
        }
        if page.rejects.len() < 1000 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Prints the `rejects` of an answer as the agent sent them, one per line; `newest_first`
/// says the page is in that order (a listing) rather than oldest first (following).
fn print_sent_lines(sent: &Value, count: usize, newest_first: bool) {
    // The answer was decoded already, so `rejects` is an array of `count` items.
    let lines = (0..count).map(|i| &sent["rejects"][i]);
    if newest_first {
        lines.rev().for_each(|line| println!("{line}"));
    } else {
        lines.for_each(|line| println!("{line}"));
    }
}

/// Events as they are accepted (durable), one JSON line each, until interrupted.
pub fn tail(target: &AdminTarget) -> anyhow::Result<()> {
    let client = AdminClient::new(target)?;
    let status: AgentStatus = client.get_json("/v1/status")?;
    // Start at what arrives from now on.
    let mut after = status.backlog.next_seq.saturating_sub(1);
    loop {
        let path = format!("/v1/tail?after={after}");
        let answer: EventsAnswer = client.get_json(&path)?;
        for event in &answer.events {
            let seq = event.get("seq").and_then(Value::as_u64).ok_or_else(|| {
                anyhow!("{}{path} sent an event without a seq: {event}", target.url)
            })?;
            after = after.max(seq);
            println!("{event}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
