//! Master data: the setup every event needs (the company's currency, the warehouse and its
//! locations, the configured customer and supplier parties), products by SKU, the mapped
//! locations, and resolving each event against them into a `Prepared` event or the reason it
//! cannot be posted. Lookups that found nothing are not cached, and a setup with a party
//! missing is read again after `SETUP_RETRY`, so what is added in Tryton is found without a
//! relay restart.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use backhaul_events::Event;
use serde_json::{Value, json};
use time::Date;

use super::config::TrytonLocation;
use super::dates::Calendar;
use super::rpc::{RpcError, decimal, id_field, records};
use super::{Inner, SETUP_RETRY, lock};
use crate::connector::Delivery;

/// Master data every event needs, read once.
#[derive(Debug)]
pub(super) struct Setup {
    pub(super) currency: i64,
    pub(super) warehouse: i64,
    pub(super) input: i64,
    pub(super) output: i64,
    pub(super) storage: i64,
    pub(super) lost_found: i64,
    pub(super) customer: Result<Party, String>,
    pub(super) supplier: Result<Party, String>,
    loaded_at: Instant,
}

#[derive(Debug, Clone)]
pub(super) struct Party {
    pub(super) id: i64,
    pub(super) address: Option<i64>,
    pub(super) customer_location: i64,
    pub(super) supplier_location: i64,
}

#[derive(Debug, Clone)]
pub(super) struct Product {
    pub(super) id: i64,
    pub(super) uom: i64,
    pub(super) cost_price: Value,
}

/// An event whose master data resolved.
pub(super) struct Prepared<'a> {
    pub(super) idx: usize,
    pub(super) event: &'a Event,
    pub(super) product: Product,
    pub(super) location: i64,
    /// The date its document is booked on: the event's day, or Tryton's today when later.
    pub(super) date: Date,
    /// Why nothing may be booked on that date (a closed stock period), if so.
    pub(super) closed: Option<Delivery>,
}

impl Inner {
    pub(super) async fn setup(&self) -> Result<Arc<Setup>, Delivery> {
        let mut slot = self.setup.lock().await;
        if let Some(setup) = slot.as_ref() {
            // A party missing in Tryton may be added there: look again now and then.
            let incomplete = setup.customer.is_err() || setup.supplier.is_err();
            if !incomplete || setup.loaded_at.elapsed() < SETUP_RETRY {
                return Ok(setup.clone());
            }
        }
        let setup = Arc::new(self.load_setup().await?);
        *slot = Some(setup.clone());
        Ok(setup)
    }

