//! The EPCIS 2.0 connector: warehouse events as GS1 EPCIS 2.0 JSON-LD ObjectEvents, posted to
//! a repository's capture interface (`POST {url}/capture`, then the capture job's status).
//!
//! What it owns: the mapping of an event to an ObjectEvent (the CBV business step of its type,
//! a quantity list whose product class is the SKU's GTIN as a GS1 Digital Link URI, read point
//! and business location from the configured SGLNs, business transactions from the order and
//! the purchase order, an event id derived from the site and Backhaul's id so that a retry is
//! the same EPCIS event), the capture document, and how the repository's answers become
//! deliveries. A document refused as a whole is split and sent again one event per document,
//! so one bad event is dead-lettered alone.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use backhaul_events::config::{ConfigError, Secret, SecretSource};
use backhaul_events::{EventType, StampedEvent};
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::Delivery;

/// The JSON-LD context of every document.
const EPCIS_CONTEXT: &str = "https://ref.gs1.org/standards/epcis/2.0.0/epcis-context.jsonld";
/// How often a running capture job is asked about.
const JOB_POLL: Duration = Duration::from_millis(100);
/// The most of a capture job's answer read: its errors, not a flood.
const JOB_ANSWER_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EpcisConfig {
    /// The repository's EPCIS 2.0 REST base: documents go to `{url}/capture`. Needed by the
    /// connector; a mapping used only by `export epcis` may leave it out.
    #[serde(default)]
    pub url: Option<String>,
    /// Sent as `Authorization: Bearer …` when set.
    #[serde(default)]
    pub token: Option<SecretSource>,
    /// Time allowed for the capture request and its job to finish.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// The GLN (13 digits) of the company whose orders and purchase orders these are: business
    /// transaction ids are `urn:epcglobal:cbv:bt:{owner_gln}:{number}`.
    pub owner_gln: String,
    /// SKU → GTIN (14 digits). An event of a SKU without one is refused (dead-lettered) with
    /// the SKU named, and can be replayed once the map has it.
    #[serde(default)]
    pub gtins: BTreeMap<String, String>,
    /// Location → SGLN URI (`urn:epc:id:sgln:…`): the event's read point.
    #[serde(default)]
    pub locations: BTreeMap<String, String>,
    /// Site → SGLN URI: the business location of the site's events.
    #[serde(default)]
    pub sites: BTreeMap<String, String>,
}

fn default_timeout_ms() -> u64 {
    10_000
}

fn is_digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

impl EpcisConfig {
    pub fn check(&self, file: &Path) -> Result<(), ConfigError> {
        let url = self.url.as_deref().unwrap_or_default();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::invalid(
                file,
                "sink.epcis.url",
                "an http:// or https:// URL (the repository's EPCIS 2.0 REST base)",
            ));
        }
        if self.timeout_ms == 0 {
            return Err(ConfigError::invalid(
                file,
                "sink.epcis.timeout_ms",
                "at least 1",
            ));
        }
        self.check_mapping(file)
    }

    /// The mapping's own rules (GLN, GTINs, SGLNs), which `export epcis` needs too.
    pub fn check_mapping(&self, file: &Path) -> Result<(), ConfigError> {
        if !is_digits(&self.owner_gln, 13) {
            return Err(ConfigError::invalid(
                file,
                "sink.epcis.owner_gln",
                "a GLN: 13 digits",
            ));
        }
        for (sku, gtin) in &self.gtins {
            if !is_digits(gtin, 14) {
                return Err(ConfigError::invalid(
                    file,
                    &format!("sink.epcis.gtins.{sku}"),
                    "a GTIN: 14 digits (pad a GTIN-13 with a leading 0)",
                ));
            }
        }
        for (table, map) in [("locations", &self.locations), ("sites", &self.sites)] {
            for (name, sgln) in map {
                if !sgln.starts_with("urn:epc:id:sgln:") {
                    return Err(ConfigError::invalid(
                        file,
                        &format!("sink.epcis.{table}.{name}"),
                        "an SGLN URI: urn:epc:id:sgln:<company prefix>.<location reference>.<extension>",
                    ));
                }
            }
        }
        Ok(())
    }

    /// The `[sink.epcis]` table of a TOML file (a relay configuration, or a file holding only
    /// that table), for `export epcis`.
    pub fn load_mapping(file: &Path) -> Result<EpcisConfig, ConfigError> {
        #[derive(Deserialize)]
        struct WithSink {
            #[serde(default)]
            sink: Sinks,
        }
        #[derive(Deserialize, Default)]
        struct Sinks {
            epcis: Option<EpcisConfig>,
        }
        let text = std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        let parsed: WithSink = backhaul_events::config::parse_toml(file, &text)?;
        let mapping = parsed.sink.epcis.ok_or_else(|| {
            ConfigError::invalid(
                file,
                "sink.epcis",
                "a [sink.epcis] table: owner_gln, gtins, locations and sites",
            )
        })?;
        mapping.check_mapping(file)?;
        Ok(mapping)
    }
}

