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

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use backhaul_events::config::{Secret, SecretSource};
use backhaul_events::{Event, EventType, StampedEvent};
use reqwest::header::{AUTHORIZATION, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::Date;

use super::Delivery;

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

/// How long a setup problem (login refused, warehouse missing) asks the relay to wait, and how
/// long a party found missing is believed missing before it is looked up again.
const SETUP_RETRY: Duration = Duration::from_secs(30);
/// The longest ERP message kept in a reason; Tryton's can be tens of kilobytes.
const MAX_REASON_CHARS: usize = 2000;
/// Warnings acknowledged for one call before giving up (each skip covers one warning).
const MAX_WARNINGS_PER_CALL: usize = 8;
/// Transition rounds before a document that does not settle is reported as transient.
const MAX_ROUNDS: usize = 12;
/// How long Tryton's date and closed stock periods, once read, serve the deliveries that they
/// give nothing to do (no date to clamp, none in a closed period).
const CALENDAR_TTL: Duration = Duration::from_secs(60);

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

/// Tryton's today (in the company's time zone) and the end of its latest closed stock period.
#[derive(Debug, Clone, Copy)]
struct Calendar {
    today: Date,
    closed_until: Option<Date>,
    read_at: Instant,
}

impl Calendar {
    /// Whether these dates need nothing of the calendar: none after today, none in a closed
    /// period.
    fn quiet(&self, dates: &[Date]) -> bool {
        dates
            .iter()
            .all(|d| *d <= self.today && self.closed_until.is_none_or(|c| *d > c))
    }
}

/// Master data every event needs, read once.
#[derive(Debug)]
struct Setup {
    currency: i64,
    warehouse: i64,
    input: i64,
    output: i64,
    storage: i64,
    lost_found: i64,
    customer: Result<Party, String>,
    supplier: Result<Party, String>,
    loaded_at: Instant,
}

#[derive(Debug, Clone)]
struct Party {
    id: i64,
    address: Option<i64>,
    customer_location: i64,
    supplier_location: i64,
}

#[derive(Debug, Clone)]
struct Product {
    id: i64,
    uom: i64,
    cost_price: Value,
}

/// An event whose master data resolved.
struct Prepared<'a> {
    idx: usize,
    event: &'a Event,
    product: Product,
    location: i64,
    /// The date its document is booked on: the event's day, or Tryton's today when later.
    date: Date,
    /// Why nothing may be booked on that date (a closed stock period), if so.
    closed: Option<Delivery>,
}

