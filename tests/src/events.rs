//! Valid v1 events with unique ids, invalid ones with the exact text a sender should see, and
//! the check that a stored event is what was sent.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

use crate::agent::SITE;

/// The `ts` of the generated events: the scanner's clock, kept exactly as sent. Nothing the
/// agent or relay decides depends on it; tests whose outcome depends on the day (an ERP that
/// books documents on the event's date) use [`scan_ts`] instead.
pub const TS: &str = "2026-11-22T10:15:00.123Z";

/// The instant this test process first asked, as RFC 3339 in UTC: a `ts` on the real day, the
/// same for every event of one test, so that no test holds only until a fixed date passes and
/// none sees its events split across midnight.
pub fn scan_ts() -> &'static str {
    static SCAN_TS: OnceLock<String> = OnceLock::new();
    SCAN_TS.get_or_init(|| {
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|e| panic!("formatting the current time: {e}"))
    })
}

/// An id no other event of this or any other test run uses: the prefix, this process and a
/// counter (`A-Z a-z 0-9 . _ : -`, at most 64 characters when the prefix is short).
pub fn unique_id(prefix: &str) -> String {
    static RUN: OnceLock<String> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let run = RUN.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{:x}{:x}", std::process::id(), nanos % (1 << 40))
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let id = format!("{prefix}-{run}-{n}");
    assert!(id.len() <= 64, "id {id} is too long: use a shorter prefix");
    id
}

/// A pick of 2 of SKU-001 for `order`.
pub fn pick(id: &str, order: &str) -> Value {
    json!({"v": 1, "id": id, "type": "pick", "ts": TS, "order": order, "line": 1,
           "sku": "SKU-001", "qty": "2", "uom": "EA", "location": "A-01-03"})
}

/// A shipment of one line of `order`.
pub fn ship(id: &str, order: &str) -> Value {
    json!({"v": 1, "id": id, "type": "ship", "ts": TS, "order": order, "line": 2,
           "sku": "SKU-002", "qty": "5", "carrier": "DHL", "tracking": "JD0000001"})
}

/// A receipt against purchase order `po`.
pub fn receive(id: &str, sku: &str, po: &str) -> Value {
    json!({"v": 1, "id": id, "type": "receive", "ts": TS, "sku": sku, "qty": "12.5",
           "uom": "KG", "location": "DOCK-1", "po": po, "lot": "L-77"})
}

/// A stock adjustment (`qty` may be negative, never 0).
pub fn adjust(id: &str, sku: &str, qty: &str, reason: &str) -> Value {
    json!({"v": 1, "id": id, "type": "adjust", "ts": TS, "sku": sku, "qty": qty,
           "location": "B-02-01", "reason": reason})
}

/// A stock count of `sku` at `location` (`qty` ≥ 0).
pub fn count(id: &str, sku: &str, location: &str, qty: &str) -> Value {
    json!({"v": 1, "id": id, "type": "count", "ts": TS, "sku": sku, "qty": qty,
           "location": location})
}

/// One event of each type with a fresh id, together using every optional field (`device`,
/// `lot`, `serial`, `attrs`, a numeric `qty`, a default `uom`).
pub fn one_of_each(prefix: &str) -> Vec<Value> {
    let mut serial_pick = pick(&unique_id(prefix), "SO-1001");
    serial_pick["serial"] = json!("SN-0001");
    serial_pick["attrs"] = json!({"shift": "night", "wave": "7"});
    serial_pick["qty"] = json!(3);
    let mut ship = ship(&unique_id(prefix), "SO-1001");
    ship["device"] = json!("packing-station-2");
    let mut count = count(&unique_id(prefix), "SKU-004", "C-03-02", "0");
    count["lot"] = json!("L-12");
    vec![
        serial_pick,
        ship,
        receive(&unique_id(prefix), "SKU-003", "PO-55"),
        adjust(&unique_id(prefix), "SKU-003", "-1.25", "damaged"),
        count,
    ]
}

pub fn to_bytes(event: &Value) -> Vec<u8> {
    serde_json::to_vec(event).expect("JSON")
}

