//! Reading a running service over its admin HTTP: a GET, counters summed from `/metrics`
//! (over all label sets, or by one label), and Prometheus/OpenMetrics histograms: parsing one
//! from `/metrics`, the difference between two readings, and quantiles from the bucket counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, bail};

const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// One client for every GET: no proxy from the environment, and no connection kept open
/// after its answer, so a measured process's descriptors are its own.
fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(HTTP_TIMEOUT)
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap_or_default()
    })
}

/// GETs `path` from `addr` and returns the status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let url = format!("http://{addr}{path}");
    let response = client()
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .with_context(|| format!("GET {url}: reading the answer"))?;
    Ok((status, body))
}

/// One reading of a histogram: cumulative bucket counts by upper bound, count and sum.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    /// (upper bound `le`, cumulative count), ascending; the last bound is +Inf.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    /// Finds the histogram `name` (without `_bucket`/`_sum`/`_count`) in a text exposition.
    pub fn parse(text: &str, name: &str) -> anyhow::Result<Histogram> {
        let bucket_prefix = format!("{name}_bucket{{");
        let mut buckets = Vec::new();
        let mut count = None;
        let mut sum = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&bucket_prefix) {
                let (labels, value) = rest
                    .split_once('}')
                    .with_context(|| format!("bad bucket line {line:?}"))?;
                let le = labels
                    .split(',')
                    .find_map(|label| label.trim().strip_prefix("le="))
                    .map(|le| le.trim_matches('"'))
                    .with_context(|| format!("a bucket without `le`: {line:?}"))?;
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse::<f64>()
                        .with_context(|| format!("bad bucket bound in {line:?}"))?
                };
                buckets.push((le, sample_value(value, line)? as u64));
            } else if let Some(value) = line.strip_prefix(&format!("{name}_count ")) {
                count = Some(sample_value(value, line)? as u64);
            } else if let Some(value) = line.strip_prefix(&format!("{name}_sum ")) {
                sum = Some(sample_value(value, line)?);
            }
        }
        if buckets.is_empty() {
            bail!("no histogram {name} in the metrics");
        }
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(Histogram {
            count: count.or_else(|| buckets.last().map(|b| b.1)).unwrap_or(0),
            sum: sum.unwrap_or(0.0),
            buckets,
        })
    }

    /// What was observed between `earlier` and this reading.
    pub fn since(&self, earlier: &Histogram) -> anyhow::Result<Histogram> {
        if self.buckets.len() != earlier.buckets.len()
            || self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .any(|(a, b)| a.0 != b.0)
        {
            bail!("the histogram's buckets changed between two readings");
        }
        Ok(Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(now, then)| (now.0, now.1.saturating_sub(then.1)))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
            sum: self.sum - earlier.sum,
        })
    }

    /// The `q` quantile, interpolated linearly within its bucket as Prometheus'
    /// `histogram_quantile` does (the highest finite bound when it falls in +Inf).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut lower = 0.0;
        let mut below = 0u64;
        for &(le, cumulative) in &self.buckets {
            if cumulative as f64 >= rank && cumulative > below {
                if le.is_infinite() {
                    return Some(lower);
                }
                let within = (rank - below as f64) / (cumulative - below) as f64;
                return Some(lower + (le - lower) * within.clamp(0.0, 1.0));
            }
            if le.is_finite() {
                lower = le;
            }
            below = cumulative;
        }
        Some(lower)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

fn sample_value(text: &str, line: &str) -> anyhow::Result<f64> {
    // A value may be followed by a timestamp or an exemplar.
    let value = text
        .split_whitespace()
        .next()
        .with_context(|| format!("no value in {line:?}"))?;
    value
        .parse::<f64>()
        .with_context(|| format!("bad value in {line:?}"))
}

/// The sum of a metric's samples over all its label sets.
pub fn metric_sum(text: &str, name: &str) -> u64 {
    metric_by_label(text, name, "").values().sum()
}

/// A metric's samples summed by the value of `label` ("" sums them all under "").
pub fn metric_by_label(text: &str, name: &str, label: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (labels, value) = match rest.strip_prefix('{') {
            Some(inner) => match inner.split_once('}') {
                Some((labels, value)) => (labels, value),
                None => continue,
            },
            None if rest.starts_with(' ') => ("", rest),
            None => continue,
        };
        let Some(value) = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let key = labels
            .split(',')
            .find_map(|pair| pair.trim().strip_prefix(&format!("{label}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default();
        let key = if label.is_empty() { String::new() } else { key };
        *out.entry(key).or_insert(0) += value.max(0.0) as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# TYPE x_seconds histogram
x_seconds_sum 0.5
x_seconds_count 10
x_seconds_bucket{le=\"0.001\"} 2
x_seconds_bucket{le=\"0.002\"} 8
x_seconds_bucket{le=\"0.004\"} 10
x_seconds_bucket{le=\"+Inf\"} 10
";

    #[test]
    fn parses_and_interpolates() {
        let h = Histogram::parse(TEXT, "x_seconds").expect("parse");
        assert_eq!(h.count, 10);
        assert_eq!(h.buckets.len(), 4);
        // rank 5 of 10 lies half-way through the (0.001, 0.002] bucket.
        let p50 = h.quantile(0.5).expect("p50");
        assert!((p50 - 0.0015).abs() < 1e-12, "{p50}");
        let p10 = h.quantile(0.1).expect("p10");
        assert!((p10 - 0.0005).abs() < 1e-12, "{p10}");
        assert!(h.quantile(0.99).expect("p99") <= 0.004);
    }

    #[test]
    fn differences_of_readings() {
        let before = Histogram::parse(TEXT, "x_seconds").expect("parse");
        let after = Histogram::parse(
            &TEXT
                .replace("} 10", "} 20")
                .replace("_count 10", "_count 20"),
            "x_seconds",
        )
        .expect("parse");
        let delta = after.since(&before).expect("delta");
        assert_eq!(delta.count, 10);
        // All ten new observations fell into (0.002, 0.004].
        let p50 = delta.quantile(0.5).expect("p50");
        assert!((p50 - 0.003).abs() < 1e-12, "{p50}");
        assert_eq!(
            delta.since(&delta).map(|d| d.quantile(0.5)).ok(),
            Some(None)
        );
    }
}
