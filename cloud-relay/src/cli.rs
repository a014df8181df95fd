//! The relay's operator commands (`status`, `sites`, `dlq ...`): they read and drive the
//! admin API of a running relay, so they work the same on the machine or from afar (`--url`).

use anyhow::bail;
use backhaul_events::admin::{
    DeadLetter, DeadLettersAnswer, DiscardAnswer, DiscardRequest, RelayStatus, ReplayAnswer,
    ReplayRequest, SitesAnswer,
};
use backhaul_events::admin_client::{AdminClient, AdminTarget, age};

/// Where a command finds the relay and which token it sends: `--url`, else the admin address in
/// `--config`, else the default; `--token-file`, else `BACKHAUL_ADMIN_TOKEN`, else the
/// configuration's admin token.
pub fn admin_target(
    url: Option<String>,
    token_file: Option<&std::path::Path>,
    config: Option<&std::path::Path>,
) -> anyhow::Result<AdminTarget> {
    let from_config = match config {
        Some(file) => {
            let loaded = crate::config::RelayConfig::load(file)?;
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
        "http://127.0.0.1:8788",
    )?)
}

fn client(target: &AdminTarget) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::new(target)?)
}

/// Prints what the relay sent, as it sent it: `--json` output is for scripts, which should
/// see every field, including those this build of the command does not know.
fn print_sent(client: &AdminClient, path: &str) -> anyhow::Result<()> {
    let sent = client.get(path)?;
    println!("{}", serde_json::to_string_pretty(&sent)?);
    Ok(())
}

pub fn status(target: &AdminTarget, as_json: bool) -> anyhow::Result<()> {
    let client = client(target)?;
    if as_json {
        return print_sent(&client, "/v1/status");
    }
    let status: RelayStatus = client.get_json("/v1/status")?;
    println!(
        "broker          {}",
        if status.broker_connected {
            "connected"
        } else {
            "NOT CONNECTED"
        }
    );
    println!(
        "delivery        {}",
        if status.delivery_paused {
            "PAUSED (every ERP call failing; probing)"
        } else {
            "running"
        }
    );
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;
    println!(
        "outbox          {} events waiting, {:.1} of {:.1} MiB{}",
        status.outbox_depth,
        mib(status.outbox_bytes),
        mib(status.outbox_max_bytes),
        if status.outbox_full {
            " (full: batches are refused; the agents keep their events)"
        } else {
            ""
        }
    );
    println!("dead letters    {}", status.dlq_events);
    println!(
        "received        {} events in {} batches ({} duplicates dropped)",
        status.events_received, status.batches_received, status.events_duplicate
    );
    println!(
        "delivered       {} events, {} retries, {} dead-lettered",
        status.events_delivered, status.delivery_retries, status.events_dead_lettered
    );
    Ok(())
}

pub fn sites(target: &AdminTarget, as_json: bool) -> anyhow::Result<()> {
    let client = client(target)?;
    if as_json {
        return print_sent(&client, "/v1/sites");
    }
    let answer: SitesAnswer = client.get_json("/v1/sites")?;
    // "refusals": refusals the site's agent has not taken yet (it is away, or unsigned).
    println!(
        "{:<20} {:>12} {:>10} {:>10} {:>9} {:>12}  {:<12} epoch",
        "site", "highest seq", "outbox", "dead", "refusals", "delivered", "last seen"
    );
    for site in &answer.sites {
        println!(
            "{:<20} {:>12} {:>10} {:>10} {:>9} {:>12}  {:<12} {}",
            site.site,
            site.highest_seq,
            site.outbox_depth,
            site.events_dead_lettered,
            site.refusals_unacknowledged,
            site.events_delivered,
            age(Some(site.last_seen_ms)),
            site.epoch
        );
    }
    Ok(())
}

pub fn dlq_list(target: &AdminTarget, as_json: bool) -> anyhow::Result<()> {
    let client = client(target)?;
    let path = "/v1/dlq?limit=1000";
    if as_json {
        return print_sent(&client, path);
    }
    let list: DeadLettersAnswer = client.get_json(path)?;
    println!("{} dead letters", list.total);
    if list.dead_letters.is_empty() {
        return Ok(());
    }
    println!(
        "{:>8}  {:<12} {:<36} {:<8} {:>5}  reason",
        "id", "site", "event", "type", "tries"
    );
    for l in &list.dead_letters {
        let reason: String = l.reason.chars().take(100).collect();
        println!(
            "{:>8}  {:<12} {:<36} {:<8} {:>5}  {}",
            l.id,
            l.site,
            l.event_id,
            l.kind.as_str(),
            l.attempts,
            reason
        );
    }
    Ok(())
}

