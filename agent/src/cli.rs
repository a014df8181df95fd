//! The agent's operator commands (`status`, `rejects`, `tail`): they read the admin API of a
//! running agent and answer "is it moving, what is stuck, and why" in a compact table, or JSON
//! for scripts.

use std::time::Duration;

use backhaul_events::admin_client::{AdminClient, age};
use serde_json::Value;

/// Where a command finds the agent: `--url`, the HTTP address in `--config`, or the default.
pub fn admin_url(url: Option<String>, config: Option<&std::path::Path>) -> anyhow::Result<String> {
    if let Some(url) = url {
        return Ok(url);
    }
    if let Some(file) = config {
        let loaded = crate::config::AgentConfig::load(file)?;
        return Ok(format!("http://{}", loaded.config.http.listen));
    }
    Ok("http://127.0.0.1:8787".into())
}

fn count(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

fn bytes(n: u64) -> String {
    backhaul_events::config::ByteSize(n).to_string()
}

pub fn status(base: &str, as_json: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(base)?;
    let s = client.get("/v1/status")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    let link = &s["link"];
    let oldest = s["backlog"]["oldest_age_seconds"]
        .as_f64()
        .map(|a| format!("{a:.1}s"))
        .unwrap_or_else(|| "-".into());
    println!(
        "site            {} (epoch {})",
        s["site"].as_str().unwrap_or("?"),
        s["epoch"].as_str().unwrap_or("?")
    );
    if link.is_null() {
        println!("link            not configured (no [uplink]): events are only kept here");
    } else {
        println!(
            "link            {} since {}{}",
            link["state"].as_str().unwrap_or("?"),
            age(link["since_ms"].as_i64()),
            link["last_error"]
                .as_str()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default()
        );
        println!(
            "last ack        {}   acknowledged through seq {}   {} batches in flight",
            age(link["last_ack_ms"].as_i64()),
            link["acked_through"],
            link["batches_in_flight"]
        );
    }
    println!(
        "backlog         {} events, {}, oldest {oldest}",
        count(&s["backlog"]["events"]),
        bytes(count(&s["backlog"]["bytes"]))
    );
    println!(
        "disk quota      {} of {} ({:.1}%){}",
        bytes(count(&s["quota"]["used_bytes"])),
        bytes(count(&s["quota"]["max_bytes"])),
        s["quota"]["used_ratio"].as_f64().unwrap_or(0.0) * 100.0,
        if s["quota"]["exceeded"] == true {
            "  FULL: producers are refused"
        } else {
            ""
        }
    );
    let ingest = &s["ingest"];
    println!(
        "ingested        mqtt {} http {}   duplicates {}   rejected {}   refused (quota) {}",
        count(&ingest["accepted"]["mqtt"]),
        count(&ingest["accepted"]["http"]),
        count(&ingest["duplicates"]["mqtt"]) + count(&ingest["duplicates"]["http"]),
        count(&ingest["rejected"]["mqtt"]) + count(&ingest["rejected"]["http"]),
        count(&ingest["quota_refusals"]["mqtt"]) + count(&ingest["quota_refusals"]["http"])
    );
    println!("mqtt clients    {}", s["mqtt"]["connected_clients"]);
    if !link.is_null() {
        println!(
            "ERP             {} posted since start, {} refusals kept (backhaul-agent rejects)",
            count(&link["erp_posted"]),
            count(&s["erp_refusals_stored"])
        );
        let hour_ago = backhaul_now_ms() - 3_600_000;
        for refusal in s["erp_refusals"].as_array().into_iter().flatten() {
            if refusal["reported_at_ms"].as_i64().unwrap_or(0) >= hour_ago {
                println!(
                    "  refused       {}: {}",
                    refusal["id"].as_str().unwrap_or("?"),
                    refusal["reason"].as_str().unwrap_or("")
                );
            }
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

fn print_reject(r: &Value) {
    let reasons: Vec<String> = r["violations"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            format!(
                "{}: {}",
                v["field"].as_str().unwrap_or("?"),
                v["rule"].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!(
        "{:<10} {:<40} {}",
        age(r["at_ms"].as_i64()),
        r["sender"].as_str().unwrap_or("?"),
        reasons.join("; ")
    );
}

/// Rejected events (the edge) and ERP refusals (reported by the relay); `follow` keeps
/// printing new rejects as they come.
pub fn rejects(base: &str, as_json: bool, follow: bool) -> anyhow::Result<()> {
    let client = AdminClient::new(base)?;
    let answer = client.get("/v1/rejects?limit=100")?;
    if as_json && !follow {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(());
    }
    let list = answer["rejects"].as_array().cloned().unwrap_or_default();
    println!("rejected at the edge ({} shown, newest last):", list.len());
    for r in list.iter().rev() {
        print_reject(r);
    }
    let refusals = answer["erp_refusals"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    println!("refused by the ERP ({} shown):", refusals.len());
    for r in refusals.iter().rev() {
        println!(
            "{:<10} {:<40} {}",
            age(r["reported_at_ms"].as_i64()),
            r["id"].as_str().unwrap_or("?"),
            r["reason"].as_str().unwrap_or("")
        );
    }
    if !follow {
        return Ok(());
    }
    // Follow by id, so a flood of more than a page a second shows every reject.
    let mut newest = list.first().and_then(|r| r["id"].as_u64()).unwrap_or(0);
    loop {
        let answer = client.get(&format!("/v1/rejects?after={newest}&limit=1000"))?;
        let fresh = answer["rejects"].as_array().cloned().unwrap_or_default();
        for r in &fresh {
            newest = newest.max(r["id"].as_u64().unwrap_or(newest));
            if as_json {
                println!("{r}");
            } else {
                print_reject(r);
            }
        }
        if fresh.len() < 1000 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

/// Events as they are accepted (durable), one JSON line each, until interrupted.
pub fn tail(base: &str) -> anyhow::Result<()> {
    let client = AdminClient::new(base)?;
    let status = client.get("/v1/status")?;
    // Start at what arrives from now on.
    let mut after = status["backlog"]["next_seq"]
        .as_u64()
        .unwrap_or(1)
        .saturating_sub(1);
    loop {
        let answer = client.get(&format!("/v1/tail?after={after}"))?;
        for event in answer["events"].as_array().into_iter().flatten() {
            after = after.max(event["seq"].as_u64().unwrap_or(after));
            println!("{event}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