pub fn id_of(event: &Value) -> &str {
    event["id"].as_str().expect("the event has a string id")
}

/// `qty` as the agent stores it: exact decimal text.
fn qty_text(qty: &Value) -> Value {
    match qty {
        Value::Number(n) => Value::String(n.to_string()),
        other => other.clone(),
    }
}

/// Asserts that a record of `/v1/log` is the event that was sent, field by field: every sent
/// field unchanged (`qty` as exact text), `uom` defaulted to EA, `device` defaulted to
/// `topic_device` (the device of the MQTT topic; `None` for HTTP), the agent's stamps, and
/// nothing else.
#[track_caller]
pub fn assert_stored_as_sent(sent: &Value, stored: &Value, topic_device: Option<&str>) {
    let id = id_of(sent);
    let sent = sent.as_object().expect("the sent event is an object");
    let stored_map = stored.as_object().expect("the stored event is an object");
    for (field, value) in sent {
        let want = if field == "qty" {
            qty_text(value)
        } else {
            value.clone()
        };
        assert_eq!(
            stored.get(field),
            Some(&want),
            "event {id}: field {field} was sent as {value} but stored as {:?}\nstored: {stored}",
            stored.get(field)
        );
    }
    let mut allowed: Vec<&str> = sent.keys().map(String::as_str).collect();
    allowed.extend(["site", "epoch", "seq", "received_at_ms", "uom"]);
    if !sent.contains_key("uom") {
        assert_eq!(stored["uom"], "EA", "event {id}: uom defaults to EA");
    }
    if !sent.contains_key("device") {
        match topic_device {
            Some(device) => {
                assert_eq!(
                    stored["device"], device,
                    "event {id}: device defaults to the topic's device"
                );
                allowed.push("device");
            }
            None => assert!(
                stored.get("device").is_none(),
                "event {id}: no device was sent, yet one was stored: {stored}"
            ),
        }
    }
    assert_eq!(stored["site"], SITE, "event {id}: site");
    assert!(
        stored["seq"].as_u64().is_some_and(|s| s > 0),
        "event {id}: seq"
    );
    assert!(
        stored["epoch"].as_str().is_some_and(|e| e.len() == 32),
        "event {id}: epoch"
    );
    assert!(
        stored["received_at_ms"].as_i64().is_some_and(|t| t > 0),
        "event {id}: received_at_ms"
    );
    for field in stored_map.keys() {
        assert!(
            allowed.contains(&field.as_str()),
            "event {id}: field {field} was stored but never sent: {stored}"
        );
    }
}

/// An event that breaks rules, and the violations (each `field: rule`) the sender must see.
#[derive(Debug, Clone)]
pub struct RuleCase {
    pub name: &'static str,
    /// The payload exactly as sent.
    pub payload: Vec<u8>,
    /// Each violation's full text; an entry ending in `…` only has to be a prefix (for texts
    /// that quote a JSON parser's message).
    pub expected: Vec<String>,
    /// The payload is a JSON value, so it can be an element of an HTTP array.
    pub is_json: bool,
}

impl RuleCase {
    /// Whether `actual` (the violations in order, each `field: rule`) is what was expected.
    pub fn matches(&self, actual: &[String]) -> bool {
        actual.len() == self.expected.len()
            && self
                .expected
                .iter()
                .zip(actual)
                .all(|(want, got)| match want.strip_suffix('…') {
                    Some(prefix) => got.starts_with(prefix),
                    None => got == want,
                })
    }

    /// The fields the violations name (the text before the first `: `).
    pub fn fields(&self) -> Vec<String> {
        self.expected
            .iter()
            .map(|e| e.split_once(": ").map(|(f, _)| f).unwrap_or("").to_string())
            .collect()
    }
}

fn case(name: &'static str, event: Value, expected: &[&str]) -> RuleCase {
    RuleCase {
        name,
        payload: to_bytes(&event),
        expected: expected.iter().map(|s| s.to_string()).collect(),
        is_json: true,
    }
}