/// `s` as one segment of a URL path or a query value.
pub(crate) fn url_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for byte in s.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub fn trace(
    target: &AdminTarget,
    id: &str,
    site: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut path = format!("/v1/events/{}", url_component(id));
    if let Some(site) = site {
        path.push_str(&format!("?site={}", url_component(site)));
    }
    let answer: TraceAnswer = client(target)?.get_json(&path)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer.traces)?);
        return Ok(());
    }
    for (n, view) in answer.traces.iter().enumerate() {
        if n > 0 {
            println!();
        }
        print!("{}", crate::trace::render(view));
    }
    Ok(())
}

/// How a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
}

pub fn reconcile(
    target: &AdminTarget,
    site: &str,
    from: &str,
    to: &str,
    format: ReportFormat,
) -> anyhow::Result<()> {
    for (what, day) in [("--from", from), ("--to", to)] {
        crate::reconcile::parse_day(what, day).map_err(|e| anyhow::anyhow!(e))?;
    }
    let path = format!(
        "/v1/reconcile?site={}&from={}&to={}",
        url_component(site),
        url_component(from),
        url_component(to)
    );
    // The relay reads every trace of the site's window and asks the ERP: give it time.
    let client = AdminClient::with_timeout(target, std::time::Duration::from_secs(600))?;
    let text = match format {
        ReportFormat::Json => return print_sent(&client, &path),
        ReportFormat::Csv => crate::reconcile::csv(&client.get_json(&path)?),
        ReportFormat::Table => crate::reconcile::render(&client.get_json(&path)?),
    };
    print!("{text}");
    Ok(())
}

pub fn export_epcis(
    target: &AdminTarget,
    site: &str,
    from: &str,
    to: &str,
    mapping: &crate::connector::epcis::EpcisConfig,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use crate::connector::epcis::{document, object_event};
    let client = client(target)?;
    let mut objects = Vec::new();
    let mut skipped: std::collections::BTreeMap<String, usize> = Default::default();
    let mut after = String::new();
    loop {
        let path = format!(
            "/v1/sites/{}/delivered?from={}&to={}&after={}",
            url_component(site),
            url_component(from),
            url_component(to),
            url_component(&after)
        );
        let page: crate::admin::DeliveredAnswer = client.get_json(&path)?;
        for event in page.events {
            let event = event
                .into_stamped()
                .map_err(|e| anyhow::anyhow!("{path}: {e}"))?;
            match object_event(mapping, &event) {
                Ok(object) => objects.push(object),
                Err(reason) => *skipped.entry(reason).or_default() += 1,
            }
        }
        match page.next_after {
            Some(next) => after = next,
            None => break,
        }
    }
    let count = objects.len();
    let text = serde_json::to_string_pretty(&document(objects))?;
    match out {
        Some(file) => {
            std::fs::write(file, format!("{text}\n"))
                .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
            eprintln!(
                "wrote {count} events of site {site}, {from} to {to}, to {}",
                file.display()
            );
        }
        None => println!("{text}"),
    }
    eprintln!(
        "the export holds the events the relay posted and still keeps a trace of \
         (outbox.trace_days); events still waiting or dead-lettered are not in it"
    );
    for (reason, n) in skipped {
        eprintln!("left out {n} events: {reason}");
    }
    Ok(())
}

#[derive(serde::Deserialize)]
struct TraceAnswer {
    traces: Vec<crate::trace::TraceView>,
}

pub fn dlq_show(target: &AdminTarget, id: u64) -> anyhow::Result<()> {
    let letter: DeadLetter = client(target)?.get_json(&format!("/v1/dlq/{id}"))?;
    println!("{}", serde_json::to_string_pretty(&letter)?);
    Ok(())
}

pub fn dlq_replay(target: &AdminTarget, ids: &[u64], all: bool) -> anyhow::Result<()> {
    if ids.is_empty() && !all {
        bail!("name the dead letters to replay, or use --all");
    }
    let request = ReplayRequest {
        ids: if all { Vec::new() } else { ids.to_vec() },
        all,
    };
    let answer: ReplayAnswer = client(target)?.post_json("/v1/dlq/replay", &request)?;
    println!(
        "{} dead letters sent back for delivery, in their original order",
        answer.replayed.len()
    );
    report_missing(ids, &answer.replayed);
    Ok(())
}

pub fn dlq_discard(target: &AdminTarget, ids: &[u64]) -> anyhow::Result<()> {
    if ids.is_empty() {
        bail!("name the dead letters to discard");
    }
    let request = DiscardRequest { ids: ids.to_vec() };
    let answer: DiscardAnswer = client(target)?.post_json("/v1/dlq/discard", &request)?;
    println!("{} dead letters discarded", answer.discarded.len());
    report_missing(ids, &answer.discarded);
    Ok(())
}

fn report_missing(asked: &[u64], done: &[u64]) {
    let missing: Vec<&u64> = asked.iter().filter(|id| !done.contains(id)).collect();
    if !missing.is_empty() {
        eprintln!("not in the dead-letter queue: {missing:?}");
    }
}
