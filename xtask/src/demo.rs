//! `cargo xtask demo`: the whole pipeline on one machine, as real processes — a relay with its
//! embedded broker and the ledger connector, one agent per site for two sites, simulated
//! scanners — with a live view. Part-way through, one site's link is cut and later restored,
//! so its backlog grows and drains. It ends with a table per site: scanned, acknowledged,
//! posted, lost and duplicated.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use backhaul_tests::proxy::TcpProxy;
use serde_json::Value;

use crate::procs::{ChildGuard, free_addr};

const SITES: [&str; 2] = ["north", "south"];
/// The login the demo's agents use on the relay's embedded broker, which takes no anonymous
/// client.
const DEMO_LOGIN: &str = "demo-agents";
const DEMO_PASSWORD: &str = "demo-broker-password";
/// The site whose link the demo cuts.
const CUT_SITE: &str = "south";

struct Site {
    name: &'static str,
    /// The agent's admin API.
    admin: String,
    mqtt: std::net::SocketAddr,
    proxy: TcpProxy,
    acked_file: PathBuf,
    agent: ChildGuard,
    sim: Option<ChildGuard>,
}

fn http_json(client: &reqwest::blocking::Client, url: &str) -> Option<Value> {
    client.get(url).send().ok()?.json().ok()
}

fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ready() {
        if Instant::now() > deadline {
            bail!("{what} did not happen within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

pub fn run(root: &Path, target_dir: &Path, duration: Duration, rate: u32) -> anyhow::Result<()> {
    eprintln!("demo: building the release binaries (the first build takes a few minutes)");
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "backhaul-agent",
            "-p",
            "backhaul-relay",
            "--bins",
        ])
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    let bin = target_dir.join("release");
    let dir = target_dir.join("demo");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            runtime.block_on(async {
                let _ = tokio::signal::ctrl_c().await;
                flag.store(true, Ordering::SeqCst);
            });
        }
    });

    // The relay, with its embedded broker and the ledger.
    let broker = free_addr()?;
    let admin = free_addr()?;
    let relay_dir = dir.join("relay");
    let ledger = relay_dir.join("ledger.jsonl");
    let relay_config = std::fs::read_to_string(root.join("config/relay.toml"))?
        .replace(
            "/var/lib/backhaul-relay/ledger.jsonl",
            &ledger.display().to_string(),
        )
        .replace(
            "/var/lib/backhaul-relay",
            &relay_dir.join("state").display().to_string(),
        )
        .replace("port = 1883", &format!("port = {}", broker.port()))
        .replace(
            "embedded = false",
            &format!(
                "embedded = true\nusers = [{{ username = \"{DEMO_LOGIN}\", password = {{ value = \"{DEMO_PASSWORD}\" }} }}]"
            ),
        )
        .replace("127.0.0.1:8788", &admin.to_string());
    let relay_config_path = dir.join("relay.toml");
    std::fs::write(&relay_config_path, relay_config)?;
    let mut relay = ChildGuard::spawn(
        "backhaul-relay",
        Command::new(bin.join("backhaul-relay"))
            .args(["run", "--config"])
            .arg(&relay_config_path)
            .env("BACKHAUL_LOG", "info,rumqttd=warn"),
        &dir.join("relay.log"),
    )?;
    let relay_url = format!("http://{admin}");
    wait_until("the relay's readiness", Duration::from_secs(30), || {
        client
            .get(format!("{relay_url}/readyz"))
            .send()
            .is_ok_and(|r| r.status().is_success())
    })
    .map_err(|e| e.context(crate::procs::log_tail(&dir.join("relay.log"), 20)))?;

    // One agent per site, each reaching the broker through a link the demo can cut.
    let mut sites = Vec::new();
    for name in SITES {
        let proxy = TcpProxy::start(broker);
        let (mqtt, http, admin) = (free_addr()?, free_addr()?, free_addr()?);
        let config = std::fs::read_to_string(root.join("config/agent.toml"))?
            .replace("site = \"wh-east\"", &format!("site = \"{name}\""))
            .replace(
                "/var/lib/backhaul-agent",
                &dir.join(name).join("state").display().to_string(),
            )
            .replace("0.0.0.0:1883", &mqtt.to_string())
            .replace("127.0.0.1:8787", &http.to_string())
            .replace("127.0.0.1:8789", &admin.to_string())
            .replace("port = 1883", &format!("port = {}", proxy.port()))
            .replace(
                "# username = \"wh-east\"",
                &format!("username = \"{DEMO_LOGIN}\""),
            )
            .replace(
                "# password = { file = \"$CREDENTIALS_DIRECTORY/uplink-password\" }",
                &format!("password = {{ value = \"{DEMO_PASSWORD}\" }}"),
            )
            .replace("ack_timeout_secs = 30", "ack_timeout_secs = 5")
            .replace("reconnect_max_ms = 30000", "reconnect_max_ms = 2000");
        let config_path = dir.join(format!("agent-{name}.toml"));
        std::fs::write(&config_path, config)?;
        let agent = ChildGuard::spawn(
            "backhaul-agent",
            Command::new(bin.join("backhaul-agent"))
                .args(["run", "--config"])
                .arg(&config_path),
            &dir.join(format!("agent-{name}.log")),
        )?;
        let admin_url = format!("http://{admin}");
        wait_until(
            &format!("agent {name}'s health"),
            Duration::from_secs(30),
            || {
                client
                    .get(format!("{admin_url}/healthz"))
                    .send()
                    .is_ok_and(|r| r.status().is_success())
            },
        )?;
        sites.push(Site {
            name,
            admin: admin_url,
            mqtt,
            proxy,
            acked_file: dir.join(format!("acked-{name}.txt")),
            agent,
            sim: None,
        });
    }

    // Scanners: a realistic mix, a few invalid events to show rejects.
    for site in &mut sites {
        let sim = ChildGuard::spawn(
            "backhaul-sim",
            Command::new(bin.join("backhaul-sim"))
                .args(["run", "--agent", &site.mqtt.to_string(), "--devices", "3"])
                .args([
                    "--rate",
                    &rate.to_string(),
                    "--duration",
                    &duration.as_secs_f64().to_string(),
                ])
                .args([
                    "--invalid-ratio",
                    "0.01",
                    "--mqtt-version",
                    "5",
                    "--device-prefix",
                    &format!("{}-scanner", site.name),
                ])
                .arg("--acked-file")
                .arg(&site.acked_file),
            &dir.join(format!("sim-{}.log", site.name)),
        )?;
        site.sim = Some(sim);
    }

    let started = Instant::now();
    let cut_at = duration / 3;
    let restore_at = duration * 2 / 3;
    let mut cut = false;
    let mut restored = false;
    let mut drained_since: Option<Instant> = None;
    loop {
        let elapsed = started.elapsed();
        if !cut && elapsed >= cut_at {
            if let Some(site) = sites.iter().find(|s| s.name == CUT_SITE) {
                site.proxy.cut();
            }
            cut = true;
        }
        if cut && !restored && elapsed >= restore_at {
            if let Some(site) = sites.iter().find(|s| s.name == CUT_SITE) {
                site.proxy.restore();
            }
            restored = true;
        }
        let relay_sites =
            http_json(&client, &format!("{relay_url}/v1/sites")).unwrap_or(Value::Null);
        let statuses: Vec<Value> = sites
            .iter()
            .map(|s| http_json(&client, &format!("{}/v1/status", s.admin)).unwrap_or(Value::Null))
            .collect();
        draw(
            &sites,
            &statuses,
            &relay_sites,
            elapsed,
            duration,
            cut && !restored,
        );
        relay.check_running()?;
        for site in &mut sites {
            site.agent.check_running()?;
        }
        let sims_done = sites.iter_mut().all(|s| {
            s.sim
                .as_mut()
                .is_none_or(|sim| sim.check_running().is_err())
        });
        let drained = statuses.iter().all(|s| s["backlog"]["events"] == 0)
            && relay_sites["sites"]
                .as_array()
                .is_some_and(|list| list.iter().all(|s| s["outbox_depth"] == 0));
        if sims_done && drained {
            // Let the last outcomes settle before the closing count.
            if drained_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_secs(1) {
                break;
            }
        } else {
            drained_since = None;
        }
        if stop.load(Ordering::SeqCst) {
            eprintln!("\ndemo: stopping (Ctrl-C)");
            break;
        }
        if sims_done && elapsed > duration + Duration::from_secs(90) {
            eprintln!("\ndemo: the backlog did not drain within 90 s after the scanners stopped");
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    for site in &mut sites {
        if let Some(mut sim) = site.sim.take() {
            let _ = sim.terminate(Duration::from_secs(5));
        }
    }
    let table = closing_table(&sites, &ledger)?;
    println!("\n{table}");
    println!("relay admin   {relay_url}   (backhaul-relay status --url {relay_url})");
    for site in &sites {
        println!(
            "agent {:<7} {}   (backhaul-agent status --url {})",
            site.name, site.admin, site.admin
        );
    }
    println!("ledger        {}", ledger.display());
    println!("logs          {}", dir.display());
    for site in &mut sites {
        let _ = site.agent.terminate(Duration::from_secs(10));
    }
    let _ = relay.terminate(Duration::from_secs(10));
    Ok(())
}

fn draw(
    sites: &[Site],
    statuses: &[Value],
    relay_sites: &Value,
    elapsed: Duration,
    duration: Duration,
    cutting: bool,
) {
    let posted_by_site: HashMap<&str, u64> = relay_sites["sites"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| Some((s["site"].as_str()?, s["events_delivered"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default();
    let mut frame = String::from("\x1b[2J\x1b[H");
    frame.push_str(&format!(
        "Backhaul demo — {:.0}s of {:.0}s{}\n\n",
        elapsed.as_secs_f64(),
        duration.as_secs_f64(),
        if cutting {
            format!("   (link of {CUT_SITE} CUT)")
        } else {
            String::new()
        }
    ));
    frame.push_str(&format!(
        "{:<7} {:<22} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}  link\n",
        "site",
        "posted / acknowledged",
        "scanned",
        "acked",
        "buffered",
        "forwarded",
        "posted",
        "oldest"
    ));
    for (site, status) in sites.iter().zip(statuses) {
        let accepted = status["ingest"]["accepted"]["mqtt"].as_u64().unwrap_or(0)
            + status["ingest"]["accepted"]["http"].as_u64().unwrap_or(0);
        let rejected = status["ingest"]["rejected"]["mqtt"].as_u64().unwrap_or(0)
            + status["ingest"]["rejected"]["http"].as_u64().unwrap_or(0);
        let buffered = status["backlog"]["events"].as_u64().unwrap_or(0);
        let forwarded = status["link"]["acked_through"].as_u64().unwrap_or(0);
        let posted = posted_by_site.get(site.name).copied().unwrap_or(0);
        let oldest = status["backlog"]["oldest_age_seconds"]
            .as_f64()
            .map(|s| format!("{s:.1}s"))
            .unwrap_or_else(|| "-".into());
        let link = status["link"]["state"].as_str().unwrap_or("?");
        let width = 20usize;
        let filled = if accepted == 0 {
            0
        } else {
            (posted.min(accepted) as usize * width) / accepted as usize
        };
        let bar = format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled));
        frame.push_str(&format!(
            "{:<7} {bar} {:>8} {:>8} {:>8} {:>9} {:>8} {:>8}  {link}\n",
            site.name,
            accepted + rejected,
            accepted,
            buffered,
            forwarded,
            posted,
            oldest
        ));
    }
    frame.push_str(
        "\nscanned: events received from scanners (invalid ones refused with a reason)\n",
    );
    frame.push_str("acked: PUBACKs (on the agent's disk)   buffered: in the agent's log, not yet acknowledged by the relay\n");
    frame.push_str("forwarded: acknowledged by the relay's outbox   posted: written to the ledger\nCtrl-C stops everything.\n");
    print!("{frame}");
    let _ = std::io::Write::flush(&mut std::io::stdout());
}

fn closing_table(sites: &[Site], ledger: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(ledger).unwrap_or_default();
    let mut in_ledger: HashMap<String, (String, u32)> = HashMap::new();
    for line in text.lines() {
        let value: Value = serde_json::from_str(line).context("a ledger line is not JSON")?;
        if let (Some(id), Some(site)) = (value["id"].as_str(), value["site"].as_str()) {
            in_ledger
                .entry(id.to_string())
                .or_insert_with(|| (site.to_string(), 0))
                .1 += 1;
        }
    }
    let mut out = format!(
        "{:<7} {:>9} {:>13} {:>8} {:>6} {:>11}\n",
        "site", "scanned", "acknowledged", "posted", "lost", "duplicated"
    );
    let mut bad = 0;
    for site in sites {
        let acked_text = std::fs::read_to_string(&site.acked_file).unwrap_or_default();
        let acked: Vec<&str> = acked_text.lines().filter(|l| !l.is_empty()).collect();
        let scanned = crate::procs::log_tail(&site.sim_log(), 1);
        let scanned = scanned
            .split_whitespace()
            .skip_while(|w| *w != "published")
            .nth(1)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(acked.len() as u64);
        let posted = in_ledger.values().filter(|(s, _)| s == site.name).count();
        let lost = acked
            .iter()
            .filter(|id| !in_ledger.contains_key(**id))
            .count();
        let duplicated = in_ledger
            .values()
            .filter(|(s, n)| s == site.name && *n > 1)
            .count();
        bad += lost + duplicated;
        out.push_str(&format!(
            "{:<7} {:>9} {:>13} {:>8} {:>6} {:>11}\n",
            site.name,
            scanned,
            acked.len(),
            posted,
            lost,
            duplicated
        ));
    }
    if bad > 0 {
        out.push_str("SOMETHING WAS LOST OR DUPLICATED: see the logs\n");
    }
    Ok(out)
}

impl Site {
    fn sim_log(&self) -> PathBuf {
        self.acked_file
            .parent()
            .map(|d| d.join(format!("sim-{}.log", self.name)))
            .unwrap_or_default()
    }
}
