//! The Grafana dashboard and the Prometheus alert rules: valid files, and every metric they name
//! is one the running agent and relay actually export.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use backhaul_tests::agent::{AgentOptions, AgentProcess};
use backhaul_tests::relay::RelayProcess;

fn config_file(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../config")
        .join(path)
}

/// `backhaul_…` names in a text, with the suffixes Prometheus adds stripped to the family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("backhaul_") {
        let name: String = text[start..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

/// Metric families a process exports, with the sample-name forms PromQL can use.
fn exported(metrics_text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics_text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        names.insert(name);
    }
    names
}

#[test]
fn dashboard_and_alerts_name_only_exported_metrics() {
    let dashboard_text = std::fs::read_to_string(config_file("grafana/backhaul.json")).unwrap();
    let dashboard: serde_json::Value =
        serde_json::from_str(&dashboard_text).expect("the dashboard is JSON");
    let panels = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels");
    assert!(panels.len() >= 8, "only {} panels", panels.len());
    let mut exprs = String::new();
    for panel in panels {
        for target in panel["targets"]
            .as_array()
            .expect("every panel has targets")
        {
            exprs.push_str(target["expr"].as_str().expect("every target has an expr"));
            exprs.push('\n');
        }
    }
    let alerts = std::fs::read_to_string(config_file("prometheus/alerts.yml")).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let broker_port = backhaul_tests::free_port();
    let relay = RelayProcess::start(&dir.path().join("relay"), broker_port, true);
    let agent = AgentProcess::start(AgentOptions::default().uplink("127.0.0.1", broker_port));
    // A transport label appears once something was counted for it.
    let event = serde_json::json!({"v":1,"id":"dash-1","type":"count","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"location":"L"});
    assert_eq!(agent.post_events(&event, None).status().as_u16(), 202);
    // Per-site relay metrics appear once the site's first batch arrived.
    let relay_metrics = backhaul_tests::poll_until(std::time::Duration::from_secs(30), || {
        let text = relay.metrics();
        text.contains("backhaul_relay_outbox_events{")
            .then_some(text)
    })
    .expect("the relay never heard of the site");
    let mut available = exported(&agent.metrics());
    available.extend(exported(&relay_metrics));

    let named: BTreeSet<String> = metric_names(&exprs)
        .into_iter()
        .chain(metric_names(&alerts))
        .collect();
    let missing: Vec<&String> = named.iter().filter(|n| !available.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "named in the dashboard or alerts but not exported: {missing:?}\nexported: {available:?}"
    );
    println!("{} metrics named, all exported", named.len());
}

#[test]
fn alert_rules_pass_promtool() {
    let file = config_file("prometheus/alerts.yml");
    let output = Command::new("promtool")
        .args(["check", "rules", &file.to_string_lossy()])
        .output()
        .expect("promtool is missing: install Debian's prometheus (cargo xtask test does)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool check rules:\n{text}");
    println!("{}", text.trim());
}
