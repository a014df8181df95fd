//! The relay's operator commands (`status`, `sites`, `dlq ...`): they read and drive the
//! admin API of a running relay, so they work the same on the machine or from afar (`--url`).

use anyhow::bail;
use backhaul_events::admin_client::{AdminClient, age};
use serde_json::{Value, json};

/// Where a command finds the relay: `--url`, or the admin address in `--config`, or the
/// default admin address.
pub fn admin_url(url: Option<String>, config: Option<&std::path::Path>) -> anyhow::Result<String> {
    if let Some(url) = url {
        return Ok(url.trim_end_matches('/').to_string());
    }
    if let Some(file) = config {
        let loaded = crate::config::RelayConfig::load(file)?;
        return Ok(format!("http://{}", loaded.config.admin.listen));
    }
    Ok("http://127.0.0.1:8788".into())
}

fn client(base: &str) -> anyhow::Result<AdminClient> {
    Ok(AdminClient::new(base)?)
}

pub fn status(base: &str, as_json: bool) -> anyhow::Result<()> {
    let status = client(base)?.get("/v1/status")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!(
        "broker          {}",
        if status["broker_connected"] == true {
            "connected"
        } else {
            "NOT CONNECTED"
        }
    );
    println!(
        "delivery        {}",
        if status["delivery_paused"] == true {
            "PAUSED (every ERP call failing; probing)"
        } else {
            "running"
        }
    );
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / (1u64 << 20) as f64;
    println!(
        "outbox          {} events waiting, {:.1} of {:.1} MiB{}",
        status["outbox_depth"],
        mib(&status["outbox_bytes"]),
        mib(&status["outbox_max_bytes"]),
        if status["outbox_full"] == true {
            " (full: batches are refused; the agents keep their events)"
        } else {
            ""
        }
    );
    println!("dead letters    {}", status["dlq_events"]);
    println!(
        "received        {} events in {} batches ({} duplicates dropped)",
        status["events_received"], status["batches_received"], status["events_duplicate"]
    );
    println!(
        "delivered       {} events, {} retries, {} dead-lettered",
        status["events_delivered"], status["delivery_retries"], status["events_dead_lettered"]
    );
    Ok(())
}

pub fn sites(base: &str, as_json: bool) -> anyhow::Result<()> {
    let sites = client(base)?.get("/v1/sites")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&sites)?);
        return Ok(());
    }
    println!(
        "{:<20} {:>12} {:>10} {:>10} {:>12}  {:<12} epoch",
        "site", "highest seq", "outbox", "dead", "delivered", "last seen"
    );
    for site in sites["sites"].as_array().into_iter().flatten() {
        println!(
            "{:<20} {:>12} {:>10} {:>10} {:>12}  {:<12} {}",
            site["site"].as_str().unwrap_or("?"),
            site["highest_seq"],
            site["outbox_depth"],
            site["events_dead_lettered"].as_u64().unwrap_or(0),
            site["events_delivered"],
            age(site["last_seen_ms"].as_i64()),
            site["epoch"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

pub fn dlq_list(base: &str, as_json: bool) -> anyhow::Result<()> {
    let list = client(base)?.get("/v1/dlq?limit=1000")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    let letters = list["dead_letters"].as_array().cloned().unwrap_or_default();
    println!("{} dead letters", list["total"]);
    if letters.is_empty() {
        return Ok(());
    }
    println!(
        "{:>8}  {:<12} {:<36} {:<8} {:>5}  reason",
        "id", "site", "event", "type", "tries"
    );
    for l in letters {
        let reason: String = l["reason"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(100)
            .collect();
        println!(
            "{:>8}  {:<12} {:<36} {:<8} {:>5}  {}",
            l["id"],
            l["site"].as_str().unwrap_or("?"),
            l["event_id"].as_str().unwrap_or("?"),
            l["type"].as_str().unwrap_or("?"),
            l["attempts"],
            reason
        );
    }
    Ok(())
}

pub fn dlq_show(base: &str, id: u64) -> anyhow::Result<()> {
    let letter = client(base)?.get(&format!("/v1/dlq/{id}"))?;
    println!("{}", serde_json::to_string_pretty(&letter)?);
    Ok(())
}

pub fn dlq_replay(base: &str, ids: &[u64], all: bool) -> anyhow::Result<()> {
    if ids.is_empty() && !all {
        bail!("name the dead letters to replay, or use --all");
    }
    let body = if all {
        json!({"all": true})
    } else {
        json!({"ids": ids})
    };
    let answer = client(base)?.post("/v1/dlq/replay", &body)?;
    let replayed = answer["replayed"].as_array().map(Vec::len).unwrap_or(0);
    println!("{replayed} dead letters sent back for delivery, in their original order");
    report_missing(ids, &answer["replayed"]);
    Ok(())
}

pub fn dlq_discard(base: &str, ids: &[u64]) -> anyhow::Result<()> {
    if ids.is_empty() {
        bail!("name the dead letters to discard");
    }
    let answer = client(base)?.post("/v1/dlq/discard", &json!({"ids": ids}))?;
    let discarded = answer["discarded"].as_array().map(Vec::len).unwrap_or(0);
    println!("{discarded} dead letters discarded");
    report_missing(ids, &answer["discarded"]);
    Ok(())
}

fn report_missing(asked: &[u64], done: &Value) {
    let done: Vec<u64> = done
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_u64)
        .collect();
    let missing: Vec<&u64> = asked.iter().filter(|id| !done.contains(id)).collect();
    if !missing.is_empty() {
        eprintln!("not in the dead-letter queue: {missing:?}");
    }
}