    async fn load_setup(&self) -> Result<Setup, Delivery> {
        let setup_failure = |reason: String| Delivery::Transient {
            reason,
            retry_after: Some(SETUP_RETRY),
        };
        let rpc_failure = |e: RpcError, what: &str| match e {
            RpcError::Transient { .. } | RpcError::Throttled { .. } => e.delivery(what),
            other => setup_failure(format!("{what}: {}", other.message())),
        };
        let company = self
            .rpc
            .call(
                "model.company.company.read",
                vec![json!([self.config.company]), json!(["currency"])],
            )
            .await
            .map_err(|e| rpc_failure(e, "reading the company (sink.tryton.company)"))?;
        let currency = records(&company)
            .first()
            .and_then(|c| id_field(c, "currency"))
            .ok_or_else(|| {
                setup_failure(format!(
                    "Tryton has no company {} with a currency (sink.tryton.company)",
                    self.config.company
                ))
            })?;
        let warehouses = self
            .rpc
            .call(
                "model.stock.location.search_read",
                vec![
                    json!([
                        ["type", "=", "warehouse"],
                        ["code", "=", self.config.warehouse]
                    ]),
                    json!(0),
                    json!(1),
                    Value::Null,
                    json!([
                        "input_location",
                        "output_location",
                        "storage_location",
                        "lost_found_location"
                    ]),
                ],
            )
            .await
            .map_err(|e| rpc_failure(e, "looking up the warehouse"))?;
        let warehouse = records(&warehouses).first().copied().ok_or_else(|| {
            setup_failure(format!(
                "Tryton has no warehouse location with code {:?} (sink.tryton.warehouse)",
                self.config.warehouse
            ))
        })?;
        let location = |field: &str| {
            id_field(warehouse, field).ok_or_else(|| {
                setup_failure(format!(
                    "warehouse {:?} in Tryton has no {field}",
                    self.config.warehouse
                ))
            })
        };
        let (input, output, storage, lost_found) = (
            location("input_location")?,
            location("output_location")?,
            location("storage_location")?,
            location("lost_found_location")?,
        );
        let warehouse = location("id")?;

        let codes: Vec<&String> = [&self.config.customer_party, &self.config.supplier_party]
            .into_iter()
            .flatten()
            .collect();
        let mut parties: HashMap<String, Party> = HashMap::new();
        if !codes.is_empty() {
            let found = self
                .rpc
                .call(
                    "model.party.party.search_read",
                    vec![
                        json!([["code", "in", codes]]),
                        json!(0),
                        Value::Null,
                        Value::Null,
                        json!([
                            "code",
                            "addresses",
                            "customer_location",
                            "supplier_location"
                        ]),
                    ],
                )
                .await
                .map_err(|e| rpc_failure(e, "looking up the parties"))?;
            for record in records(&found) {
                let (Some(id), Some(code)) = (
                    record.get("id").and_then(Value::as_i64),
                    record.get("code").and_then(Value::as_str),
                ) else {
                    continue;
                };
                let customer_location = match id_field(record, "customer_location") {
                    Some(id) => Some(id),
                    None => self.default_location("customer").await,
                };
                let supplier_location = match id_field(record, "supplier_location") {
                    Some(id) => Some(id),
                    None => self.default_location("supplier").await,
                };
                let address = record
                    .get("addresses")
                    .and_then(Value::as_array)
                    .and_then(|a| a.first())
                    .and_then(Value::as_i64);
                parties.insert(
                    code.to_string(),
                    Party {
                        id,
                        address,
                        customer_location: customer_location.unwrap_or(0),
                        supplier_location: supplier_location.unwrap_or(0),
                    },
                );
            }
        }
        let party = |code: &Option<String>, key: &str| match code {
            None => Err(format!("sink.tryton.{key} is not set")),
            Some(code) => match parties.get(code) {
                None => Err(format!(
                    "Tryton has no party with code {code:?} (sink.tryton.{key})"
                )),
                Some(party) => Ok(party.clone()),
            },
        };
        let customer = party(&self.config.customer_party, "customer_party").and_then(|p| {
            if p.address.is_none() {
                Err(format!(
                    "the customer party {:?} has no address in Tryton (sink.tryton.customer_party)",
                    self.config.customer_party.as_deref().unwrap_or_default()
                ))
            } else if p.customer_location == 0 {
                Err("Tryton has no customer location".to_string())
            } else {
                Ok(p)
            }
        });
        let supplier = party(&self.config.supplier_party, "supplier_party").and_then(|p| {
            if p.supplier_location == 0 {
                Err("Tryton has no supplier location".to_string())
            } else {
                Ok(p)
            }
        });
        Ok(Setup {
            currency,
            warehouse,
            input,
            output,
            storage,
            lost_found,
            customer,
            supplier,
            loaded_at: Instant::now(),
        })
    }

    /// The first location of a type (customer, supplier), for parties without their own.
    async fn default_location(&self, kind: &str) -> Option<i64> {
        let found = self
            .rpc
            .call(
                "model.stock.location.search",
                vec![
                    json!([["type", "=", kind]]),
                    json!(0),
                    json!(1),
                    Value::Null,
                ],
            )
            .await
            .ok()?;
        found.as_array()?.first()?.as_i64()
    }