impl TrytonConnector {
    pub fn new(config: &TrytonConfig, password: Secret) -> anyhow::Result<Self> {
        let mut endpoint = Url::parse(&config.url)
            .map_err(|e| anyhow::anyhow!("sink.tryton.url {:?} is not a URL: {e}", config.url))?;
        if !matches!(endpoint.scheme(), "http" | "https") {
            anyhow::bail!(
                "sink.tryton.url {:?} must start with http:// or https://",
                config.url
            );
        }
        if config.database.is_empty() {
            anyhow::bail!("sink.tryton.database must not be empty");
        }
        if config.max_batch == 0 {
            anyhow::bail!("sink.tryton.max_batch must be at least 1");
        }
        if config.timeout_ms == 0 {
            anyhow::bail!("sink.tryton.timeout_ms must be at least 1");
        }
        endpoint
            .path_segments_mut()
            .map_err(|()| anyhow::anyhow!("sink.tryton.url {:?} cannot take a path", config.url))?
            .pop_if_empty()
            .push(&config.database)
            .push("rpc")
            .push("");
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .connect_timeout(Duration::from_millis(config.timeout_ms.min(10_000)))
            .build()?;
        Ok(TrytonConnector(Box::new(Inner {
            rpc: Rpc {
                client,
                endpoint,
                username: config.username.clone(),
                password,
                context: json!({"company": config.company, "language": "en"}),
                session: StdMutex::new(None),
                login_lock: tokio::sync::Mutex::new(()),
                next_id: AtomicU64::new(1),
            },
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

    // ----- master data -----------------------------------------------------------------------

    async fn setup(&self) -> Result<Arc<Setup>, Delivery> {
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

    /// Tryton's today and its closed stock periods, read again unless a recent reading has
    /// nothing to say about these dates: a date after today (to be clamped) or in a closed
    /// period (to be refused) is always judged on a fresh reading.
    async fn calendar(&self, dates: &[Date]) -> Result<Calendar, Delivery> {
        if let Some(calendar) = *lock(&self.calendar)
            && calendar.read_at.elapsed() < CALENDAR_TTL
            && calendar.quiet(dates)
        {
            return Ok(calendar);
        }
        let what = "reading Tryton's date and closed stock periods";
        let failure = |e: RpcError| match e {
            RpcError::Transient { .. } | RpcError::Throttled { .. } => e.delivery(what),
            // Most likely the user lacks the stock group: a setup problem, not the events'.
            other => Delivery::Transient {
                reason: format!("{what}: {}", other.message()),
                retry_after: Some(SETUP_RETRY),
            },
        };
        let periods = json!([
            ["state", "=", "closed"],
            ["company", "=", self.config.company]
        ]);
        let (today, closed) = tokio::join!(
            self.rpc.call("model.ir.date.today", Vec::new()),
            self.rpc.call(
                "model.stock.period.search_read",
                vec![
                    periods,
                    json!(0),
                    json!(1),
                    json!([["date", "DESC"]]),
                    json!(["date"]),
                ],
            ),
        );
        let today = today.map_err(failure)?;
        let closed = closed.map_err(failure)?;
        let today = tryton_date(&today).ok_or_else(|| {
            failure(RpcError::Request(format!(
                "ir.date.today answered {}",
                truncate(&today.to_string())
            )))
        })?;
        let closed_until = match records(&closed).first() {
            None => None,
            Some(period) => Some(period.get("date").and_then(tryton_date).ok_or_else(|| {
                failure(RpcError::Request(format!(
                    "a closed stock.period came back without a date: {}",
                    truncate(&closed.to_string())
                )))
            })?),
        };
        let calendar = Calendar {
            today,
            closed_until,
            read_at: Instant::now(),
        };
        *lock(&self.calendar) = Some(calendar);
        Ok(calendar)
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
    async fn load_products(&self, skus: &[&str]) -> Result<(), RpcError> {
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
    async fn load_locations(&self, wanted: &[&str]) -> Result<(), RpcError> {
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
    fn prepare<'a>(
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
                event = %event.id,
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

    // ----- adjust ----------------------------------------------------------------------------

    async fn adjust(&self, setup: &Setup, items: Vec<Prepared<'_>>) -> Vec<(usize, Delivery)> {
        let model = Flow::Adjust.model();
        let existing = match self.find_by(model, "reference", &items).await {
            Ok(found) => found,
            Err(e) => return fail_all(&items, e.delivery("searching internal shipments")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        for item in &items {
            if let Some((id, state)) = existing.get(&item.event.id) {
                jobs.push(Job::found(item, *id, state.clone(), ""));
                continue;
            }
            if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
                continue;
            }
            let (from, to) = if item.event.qty.is_sign_negative() {
                (item.location, setup.lost_found)
            } else {
                (setup.lost_found, item.location)
            };
            let quantity = quantity(&item.event.qty.abs().to_string());
            to_create.push(Create::new(
                Flow::Adjust,
                item,
                json!({
                    "reference": item.event.id,
                    "company": self.config.company,
                    "from_location": from,
                    "to_location": to,
                    "moves": [["create", [{
                        "product": item.product.id,
                        "unit": item.product.uom,
                        "quantity": quantity,
                        "from_location": from,
                        "to_location": to,
                        "company": self.config.company,
                    }]]],
                }),
            ));
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "")
            .await;
        out.extend(self.drive(Flow::Adjust, jobs).await);
        out
    }

    // ----- count -----------------------------------------------------------------------------

    async fn count(&self, items: Vec<Prepared<'_>>) -> Vec<(usize, Delivery)> {
        let model = Flow::Count.model();
        let ids: Vec<&str> = items.iter().map(|i| i.event.id.as_str()).collect();
        let found = self
            .rpc
            .call(
                &format!("model.{model}.search_read"),
                vec![
                    json!([["number", "in", ids]]),
                    json!(0),
                    Value::Null,
                    Value::Null,
                    json!(["number", "state", "location"]),
                ],
            )
            .await;
        let found = match found {
            Ok(found) => found,
            Err(e) => return fail_all(&items, e.delivery("searching inventories")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        for item in &items {
            let same_number: Vec<&Map<String, Value>> = records(&found)
                .into_iter()
                .filter(|r| r.get("number").and_then(Value::as_str) == Some(&item.event.id))
                .collect();
            if let Some(record) = same_number
                .iter()
                .find(|r| id_field(r, "location") == Some(item.location))
            {
                let (Some(id), Some(state)) = (
                    record.get("id").and_then(Value::as_i64),
                    record.get("state").and_then(Value::as_str),
                ) else {
                    out.push((item.idx, malformed("an inventory")));
                    continue;
                };
                jobs.push(Job::found(item, id, state.to_string(), ""));
            } else if !same_number.is_empty() {
                out.push((
                    item.idx,
                    Delivery::Permanent {
                        reason: format!(
                            "Tryton already has an inventory numbered {:?} at another location; \
                             this count cannot take that number",
                            item.event.id
                        ),
                    },
                ));
            } else if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
            } else {
                to_create.push(Create::new(
                    Flow::Count,
                    item,
                    json!({
                        "number": item.event.id,
                        "location": item.location,
                        "company": self.config.company,
                        "lines": [["create", [{
                            "product": item.product.id,
                            "quantity": quantity(&item.event.qty.to_string()),
                        }]]],
                    }),
                ));
            }
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "")
            .await;
        out.extend(self.drive(Flow::Count, jobs).await);
        out
    }

    // ----- receive ---------------------------------------------------------------------------

    async fn receive(&self, setup: &Setup, items: Vec<Prepared<'_>>) -> Vec<(usize, Delivery)> {
        let model = Flow::Receive.model();
        let existing = match self.find_by(model, "reference", &items).await {
            Ok(found) => found,
            Err(e) => return fail_all(&items, e.delivery("searching supplier shipments")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        for item in &items {
            if let Some((id, state)) = existing.get(&item.event.id) {
                jobs.push(Job::found(item, *id, state.clone(), ""));
                continue;
            }
            if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
                continue;
            }
            let supplier = match &setup.supplier {
                Ok(supplier) => supplier,
                Err(why) => {
                    out.push((
                        item.idx,
                        Delivery::Permanent {
                            reason: format!("cannot create the receipt: {why}"),
                        },
                    ));
                    continue;
                }
            };
            to_create.push(Create::new(
                Flow::Receive,
                item,
                json!({
                    "reference": item.event.id,
                    "company": self.config.company,
                    "supplier": supplier.id,
                    "warehouse": setup.warehouse,
                    "warehouse_input": setup.input,
                    "warehouse_storage": item.location,
                    "incoming_moves": [["create", [{
                        "product": item.product.id,
                        "unit": item.product.uom,
                        "quantity": quantity(&item.event.qty.to_string()),
                        "from_location": supplier.supplier_location,
                        "to_location": setup.input,
                        "company": self.config.company,
                        "unit_price": item.product.cost_price,
                        "currency": setup.currency,
                    }]]],
                }),
            ));
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "")
            .await;
        out.extend(self.drive(Flow::Receive, jobs).await);
        out
    }

    // ----- pick and ship ---------------------------------------------------------------------

    async fn order_events(
        &self,
        setup: &Setup,
        items: Vec<Prepared<'_>>,
        flow: Flow,
    ) -> Vec<(usize, Delivery)> {
        let model = flow.model();
        let orders: Vec<&str> = items
            .iter()
            .filter_map(|i| i.event.order.as_deref())
            .collect();
        let shipments = match self.order_shipments(&orders).await {
            Ok(shipments) => shipments,
            Err(e) => return fail_all(&items, e.delivery("searching customer shipments")),
        };
        let mut out = Vec::new();
        let mut jobs = Vec::new();
        let mut to_create = Vec::new();
        let mut to_extend: BTreeMap<i64, Extension> = BTreeMap::new();
        let mut extended: Vec<(usize, Date, i64, String)> = Vec::new();
        for item in &items {
            let Some(order) = item.event.order.as_deref() else {
                out.push((
                    item.idx,
                    Delivery::Permanent {
                        reason: format!("a {} event needs an order", item.event.kind),
                    },
                ));
                continue;
            };
            let label = format!("order {order}");
            let of_order = shipments.get(order).map(Vec::as_slice).unwrap_or_default();
            let live: Vec<&OrderShipment> =
                of_order.iter().filter(|s| s.state != "cancelled").collect();
            if live.is_empty() && !of_order.is_empty() {
                out.push((
                    item.idx,
                    Delivery::Permanent {
                        reason: format!(
                            "the customer shipment of order {order} is cancelled in Tryton \
                             ({model}/{})",
                            of_order[0].id
                        ),
                    },
                ));
                continue;
            }
            if let Some(shipment) = live.iter().find(|s| s.products.contains(&item.product.id)) {
                jobs.push(Job::found(
                    item,
                    shipment.id,
                    shipment.state.clone(),
                    &label,
                ));
                continue;
            }
            if let Some(closed) = &item.closed {
                out.push((item.idx, closed.clone()));
                continue;
            }
            let line = json!({
                "product": item.product.id,
                "unit": item.product.uom,
                "quantity": quantity(&item.event.qty.to_string()),
                "from_location": setup.output,
                "to_location": setup.customer.as_ref().map(|c| c.customer_location).ok(),
                "company": self.config.company,
                "unit_price": item.product.cost_price,
                "currency": setup.currency,
            });
            if let Some(open) = live
                .iter()
                .find(|s| matches!(s.state.as_str(), "draft" | "waiting" | "assigned"))
            {
                let mut line = line;
                if let Some(to) = open.customer_location {
                    line["to_location"] = json!(to);
                }
                if let Some(from) = open.output {
                    line["from_location"] = json!(from);
                }
                let entry = to_extend.entry(open.id).or_insert(Extension {
                    lines: Vec::new(),
                    rewait: open.state != "draft",
                    date: item.date,
                });
                entry.lines.push(line);
                entry.date = entry.date.max(item.date);
                extended.push((item.idx, item.date, open.id, label));
                continue;
            }
            let customer = match &setup.customer {
                Ok(customer) => customer,
                Err(why) => {
                    out.push((
                        item.idx,
                        Delivery::Permanent {
                            reason: format!(
                                "Tryton has no customer shipment for order {order} and none \
                                 can be created: {why}"
                            ),
                        },
                    ));
                    continue;
                }
            };
            to_create.push(Create::new(
                flow,
                item,
                json!({
                    "reference": order,
                    "company": self.config.company,
                    "customer": customer.id,
                    "delivery_address": customer.address,
                    "warehouse": setup.warehouse,
                    "warehouse_storage": item.location,
                    "warehouse_output": setup.output,
                    "outgoing_moves": [["create", [line]]],
                }),
            ));
        }

        if !to_extend.is_empty() {
            let mut params = Vec::new();
            for (id, extension) in &to_extend {
                let values = json!({"outgoing_moves": [["create", extension.lines]]});
                params.push(json!([id]));
                params.push(with_dates(values, flow.found_dates(extension.date)));
            }
            let rewait: Vec<i64> = to_extend
                .iter()
                .filter(|(_, extension)| extension.rewait)
                .map(|(id, _)| *id)
                .collect();
            let mut result = self.rpc.call(&format!("model.{model}.write"), params).await;
            if result.is_ok() && !rewait.is_empty() {
                result = self
                    .rpc
                    .call(&format!("model.{model}.wait"), vec![json!(rewait)])
                    .await;
            }
            match result {
                Ok(_) => {
                    for (idx, date, id, label) in extended {
                        let state = if rewait.contains(&id) {
                            "waiting"
                        } else {
                            "draft"
                        };
                        jobs.push(Job::dated(idx, date, id, state.into(), &label));
                    }
                }
                Err(e) => {
                    // Rare (one order per event, a few events): no per-record fallback.
                    for (idx, _, _, label) in extended {
                        out.push((
                            idx,
                            e.delivery(&format!("adding a line to the shipment of {label}")),
                        ));
                    }
                }
            }
        }
        self.create_jobs(model, to_create, &mut jobs, &mut out, "order")
            .await;
        out.extend(self.drive(flow, jobs).await);
        out
    }

    /// The customer shipments whose reference is one of these orders, oldest first, with the
    /// products of their outgoing moves that are not cancelled.
    async fn order_shipments(
        &self,
        orders: &[&str],
    ) -> Result<HashMap<String, Vec<OrderShipment>>, RpcError> {
        let found = self
            .rpc
            .call(
                "model.stock.shipment.out.search_read",
                vec![
                    json!([["reference", "in", orders]]),
                    json!(0),
                    Value::Null,
                    json!([["id", "ASC"]]),
                    json!([
                        "reference",
                        "state",
                        "outgoing_moves",
                        "customer_location",
                        "warehouse_output"
                    ]),
                ],
            )
            .await?;
        let move_ids: Vec<i64> = records(&found)
            .iter()
            .flat_map(|r| ids_field(r, "outgoing_moves"))
            .collect();
        let mut move_products: HashMap<i64, i64> = HashMap::new();
        if !move_ids.is_empty() {
            let moves = self
                .rpc
                .call(
                    "model.stock.move.read",
                    vec![json!(move_ids), json!(["product", "state"])],
                )
                .await?;
            for record in records(&moves) {
                if record.get("state").and_then(Value::as_str) == Some("cancelled") {
                    continue;
                }
                if let (Some(id), Some(product)) = (
                    record.get("id").and_then(Value::as_i64),
                    id_field(record, "product"),
                ) {
                    move_products.insert(id, product);
                }
            }
        }
        let mut by_order: HashMap<String, Vec<OrderShipment>> = HashMap::new();
        for record in records(&found) {
            let (Some(id), Some(reference), Some(state)) = (
                record.get("id").and_then(Value::as_i64),
                record.get("reference").and_then(Value::as_str),
                record.get("state").and_then(Value::as_str),
            ) else {
                return Err(RpcError::Request(
                    "a customer shipment came back without id, reference or state".into(),
                ));
            };
            let products = ids_field(record, "outgoing_moves")
                .filter_map(|m| move_products.get(&m).copied())
                .collect();
            by_order
                .entry(reference.to_string())
                .or_default()
                .push(OrderShipment {
                    id,
                    state: state.to_string(),
                    products,
                    customer_location: id_field(record, "customer_location"),
                    output: id_field(record, "warehouse_output"),
                });
        }
        Ok(by_order)
    }

    // ----- shared steps ----------------------------------------------------------------------

    /// Records of `model` whose `field` is one of the events' ids: event id → (id, state). A
    /// record that is not cancelled wins over a cancelled one.
    async fn find_by(
        &self,
        model: &str,
        field: &str,
        items: &[Prepared<'_>],
    ) -> Result<HashMap<String, (i64, String)>, RpcError> {
        let keys: Vec<&str> = items.iter().map(|i| i.event.id.as_str()).collect();
        let found = self
            .rpc
            .call(
                &format!("model.{model}.search_read"),
                vec![
                    json!([[field, "in", keys]]),
                    json!(0),
                    Value::Null,
                    json!([["id", "ASC"]]),
                    json!([field, "state"]),
                ],
            )
            .await?;
        let mut map: HashMap<String, (i64, String)> = HashMap::new();
        for record in records(&found) {
            let (Some(id), Some(key), Some(state)) = (
                record.get("id").and_then(Value::as_i64),
                record.get(field).and_then(Value::as_str),
                record.get("state").and_then(Value::as_str),
            ) else {
                return Err(RpcError::Request(format!(
                    "a {model} came back without id, {field} or state"
                )));
            };
            let keep = match map.get(key) {
                None => true,
                Some((_, old)) => old == "cancelled" && state != "cancelled",
            };
            if keep {
                map.insert(key.to_string(), (id, state.to_string()));
            }
        }
        Ok(map)
    }

    /// Creates the records (one call, or one per record when the batch is refused) and adds a
    /// draft job for each; refusals go to `out`.
    async fn create_jobs(
        &self,
        model: &'static str,
        records: Vec<Create>,
        jobs: &mut Vec<Job>,
        out: &mut Vec<(usize, Delivery)>,
        label_field: &str,
    ) {
        if records.is_empty() {
            return;
        }
        let method = format!("model.{model}.create");
        let labels: Vec<String> = records
            .iter()
            .map(|record| {
                let reference = record.values.get("reference").and_then(Value::as_str);
                match reference {
                    Some(r) if !label_field.is_empty() => format!("{label_field} {r}"),
                    _ => String::new(),
                }
            })
            .collect();
        let values: Vec<Value> = records.iter().map(|r| r.values.clone()).collect();
        let batch = self.rpc.call(&method, vec![Value::Array(values)]).await;
        let per_record: Vec<Result<i64, RpcError>> = match batch {
            Ok(ids) => match ids.as_array() {
                Some(ids) if ids.len() == records.len() => ids
                    .iter()
                    .map(|id| {
                        id.as_i64()
                            .ok_or_else(|| RpcError::Request(format!("{method} answered {id}")))
                    })
                    .collect(),
                _ => {
                    let e = RpcError::Request(format!("{method} answered {ids}"));
                    records.iter().map(|_| Err(e.clone())).collect()
                }
            },
            Err(RpcError::User(_)) if records.len() > 1 => {
                let mut each = Vec::new();
                for record in &records {
                    let one = self.rpc.call(&method, vec![json!([record.values])]).await;
                    each.push(one.and_then(|ids| {
                        ids.as_array()
                            .and_then(|a| a.first())
                            .and_then(Value::as_i64)
                            .ok_or_else(|| RpcError::Request(format!("{method} answered {ids}")))
                    }));
                }
                each
            }
            Err(e) => records.iter().map(|_| Err(e.clone())).collect(),
        };
        for ((record, result), label) in records.iter().zip(per_record).zip(labels) {
            match result {
                Ok(id) => jobs.push(Job::dated(
                    record.idx,
                    record.date,
                    id,
                    "draft".into(),
                    &label,
                )),
                Err(e) => out.push((
                    record.idx,
                    e.delivery(&format!("creating the {model} dated {}", record.date)),
                )),
            }
        }
    }

    /// Calls the transitions each job still needs, several jobs per call, reading the states
    /// back after each round, until every job reached its target, failed or waits for stock.
    async fn drive(&self, flow: Flow, mut jobs: Vec<Job>) -> Vec<(usize, Delivery)> {
        let model = flow.model();
        let mut out = Vec::new();
        for _ in 0..MAX_ROUNDS {
            // Settle the jobs that need no call, group the others by transition.
            let mut calls: BTreeMap<&'static str, Vec<usize>> = BTreeMap::new();
            for (j, job) in jobs.iter_mut().enumerate() {
                if job.outcome.is_some() {
                    continue;
                }
                let outcome = match flow.next_step(&job.state, job.tried_assign) {
                    // A document that still needs a transition would book moves on its date.
                    Step::Call(method) => match job.closed.take() {
                        Some(refusal) => refusal,
                        None => {
                            calls.entry(method).or_default().push(j);
                            continue;
                        }
                    },
                    Step::Reached => Delivery::Posted {
                        erp_ref: format!("{model}/{}", job.id),
                    },
                    Step::Stuck => Delivery::Waiting {
                        reason: format!(
                            "waiting for stock: Tryton cannot reserve the stock for {} \
                             ({model}/{} stays waiting)",
                            job.describe(flow),
                            job.id
                        ),
                        retry_after: Duration::from_millis(self.config.waiting_retry_ms),
                    },
                    Step::Refused(why) => Delivery::Permanent {
                        reason: format!("{} ({model}/{}) {why}", job.describe(flow), job.id),
                    },
                };
                job.outcome = Some(outcome);
            }
            self.date_jobs(flow, &mut jobs, &mut calls).await;
            if calls.is_empty() {
                break;
            }
            // Jobs whose next state Tryton decides (assign_try): read back after the calls.
            let mut to_read: Vec<usize> = Vec::new();
            for (method, members) in calls {
                let ids: Vec<i64> = {
                    let mut seen = HashSet::new();
                    members
                        .iter()
                        .map(|j| jobs[*j].id)
                        .filter(|id| seen.insert(*id))
                        .collect()
                };
                let results = self.call_each(model, method, &ids).await;
                for j in members {
                    let job = &mut jobs[j];
                    if matches!(method, "assign_try" | "assign_force") {
                        job.tried_assign = true;
                    }
                    match results.get(&job.id) {
                        Some(Err(e)) => {
                            let what = format!("{method} on {model}/{} dated {}", job.id, job.date);
                            job.outcome = Some(e.delivery(&what));
                        }
                        _ => match state_after(method) {
                            Some(state) => job.state = state.to_string(),
                            None => to_read.push(j),
                        },
                    }
                }
            }
            if to_read.is_empty() {
                continue;
            }
            let ids: Vec<i64> = {
                let mut seen = HashSet::new();
                to_read
                    .iter()
                    .map(|j| jobs[*j].id)
                    .filter(|id| seen.insert(*id))
                    .collect()
            };
            let states = self
                .rpc
                .call(
                    &format!("model.{model}.read"),
                    vec![json!(ids), json!(["state"])],
                )
                .await;
            match states {
                Ok(states) => {
                    let states: HashMap<i64, String> = records(&states)
                        .iter()
                        .filter_map(|r| {
                            Some((
                                r.get("id")?.as_i64()?,
                                r.get("state")?.as_str()?.to_string(),
                            ))
                        })
                        .collect();
                    for j in to_read {
                        if let Some(state) = states.get(&jobs[j].id) {
                            jobs[j].state = state.clone();
                        }
                    }
                }
                Err(e) => {
                    for j in to_read {
                        jobs[j].outcome = Some(e.delivery(&format!("reading {model} states")));
                    }
                }
            }
        }
        for job in jobs {
            let delivery = job.outcome.unwrap_or_else(|| Delivery::Transient {
                reason: format!(
                    "{model}/{} did not reach its state in {MAX_ROUNDS} rounds (state {})",
                    job.id, job.state
                ),
                retry_after: None,
            });
            out.push((job.idx, delivery));
        }
        out
    }

    /// Dates the documents of the jobs about to be called, before the transitions book their
    /// moves: a document found rather than created in this delivery gets its date fields before
    /// its first transition, and a pick dates the inventory moves of its customer shipment just
    /// before `pick`. A job whose dating fails leaves the round with that failure.
    async fn date_jobs(
        &self,
        flow: Flow,
        jobs: &mut [Job],
        calls: &mut BTreeMap<&'static str, Vec<usize>>,
    ) {
        let model = flow.model();
        let undated: Vec<usize> = calls
            .values()
            .flatten()
            .copied()
            .filter(|j| !jobs[*j].dated && flow.found_dates(jobs[*j].date).is_some())
            .collect();
        if !undated.is_empty() {
            let targets = date_targets(jobs, &undated);
            let written = self
                .write_dates(model, &targets, |date| {
                    Value::Object(flow.found_dates(date).unwrap_or_default())
                })
                .await;
            for j in undated {
                let job = &mut jobs[j];
                match written.get(&job.id) {
                    Some(Err(e)) => {
                        let what = format!("dating {model}/{} {}", job.id, job.date);
                        job.outcome = Some(e.delivery(&what));
                    }
                    _ => job.dated = true,
                }
            }
        }
        if flow == Flow::Pick
            && let Some(members) = calls.get("pick")
        {
            let picking: Vec<usize> = members
                .iter()
                .copied()
                .filter(|j| jobs[*j].outcome.is_none())
                .collect();
            let written = self
                .date_inventory_moves(&date_targets(jobs, &picking))
                .await;
            for j in picking {
                let job = &mut jobs[j];
                if let Some(Err(e)) = written.get(&job.id) {
                    let what = format!(
                        "dating the inventory moves of {model}/{} {}",
                        job.id, job.date
                    );
                    job.outcome = Some(e.delivery(&what));
                }
            }
        }
        for members in calls.values_mut() {
            members.retain(|j| jobs[*j].outcome.is_none());
        }
        calls.retain(|_, members| !members.is_empty());
    }

    /// Dates the inventory moves (storage to output) of customer shipments about to be picked:
    /// the moves still assigned, which `pick` books; Tryton keeps a date a move already has.
    async fn date_inventory_moves(
        &self,
        shipments: &[(i64, Date)],
    ) -> HashMap<i64, Result<(), RpcError>> {
        if shipments.is_empty() {
            return HashMap::new();
        }
        let shipment_model = Flow::Pick.model();
        let refs: Vec<String> = shipments
            .iter()
            .map(|(id, _)| format!("{shipment_model},{id}"))
            .collect();
        let found = self
            .rpc
            .call(
                "model.stock.move.search_read",
                vec![
                    json!([["shipment", "in", refs], ["state", "=", "assigned"]]),
                    json!(0),
                    Value::Null,
                    Value::Null,
                    json!(["shipment"]),
                ],
            )
            .await;
        let found = match found {
            Ok(found) => found,
            Err(e) => {
                return shipments
                    .iter()
                    .map(|(id, _)| (*id, Err(e.clone())))
                    .collect();
            }
        };
        let date_of: HashMap<i64, Date> = shipments.iter().copied().collect();
        let mut moves: Vec<(i64, Date)> = Vec::new();
        let mut shipment_of: HashMap<i64, i64> = HashMap::new();
        for record in records(&found) {
            let shipment = record
                .get("shipment")
                .and_then(Value::as_str)
                .and_then(|r| r.strip_prefix(shipment_model))
                .and_then(|r| r.strip_prefix(','))
                .and_then(|id| id.parse::<i64>().ok());
            let (Some(id), Some(shipment)) = (record.get("id").and_then(Value::as_i64), shipment)
            else {
                continue;
            };
            if let Some(date) = date_of.get(&shipment) {
                moves.push((id, *date));
                shipment_of.insert(id, shipment);
            }
        }
        let written = self
            .write_dates(
                "stock.move",
                &moves,
                |date| json!({"effective_date": date_value(date)}),
            )
            .await;
        let mut out: HashMap<i64, Result<(), RpcError>> =
            shipments.iter().map(|(id, _)| (*id, Ok(()))).collect();
        for (move_id, result) in written {
            if let (Err(e), Some(shipment)) = (result, shipment_of.get(&move_id)) {
                out.insert(*shipment, Err(e));
            }
        }
        out
    }

    /// Writes date fields on records of `model`, one call for all (grouped by date); when
    /// Tryton refuses the batch, once per record to find which it refuses.
    async fn write_dates(
        &self,
        model: &str,
        targets: &[(i64, Date)],
        values: impl Fn(Date) -> Value,
    ) -> HashMap<i64, Result<(), RpcError>> {
        if targets.is_empty() {
            return HashMap::new();
        }
        let method = format!("model.{model}.write");
        let mut by_date: BTreeMap<Date, Vec<i64>> = BTreeMap::new();
        for (id, date) in targets {
            by_date.entry(*date).or_default().push(*id);
        }
        let mut params = Vec::new();
        for (date, ids) in &by_date {
            params.push(json!(ids));
            params.push(values(*date));
        }
        match self.rpc.call(&method, params).await {
            Ok(_) => targets.iter().map(|(id, _)| (*id, Ok(()))).collect(),
            Err(RpcError::User(_)) if targets.len() > 1 => {
                let mut each = HashMap::new();
                for (id, date) in targets {
                    let one = self
                        .rpc
                        .call(&method, vec![json!([id]), values(*date)])
                        .await;
                    each.insert(*id, one.map(|_| ()));
                }
                each
            }
            Err(e) => targets
                .iter()
                .map(|(id, _)| (*id, Err(e.clone())))
                .collect(),
        }
    }

    /// Calls a transition on all the ids at once; when Tryton refuses the batch, once per id to
    /// find which it refuses.
    async fn call_each(
        &self,
        model: &str,
        method: &str,
        ids: &[i64],
    ) -> HashMap<i64, Result<(), RpcError>> {
        let full = format!("model.{model}.{method}");
        match self.rpc.call(&full, vec![json!(ids)]).await {
            Ok(_) => ids.iter().map(|id| (*id, Ok(()))).collect(),
            Err(RpcError::User(_)) if ids.len() > 1 => {
                let mut each = HashMap::new();
                for id in ids {
                    let one = self.rpc.call(&full, vec![json!([id])]).await.map(|_| ());
                    each.insert(*id, one);
                }
                each
            }
            Err(e) => ids.iter().map(|id| (*id, Err(e.clone()))).collect(),
        }
    }
}

struct OrderShipment {
    id: i64,
    state: String,
    products: HashSet<i64>,
    customer_location: Option<i64>,
    output: Option<i64>,
}

/// The lines a pick or ship adds to an open customer shipment of its order.
struct Extension {
    lines: Vec<Value>,
    /// Whether the shipment must be set back to waiting after (it was waiting or assigned).
    rewait: bool,
    date: Date,
}

/// A document to create for one event, with its date fields.
struct Create {
    idx: usize,
    date: Date,
    values: Value,
}

impl Create {
    fn new(flow: Flow, item: &Prepared<'_>, values: Value) -> Create {
        Create {
            idx: item.idx,
            date: item.date,
            values: with_dates(values, Some(flow.created_dates(item.date))),
        }
    }
}

/// One event's document on its way to the state its event asks for.
struct Job {
    idx: usize,
    id: i64,
    state: String,
    tried_assign: bool,
    label: String,
    outcome: Option<Delivery>,
    /// The date the event's moves are booked on.
    date: Date,
    /// Whether the document already has its date fields (it was made or extended by this
    /// delivery); otherwise they are written before its first transition.
    dated: bool,
    /// The refusal of a date in a closed stock period, given if a transition is needed.
    closed: Option<Delivery>,
}

impl Job {
    /// A job on a document found in Tryton for the event.
    fn found(item: &Prepared<'_>, id: i64, state: String, label: &str) -> Job {
        Job {
            idx: item.idx,
            id,
            state,
            tried_assign: false,
            label: label.to_string(),
            outcome: None,
            date: item.date,
            dated: false,
            closed: item.closed.clone(),
        }
    }

    /// A job on a document this delivery created or extended with its date fields, after
    /// checking the date against the closed periods.
    fn dated(idx: usize, date: Date, id: i64, state: String, label: &str) -> Job {
        Job {
            idx,
            id,
            state,
            tried_assign: false,
            label: label.to_string(),
            outcome: None,
            date,
            dated: true,
            closed: None,
        }
    }

    fn describe(&self, flow: Flow) -> String {
        let what = match flow {
            Flow::Adjust => "the internal shipment",
            Flow::Count => "the inventory",
            Flow::Receive => "the supplier shipment",
            Flow::Pick | Flow::Ship => "the customer shipment",
        };
        if self.label.is_empty() {
            what.to_string()
        } else {
            format!("{what} of {}", self.label)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Adjust,
    Count,
    Receive,
    Pick,
    Ship,
}

enum Step {
    Reached,
    Call(&'static str),
    /// Waiting for stock Tryton cannot reserve.
    Stuck,
    Refused(&'static str),
}

impl Flow {
    fn model(self) -> &'static str {
        match self {
            Flow::Adjust => "stock.shipment.internal",
            Flow::Count => "stock.inventory",
            Flow::Receive => "stock.shipment.in",
            Flow::Pick | Flow::Ship => "stock.shipment.out",
        }
    }

    /// The date fields of a document created for an event of this flow. Tryton copies a
    /// shipment's planned date onto its moves, where it checks closed stock periods.
    fn created_dates(self, date: Date) -> Map<String, Value> {
        let date = date_value(date);
        let fields: &[&str] = match self {
            // Tryton requires a planned start date with an internal shipment's planned date.
            Flow::Adjust => &["effective_date", "planned_date", "planned_start_date"],
            Flow::Receive | Flow::Ship => &["effective_date", "planned_date"],
            Flow::Pick => &["planned_date"],
            Flow::Count => &["date"],
        };
        fields
            .iter()
            .map(|field| (field.to_string(), date.clone()))
            .collect()
    }

    /// The date fields written on a document found for the event (or extended with a line of
    /// it) before its first transition; none for a pick, which dates the moves it picks. A
    /// customer shipment keeps the planned date the ERP gave it.
    fn found_dates(self, date: Date) -> Option<Map<String, Value>> {
        match self {
            Flow::Pick => None,
            Flow::Ship => {
                let mut fields = Map::new();
                fields.insert("effective_date".into(), date_value(date));
                Some(fields)
            }
            Flow::Adjust | Flow::Receive | Flow::Count => Some(self.created_dates(date)),
        }
    }

    /// What a document of this flow in `state` needs next.
    fn next_step(self, state: &str, tried_assign: bool) -> Step {
        const CANCELLED: &str = "is cancelled in Tryton";
        match (self, state) {
            (_, "cancelled") => Step::Refused(CANCELLED),
            (Flow::Count, "draft") => Step::Call("confirm"),
            (Flow::Count, "done") => Step::Reached,
            (Flow::Receive, "draft") => Step::Call("receive"),
            (Flow::Receive, "received") => Step::Call("do"),
            (Flow::Receive, "done") => Step::Reached,
            (Flow::Adjust, "request") => Step::Call("draft"),
            (Flow::Adjust | Flow::Pick | Flow::Ship, "draft") => Step::Call("wait"),
            (Flow::Adjust | Flow::Pick | Flow::Ship, "waiting") if !tried_assign => {
                Step::Call("assign_try")
            }
            (Flow::Adjust, "waiting") => Step::Call("assign_force"),
            (Flow::Pick | Flow::Ship, "waiting") => Step::Stuck,
            (Flow::Adjust, "assigned") => Step::Call("do"),
            (Flow::Adjust, "packed") => Step::Call("ship"),
            (Flow::Adjust, "shipped") => Step::Call("do"),
            (Flow::Adjust, "done") => Step::Reached,
            (Flow::Pick | Flow::Ship, "assigned") => Step::Call("pick"),
            (Flow::Pick, "picked" | "packed" | "shipped" | "done") => Step::Reached,
            (Flow::Ship, "picked") => Step::Call("pack"),
            (Flow::Ship, "packed" | "shipped") => Step::Call("do"),
            (Flow::Ship, "done") => Step::Reached,
            _ => Step::Refused("is in a state this connector does not handle"),
        }
    }
}

/// The state a transition leaves a document in when Tryton accepts it; `None` when Tryton
/// decides (`assign_try` reserves what it can and may leave the document waiting).
fn state_after(method: &str) -> Option<&'static str> {
    Some(match method {
        "draft" => "draft",
        "wait" => "waiting",
        "assign_force" => "assigned",
        "pick" => "picked",
        "pack" => "packed",
        "ship" => "shipped",
        "do" | "confirm" => "done",
        "receive" => "received",
        _ => return None,
    })
}

/// The calendar day of the event's `ts` in its own offset: the warehouse's day as the scanner
/// wrote it.
fn event_date(event: &Event) -> Result<Date, Delivery> {
    time::OffsetDateTime::parse(&event.ts, &time::format_description::well_known::Rfc3339)
        .map(|ts| ts.date())
        .map_err(|e| Delivery::Permanent {
            reason: format!("the event's ts {:?} is not an RFC 3339 time: {e}", event.ts),
        })
}

/// A date as Tryton's JSON-RPC carries it.
fn date_value(date: Date) -> Value {
    json!({
        "__class__": "date",
        "year": date.year(),
        "month": u8::from(date.month()),
        "day": date.day(),
    })
}

/// A date from Tryton's JSON-RPC.
fn tryton_date(value: &Value) -> Option<Date> {
    if value.get("__class__").and_then(Value::as_str) != Some("date") {
        return None;
    }
    let part = |name: &str| value.get(name).and_then(Value::as_i64);
    let year = i32::try_from(part("year")?).ok()?;
    let month = time::Month::try_from(u8::try_from(part("month")?).ok()?).ok()?;
    let day = u8::try_from(part("day")?).ok()?;
    Date::from_calendar_date(year, month, day).ok()
}

/// `values` (an object) with these date fields added.
fn with_dates(mut values: Value, dates: Option<Map<String, Value>>) -> Value {
    if let (Some(object), Some(dates)) = (values.as_object_mut(), dates) {
        object.extend(dates);
    }
    values
}

/// The distinct documents of these jobs with their dates (the latest, should two events of
/// one delivery share a document).
fn date_targets(jobs: &[Job], members: &[usize]) -> Vec<(i64, Date)> {
    let mut by_id: BTreeMap<i64, Date> = BTreeMap::new();
    for j in members {
        let job = &jobs[*j];
        let date = by_id.entry(job.id).or_insert(job.date);
        *date = (*date).max(job.date);
    }
    by_id.into_iter().collect()
}

fn fail_all(items: &[Prepared<'_>], delivery: Delivery) -> Vec<(usize, Delivery)> {
    items.iter().map(|i| (i.idx, delivery.clone())).collect()
}

fn malformed(what: &str) -> Delivery {
    Delivery::Permanent {
        reason: format!("Tryton returned {what} without the fields asked for"),
    }
}

/// The records of a `read` or `search_read` answer.
fn records(value: &Value) -> Vec<&Map<String, Value>> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_object).collect())
        .unwrap_or_default()
}

/// A Many2One field (an id, or null).
fn id_field(record: &Map<String, Value>, field: &str) -> Option<i64> {
    record.get(field).and_then(Value::as_i64)
}

/// A One2Many field (a list of ids).
fn ids_field<'a>(record: &'a Map<String, Value>, field: &str) -> impl Iterator<Item = i64> + 'a {
    record
        .get(field)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_i64)
}

fn decimal(text: &str) -> Value {
    json!({"__class__": "Decimal", "decimal": text})
}

/// Tryton's quantities are floats: the exact decimal text becomes the nearest float.
fn quantity(text: &str) -> Value {
    text.parse::<f64>().map(|q| json!(q)).unwrap_or(Value::Null)
}

fn lock<T>(mutex: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_REASON_CHARS {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(MAX_REASON_CHARS).collect();
        cut.push('…');
        cut
    }
}

// ----- JSON-RPC ------------------------------------------------------------------------------

/// What went wrong with one JSON-RPC call.
#[derive(Debug, Clone)]
enum RpcError {
    /// Worth retrying: busy, unreachable, timed out, rate limited, login refused.
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Tryton (or a proxy before it) asks every caller to slow down: 429, 503.
    Throttled {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// Tryton's `UserError`: its message.
    User(String),
    /// The request itself was wrong: `[text, traceback]`, 400, 403, 422.
    Request(String),
}

impl RpcError {
    fn message(&self) -> &str {
        match self {
            RpcError::Transient { reason, .. } | RpcError::Throttled { reason, .. } => reason,
            RpcError::User(message) | RpcError::Request(message) => message,
        }
    }

    fn delivery(&self, what: &str) -> Delivery {
        match self {
            RpcError::Transient {
                reason,
                retry_after,
            } => Delivery::Transient {
                reason: format!("{what}: {reason}"),
                retry_after: *retry_after,
            },
            RpcError::Throttled {
                reason,
                retry_after,
            } => Delivery::Throttled {
                reason: format!("{what}: {reason}"),
                retry_after: *retry_after,
            },
            RpcError::User(message) => Delivery::Permanent {
                reason: format!("Tryton refused {what}: {message}"),
            },
            RpcError::Request(message) => Delivery::Permanent {
                reason: format!(
                    "Tryton could not process {what} (a bug in the connector's request): {message}"
                ),
            },
        }
    }
}

struct Rpc {
    client: reqwest::Client,
    endpoint: Url,
    username: String,
    password: Secret,
    context: Value,
    /// The `Authorization` header of the current session, when logged in.
    session: StdMutex<Option<Arc<str>>>,
    login_lock: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
}

/// One answer of the server, before retries.
enum Answer {
    Result(Value),
    Unauthorized,
    Warning { name: String, message: String },
    Failed(RpcError),
}

impl Rpc {
    /// Calls `method` with `params` and the context as the last parameter; logs in when
    /// needed, once more after a 401, and acknowledges user warnings.
    async fn call(&self, method: &str, mut params: Vec<Value>) -> Result<Value, RpcError> {
        params.push(self.context.clone());
        let params = Value::Array(params);
        let mut relogged = false;
        let mut warnings = 0;
        loop {
            let auth = self.session().await?;
            match self.post(method, &params, Some(&auth)).await {
                Answer::Result(value) => return Ok(value),
                Answer::Failed(e) => return Err(e),
                Answer::Unauthorized if !relogged => {
                    relogged = true;
                    let mut session = lock(&self.session);
                    if session.as_ref() == Some(&auth) {
                        *session = None;
                    }
                }
                Answer::Unauthorized => {
                    return Err(RpcError::Transient {
                        reason: format!(
                            "Tryton answered 401 to {method} right after a fresh login of {:?}",
                            self.username
                        ),
                        retry_after: Some(SETUP_RETRY),
                    });
                }
                Answer::Warning { name, message } => {
                    warnings += 1;
                    if warnings > MAX_WARNINGS_PER_CALL {
                        return Err(RpcError::User(format!(
                            "warning after warning from {method}, the last: {}",
                            truncate(&message)
                        )));
                    }
                    let skip = json!([name, false, self.context]);
                    match self
                        .post("model.res.user.warning.skip", &skip, Some(&auth))
                        .await
                    {
                        Answer::Result(_) => {}
                        Answer::Unauthorized => {}
                        Answer::Warning { message, .. } => {
                            return Err(RpcError::Request(format!(
                                "acknowledging a warning raised another: {message}"
                            )));
                        }
                        Answer::Failed(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// The current session's `Authorization` header, logging in first when there is none.
    async fn session(&self) -> Result<Arc<str>, RpcError> {
        if let Some(auth) = lock(&self.session).clone() {
            return Ok(auth);
        }
        let _one_login = self.login_lock.lock().await;
        if let Some(auth) = lock(&self.session).clone() {
            return Ok(auth);
        }
        let params = json!([self.username, {"password": self.password.expose()}, "en"]);
        let refused = |detail: &str| RpcError::Transient {
            reason: format!(
                "Tryton refused the login of {:?} ({detail}): check sink.tryton.username and \
                 password",
                self.username
            ),
            retry_after: Some(SETUP_RETRY),
        };
        let result = match self.post("common.db.login", &params, None).await {
            Answer::Result(result) => result,
            Answer::Unauthorized => return Err(refused("HTTP 401")),
            Answer::Warning { message, .. } => return Err(refused(&message)),
            Answer::Failed(RpcError::Transient {
                reason,
                retry_after,
            }) => {
                return Err(RpcError::Transient {
                    reason: format!("logging in: {reason}"),
                    retry_after,
                });
            }
            Answer::Failed(RpcError::Throttled {
                reason,
                retry_after,
            }) => {
                return Err(RpcError::Throttled {
                    reason: format!("logging in: {reason}"),
                    retry_after,
                });
            }
            Answer::Failed(e) => return Err(refused(e.message())),
        };
        let (Some(user_id), Some(token)) = (
            result.get(0).and_then(Value::as_i64),
            result.get(1).and_then(Value::as_str),
        ) else {
            return Err(refused(&format!(
                "unexpected answer {}",
                truncate(&result.to_string())
            )));
        };
        let credentials = format!("{}:{user_id}:{token}", self.username);
        let auth: Arc<str> = format!("Session {}", BASE64.encode(credentials.as_bytes())).into();
        *lock(&self.session) = Some(auth.clone());
        Ok(auth)
    }

    /// One HTTP request: `{"id", "method", "params"}` and nothing else (a `jsonrpc` member
    /// switches Tryton to HTML errors).
    async fn post(&self, method: &str, params: &Value, auth: Option<&str>) -> Answer {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = json!({"id": id, "method": method, "params": params});
        let mut request = self.client.post(self.endpoint.clone()).json(&body);
        if let Some(auth) = auth {
            request = request.header(AUTHORIZATION, auth);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(e) => return Answer::Failed(transport_error(method, &e)),
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let text = match response.text().await {
            Ok(text) => text,
            Err(e) => return Answer::Failed(transport_error(method, &e)),
        };
        match status {
            StatusCode::OK => {}
            StatusCode::UNAUTHORIZED => return Answer::Unauthorized,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => {
                return Answer::Failed(RpcError::Throttled {
                    reason: format!(
                        "Tryton is asking for fewer requests (HTTP {}) to {method}",
                        status.as_u16()
                    ),
                    retry_after,
                });
            }
            StatusCode::NOT_FOUND => {
                return Answer::Failed(RpcError::Transient {
                    reason: format!(
                        "Tryton answered 404 at {}: is sink.tryton.database a database the \
                         server was started with?",
                        self.endpoint
                    ),
                    retry_after: Some(SETUP_RETRY),
                });
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                return Answer::Failed(RpcError::Transient {
                    reason: format!(
                        "Tryton answered HTTP {} to {method}: {}",
                        s.as_u16(),
                        html_text(&text)
                    ),
                    retry_after,
                });
            }
            s => {
                return Answer::Failed(RpcError::Request(format!(
                    "HTTP {} to {method}: {}",
                    s.as_u16(),
                    html_text(&text)
                )));
            }
        }
        let answer: Value = match serde_json::from_str(&text) {
            Ok(answer) => answer,
            Err(e) => {
                return Answer::Failed(RpcError::Transient {
                    reason: format!(
                        "Tryton's answer to {method} is not JSON ({e}): {}",
                        truncate(&text)
                    ),
                    retry_after: None,
                });
            }
        };
        match answer.get("error") {
            None | Some(Value::Null) => match answer.get("result") {
                Some(result) => Answer::Result(result.clone()),
                None => Answer::Failed(RpcError::Request(format!(
                    "Tryton's answer to {method} has neither result nor error"
                ))),
            },
            Some(error) => classify_error(method, error),
        }
    }
}

/// Sorts Tryton's `error` member.
fn classify_error(method: &str, error: &Value) -> Answer {
    let kind = error.get(0).and_then(Value::as_str).unwrap_or_default();
    let args = error.get(1).unwrap_or(&Value::Null);
    let arg = |i: usize| args.get(i).and_then(Value::as_str).unwrap_or_default();
    match kind {
        "UserError" => {
            let (message, description) = (arg(0), arg(1));
            let text = if description.is_empty() {
                message.to_string()
            } else {
                format!("{message} ({description})")
            };
            Answer::Failed(RpcError::User(truncate(&text)))
        }
        "UserWarning" => Answer::Warning {
            name: arg(0).to_string(),
            message: arg(1).to_string(),
        },
        "ConcurrencyException" => Answer::Failed(RpcError::Transient {
            reason: format!("Tryton answered {kind} to {method}"),
            retry_after: None,
        }),
        "RateLimitException" => Answer::Failed(RpcError::Throttled {
            reason: format!("Tryton answered {kind} to {method}"),
            retry_after: None,
        }),
        "LoginException" => Answer::Unauthorized,
        text => {
            let text = if text.is_empty() {
                error.to_string()
            } else {
                text.to_string()
            };
            let lowered = text.to_ascii_lowercase();
            if lowered.contains("database is locked") || lowered.contains("could not serialize") {
                Answer::Failed(RpcError::Transient {
                    reason: format!("Tryton is busy ({}) for {method}", truncate(&text)),
                    retry_after: None,
                })
            } else {
                Answer::Failed(RpcError::Request(format!("{method}: {}", truncate(&text))))
            }
        }
    }
}

fn transport_error(method: &str, e: &reqwest::Error) -> RpcError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "failed"
    };
    RpcError::Transient {
        reason: format!("{method} {what}: {e}"),
        retry_after: None,
    }
}

/// The readable part of an HTML error page (Werkzeug puts it in the last `<p>`).
fn html_text(body: &str) -> String {
    let text = body
        .rsplit_once("<p>")
        .map(|(_, p)| p.split("</p>").next().unwrap_or(p))
        .unwrap_or(body)
        .trim();
    truncate(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_transcript() {
        let token = "33ddc79f71ba8eb3e09118beb02051295c3c160f7b7a56e4e24654fc2a148d49";
        assert_eq!(
            BASE64.encode(format!("admin:1:{token}").as_bytes()),
            "YWRtaW46MTozM2RkYzc5ZjcxYmE4ZWIzZTA5MTE4YmViMDIwNTEyOTVjM2MxNjBmN2I3YTU2ZTRlMjQ2NTRmYzJhMTQ4ZDQ5"
        );
        assert_eq!(BASE64.encode(b"a"), "YQ==");
        assert_eq!(BASE64.encode(b"ab"), "YWI=");
        assert_eq!(BASE64.encode(b""), "");
    }

    #[test]
    fn errors_are_sorted() {
        let user = json!(["UserError", ["You can not call \"do\".", "", null]]);
        assert!(matches!(
            classify_error("m", &user),
            Answer::Failed(RpcError::User(m)) if m == "You can not call \"do\"."
        ));
        let warning = json!(["UserWarning", ["abc.done", "no origin", ""]]);
        assert!(matches!(
            classify_error("m", &warning),
            Answer::Warning { name, .. } if name == "abc.done"
        ));
        let bug = json!(["'foo'", ""]);
        assert!(matches!(
            classify_error("m", &bug),
            Answer::Failed(RpcError::Request(m)) if m.contains("'foo'")
        ));
    }

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

    fn event_at(ts: &str) -> Event {
        let json = format!(
            r#"{{"v":1,"id":"e-1","type":"adjust","ts":"{ts}","sku":"SKU-1","qty":1,"reason":"found"}}"#
        );
        match backhaul_events::event::parse_event(json.as_bytes()) {
            Ok(event) => event,
            Err(v) => panic!("invalid test event: {v}"),
        }
    }

    fn date(year: i32, month: u8, day: u8) -> Date {
        let month = time::Month::try_from(month).unwrap();
        Date::from_calendar_date(year, month, day).unwrap()
    }

    #[test]
    fn an_event_is_dated_by_its_own_offsets_day() {
        let day = |ts: &str| event_date(&event_at(ts)).unwrap();
        assert_eq!(day("2026-11-12T23:30:00-05:00"), date(2026, 11, 12));
        assert_eq!(day("2026-11-12T06:00:00+09:00"), date(2026, 11, 12));
        assert_eq!(day("2026-11-12T00:00:00Z"), date(2026, 11, 12));
        assert_eq!(day("2026-12-31T23:59:59.999+14:00"), date(2026, 12, 31));
        let mut bad = event_at("2026-11-12T00:00:00Z");
        bad.ts = "12/11/2026".into();
        assert!(matches!(
            event_date(&bad),
            Err(Delivery::Permanent { reason }) if reason.contains("12/11/2026")
        ));
    }

    #[test]
    fn dates_travel_as_tryton_writes_them() {
        let value = date_value(date(2026, 2, 28));
        assert_eq!(
            value,
            json!({"__class__": "date", "year": 2026, "month": 2, "day": 28})
        );
        assert_eq!(tryton_date(&value), Some(date(2026, 2, 28)));
        let invalid = json!({"__class__": "date", "year": 2026, "month": 2, "day": 30});
        assert_eq!(tryton_date(&invalid), None);
        let datetime = json!({"__class__": "datetime", "year": 2026, "month": 2, "day": 3});
        assert_eq!(tryton_date(&datetime), None);
        assert_eq!(tryton_date(&Value::Null), None);
    }

    #[test]
    fn a_calendar_serves_only_dates_it_has_nothing_to_say_about() {
        let calendar = Calendar {
            today: date(2026, 11, 22),
            closed_until: Some(date(2026, 10, 31)),
            read_at: Instant::now(),
        };
        assert!(calendar.quiet(&[date(2026, 11, 1), date(2026, 11, 22)]));
        assert!(!calendar.quiet(&[date(2026, 11, 1), date(2026, 11, 23)]));
        assert!(!calendar.quiet(&[date(2026, 10, 31)]));
        let open = Calendar {
            closed_until: None,
            ..calendar
        };
        assert!(open.quiet(&[date(2000, 1, 1)]));
    }

    #[test]
    fn date_fields_per_document() {
        let day = date(2026, 11, 12);
        let keys = |fields: Map<String, Value>| fields.keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            keys(Flow::Adjust.created_dates(day)),
            ["effective_date", "planned_date", "planned_start_date"]
        );
        assert_eq!(keys(Flow::Count.created_dates(day)), ["date"]);
        assert_eq!(keys(Flow::Pick.created_dates(day)), ["planned_date"]);
        assert_eq!(Flow::Pick.found_dates(day), None);
        // A customer shipment the ERP planned keeps its planned date.
        assert_eq!(
            Flow::Ship.found_dates(day).map(keys),
            Some(vec!["effective_date".to_string()])
        );
        let values = with_dates(json!({"reference": "r"}), Flow::Ship.found_dates(day));
        assert_eq!(values["effective_date"], date_value(day));
        assert_eq!(values["reference"], "r");
    }

    #[test]
    fn ship_and_pick_steps() {
        assert!(matches!(Flow::Pick.next_step("done", false), Step::Reached));
        assert!(matches!(Flow::Pick.next_step("waiting", true), Step::Stuck));
        assert!(matches!(
            Flow::Adjust.next_step("waiting", true),
            Step::Call("assign_force")
        ));
        assert!(matches!(
            Flow::Ship.next_step("picked", false),
            Step::Call("pack")
        ));
        assert!(matches!(
            Flow::Receive.next_step("cancelled", false),
            Step::Refused(_)
        ));
    }
}
