//! The Tryton connector: posts warehouse events to a Tryton 8.0 server over its JSON-RPC, as
//! stock documents keyed by the event id, so a repeated delivery never makes a second record.
//!
//! It owns the JSON-RPC session (login, `Authorization: Session ...`, re-login on 401), the
//! mapping of each event type onto Tryton's stock documents, the idempotency searches, the
//! batching of several events into one ERP call, and the sorting of Tryton's answers into
//! [`Delivery`] outcomes. It caches master data: products by SKU and mapped locations once
//! found (a lookup that found nothing is not cached, so a product added in Tryton is found by
//! the next delivery), and the company's currency, the warehouse and the parties for the
//! connector's life (a party found missing is looked up again after 30 s; other changes to
//! them need a relay restart). Tryton's date and its closed stock periods are read again for
//! each delivery they would clamp or refuse, and at least every minute (see Dates).
//!
//! # What each event becomes
//!
//! | event | Tryton document | idempotency key | driven to |
//! |---|---|---|---|
//! | `adjust` | `stock.shipment.internal`, one move between the location and the warehouse's lost-and-found (qty > 0: lost-and-found → location; qty < 0: location → lost-and-found) | `reference` = event id | `done` (wait, assign_try, do) |
//! | `count` | `stock.inventory` at the location with one line (product, counted quantity) | `number` = event id | `done` (confirm) |
//! | `receive` | `stock.shipment.in` from the configured supplier, into the warehouse's input, stored to the location | `reference` = event id | `done` (receive, do) |
//! | `pick` | the customer shipment (`stock.shipment.out`) of the order | `reference` = the event's `order`, the line by its SKU | `picked` (wait, assign_try, pick) |
//! | `ship` | the same customer shipment | as for pick | `done` (… pick, pack, do) |
//!
//! "The location" is the event's `location` looked up in `sink.tryton.locations`, or the
//! warehouse's storage location when the event names none. A location missing from that table
//! (or one the table maps to a code Tryton does not have, or to a non-storage location) is a
//! permanent failure naming the location and the key.
//!
//! Before any create, the connector searches for the key; a record found is not created again,
//! its state is read and only the transitions still missing are called. So every event can be
//! delivered any number of times with one effect. A count's inventory takes the event id as
//! its `number` (Tryton keeps a number given at creation instead of drawing one from the
//! sequence); an inventory found under that number at a different location is reported as a
//! clash rather than taken as the count.
//!
//! # Orders: pick and ship
//!
//! One order is one customer shipment whose `reference` is the order. A line of an order is
//! identified by its SKU (Tryton's moves carry no free text to hold an event id or a line
//! number): an order that lists the same SKU on two lines is posted as one line.
//!
//! - A pick or ship whose SKU is already on one of the order's shipments works on that
//!   shipment: the ERP had the line (from a sale, say) or this is a re-delivery. Its quantity is
//!   the ERP's.
//! - A new SKU is added to the order's shipment while that is still `draft`, `waiting` or
//!   `assigned` (a waiting or assigned shipment is set back to waiting so the new line gets its
//!   inventory move). Once the shipment is picked, a new SKU goes to a new shipment with the
//!   same reference, the way Tryton itself splits a delivery; when the order has no shipment at
//!   all, one is created for the configured customer (`customer_party`).
//! - A pick drives the shipment to `picked`; a shipment already picked, packed, shipped or done
//!   needs nothing and the pick is posted as it is. A ship drives it on to `done` (pack, do);
//!   a done shipment needs nothing.
//! - When Tryton cannot reserve the stock (`assign_try` leaves the shipment `waiting`), the
//!   pick or ship waits: "waiting for stock", its order's key retried after
//!   `waiting_retry_ms` while every other key goes on (the ERP answered; nothing is wrong with
//!   it). The ERP's stock disagrees with the floor, and a receipt or count of that SKU usually
//!   fixes it.
//! - A shipment of the order that was cancelled in Tryton is not reused: when every shipment
//!   of the order is cancelled, the event is refused permanently.
//! - A shipment the connector creates picks from the location of the event that created it;
//!   lines added later are picked from wherever that shipment picks.
//! - `carrier` and `tracking` are not posted: Tryton's stock module has no fields for them.
//!
//! # Adjustments, counts and receipts
//!
//! - A negative adjustment is what the floor saw: when Tryton finds less stock than the loss,
//!   `assign_try` leaves it waiting and the connector forces the reservation (`assign_force`),
//!   so Tryton's stock may go below zero until the next count corrects it. Holding the key
//!   instead would also hold every later receipt and count of that SKU and location.
//! - A count is absolute: the inventory's line holds the counted quantity and Tryton posts the
//!   difference from what it expected at the location. It counts the location itself, not its
//!   child locations (Tryton's inventory), so a count of a zone leaves its bins alone.
//! - Receipts come from the configured supplier (`supplier_party`); the event's `po` is not
//!   matched to a purchase (the purchase module is not assumed).
//! - Quantities are posted in the product's default unit; the event's `uom` is not converted.
//!   `lot` and `serial` are not posted (no lot module is assumed). Moves that need a unit price
//!   (from suppliers, to customers) take the product's cost price.
//!
//! # Dates
//!
//! Every document is dated by when its event happened, not by when it reached Tryton: the
//! calendar day of the event's `ts` in its own offset (the warehouse's day as the scanner
//! wrote it; `2026-11-12T23:30:00-05:00` is booked on 12 November). Tryton knows days, not
//! times, so everything of one day counts as simultaneous.
//!
//! | event | dates set |
//! |---|---|
//! | `adjust` | the internal shipment's `effective_date`, `planned_date` and `planned_start_date`: its move is done on that day |
//! | `count` | the inventory's `date`: Tryton computes the expected quantity as the stock at the end of that day (moves of later days already in Tryton are not counted over), and the difference move is dated that day |
//! | `receive` | the supplier shipment's `effective_date` and `planned_date`: both the receipt into input and the move to storage are done on that day |
//! | `pick` | the inventory moves (storage to output) of the customer shipment, just before `pick`; a shipment the pick creates is planned on that day |
//! | `ship` | the customer shipment's `effective_date`: its outgoing moves (and its inventory moves when the ship also picks) are done on that day |
//!
//! - A customer shipment gathers lines, and Tryton picks it as a whole: its picking is dated
//!   by the event that picks it (later picks of lines already picked change nothing), and the
//!   shipment itself is dated by the ship that sends it, so a shipment picked over several days
//!   and shipped on a later one shows the ship's day. A pick that waited for stock is picked
//!   on its own day, not on the day the stock reached Tryton. The planned date of a shipment
//!   the ERP made is left as the ERP set it.
//! - A document found under its key rather than created gets the same date fields written
//!   before its first transition, so a re-delivery books on the event's day too. Documents
//!   are one per event (one per order for picks and ships, and a delivery never holds two
//!   events of one order), so no document mixes the dates of two events of one delivery.
//! - A `ts` after Tryton's today (the company's time zone, or the server's when the company
//!   has none) is booked on Tryton's today, and logged when it is more than a day ahead. A
//!   warehouse east of the company's time zone starts its day first, and a scanner's clock
//!   may run ahead; the goods did move, and refusing would leave Tryton's stock wrong with no
//!   way to replay the event right. Tryton itself only warns about future dates, and a done
//!   move dated tomorrow is missing from today's stock, while an inventory dated in the future
//!   would count against planned moves.
//! - A date on or before the end of Tryton's latest closed stock period (`stock.period`) is
//!   refused, permanently, naming the date and the period's end: such an event needs the
//!   period reopened (then a replay) or a booking by hand. Nothing is created for it. Tryton
//!   refuses moves dated in a closed period only when they carry that date before the change
//!   (a shipment's moves get theirs when done), and books the others where its period stock
//!   no longer counts them. So the connector checks first, and where it can it puts the date
//!   on the moves ahead of the transitions (the planned dates of the documents it makes, the
//!   inventory moves a pick books) so that Tryton refuses too when a period was closed after
//!   the connector last read them. A document already done is still posted when its event is
//!   delivered again.
//! - The connector user needs read access to `stock.period` (the stock group has it); when
//!   the date or the periods cannot be read, the events wait (transient).
//!
//! # Batching
//!
//! A call to [`TrytonConnector::deliver`] groups the events by type and makes one ERP call per
//! step for each group: one search for the keys, one `create` with every missing record, one
//! call per transition on all the records that need it, and a read of the states only after
//! `assign_try` (any other accepted transition has a known outcome). Tryton runs a
//! call in one transaction, so when a batched call is refused (a `UserError`) nothing of it is
//! kept and the connector repeats that step one record at a time to find the event Tryton
//! refuses; the others go on.
//!
//! # Errors
//!
//! - `UserError` → permanent, with Tryton's message (and description when it gave one), and
//!   the date of the document when a transition or a create was refused.
//! - `UserWarning` → acknowledged with `res.user.warning.skip`, then the call is made again.
//! - `[text, traceback]` → permanent: the request itself was wrong (a bug here, or a Tryton
//!   setup this connector does not understand), with Tryton's text.
//! - 401 → one fresh login and the call again. 429, 503 and `RateLimitException` → throttled
//!   (every key pauses, for Retry-After when given); 500, 502, 504, connection errors and
//!   timeouts → transient (the event's key backs off). 403, 400 and 422 → permanent (the
//!   request is wrong).
//! - Problems of the setup rather than of one event (login refused, unknown database, the
//!   warehouse or company missing) are transient, so the events wait in the outbox while the
//!   configuration is fixed instead of filling the dead-letter queue. An unknown SKU or
//!   location, or a missing party code, is permanent for the events that need it.