    /// Looks up the SKUs not cached yet in one search; SKUs Tryton lacks stay uncached.
    pub(super) async fn load_products(&self, skus: &[&str]) -> Result<(), RpcError> {
        let missing: Vec<&str> = {
            let cache = lock(&self.products);
            let mut seen = HashSet::new();
            skus.iter()
                .copied()
                .filter(|sku| !cache.contains_key(*sku) && seen.insert(*sku))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let found = self
            .rpc
            .call(
                "model.product.product.search_read",
                vec![
                    json!([["code", "in", missing]]),
                    json!(0),
                    Value::Null,
                    Value::Null,
                    json!(["code", "default_uom", "cost_price"]),
                ],
            )
            .await?;
        let mut cache = lock(&self.products);
        for record in records(&found) {
            let (Some(code), Some(id), Some(uom)) = (
                record.get("code").and_then(Value::as_str),
                record.get("id").and_then(Value::as_i64),
                id_field(record, "default_uom"),
            ) else {
                continue;
            };
            let cost_price = match record.get("cost_price") {
                Some(price @ Value::Object(_)) => price.clone(),
                _ => decimal("0"),
            };
            cache.entry(code.to_string()).or_insert(Product {
                id,
                uom,
                cost_price,
            });
        }
        Ok(())
    }

    /// Resolves the mapped locations of these event locations that are not cached yet.
    pub(super) async fn load_locations(&self, wanted: &[&str]) -> Result<(), RpcError> {
        let pending: Vec<(&str, &TrytonLocation)> = {
            let cache = lock(&self.locations);
            let mut seen = HashSet::new();
            wanted
                .iter()
                .copied()
                .filter(|loc| !cache.contains_key(*loc) && seen.insert(*loc))
                .filter_map(|loc| self.config.locations.get(loc).map(|t| (loc, t)))
                .collect()
        };
        if pending.is_empty() {
            return Ok(());
        }
        let codes: Vec<&str> = pending
            .iter()
            .filter_map(|(_, t)| match t {
                TrytonLocation::Code(code) => Some(code.as_str()),
                TrytonLocation::Id(_) => None,
            })
            .collect();
        let ids: Vec<i64> = pending
            .iter()
            .filter_map(|(_, t)| match t {
                TrytonLocation::Id(id) => Some(*id),
                TrytonLocation::Code(_) => None,
            })
            .collect();
        let found = self
            .rpc
            .call(
                "model.stock.location.search_read",
                vec![
                    json!(["OR", ["code", "in", codes], ["id", "in", ids]]),
                    json!(0),
                    Value::Null,
                    Value::Null,
                    json!(["code", "type"]),
                ],
            )
            .await?;
        let mut cache = lock(&self.locations);
        for (event_location, target) in pending {
            let record = records(&found).into_iter().find(|r| match target {
                TrytonLocation::Id(id) => r.get("id").and_then(Value::as_i64) == Some(*id),
                TrytonLocation::Code(code) => {
                    r.get("code").and_then(Value::as_str) == Some(code.as_str())
                }
            });
            let storage = record
                .filter(|r| r.get("type").and_then(Value::as_str) == Some("storage"))
                .and_then(|r| r.get("id").and_then(Value::as_i64));
            if let Some(id) = storage {
                cache.insert(event_location.to_string(), id);
            }
        }
        Ok(())
    }

    /// The product and location of one event, or the reason it cannot be posted.
    pub(super) fn prepare<'a>(
        &self,
        setup: &Setup,
        calendar: &Calendar,
        idx: usize,
        event: &'a Event,
        event_date: Date,
    ) -> Result<Prepared<'a>, Delivery> {
        let Some(product) = lock(&self.products).get(&event.sku).cloned() else {
            return Err(Delivery::Permanent {
                reason: format!(
                    "unknown SKU {:?}: Tryton has no active product.product with code {:?}",
                    event.sku, event.sku
                ),
            });
        };
        let location = match event.location.as_deref() {
            None => setup.storage,
            Some(code) => match lock(&self.locations).get(code).copied() {
                Some(id) => id,
                None => {
                    let reason = match self.config.locations.get(code) {
                        None => format!(
                            "unknown location {code:?}: it is not in sink.tryton.locations \
                             (add {code:?} = \"<Tryton stock.location code>\")"
                        ),
                        Some(target) => format!(
                            "location {code:?}: sink.tryton.locations maps it to Tryton location \
                             {target}, which Tryton does not have as a storage location"
                        ),
                    };
                    return Err(Delivery::Permanent { reason });
                }
            },
        };
        let date = event_date.min(calendar.today);
        if event_date > calendar.today.next_day().unwrap_or(Date::MAX) {
            // A day ahead is a time zone east of the company's; more is a clock that is wrong.
            tracing::warn!(
                id = %event.id,
                ts = %event.ts,
                booked = %date,
                "event dated after Tryton's today is booked on Tryton's today"
            );
        }
        let closed = calendar
            .closed_until
            .filter(|until| date <= *until)
            .map(|until| Delivery::Permanent {
                reason: format!(
                    "the event is dated {date} (ts {:?}), in a closed stock period: Tryton's \
                     stock periods are closed up to {until}, and it takes no stock moves dated \
                     on or before then; reopen the period in Tryton and replay the event, or \
                     book the movement by hand",
                    event.ts
                ),
            });
        Ok(Prepared {
            idx,
            event,
            product,
            location,
            date,
            closed,
        })
    }
}
