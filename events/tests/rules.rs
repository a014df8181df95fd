//! Every validation rule of the v1 event, with the exact text a sender sees when breaking it.

use std::collections::BTreeMap;
use std::str::FromStr;

use backhaul_events::event::{MAX_EVENT_BYTES, parse_event};
use backhaul_events::{Event, EventType};
use rust_decimal::Decimal;
use serde_json::{Value, json};

const QTY_SYNTAX: &str =
    "qty: must be a decimal number (like 2 or \"1.5\") of at most 28 significant digits";
const TS_RULE: &str =
    "ts: must be an RFC 3339 timestamp with an offset, like 2026-11-22T10:15:00.123Z";

/// A minimal valid event of each type.
fn valid(kind: &str) -> Value {
    let mut event = json!({
        "v": 1,
        "id": "evt-0001",
        "type": kind,
        "ts": "2026-11-22T10:15:00.123Z",
        "sku": "SKU-001",
        "qty": 2,
    });
    match kind {
        "pick" | "ship" => event["order"] = json!("SO-1001"),
        "adjust" => event["reason"] = json!("damaged"),
        "count" => event["location"] = json!("A-01-03"),
        _ => {}
    }
    event
}

fn with(mut event: Value, field: &str, value: Value) -> Value {
    event[field] = value;
    event
}

fn without(mut event: Value, field: &str) -> Value {
    event.as_object_mut().unwrap().remove(field);
    event
}

fn parse(event: &Value) -> Result<Event, Vec<String>> {
    parse_event(&serde_json::to_vec(event).unwrap()).map_err(|v| v.lines())
}

