//! `[sink.tryton]`: the settings the connector is built from, their defaults, and the checks
//! that refuse a relay configuration the connector could not work with before any event is
//! delivered.

use std::collections::BTreeMap;

use backhaul_events::config::SecretSource;
use reqwest::Url;
use serde::Deserialize;

/// `[sink.tryton]`: where Tryton is, who the connector logs in as, and which master data the
/// events map onto.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrytonConfig {
    /// The server's base URL, without the database: `http://127.0.0.1:8000`. Requests go to
    /// `{url}/{database}/rpc/`.
    pub url: String,
    /// The Tryton database (trytond serves only the databases named when it starts).
    pub database: String,
    /// The Tryton user the connector logs in as; it needs the stock groups (stock and stock
    /// administration) of the company below.
    pub username: String,
    /// That user's password: `{ file = "..." }`, `{ env = "..." }` or `{ value = "..." }`.
    pub password: SecretSource,
    /// Code of the `stock.location` of type warehouse the events happen in. Its storage,
    /// input, output and lost-and-found locations are used. Default `"WH"`.
    #[serde(default = "default_warehouse")]
    pub warehouse: String,
    /// Id of the `company.company` the documents belong to; sent as the context's company.
    /// Default 1.
    #[serde(default = "default_company")]
    pub company: i64,
    /// Code of the `party.party` a customer shipment is made for when a pick or ship names an
    /// order Tryton has no shipment for. Unset: such events are refused (permanent).
    #[serde(default)]
    pub customer_party: Option<String>,
    /// Code of the `party.party` receipts (`stock.shipment.in`) come from. Unset: receive
    /// events are refused (permanent).
    #[serde(default)]
    pub supplier_party: Option<String>,
    /// Event location → Tryton storage location, by the Tryton location's code (a string) or
    /// id (an integer): `locations = { "A1" = "STO-A1", "DOCK" = 12 }`. Codes are preferred:
    /// they survive a database rebuild, ids do not. An event without a location uses the
    /// warehouse's storage location; an event whose location is not in this table is refused
    /// (permanent), naming the location and this key.
    #[serde(default)]
    pub locations: BTreeMap<String, TrytonLocation>,
    /// Time allowed for one JSON-RPC request, answer included, in milliseconds. Default 30000.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Events in one `deliver` call that are posted together (one `create` with many records,
    /// one transition call on many ids). Default 50.
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Retry hint, in milliseconds, for a pick or ship that waits for stock Tryton cannot
    /// reserve. Default 60000.
    #[serde(default = "default_waiting_retry_ms")]
    pub waiting_retry_ms: u64,
}

/// A Tryton `stock.location`, by code or by id.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum TrytonLocation {
    Id(i64),
    Code(String),
}

impl std::fmt::Display for TrytonLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrytonLocation::Id(id) => write!(f, "id {id}"),
            TrytonLocation::Code(code) => write!(f, "code {code:?}"),
        }
    }
}

fn default_warehouse() -> String {
    "WH".into()
}
fn default_company() -> i64 {
    1
}
fn default_timeout_ms() -> u64 {
    30_000
}
fn default_max_batch() -> usize {
    50
}
fn default_waiting_retry_ms() -> u64 {
    60_000
}

impl TrytonConfig {
    /// Refuses the settings the connector cannot work with, and gives the URL its requests go
    /// to: `{url}/{database}/rpc/`.
    pub(super) fn validate(&self) -> anyhow::Result<Url> {
        let mut endpoint = Url::parse(&self.url)
            .map_err(|e| anyhow::anyhow!("sink.tryton.url {:?} is not a URL: {e}", self.url))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            anyhow::bail!(
                "sink.tryton.url {:?} must start with http:// or https://",
                self.url
            );
        }
        if self.database.is_empty() {
            anyhow::bail!("sink.tryton.database must not be empty");
        }
        if self.max_batch == 0 {
            anyhow::bail!("sink.tryton.max_batch must be at least 1");
        }
        if self.timeout_ms == 0 {
            anyhow::bail!("sink.tryton.timeout_ms must be at least 1");
        }
        endpoint
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("sink.tryton.url {:?} cannot take a path", self.url))?
            .pop_if_empty()
            .push(&self.database)
            .push("rpc")
            .push("");
        Ok(endpoint)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connector::tryton::TrytonConnector;
    use backhaul_events::config::Secret;
    use serde_json::json;

    #[test]
    fn config_defaults_and_locations() {
        let config: TrytonConfig = serde_json::from_value(json!({
            "url": "http://127.0.0.1:8000",
            "database": "backhaul",
            "username": "admin",
            "password": {"value": "admin"},
            "locations": {"A1": "STO-A1", "DOCK": 12},
        }))
        .unwrap();
        assert_eq!(config.warehouse, "WH");
        assert_eq!(config.company, 1);
        assert_eq!(config.max_batch, 50);
        assert_eq!(
            config.locations["A1"],
            TrytonLocation::Code("STO-A1".into())
        );
        assert_eq!(config.locations["DOCK"], TrytonLocation::Id(12));
        let connector = TrytonConnector::new(&config, Secret::new("admin")).unwrap();
        assert_eq!(
            connector.0.rpc.endpoint.as_str(),
            "http://127.0.0.1:8000/backhaul/rpc/"
        );
    }

    #[test]
    fn config_reads_from_toml() {
        let text = r#"
            url = "http://127.0.0.1:8000"
            database = "backhaul"
            username = "admin"
            password = { env = "TRYTON_PASSWORD" }
            customer_party = "CUST-A"
            locations = { "A1" = "STO-A1", "DOCK" = 12 }
        "#;
        let config: TrytonConfig =
            backhaul_events::config::parse_toml(std::path::Path::new("relay.toml"), text).unwrap();
        assert_eq!(config.locations["DOCK"], TrytonLocation::Id(12));
        assert_eq!(config.customer_party.as_deref(), Some("CUST-A"));
        let typo = format!("{text}\nmax_bach = 5\n");
        let err = backhaul_events::config::parse_toml::<TrytonConfig>(
            std::path::Path::new("relay.toml"),
            &typo,
        )
        .unwrap_err();
        assert!(err.to_string().contains("max_bach"), "{err}");
    }
}