/// The CBV 2.0 business step of an event type.
pub fn biz_step(kind: EventType) -> &'static str {
    match kind {
        EventType::Pick => "picking",
        EventType::Ship => "shipping",
        EventType::Receive => "receiving",
        // An adjustment books what a stock take found (damage, loss, a miscount).
        EventType::Adjust => "stock_taking",
        EventType::Count => "cycle_counting",
    }
}

/// UN/CEFACT Recommendation 20 codes for the units warehouses write most.
fn uom_code(uom: &str) -> String {
    match uom.to_ascii_uppercase().as_str() {
        "EA" | "PC" | "PCS" | "EACH" => "EA".into(),
        "KG" | "KGM" => "KGM".into(),
        "G" | "GRM" => "GRM".into(),
        "L" | "LTR" => "LTR".into(),
        "M" | "MTR" => "MTR".into(),
        other => other.into(),
    }
}

/// `+HH:MM` of an RFC 3339 timestamp (`Z` is `+00:00`).
fn time_zone_offset(ts: &str) -> String {
    if ts.ends_with('Z') || ts.ends_with('z') {
        return "+00:00".into();
    }
    match ts.get(ts.len().saturating_sub(6)..) {
        Some(tail) if tail.starts_with(['+', '-']) && tail.as_bytes().get(3) == Some(&b':') => {
            tail.to_string()
        }
        _ => "+00:00".into(),
    }
}

/// A UUID URN derived from the site and the event's id: the same event always gets the same
/// EPCIS event id, so a repository can tell a retry from a new event.
pub fn event_id(site: &str, id: &str) -> String {
    let mut hash = Sha256::new();
    hash.update(b"backhaul-epcis-event\0");
    hash.update(site.as_bytes());
    hash.update([0]);
    hash.update(id.as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    // RFC 9562 version 8 (custom), variant 10.
    bytes[6] = (bytes[6] & 0x0f) | 0x80;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "urn:uuid:{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// The ObjectEvent of one event, or why it cannot be one.
pub fn object_event(config: &EpcisConfig, stamped: &StampedEvent) -> Result<Value, String> {
    let event = &stamped.event;
    let gtin = config
        .gtins
        .get(&event.sku)
        .ok_or_else(|| format!("SKU {} has no GTIN in sink.epcis.gtins", event.sku))?;
    let mut object = json!({
        "type": "ObjectEvent",
        "eventID": event_id(&stamped.site, &event.id),
        "eventTime": event.ts,
        "eventTimeZoneOffset": time_zone_offset(&event.ts),
        "epcList": [],
        "action": "OBSERVE",
        "bizStep": biz_step(event.kind),
        "quantityList": [{
            "epcClass": format!("https://id.gs1.org/01/{gtin}"),
            "quantity": event.qty.abs().to_string().parse::<f64>().unwrap_or_default(),
            "uom": uom_code(&event.uom),
        }],
    });
    if let Some(sgln) = event
        .location
        .as_ref()
        .and_then(|l| config.locations.get(l))
    {
        object["readPoint"] = json!({ "id": sgln });
    }
    if let Some(sgln) = config.sites.get(&stamped.site) {
        object["bizLocation"] = json!({ "id": sgln });
    }
    let mut transactions = Vec::new();
    // CBV 2.0 has no sales-order type: the order a pick or shipment serves is the customer's
    // purchase order, as the customer's own EPCIS events name it.
    if let Some(order) = &event.order {
        transactions.push(json!({
            "type": "po",
            "bizTransaction": format!("urn:epcglobal:cbv:bt:{}:{}", config.owner_gln, order),
        }));
    }
    if let Some(po) = &event.po {
        transactions.push(json!({
            "type": "po",
            "bizTransaction": format!("urn:epcglobal:cbv:bt:{}:{}", config.owner_gln, po),
        }));
    }
    if !transactions.is_empty() {
        object["bizTransactionList"] = Value::Array(transactions);
    }
    if event.kind == EventType::Adjust && event.qty.is_sign_negative() {
        object["disposition"] = json!("damaged");
    }
    Ok(object)
}

/// The capture document of `events` (ObjectEvents made by [`object_event`]).
pub fn document(events: Vec<Value>) -> Value {
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "@context": [EPCIS_CONTEXT],
        "type": "EPCISDocument",
        "schemaVersion": "2.0",
        "creationDate": created,
        "epcisBody": { "eventList": events },
    })
}