fn raw_case(name: &'static str, payload: &str, is_json: bool, expected: &[&str]) -> RuleCase {
    RuleCase {
        name,
        payload: payload.as_bytes().to_vec(),
        expected: expected.iter().map(|s| s.to_string()).collect(),
        is_json,
    }
}

fn with(mut event: Value, field: &str, v: Value) -> Value {
    event[field] = v;
    event
}

fn without(mut event: Value, field: &str) -> Value {
    event.as_object_mut().expect("object").remove(field);
    event
}

/// Every validation rule of the v1 event (README, "The event"), each broken on its own, plus
/// one event breaking several at once. Ids are fresh, so none can collide with a stored event.
pub fn rule_cases() -> Vec<RuleCase> {
    let p = || pick(&unique_id("rule"), "SO-1");
    const QTY_SYNTAX: &str =
        "qty: must be a decimal number (like 2 or \"1.5\") of at most 28 significant digits";
    const TS_RULE: &str =
        "ts: must be an RFC 3339 timestamp with an offset, like 2026-11-22T10:15:00.123Z";
    let big = with(p(), "attrs", json!({"blob": "x".repeat(200)}));
    let mut attrs = serde_json::Map::new();
    for i in 0..80 {
        attrs.insert(format!("k{i}"), json!("y".repeat(200)));
    }
    let too_big = with(big, "attrs", Value::Object(attrs));
    let too_big_len = to_bytes(&too_big).len();
    let too_big_text = format!("event: must be at most 16384 bytes of JSON (got {too_big_len})");
    let dup_id = unique_id("rule");
    vec![
        case(
            "v missing",
            without(p(), "v"),
            &["v: is required (the event format version, 1)"],
        ),
        case(
            "v is 2",
            with(p(), "v", json!(2)),
            &["v: must be 1 (the only event format version)"],
        ),
        case("id missing", without(p(), "id"), &["id: is required"]),
        case(
            "id with a space",
            with(p(), "id", json!("bad id")),
            &["id: must contain only the characters A-Z a-z 0-9 . _ : -"],
        ),
        case(
            "id of 65 characters",
            with(p(), "id", json!("i".repeat(65))),
            &["id: must be at most 64 characters (got 65)"],
        ),
        case(
            "unknown type",
            with(p(), "type", json!("teleport")),
            &["type: must be one of \"pick\", \"ship\", \"receive\", \"adjust\", \"count\""],
        ),
        case("type missing", without(p(), "type"), &["type: is required"]),
        case(
            "ts not a timestamp",
            with(p(), "ts", json!("yesterday")),
            &[TS_RULE],
        ),
        case(
            "ts without an offset",
            with(p(), "ts", json!("2026-11-22T10:15:00")),
            &[TS_RULE],
        ),
        case("ts missing", without(p(), "ts"), &["ts: is required"]),
        case("sku missing", without(p(), "sku"), &["sku: is required"]),
        case(
            "sku of 257 characters",
            with(p(), "sku", json!("S".repeat(257))),
            &["sku: must be at most 256 characters (got 257)"],
        ),
        case(
            "sku with a control character",
            with(p(), "sku", json!("SKU\u{1}1")),
            &["sku: must not contain control characters"],
        ),
        case(
            "sku a number",
            with(p(), "sku", json!(42)),
            &["sku: must be a string"],
        ),
        case("qty missing", without(p(), "qty"), &["qty: is required"]),
        case(
            "qty 0 for pick",
            with(p(), "qty", json!(0)),
            &["qty: must be greater than 0 for pick"],
        ),
        case(
            "qty negative for ship",
            ship(&unique_id("rule"), "SO-1").tap_set("qty", json!("-1")),
            &["qty: must be greater than 0 for ship"],
        ),
        case(
            "qty 0 for receive",
            receive(&unique_id("rule"), "SKU-1", "PO-1").tap_set("qty", json!("0")),
            &["qty: must be greater than 0 for receive"],
        ),
        case(
            "qty 0 for adjust",
            adjust(&unique_id("rule"), "SKU-1", "0", "lost"),
            &["qty: must not be 0 for adjust"],
        ),
        case(
            "qty negative for count",
            count(&unique_id("rule"), "SKU-1", "A-1", "-1"),
            &["qty: must be 0 or greater for count"],
        ),
        case(
            "qty not a number",
            with(p(), "qty", json!("two")),
            &[QTY_SYNTAX],
        ),
        case(
            "qty with a plus sign",
            with(p(), "qty", json!("+1")),
            &[QTY_SYNTAX],
        ),
        case(
            "qty beyond 96 bits",
            with(p(), "qty", json!("79228162514264337593543950336")),
            &[QTY_SYNTAX],
        ),
        case(
            "order missing for pick",
            without(p(), "order"),
            &["order: is required for pick"],
        ),
        case(
            "order missing for ship",
            without(ship(&unique_id("rule"), "SO-1"), "order"),
            &["order: is required for ship"],
        ),
        case(
            "reason missing for adjust",
            without(adjust(&unique_id("rule"), "SKU-1", "1", "x"), "reason"),
            &["reason: is required for adjust"],
        ),
        case(
            "location missing for count",
            without(count(&unique_id("rule"), "SKU-1", "A-1", "3"), "location"),
            &["location: is required for count"],
        ),
        case(
            "carrier on a pick",
            with(p(), "carrier", json!("DHL")),
            &["carrier: is only allowed for ship, not pick"],
        ),
        case(
            "tracking on a count",
            count(&unique_id("rule"), "SKU-1", "A-1", "3").tap_set("tracking", json!("T1")),
            &["tracking: is only allowed for ship, not count"],
        ),
        case(
            "po on a ship",
            ship(&unique_id("rule"), "SO-1").tap_set("po", json!("PO-1")),
            &["po: is only allowed for receive, not ship"],
        ),
        case(
            "unknown field",
            with(p(), "colour", json!("red")),
            &["colour: is not a field of the v1 event"],
        ),
        case(
            "site sent by the scanner",
            with(p(), "site", json!("wh-west")),
            &["site: is set by the agent from its configuration and must not be sent"],
        ),
        case(
            "empty lot",
            with(p(), "lot", json!("")),
            &["lot: must not be empty"],
        ),
        case(
            "uom of 17 characters",
            with(p(), "uom", json!("U".repeat(17))),
            &["uom: must be at most 16 characters (got 17)"],
        ),
        case(
            "line 0",
            with(p(), "line", json!(0)),
            &["line: must be a whole number from 1 to 4294967295"],
        ),
        case(
            "attrs value not a string",
            with(p(), "attrs", json!({"wave": 7})),
            &["attrs.wave: must be a string"],
        ),
        case(
            "attrs not an object",
            with(p(), "attrs", json!(["a"])),
            &["attrs: must be an object of string values"],
        ),
        raw_case(
            "a field twice",
            &format!(
                r#"{{"v":1,"id":"{dup_id}","type":"count","ts":"{TS}","sku":"S","qty":1,"location":"A","location":"B"}}"#
            ),
            true,
            &["location: appears more than once"],
        ),
        RuleCase {
            name: "over 16 KiB",
            payload: to_bytes(&too_big),
            expected: vec![too_big_text],
            is_json: true,
        },
        raw_case(
            "not an object",
            "\"pick 2 of SKU-001\"",
            true,
            &["event: must be a JSON object"],
        ),
        raw_case(
            "not JSON",
            "pick SKU-001 x2",
            false,
            &["event: is not valid JSON: …"],
        ),
        case(
            "several rules at once",
            json!({"v": 1, "id": unique_id("rule"), "type": "pick", "ts": TS, "sku": "SKU-1",
                   "qty": 0, "colour": "red"}),
            &[
                "colour: is not a field of the v1 event",
                "qty: must be greater than 0 for pick",
                "order: is required for pick",
            ],
        ),
    ]
}

trait TapSet {
    fn tap_set(self, field: &str, v: Value) -> Value;
}

impl TapSet for Value {
    fn tap_set(self, field: &str, v: Value) -> Value {
        with(self, field, v)
    }
}
