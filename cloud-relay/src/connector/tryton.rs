//! The Tryton connector (placeholder until its implementation lands).

use backhaul_events::StampedEvent;
use backhaul_events::config::{Secret, SecretSource};
use serde::Deserialize;

use super::Delivery;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrytonConfig {
    pub url: String,
    pub database: String,
    pub username: String,
    pub password: SecretSource,
}

pub struct TrytonConnector;

impl TrytonConnector {
    pub fn new(_config: &TrytonConfig, _password: Secret) -> anyhow::Result<Self> {
        anyhow::bail!("the Tryton connector is not built yet")
    }

    pub fn max_batch(&self) -> usize {
        1
    }

    pub async fn deliver(&self, events: &[StampedEvent]) -> Vec<Delivery> {
        vec![
            Delivery::Transient {
                reason: "the Tryton connector is not built yet".into(),
                retry_after: None,
            };
            events.len()
        ]
    }
}