/// How one capture went.
enum Captured {
    Done { capture_id: String },
    Refused { reason: String },
    Failed(Delivery),
}

pub struct EpcisConnector {
    config: EpcisConfig,
    token: Option<Secret>,
    client: reqwest::Client,
}

impl EpcisConnector {
    pub fn new(config: &EpcisConfig) -> anyhow::Result<EpcisConnector> {
        let token = match &config.token {
            Some(source) => Some(
                source
                    .resolve()
                    .map_err(|e| anyhow::anyhow!("sink.epcis.token: {e}"))?,
            ),
            None => None,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .user_agent(concat!("backhaul-relay/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(EpcisConnector {
            config: config.clone(),
            token,
            client,
        })
    }

    /// Captures the events in one document; when the repository refuses the document, each
    /// event again in a document of its own, so only the bad ones are refused.
    pub async fn deliver(&self, events: &[StampedEvent]) -> Vec<Delivery> {
        let mut results: Vec<Option<Delivery>> = vec![None; events.len()];
        let mut mapped = Vec::new();
        for (at, stamped) in events.iter().enumerate() {
            match object_event(&self.config, stamped) {
                Ok(object) => mapped.push((at, object)),
                Err(reason) => {
                    results[at] = Some(Delivery::Permanent {
                        reason: format!("{reason}: add it, then replay this dead letter"),
                    })
                }
            }
        }
        if mapped.is_empty() {
            return results.into_iter().flatten().collect();
        }
        let whole = document(mapped.iter().map(|(_, o)| o.clone()).collect());
        match self.capture(&whole).await {
            Captured::Done { capture_id } => {
                for (at, _) in &mapped {
                    results[*at] = Some(Delivery::Posted {
                        erp_ref: capture_id.clone(),
                    });
                }
            }
            Captured::Failed(delivery) => {
                for (at, _) in &mapped {
                    results[*at] = Some(delivery.clone());
                }
            }
            Captured::Refused { reason } if mapped.len() == 1 => {
                results[mapped[0].0] = Some(Delivery::Permanent { reason });
            }
            Captured::Refused { .. } => {
                for (at, object) in mapped {
                    results[at] = Some(match self.capture(&document(vec![object])).await {
                        Captured::Done { capture_id } => Delivery::Posted {
                            erp_ref: capture_id,
                        },
                        Captured::Refused { reason } => Delivery::Permanent { reason },
                        Captured::Failed(delivery) => delivery,
                    });
                }
            }
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or(Delivery::Transient {
                    reason: "the EPCIS connector gave no result".into(),
                    retry_after: None,
                })
            })
            .collect()
    }

