//! Fuzz target `event_parse`: the v1 event parser (`parse_event`, `parse_event_value`) on
//! arbitrary bytes, as scanners and the WMS send them.
//!
//! Asserts: no panic; a refusal names at least one violation and at most the listed maximum
//! plus the "more not listed" line; the same bytes give the same answer through the raw-value
//! path the HTTP intake uses; an accepted event's canonical JSON parses back to the same event,
//! and the event crosses the wire to the relay unchanged (in a batch frame, postcard).

#![no_main]

use backhaul_events::event::{MAX_VIOLATIONS, parse_event, parse_event_value};
use backhaul_events::{BatchEntry, BatchFrame, Epoch};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    let parsed = parse_event(data);
    match &parsed {
        Ok(event) => {
            let canonical = event.to_json().to_string();
            match parse_event(canonical.as_bytes()) {
                Ok(again) => assert_eq!(&again, event, "canonical JSON {canonical}"),
                Err(violations) => panic!(
                    "the canonical JSON of an accepted event is refused: {violations}\n{canonical}"
                ),
            }
            let batch = BatchFrame {
                site: "wh-fuzz".into(),
                epoch: Epoch(7),
                acked_through: 0,
                first_seq: 1,
                last_seq: 1,
                events: vec![BatchEntry {
                    seq: 1,
                    received_at_ms: 0,
                    event: event.clone(),
                }],
                signature: None,
            };
            let bytes = batch.encode().expect("an accepted event encodes");
            let decoded = BatchFrame::decode(&bytes, usize::MAX).expect("and decodes");
            assert_eq!(decoded, batch);
        }
        Err(violations) => {
            assert!(!violations.is_empty(), "a refusal without a violation");
            assert!(violations.len() <= MAX_VIOLATIONS + 1, "{violations}");
        }
    }
    // The HTTP intake hands each element of a JSON array over as a raw value.
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(raw) = serde_json::from_str::<&RawValue>(text)
    {
        let via_raw = parse_event_value(raw);
        match (&parsed, &via_raw) {
            (Ok(a), Ok(b)) => assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => panic!("parse_event and parse_event_value disagree: {parsed:?} / {via_raw:?}"),
        }
    }
});