mod config;
mod dates;
mod documents;
mod flows;
mod master_data;
mod rpc;

pub use config::{TrytonConfig, TrytonLocation};
/// How one answer of Tryton's JSON-RPC is sorted; public for the `tryton_rpc` fuzz target.
pub use rpc::{Answer, RpcError, read_answer};

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use backhaul_events::config::Secret;
use backhaul_events::{EventType, StampedEvent};
use time::Date;

use super::Delivery;
use dates::{Calendar, event_date};
use flows::Flow;
use master_data::{Prepared, Product, Setup};
use rpc::Rpc;

/// How long a setup problem (login refused, warehouse missing) asks the relay to wait, and how
/// long a party found missing is believed missing before it is looked up again.
const SETUP_RETRY: Duration = Duration::from_secs(30);

/// Boxed: the relay keeps its connector in an enum whose other variants are small.
pub struct TrytonConnector(Box<Inner>);

struct Inner {
    rpc: Rpc,
    config: TrytonConfig,
    setup: tokio::sync::Mutex<Option<Arc<Setup>>>,
    products: StdMutex<HashMap<String, Product>>,
    locations: StdMutex<HashMap<String, i64>>,
    calendar: StdMutex<Option<Calendar>>,
}

impl TrytonConnector {
    /// Of the posted events (event id, the record's reference as delivery reported it:
    /// `model/id`), those whose record Tryton no longer has or has cancelled, each with why.
    pub async fn missing_records(
        &self,
        posted: &[(String, String)],
    ) -> Result<HashMap<String, String>, String> {
        let mut by_model: BTreeMap<&str, Vec<(i64, &str)>> = BTreeMap::new();
        let mut missing = HashMap::new();
        for (event, erp_ref) in posted {
            match erp_ref
                .rsplit_once('/')
                .and_then(|(model, id)| id.parse::<i64>().ok().map(|id| (model, id)))
            {
                Some((model, id)) => by_model.entry(model).or_default().push((id, event)),
                None => {
                    missing.insert(
                        event.clone(),
                        format!("its reference {erp_ref:?} does not name a Tryton record"),
                    );
                }
            }
        }
        for (model, records) in by_model {
            let ids: Vec<i64> = records.iter().map(|(id, _)| *id).collect();
            let found = self
                .0
                .rpc
                .call(
                    &format!("model.{model}.search_read"),
                    vec![
                        serde_json::json!([["id", "in", ids]]),
                        serde_json::json!(0),
                        serde_json::Value::Null,
                        serde_json::Value::Null,
                        serde_json::json!(["state"]),
                    ],
                )
                .await
                .map_err(|e| format!("asking Tryton for {model} records: {}", e.message()))?;
            let states: HashMap<i64, String> = rpc::records(&found)
                .into_iter()
                .filter_map(|r| {
                    let id = r.get("id").and_then(serde_json::Value::as_i64)?;
                    let state = r.get("state").and_then(serde_json::Value::as_str);
                    Some((id, state.unwrap_or_default().to_string()))
                })
                .collect();
            for (id, event) in records {
                match states.get(&id).map(String::as_str) {
                    None => {
                        missing.insert(
                            event.to_string(),
                            format!("Tryton no longer has {model} {id} (deleted)"),
                        );
                    }
                    Some("cancelled") => {
                        missing.insert(
                            event.to_string(),
                            format!("Tryton's {model} {id} is cancelled"),
                        );
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(missing)
    }

    /// Per SKU and location, the net quantity these events imply (receipts in, adjustments by
    /// their sign, picks out, and a ship out only for an order's SKU no event picked) against
    /// what Tryton booked in the done moves of the documents delivery made for them (when
    /// posted). Counts set a level rather than move one and are left out.
    pub async fn booked_quantities(
        &self,
        events: &[crate::reconcile::Known],
    ) -> Result<Vec<crate::reconcile::QuantityRow>, String> {
        use rust_decimal::Decimal;
        let inner = &self.0;
        let setup = inner.setup().await.map_err(|failure| match failure {
            Delivery::Permanent { reason }
            | Delivery::Transient { reason, .. }
            | Delivery::Throttled { reason, .. }
            | Delivery::Waiting { reason, .. } => format!("reading Tryton's warehouse: {reason}"),
            Delivery::Posted { .. } => "reading Tryton's warehouse".to_string(),
        })?;
        let moved: Vec<&crate::reconcile::Known> = events
            .iter()
            .filter(|e| e.kind != EventType::Count)
            .filter(|e| e.state != crate::reconcile::RelayState::Repeated)
            .collect();
        let skus: Vec<&str> = moved.iter().map(|e| e.sku.as_str()).collect();
        let labels: Vec<&str> = moved.iter().filter_map(|e| e.location.as_deref()).collect();
        let looked_up = match inner.load_products(&skus).await {
            Ok(()) => inner.load_locations(&labels).await,
            Err(e) => Err(e),
        };
        looked_up.map_err(|e| format!("looking up products and locations: {}", e.message()))?;
        let products: HashMap<String, i64> = lock(&inner.products)
            .iter()
            .map(|(sku, p)| (sku.clone(), p.id))
            .collect();
        let locations = lock(&inner.locations).clone();
        let location_of = |label: Option<&str>| match label {
            None => Some(setup.storage),
            Some(label) => locations.get(label).copied(),
        };

        let mut rows: BTreeMap<(String, String), (Decimal, Decimal, u64)> = BTreeMap::new();
        // A ship moves stock out of storage only when nothing picked that line first.
        let picked: std::collections::HashSet<(Option<&str>, &str)> = moved
            .iter()
            .filter(|e| e.kind == EventType::Pick)
            .map(|e| (e.order.as_deref(), e.sku.as_str()))
            .collect();
        let mut documents = std::collections::BTreeSet::new();
        for event in &moved {
            let delta = match event.kind {
                EventType::Receive | EventType::Adjust => event.qty,
                EventType::Pick => -event.qty,
                EventType::Ship if picked.contains(&(event.order.as_deref(), &event.sku)) => {
                    Decimal::ZERO
                }
                EventType::Ship => -event.qty,
                EventType::Count => continue,
            };
            let erp_ref = match &event.state {
                crate::reconcile::RelayState::Posted { erp_ref } => Some(erp_ref.as_str()),
                _ => None,
            };
            let label = event
                .location
                .clone()
                .unwrap_or_else(|| crate::reconcile::WAREHOUSE_STORAGE.to_string());
            let row =
                rows.entry((event.sku.clone(), label))
                    .or_insert((Decimal::ZERO, Decimal::ZERO, 0));
            row.0 += delta;
            row.2 += 1;
            if let Some((model, id)) = erp_ref.and_then(|r| r.rsplit_once('/')) {
                documents.insert(format!("{model},{id}"));
            }
        }
        let documents: Vec<String> = documents.into_iter().collect();
        // (product, Tryton location) → the row's key, for each row whose SKU and location
        // Tryton knows.
        let mut row_of: HashMap<(i64, i64), (String, String)> = HashMap::new();
        for (sku, label) in rows.keys() {
            let location = if label == crate::reconcile::WAREHOUSE_STORAGE {
                location_of(None)
            } else {
                location_of(Some(label))
            };
            if let (Some(&product), Some(location)) = (products.get(sku), location) {
                row_of.insert((product, location), (sku.clone(), label.clone()));
            }
        }
        for chunk in documents.chunks(500) {
            let found = inner
                .rpc
                .call(
                    "model.stock.move.search_read",
                    vec![
                        serde_json::json!([["shipment", "in", chunk], ["state", "=", "done"]]),
                        serde_json::json!(0),
                        serde_json::Value::Null,
                        serde_json::Value::Null,
                        serde_json::json!(["product", "quantity", "from_location", "to_location"]),
                    ],
                )
                .await
                .map_err(|e| format!("reading the documents' stock moves: {}", e.message()))?;
            for record in rpc::records(&found) {
                let (Some(product), Some(quantity)) = (
                    rpc::id_field(record, "product"),
                    record.get("quantity").and_then(tryton_decimal),
                ) else {
                    continue;
                };
                let ends = [
                    (rpc::id_field(record, "to_location"), quantity),
                    (rpc::id_field(record, "from_location"), -quantity),
                ];
                for (location, signed) in ends {
                    if let Some(key) = location.and_then(|l| row_of.get(&(product, l)))
                        && let Some(row) = rows.get_mut(key)
                    {
                        row.1 += signed;
                    }
                }
            }
        }
        Ok(rows
            .into_iter()
            .map(
                |((sku, location), (implied, booked, events))| crate::reconcile::QuantityRow {
                    sku,
                    location,
                    events,
                    implied: implied.normalize().to_string(),
                    booked: booked.normalize().to_string(),
                    differs: implied.normalize() != booked.normalize(),
                },
            )
            .collect())
    }

    pub fn new(config: &TrytonConfig, password: Secret) -> anyhow::Result<Self> {
        let endpoint = config.validate()?;
        Ok(TrytonConnector(Box::new(Inner {
            rpc: Rpc::new(config, endpoint, password)?,
            config: config.clone(),
            setup: tokio::sync::Mutex::new(None),
            products: StdMutex::new(HashMap::new()),
            locations: StdMutex::new(HashMap::new()),
            calendar: StdMutex::new(None),
        })))
    }

    /// Events posted together at most; a longer slice given to [`Self::deliver`] is cut into
    /// pieces of this size.
    pub fn max_batch(&self) -> usize {
        self.0.config.max_batch
    }

    /// Posts the events and answers one [`Delivery`] per event, in the same order. The events
    /// never share an ordering key, so no two of them touch the same order or the same SKU at
    /// the same location.
    pub async fn deliver(&self, events: &[StampedEvent]) -> Vec<Delivery> {
        let mut out = Vec::with_capacity(events.len());
        for chunk in events.chunks(self.0.config.max_batch.max(1)) {
            out.extend(self.0.deliver_chunk(chunk).await);
        }
        out
    }
}

impl Inner {
    async fn deliver_chunk(&self, events: &[StampedEvent]) -> Vec<Delivery> {
        let mut results: Vec<Option<Delivery>> = vec![None; events.len()];
        let setup = match self.setup().await {
            Ok(setup) => setup,
            Err(failure) => return vec![failure; events.len()],
        };
        let skus: Vec<&str> = events.iter().map(|e| e.event.sku.as_str()).collect();
        if let Err(e) = self.load_products(&skus).await {
            let failure = e.delivery("looking up products by SKU");
            return vec![failure; events.len()];
        }
        let wanted: Vec<&str> = events
            .iter()
            .filter_map(|e| e.event.location.as_deref())
            .collect();
        if let Err(e) = self.load_locations(&wanted).await {
            let failure = e.delivery("looking up locations");
            return vec![failure; events.len()];
        }

        let mut dates: Vec<Option<Date>> = Vec::with_capacity(events.len());
        for (idx, stamped) in events.iter().enumerate() {
            match event_date(&stamped.event) {
                Ok(date) => dates.push(Some(date)),
                Err(failure) => {
                    results[idx] = Some(failure);
                    dates.push(None);
                }
            }
        }
        let known: Vec<Date> = dates.iter().flatten().copied().collect();
        let calendar = if known.is_empty() {
            None
        } else {
            match self.calendar(&known).await {
                Ok(calendar) => Some(calendar),
                Err(failure) => {
                    for (idx, date) in dates.iter().enumerate() {
                        if date.is_some() {
                            results[idx] = Some(failure.clone());
                        }
                    }
                    None
                }
            }
        };

        let mut groups: BTreeMap<EventType, Vec<Prepared<'_>>> = BTreeMap::new();
        if let Some(calendar) = &calendar {
            for (idx, stamped) in events.iter().enumerate() {
                let Some(date) = dates[idx] else { continue };
                match self.prepare(&setup, calendar, idx, &stamped.event, date) {
                    Ok(prepared) => groups.entry(stamped.event.kind).or_default().push(prepared),
                    Err(failure) => results[idx] = Some(failure),
                }
            }
        }
        for (kind, items) in groups {
            let done = match kind {
                EventType::Adjust => self.adjust(&setup, items).await,
                EventType::Count => self.count(items).await,
                EventType::Receive => self.receive(&setup, items).await,
                EventType::Pick => self.order_events(&setup, items, Flow::Pick).await,
                EventType::Ship => self.order_events(&setup, items, Flow::Ship).await,
            };
            for (idx, delivery) in done {
                results[idx] = Some(delivery);
            }
        }
        results
            .into_iter()
            .map(|d| {
                d.unwrap_or_else(|| Delivery::Transient {
                    reason: "the Tryton connector produced no outcome for this event (a bug)"
                        .into(),
                    retry_after: None,
                })
            })
            .collect()
    }
}

/// A quantity as Tryton's JSON-RPC writes it: a number, or a `Decimal` object.
fn tryton_decimal(value: &serde_json::Value) -> Option<rust_decimal::Decimal> {
    use std::str::FromStr;
    let text = match value {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Object(o) => o.get("decimal")?.as_str()?.to_string(),
        _ => return None,
    };
    rust_decimal::Decimal::from_str(&text)
        .or_else(|_| rust_decimal::Decimal::from_scientific(&text))
        .ok()
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