    fn request(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.header(AUTHORIZATION, format!("Bearer {}", token.expose())),
            None => request,
        }
    }

    async fn capture(&self, document: &Value) -> Captured {
        let base = self.config.url.as_deref().unwrap_or_default();
        let url = format!("{}/capture", base.trim_end_matches('/'));
        let started = Instant::now();
        let sent = self
            .request(self.client.post(&url))
            .header(CONTENT_TYPE, "application/ld+json")
            .header("GS1-EPCIS-Version", "2.0.0")
            .header("GS1-CBV-Version", "2.0.0")
            .body(document.to_string())
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                return Captured::Failed(Delivery::Transient {
                    reason: format!("POST {url}: {e}"),
                    retry_after: None,
                });
            }
        };
        let status = response.status();
        let location = response
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let retry_after = super::http::retry_after(response.headers());
        let body = super::excerpt(response).await;
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            return Captured::Failed(Delivery::Throttled {
                reason: format!("POST {url}: HTTP {}: {body}", status.as_u16()),
                retry_after,
            });
        }
        // A wrong URL or an expired token is the relay's to fix, not the events': refusing
        // them would dead-letter the whole backlog.
        if status.is_server_error()
            || matches!(
                status,
                StatusCode::REQUEST_TIMEOUT
                    | StatusCode::UNAUTHORIZED
                    | StatusCode::FORBIDDEN
                    | StatusCode::NOT_FOUND
            )
        {
            return Captured::Failed(Delivery::Transient {
                reason: format!("POST {url}: HTTP {}: {body}", status.as_u16()),
                retry_after,
            });
        }
        if !status.is_success() {
            return Captured::Refused {
                reason: format!("POST {url}: HTTP {}: {body}", status.as_u16()),
            };
        }
        let Some(job) = location else {
            // A repository that captures synchronously answers 201 without a job.
            return Captured::Done {
                capture_id: format!("capture HTTP {}", status.as_u16()),
            };
        };
        let job_url = match reqwest::Url::parse(&url).and_then(|base| base.join(&job)) {
            Ok(job_url) => job_url,
            Err(e) => {
                return Captured::Failed(Delivery::Transient {
                    reason: format!("the capture job {job} is not a URL: {e}"),
                    retry_after: None,
                });
            }
        };
        self.await_job(job_url, started).await
    }

    /// Asks about the capture job until it has finished, within the timeout.
    async fn await_job(&self, job_url: reqwest::Url, started: Instant) -> Captured {
        let deadline = started + Duration::from_millis(self.config.timeout_ms);
        loop {
            let answer = self.request(self.client.get(job_url.clone())).send().await;
            let job: Option<Value> = match answer {
                Ok(response) if response.status().is_success() => {
                    let body = super::read_capped(response, JOB_ANSWER_BYTES).await;
                    serde_json::from_slice(&body).ok()
                }
                _ => None,
            };
            if let Some(job) = job
                && job["running"] == false
            {
                let capture_id = job["captureID"]
                    .as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| job_url.to_string());
                if job["success"] == true {
                    return Captured::Done { capture_id };
                }
                return Captured::Refused {
                    reason: format!("EPCIS capture {capture_id} failed: {}", job["errors"]),
                };
            }
            if Instant::now() + JOB_POLL > deadline {
                return Captured::Failed(Delivery::Transient {
                    reason: format!(
                        "the capture job {job_url} did not finish within {} ms",
                        self.config.timeout_ms
                    ),
                    retry_after: None,
                });
            }
            tokio::time::sleep(JOB_POLL).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_ids_are_stable_uuids_per_site_and_id() {
        let a = event_id("wh-1", "e-1");
        assert_eq!(a, event_id("wh-1", "e-1"));
        assert_ne!(a, event_id("wh-2", "e-1"));
        assert_eq!(a.len(), "urn:uuid:".len() + 36);
        assert_eq!(&a["urn:uuid:".len() + 14..][..1], "8", "version 8: {a}");
    }

    #[test]
    fn offsets_come_from_the_timestamp() {
        assert_eq!(time_zone_offset("2026-11-22T10:15:00Z"), "+00:00");
        assert_eq!(time_zone_offset("2026-11-22T10:15:00.5+01:00"), "+01:00");
        assert_eq!(time_zone_offset("2026-11-22T10:15:00-05:30"), "-05:30");
    }
}
