//! The JSON Schema of the v1 event (`events/schema/event-v1.schema.json`) and the Rust parser
//! agree on a shared table of examples (`events/tests/examples/events-v1.json`).
//!
//! Each example holds an event exactly as a sender would write it (numbers and duplicate keys
//! reach the parser as written), the parser's violations in order (none for a valid event), and,
//! only where JSON Schema cannot express a rule, `schema_disagrees` saying why. Those examples
//! are left out of the agreement check, and a test makes sure they really do disagree, so the
//! list of exceptions cannot go stale.

use backhaul_events::EventType;
use backhaul_events::event::parse_event;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

const SCHEMA: &str = include_str!("../schema/event-v1.schema.json");
const EXAMPLES: &str = include_str!("examples/events-v1.json");

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Example {
    name: String,
    event: Box<RawValue>,
    /// The parser's violations as `field: rule`, in the order it reports them.
    errors: Vec<String>,
    /// Why JSON Schema cannot agree with the parser on this example.
    #[serde(default)]
    schema_disagrees: Option<String>,
}

impl Example {
    fn valid(&self) -> bool {
        self.errors.is_empty()
    }

    fn value(&self) -> Value {
        serde_json::from_str(self.event.get()).expect("an example is JSON")
    }
}

fn examples() -> Vec<Example> {
    serde_json::from_str(EXAMPLES).expect("the example table is JSON")
}

fn schema() -> Value {
    serde_json::from_str(SCHEMA).expect("the schema is JSON")
}

/// The schema as a publisher would run it: `format` asserted, so date-time is checked.
fn validator() -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema())
        .expect("the schema compiles")
}

fn schema_errors(validator: &jsonschema::Validator, value: &Value) -> Vec<String> {
    validator
        .iter_errors(value)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn schema_is_a_valid_draft_2020_12_schema() {
    let schema = schema();
    assert_eq!(
        schema["$schema"],
        "https://json-schema.org/draft/2020-12/schema"
    );
    if let Err(e) = jsonschema::meta::validate(&schema) {
        panic!("the schema breaks the 2020-12 meta-schema: {e}");
    }
}

#[test]
fn example_names_are_unique_and_the_table_is_large_enough() {
    let examples = examples();
    let mut names: Vec<&str> = examples.iter().map(|e| e.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(before, names.len(), "duplicate example names");

    let agreeing = examples
        .iter()
        .filter(|e| e.schema_disagrees.is_none())
        .count();
    assert!(
        agreeing >= 30,
        "only {agreeing} examples in the agreement table"
    );
    for kind in EventType::ALL {
        assert!(
            examples.iter().any(|e| e.valid()
                && e.schema_disagrees.is_none()
                && e.value()["type"] == kind.as_str()),
            "no valid {kind} example"
        );
    }
}

#[test]
fn parser_reports_exactly_the_listed_violations() {
    let mut failures = Vec::new();
    for example in examples() {
        let got = match parse_event(example.event.get().as_bytes()) {
            Ok(_) => Vec::new(),
            Err(violations) => violations.lines(),
        };
        if got != example.errors {
            failures.push(format!(
                "{}:\n  expected {:?}\n  got      {:?}",
                example.name, example.errors, got
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn schema_agrees_with_the_parser() {
    let validator = validator();
    let mut failures = Vec::new();
    for example in examples().iter().filter(|e| e.schema_disagrees.is_none()) {
        let value = example.value();
        let schema_valid = validator.is_valid(&value);
        if schema_valid != example.valid() {
            failures.push(format!(
                "{}: parser says {}, schema says {} {:?}",
                example.name,
                if example.valid() { "valid" } else { "invalid" },
                if schema_valid { "valid" } else { "invalid" },
                schema_errors(&validator, &value),
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn schema_blames_the_same_fields_as_the_parser() {
    // Not only invalid, but invalid for the same reasons: every field the parser names is
    // named by some schema error, either as its instance path or, for errors about the whole
    // object (required, additionalProperties), in the message.
    let validator = validator();
    let mut failures = Vec::new();
    for example in examples()
        .iter()
        .filter(|e| e.schema_disagrees.is_none() && !e.valid())
    {
        let value = example.value();
        let errors: Vec<(String, String)> = validator
            .iter_errors(&value)
            .map(|e| (e.instance_path().to_string(), e.to_string()))
            .collect();
        for violation in &example.errors {
            let field = violation.split(':').next().unwrap_or_default();
            let top = field.split('.').next().unwrap_or_default();
            let named = top == "event"
                || errors.iter().any(|(path, message)| {
                    path == &format!("/{top}")
                        || path.starts_with(&format!("/{top}/"))
                        || (path.is_empty() && message.contains(&format!("'{top}'")))
                        || (path.is_empty() && message.contains(&format!("\"{top}\"")))
                });
            if !named {
                failures.push(format!(
                    "{}: no schema error about {top}: {errors:?}",
                    example.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn listed_disagreements_are_real() {
    let validator = validator();
    let mut stale = Vec::new();
    for example in examples() {
        if let Some(why) = &example.schema_disagrees {
            assert!(!why.trim().is_empty(), "{}: say why", example.name);
            if validator.is_valid(&example.value()) == example.valid() {
                stale.push(example.name.clone());
            }
        }
    }
    assert!(
        stale.is_empty(),
        "these examples agree after all; move them into the agreement table: {stale:?}"
    );
}

#[test]
fn the_ts_pattern_requires_an_offset_even_without_format_assertion() {
    // Many validators treat `format` as an annotation only; the pattern still holds the line.
    let validator = jsonschema::validator_for(&schema()).expect("the schema compiles");
    let event = |ts: &str| {
        serde_json::json!({
            "v": 1, "id": "e1", "type": "pick", "ts": ts,
            "order": "SO-1", "sku": "S", "qty": 1
        })
    };
    assert!(validator.is_valid(&event("2026-11-22T10:15:00.123Z")));
    assert!(validator.is_valid(&event("2026-11-22T10:15:00+05:30")));
    assert!(!validator.is_valid(&event("2026-11-22T10:15:00.123")));
    assert!(!validator.is_valid(&event("2026-11-22")));
    assert!(!validator.is_valid(&event("2026-11-22T10:15:00+0530")));
}

#[test]
fn numeric_and_string_qty_are_both_valid() {
    let validator = validator();
    for qty in [
        serde_json::json!(0.1),
        serde_json::json!("0.1"),
        serde_json::json!(2),
        serde_json::json!("2"),
        serde_json::json!("1.50"),
        serde_json::json!("1e2"),
    ] {
        let event = serde_json::json!({
            "v": 1, "id": "e1", "type": "receive", "ts": "2026-11-22T10:15:00Z",
            "sku": "S", "qty": qty
        });
        assert!(
            validator.is_valid(&event),
            "{qty}: {:?}",
            schema_errors(&validator, &event)
        );
        let parsed = parse_event(event.to_string().as_bytes());
        assert!(parsed.is_ok(), "{qty}: {parsed:?}");
    }
}