/// The violations of raw bytes, each as `field: rule`.
fn violations_of(bytes: &[u8]) -> Vec<String> {
    match parse_event(bytes) {
        Ok(event) => panic!("{} parsed: {event:?}", String::from_utf8_lossy(bytes)),
        Err(violations) => violations.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts that the event breaks exactly one rule, with exactly this text.
#[track_caller]
fn assert_only(event: &Value, expected: &str) {
    assert_eq!(
        violations_of(&serde_json::to_vec(event).unwrap()),
        [expected],
        "for {event}"
    );
}

#[track_caller]
fn assert_valid(event: &Value) -> Event {
    match parse(event) {
        Ok(parsed) => parsed,
        Err(violations) => panic!("{event} refused: {violations:?}"),
    }
}

fn dec(text: &str) -> Decimal {
    Decimal::from_str(text).unwrap()
}

#[test]
fn the_minimal_events_are_valid() {
    for kind in EventType::ALL {
        let event = assert_valid(&valid(kind.as_str()));
        assert_eq!(event.kind, kind);
        assert_eq!(event.uom, "EA", "uom defaults to EA");
    }
}

// --- v ---

#[test]
fn v_is_required() {
    assert_only(
        &without(valid("pick"), "v"),
        "v: is required (the event format version, 1)",
    );
    assert_only(
        &with(valid("pick"), "v", Value::Null),
        "v: is required (the event format version, 1)",
    );
}

#[test]
fn v_must_be_1() {
    for v in [json!(2), json!(0), json!("1"), json!(true), json!([1])] {
        assert_only(
            &with(valid("pick"), "v", v),
            "v: must be 1 (the only event format version)",
        );
    }
    // The literal 1 only: 1.0 and 1e0 are refused too.
    for text in ["1.0", "1e0"] {
        let raw = format!(
            r#"{{"v":{text},"id":"e1","type":"receive","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1}}"#
        );
        assert_eq!(
            violations_of(raw.as_bytes()),
            ["v: must be 1 (the only event format version)"]
        );
    }
}

// --- id ---

#[test]
fn id_is_required() {
    assert_only(&without(valid("pick"), "id"), "id: is required");
    assert_only(&with(valid("pick"), "id", Value::Null), "id: is required");
}

#[test]
fn id_must_be_a_string() {
    assert_only(
        &with(valid("pick"), "id", json!(42)),
        "id: must be a string",
    );
}

#[test]
fn id_must_not_be_empty() {
    assert_only(
        &with(valid("pick"), "id", json!("")),
        "id: must not be empty",
    );
}

#[test]
fn id_is_at_most_64_characters() {
    assert_valid(&with(valid("pick"), "id", json!("a".repeat(64))));
    assert_only(
        &with(valid("pick"), "id", json!("a".repeat(65))),
        "id: must be at most 64 characters (got 65)",
    );
}

#[test]
fn id_takes_only_letters_digits_and_dot_underscore_colon_dash() {
    assert_valid(&with(valid("pick"), "id", json!("AZaz09._:-")));
    for id in ["evt 1", "evt/1", "évt", "evt+1", "evt#1"] {
        assert_only(
            &with(valid("pick"), "id", json!(id)),
            "id: must contain only the characters A-Z a-z 0-9 . _ : -",
        );
    }
}

// --- type ---

#[test]
fn type_is_required() {
    assert_only(&without(valid("receive"), "type"), "type: is required");
}

#[test]
fn type_must_be_one_of_the_five() {
    for kind in [json!("move"), json!("PICK"), json!(1), json!("")] {
        assert_only(
            &with(valid("receive"), "type", kind),
            "type: must be one of \"pick\", \"ship\", \"receive\", \"adjust\", \"count\"",
        );
    }
}

// --- ts ---

#[test]
fn ts_is_required() {
    assert_only(&without(valid("pick"), "ts"), "ts: is required");
}

#[test]
fn ts_must_be_rfc3339_with_an_offset() {
    for ts in [
        "2026-11-22T10:15:00Z",
        "2026-11-22T10:15:00.123456789Z",
        "2026-11-22T10:15:00+05:30",
        "2026-11-22T10:15:00-08:00",
        "2026-11-22t10:15:00z",
    ] {
        let event = assert_valid(&with(valid("pick"), "ts", json!(ts)));
        assert_eq!(event.ts, ts, "ts is kept exactly as written");
    }
    for ts in [
        "2026-11-22T10:15:00",
        "2026-11-22",
        "10:15:00Z",
        "2026-11-22T10:15:00+0530",
        "2026-13-01T10:15:00Z",
        "2026-02-30T10:15:00Z",
        "2026-11-22T24:00:00Z",
        "22/11/2026 10:15",
        "1763806500",
    ] {
        assert_only(&with(valid("pick"), "ts", json!(ts)), TS_RULE);
    }
}

#[test]
fn ts_is_at_most_64_characters() {
    let ts = format!("2026-11-22T10:15:00.{}Z", "1".repeat(44));
    assert_eq!(ts.len(), 65);
    assert_only(
        &with(valid("pick"), "ts", json!(ts)),
        "ts: must be at most 64 characters (got 65)",
    );
}

// --- sku and the other strings ---

#[test]
fn sku_is_required() {
    assert_only(&without(valid("ship"), "sku"), "sku: is required");
}

#[test]
fn strings_are_at_most_256_characters() {
    for field in [
        "device", "order", "sku", "location", "lot", "serial", "reason",
    ] {
        assert_valid(&with(valid("receive"), field, json!("x".repeat(256))));
        assert_only(
            &with(valid("receive"), field, json!("x".repeat(257))),
            &format!("{field}: must be at most 256 characters (got 257)"),
        );
    }
    for field in ["carrier", "tracking"] {
        assert_only(
            &with(valid("ship"), field, json!("x".repeat(257))),
            &format!("{field}: must be at most 256 characters (got 257)"),
        );
    }
    assert_only(
        &with(valid("receive"), "po", json!("x".repeat(257))),
        "po: must be at most 256 characters (got 257)",
    );
}

#[test]
fn string_lengths_count_characters_not_bytes() {
    let event = assert_valid(&with(valid("pick"), "sku", json!("ü".repeat(256))));
    assert_eq!(event.sku.len(), 512);
}

#[test]
fn strings_must_not_be_empty() {
    for field in ["device", "sku", "location", "lot", "serial", "reason"] {
        assert_only(
            &with(valid("receive"), field, json!("")),
            &format!("{field}: must not be empty"),
        );
    }
}

#[test]
fn strings_must_not_contain_control_characters() {
    for text in ["SKU\u{7}1", "SKU\n", "\tSKU", "SKU\u{85}"] {
        assert_only(
            &with(valid("pick"), "sku", json!(text)),
            "sku: must not contain control characters",
        );
    }
}

#[test]
fn strings_must_be_strings() {
    for field in ["device", "sku", "location", "lot", "serial", "reason"] {
        assert_only(
            &with(valid("receive"), field, json!(7)),
            &format!("{field}: must be a string"),
        );
    }
    // A non-string order does not count as given, so the pick also lacks one.
    assert_eq!(
        parse(&with(valid("pick"), "order", json!(["SO-1"]))).unwrap_err(),
        ["order: must be a string", "order: is required for pick"]
    );
}

// --- qty ---

#[test]
fn qty_is_required() {
    assert_only(&without(valid("pick"), "qty"), "qty: is required");
    assert_only(&with(valid("pick"), "qty", Value::Null), "qty: is required");
}

#[test]
fn qty_must_be_a_decimal_number() {
    for qty in [
        json!("two"),
        json!(""),
        json!(" 1"),
        json!("1 "),
        json!("1,5"),
        json!("0x10"),
        json!("NaN"),
        json!("Infinity"),
        json!(true),
        json!([1]),
        json!({"value": 1}),
        // What rust_decimal would take but a decimal number does not look like:
        json!("1_000"),
        json!("+1"),
        json!(".5"),
        json!("-.5"),
        json!("5."),
        json!("+1e2"),
        json!(".5e1"),
        json!("5.e1"),
        json!("1e"),
        json!("e2"),
        json!("--1"),
    ] {
        assert_only(&with(valid("receive"), "qty", qty), QTY_SYNTAX);
    }
}

#[test]
fn qty_must_fit_28_significant_digits_exactly() {
    // 28 decimal places and the largest 96-bit mantissa still fit.
    for (qty, exact) in [
        (
            "0.0000000000000000000000000001",
            "0.0000000000000000000000000001",
        ),
        (
            "79228162514264337593543950335",
            "79228162514264337593543950335",
        ),
        ("1e28", "10000000000000000000000000000"),
    ] {
        let event = assert_valid(&with(valid("receive"), "qty", json!(qty)));
        assert_eq!(event.qty.to_string(), exact);
    }
    for qty in [
        "0.00000000000000000000000000001",
        "79228162514264337593543950336",
        "1e29",
        "1e-29",
        "0e999999",
        // Would round to 1.2345678901234567890123456789 rather than be refused.
        "1.2345678901234567890123456789012e0",
        // More than 40 characters.
        "1.000000000000000000000000000000000000000",
    ] {
        assert_only(&with(valid("receive"), "qty", json!(qty)), QTY_SYNTAX);
        let raw = format!(
            r#"{{"v":1,"id":"e1","type":"receive","ts":"2026-11-22T10:15:00Z","sku":"S","qty":{qty}}}"#
        );
        assert_eq!(violations_of(raw.as_bytes()), [QTY_SYNTAX], "number {qty}");
    }
}

#[test]
fn numbers_parse_exactly_as_decimals() {
    let cases = [
        ("1.50", "1.5"),
        ("\"1.50\"", "1.5"),
        ("1e2", "100"),
        ("1E2", "100"),
        ("\"1e2\"", "100"),
        ("1e+2", "100"),
        ("1.5e-1", "0.15"),
        ("\"1.5E-1\"", "0.15"),
        ("0.1", "0.1"),
        ("\"0.1\"", "0.1"),
        ("0.3", "0.3"),
        ("\"007\"", "7"),
        (
            "12345678901234567890.12345678",
            "12345678901234567890.12345678",
        ),
        ("9007199254740993", "9007199254740993"),
        ("-2.5", "-2.5"),
    ];
    for (literal, exact) in cases {
        let raw = format!(
            r#"{{"v":1,"id":"e1","type":"adjust","ts":"2026-11-22T10:15:00Z","sku":"S","reason":"r","qty":{literal}}}"#
        );
        let event = parse_event(raw.as_bytes()).unwrap_or_else(|v| panic!("{literal}: {v}"));
        assert_eq!(event.qty, dec(exact), "{literal}");
        // Exact, normalized text: no float ever (0.1 stays 0.1, 2^53 + 1 stays odd).
        assert_eq!(event.qty.to_string(), exact, "{literal}");
        assert_eq!(event.to_json()["qty"], json!(exact), "{literal}");
    }
}

#[test]
fn qty_must_be_greater_than_0_for_pick_ship_and_receive() {
    for kind in ["pick", "ship", "receive"] {
        for qty in [
            json!(0),
            json!(-1),
            json!("0.00"),
            json!("-0.5"),
            json!(-0.0),
        ] {
            assert_only(
                &with(valid(kind), "qty", qty),
                &format!("qty: must be greater than 0 for {kind}"),
            );
        }
        assert_valid(&with(valid(kind), "qty", json!("0.001")));
    }
}

#[test]
fn qty_must_not_be_0_for_adjust() {
    for qty in [
        json!(0),
        json!("0"),
        json!("0.000"),
        json!("-0"),
        json!("0e5"),
    ] {
        assert_only(
            &with(valid("adjust"), "qty", qty),
            "qty: must not be 0 for adjust",
        );
    }
    assert_eq!(
        assert_valid(&with(valid("adjust"), "qty", json!(-3))).qty,
        dec("-3")
    );
    assert_eq!(
        assert_valid(&with(valid("adjust"), "qty", json!("2.5"))).qty,
        dec("2.5")
    );
}

#[test]
fn qty_must_be_0_or_greater_for_count() {
    for qty in [json!(-1), json!("-0.001")] {
        assert_only(
            &with(valid("count"), "qty", qty),
            "qty: must be 0 or greater for count",
        );
    }
    for qty in [json!(0), json!("-0"), json!("0.0"), json!(17)] {
        assert_valid(&with(valid("count"), "qty", qty));
    }
}

// --- uom ---

#[test]
fn uom_defaults_to_ea_and_is_at_most_16_characters() {
    assert_eq!(assert_valid(&valid("pick")).uom, "EA");
    assert_eq!(
        assert_valid(&with(valid("pick"), "uom", Value::Null)).uom,
        "EA"
    );
    assert_eq!(
        assert_valid(&with(valid("pick"), "uom", json!("K".repeat(16)))).uom,
        "K".repeat(16)
    );
    assert_only(
        &with(valid("pick"), "uom", json!("K".repeat(17))),
        "uom: must be at most 16 characters (got 17)",
    );
    assert_only(
        &with(valid("pick"), "uom", json!("")),
        "uom: must not be empty",
    );
}

// --- line ---

#[test]
fn line_is_a_whole_number_from_1() {
    assert_eq!(
        assert_valid(&with(valid("pick"), "line", json!(4_294_967_295u64))).line,
        Some(u32::MAX)
    );
    for line in [
        json!(0),
        json!(-1),
        json!(1.5),
        json!("1"),
        json!(4_294_967_296u64),
        json!(true),
    ] {
        assert_only(
            &with(valid("pick"), "line", line),
            "line: must be a whole number from 1 to 4294967295",
        );
    }
}

// --- type-specific fields ---

#[test]
fn order_is_required_for_pick_and_ship() {
    for kind in ["pick", "ship"] {
        assert_only(
            &without(valid(kind), "order"),
            &format!("order: is required for {kind}"),
        );
        assert_only(
            &with(valid(kind), "order", Value::Null),
            &format!("order: is required for {kind}"),
        );
    }
    // Everyone else may carry an order.
    for kind in ["receive", "adjust", "count"] {
        assert_valid(&with(valid(kind), "order", json!("SO-1")));
    }
}

#[test]
fn an_invalid_order_is_also_a_missing_one() {
    assert_eq!(
        parse(&with(valid("pick"), "order", json!(""))).unwrap_err(),
        ["order: must not be empty", "order: is required for pick"]
    );
}

#[test]
fn reason_is_required_for_adjust() {
    assert_only(
        &without(valid("adjust"), "reason"),
        "reason: is required for adjust",
    );
}

#[test]
fn location_is_required_for_count() {
    assert_only(
        &without(valid("count"), "location"),
        "location: is required for count",
    );
}

#[test]
fn carrier_and_tracking_only_on_ship() {
    let ship = assert_valid(&with(
        with(valid("ship"), "carrier", json!("DHL")),
        "tracking",
        json!("JD0146"),
    ));
    assert_eq!(ship.carrier.as_deref(), Some("DHL"));
    assert_eq!(ship.tracking.as_deref(), Some("JD0146"));
    for kind in ["pick", "receive", "adjust", "count"] {
        for field in ["carrier", "tracking"] {
            assert_only(
                &with(valid(kind), field, json!("x")),
                &format!("{field}: is only allowed for ship, not {kind}"),
            );
        }
    }
}

#[test]
fn po_only_on_receive() {
    let receive = assert_valid(&with(valid("receive"), "po", json!("PO-77")));
    assert_eq!(receive.po.as_deref(), Some("PO-77"));
    for kind in ["pick", "ship", "adjust", "count"] {
        assert_only(
            &with(valid(kind), "po", json!("PO-77")),
            &format!("po: is only allowed for receive, not {kind}"),
        );
    }
}

#[test]
fn every_type_may_carry_the_common_fields() {
    for kind in EventType::ALL {
        let mut event = valid(kind.as_str());
        for (field, value) in [
            ("line", json!(3)),
            ("location", json!("A-01-03")),
            ("lot", json!("L1")),
            ("serial", json!("SN1")),
            ("device", json!("scanner-07")),
            ("attrs", json!({"shift": "B"})),
            ("reason", json!("why not")),
        ] {
            event[field] = value;
        }
        let parsed = assert_valid(&event);
        assert_eq!(parsed.line, Some(3));
        assert_eq!(parsed.attrs["shift"], "B");
    }
}

// --- attrs ---

#[test]
fn attrs_is_a_map_of_strings() {
    let event = assert_valid(&with(
        valid("pick"),
        "attrs",
        json!({"shift": "B", "empty": "", "z": "ü".repeat(256)}),
    ));
    assert_eq!(event.attrs.len(), 3);
    assert_eq!(event.attrs["empty"], "");
    for attrs in [json!(["shift"]), json!("shift=B"), json!(1)] {
        assert_only(
            &with(valid("pick"), "attrs", attrs),
            "attrs: must be an object of string values",
        );
    }
}

#[test]
fn attrs_values_are_strings_of_at_most_256_characters() {
    for value in [json!(1), json!(null), json!(true), json!({"a": "b"})] {
        assert_only(
            &with(valid("pick"), "attrs", json!({ "shift": value })),
            "attrs.shift: must be a string",
        );
    }
    assert_only(
        &with(valid("pick"), "attrs", json!({"note": "x".repeat(257)})),
        "attrs.note: must be at most 256 characters",
    );
}

#[test]
fn attrs_names_are_1_to_256_characters() {
    assert_only(
        &with(valid("pick"), "attrs", json!({"": "x"})),
        "attrs.: attribute names must be 1 to 256 characters",
    );
    // The path shows the first 64 characters of a long name.
    assert_only(
        &with(valid("pick"), "attrs", json!({ "k".repeat(257): "x" })),
        &format!(
            "attrs.{}: attribute names must be 1 to 256 characters",
            "k".repeat(64)
        ),
    );
    assert_valid(&with(
        valid("pick"),
        "attrs",
        json!({ "k".repeat(256): "x" }),
    ));
}

// --- fields that are not there ---

#[test]
fn unknown_fields_are_refused() {
    assert_only(
        &with(valid("pick"), "colour", json!("red")),
        "colour: is not a field of the v1 event",
    );
    assert_only(
        &with(valid("pick"), "Qty", json!(1)),
        "Qty: is not a field of the v1 event",
    );
    // Even null: an unknown field is a typo worth knowing about.
    assert_only(
        &with(valid("pick"), "colour", Value::Null),
        "colour: is not a field of the v1 event",
    );
}

#[test]
fn site_is_refused() {
    for site in [json!("wh-east"), Value::Null] {
        assert_only(
            &with(valid("pick"), "site", site),
            "site: is set by the agent from its configuration and must not be sent",
        );
    }
}

#[test]
fn duplicate_keys_are_refused() {
    let raw = br#"{"v":1,"id":"e1","type":"receive","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"qty":1000}"#;
    assert_eq!(violations_of(raw), ["qty: appears more than once"]);
    let raw = br#"{"v":1,"v":1,"id":"e1","type":"receive","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"sku":"S"}"#;
    assert_eq!(
        violations_of(raw),
        ["v: appears more than once", "sku: appears more than once"]
    );
    // The same key spelled with an escape is the same key.
    let raw = br#"{"v":1,"id":"e1","type":"receive","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"\u0071ty":2}"#;
    assert_eq!(violations_of(raw), ["qty: appears more than once"]);
}

#[test]
fn null_optional_fields_count_as_absent() {
    let mut event = valid("pick");
    for field in [
        "device", "line", "uom", "location", "lot", "serial", "reason", "carrier", "tracking",
        "po", "attrs",
    ] {
        event[field] = Value::Null;
    }
    let parsed = assert_valid(&event);
    assert_eq!(parsed, assert_valid(&valid("pick")));
    assert_eq!(parsed.device, None);
    assert_eq!(parsed.line, None);
    assert_eq!(parsed.uom, "EA");
    assert!(parsed.attrs.is_empty());
}

// --- the event as a whole ---

#[test]
fn several_violations_are_reported_at_once_in_field_order() {
    let event = json!({
        "colour": "red",
        "v": 2,
        "id": "bad id",
        "type": "ship",
        "ts": "yesterday",
        "line": 0,
        "sku": "",
        "qty": "-1",
        "uom": "",
        "po": "PO-1",
        "attrs": {"n": 1},
        "site": "wh-east",
    });
    assert_eq!(
        parse(&event).unwrap_err(),
        [
            "colour: is not a field of the v1 event",
            "site: is set by the agent from its configuration and must not be sent",
            "v: must be 1 (the only event format version)",
            "id: must contain only the characters A-Z a-z 0-9 . _ : -",
            TS_RULE,
            "line: must be a whole number from 1 to 4294967295",
            "sku: must not be empty",
            "uom: must not be empty",
            "attrs.n: must be a string",
            "qty: must be greater than 0 for ship",
            "order: is required for ship",
            "po: is only allowed for receive, not ship",
        ]
    );
}

#[test]
fn an_empty_object_lacks_every_required_field() {
    assert_eq!(
        violations_of(b"{}"),
        [
            "v: is required (the event format version, 1)",
            "id: is required",
            "type: is required",
            "ts: is required",
            "sku: is required",
            "qty: is required",
        ]
    );
}

#[test]
fn violations_display_joined_by_semicolons() {
    let err = parse_event(b"{}").unwrap_err();
    assert_eq!(err.len(), 6);
    assert!(
        err.to_string().starts_with(
            "v: is required (the event format version, 1); id: is required; type: is required"
        ),
        "{err}"
    );
    assert_eq!(err.lines().len(), 6);
}

#[test]
fn events_are_at_most_16_kib() {
    // Pad a valid event with whitespace to exactly the limit, then one byte over.
    let compact = serde_json::to_string(&valid("pick")).unwrap();
    let pad = |len: usize| format!("{}{}", compact, " ".repeat(len - compact.len()));
    assert!(parse_event(pad(MAX_EVENT_BYTES).as_bytes()).is_ok());
    assert_eq!(
        violations_of(pad(MAX_EVENT_BYTES + 1).as_bytes()),
        ["event: must be at most 16384 bytes of JSON (got 16385)"]
    );
    // Over the limit is refused before looking inside, even if it is not JSON at all.
    assert_eq!(
        violations_of(&vec![0xff; 100_000]),
        ["event: must be at most 16384 bytes of JSON (got 100000)"]
    );
}

#[test]
fn invalid_json_is_an_event_violation() {
    for raw in [
        &b""[..],
        b"{",
        b"{\"v\":1,}",
        b"{'v':1}",
        b"{\"v\":1} trailing",
        b"not json",
        b"{\"v\":01}",
    ] {
        let violations = violations_of(raw);
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert!(
            violations[0].starts_with("event: is not valid JSON: "),
            "{:?}: {violations:?}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn a_non_object_is_an_event_violation() {
    for raw in ["[]", "[{\"v\":1}]", "1", "\"event\"", "null", "true"] {
        assert_eq!(
            violations_of(raw.as_bytes()),
            ["event: must be a JSON object"],
            "{raw}"
        );
    }
}

#[test]
fn non_utf8_is_an_event_violation() {
    let mut raw = serde_json::to_vec(&valid("pick")).unwrap();
    let at = raw.len() - 5;
    raw[at] = 0xff;
    let violations = violations_of(&raw);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(
        violations[0].starts_with("event: must be UTF-8 ("),
        "{violations:?}"
    );
}

#[test]
fn to_json_parses_back_to_the_same_event() {
    let full = json!({
        "v": 1, "id": "0193a5b2-7c1e-7e4a-9f1e-2b3c4d5e6f70", "type": "ship",
        "ts": "2026-11-22T10:15:00.123+01:00", "device": "scanner-07", "order": "SO-1001",
        "line": 7, "sku": "SKU-ü-001", "qty": "1.50", "uom": "KG", "location": "A-01-03",
        "lot": "L1", "serial": "SN \"quoted\" \\ slash", "reason": "re-pack",
        "carrier": "DHL", "tracking": "JD0146",
        "attrs": {"shift": "B", "empty": "", "tab": "a\tb"},
    });
    let mut events = vec![assert_valid(&full)];
    events.extend(
        EventType::ALL
            .iter()
            .map(|k| assert_valid(&valid(k.as_str()))),
    );
    events.push(assert_valid(&with(valid("receive"), "po", json!("PO-7"))));
    events.push(assert_valid(&with(valid("count"), "qty", json!("-0"))));
    events.push(assert_valid(&with(valid("adjust"), "qty", json!(-0.25))));
    for event in events {
        let json = event.to_json();
        let again = parse_event(&serde_json::to_vec(&json).unwrap())
            .unwrap_or_else(|v| panic!("{json} refused: {v}"));
        assert_eq!(again, event);
        assert_eq!(again.to_json(), json, "the canonical form is a fixed point");
    }
}

#[test]
fn to_json_is_canonical() {
    let event = assert_valid(&with(valid("pick"), "qty", json!(1.50)));
    let json = event.to_json();
    let map = json.as_object().unwrap();
    assert_eq!(map["v"], json!(1));
    assert_eq!(map["type"], json!("pick"));
    assert_eq!(map["qty"], json!("1.5"), "qty is exact text");
    assert_eq!(map["uom"], json!("EA"), "the default uom is written out");
    for absent in [
        "device", "line", "location", "lot", "serial", "reason", "carrier", "tracking", "po",
        "attrs", "site",
    ] {
        assert!(!map.contains_key(absent), "{absent} should be left out");
    }
    let attrs = BTreeMap::from([("shift".to_string(), "B".to_string())]);
    let event = Event { attrs, ..event };
    assert_eq!(event.to_json()["attrs"], json!({"shift": "B"}));
}

#[test]
fn a_flood_of_violations_lists_the_first_twenty_and_counts_the_rest() {
    // 16 KiB of unknown fields: thousands of violations before the cap.
    let mut event = valid("pick");
    let n = 1600;
    for i in 0..n {
        event[format!("x{i}")] = json!(1);
    }
    assert!(event.to_string().len() < MAX_EVENT_BYTES);
    let found = violations_of(event.to_string().as_bytes());
    assert_eq!(found.len(), 21, "{found:?}");
    assert_eq!(found[0], "x0: is not a field of the v1 event");
    assert_eq!(
        found[20],
        format!(
            "event: {} more violations not listed (at most 20 are)",
            n - 20
        )
    );
    assert!(n > 1000, "only {n} unknown fields");
    // A field's name is cut where the sender made it long.
    let long_name = "n".repeat(5000);
    let mut event = valid("pick");
    event[&long_name] = json!(1);
    let found = violations_of(event.to_string().as_bytes());
    assert_eq!(
        found,
        [format!(
            "{}…: is not a field of the v1 event",
            "n".repeat(80)
        )]
    );
}
