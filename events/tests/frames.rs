//! Property tests: valid events survive JSON and the wire frames unchanged, and no input, however
//! broken, makes the event parser or the frame decoders panic.

use std::collections::BTreeMap;

use backhaul_events::event::{MAX_EVENT_BYTES, parse_event};
use backhaul_events::frame::{COMPRESSED_FRAME_VERSION, FRAME_VERSION};
use backhaul_events::{
    AckFrame, BatchEntry, BatchFrame, BatchRefusal, Compression, Epoch, Event, EventOutcome,
    EventType, FrameError, Outcome,
};
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;
use proptest::sample::select;
use rust_decimal::Decimal;

// ---------- strategies ----------

/// A string of `min..=max` characters without control characters, mostly short and plain.
fn text(min: usize, max: usize) -> BoxedStrategy<String> {
    let any_text = vec(any::<char>(), min..=max).prop_map(|chars| {
        chars
            .into_iter()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect::<String>()
    });
    let plain =
        proptest::string::string_regex(&format!("[A-Za-z0-9 ._/#-]{{{min},{}}}", max.min(24)))
            .unwrap();
    prop_oneof![4 => plain, 1 => any_text].boxed()
}

/// Any string at all, control characters included (attrs are not checked for them).
fn any_text(min: usize, max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), min..=max).prop_map(|chars| chars.into_iter().collect())
}

fn id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,64}"
}

fn ts() -> impl Strategy<Value = String> {
    let offset = prop_oneof![
        select(vec!["Z", "z"]).prop_map(str::to_string),
        (any::<bool>(), 0u8..24, 0u8..60).prop_map(|(negative, h, m)| format!(
            "{}{h:02}:{m:02}",
            if negative { '-' } else { '+' }
        )),
    ];
    (
        (0u32..=9999, 1u8..=12, 1u8..=28),
        (0u8..24, 0u8..60, 0u8..60),
        option::of("[0-9]{1,9}"),
        select(vec!['T', 't']),
        offset,
    )
        .prop_map(|((y, mo, d), (h, mi, s), fraction, sep, offset)| {
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}:{s:02}{fraction}{offset}")
        })
}

/// Any decimal rust_decimal can hold, biased towards everyday quantities.
fn decimal() -> impl Strategy<Value = Decimal> {
    prop_oneof![
        3 => (-100_000i64..100_000, 0u32..4).prop_map(|(m, s)| Decimal::new(m, s)),
        1 => (any::<i64>(), 0u32..=18).prop_map(|(m, s)| Decimal::new(m, s)),
        1 => (any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>(), 0u32..=28).prop_map(
            |(lo, mid, hi, negative, scale)| Decimal::from_parts(lo, mid, hi, negative, scale)
        ),
    ]
}

fn qty_for(kind: EventType) -> BoxedStrategy<Decimal> {
    match kind {
        EventType::Pick | EventType::Ship | EventType::Receive => decimal()
            .prop_map(|d| if d.is_zero() { Decimal::ONE } else { d.abs() })
            .boxed(),
        EventType::Adjust => decimal()
            .prop_map(|d| {
                if d.is_zero() {
                    Decimal::NEGATIVE_ONE
                } else {
                    d
                }
            })
            .boxed(),
        EventType::Count => decimal().prop_map(|d| d.abs()).boxed(),
    }
}

fn attrs() -> impl Strategy<Value = BTreeMap<String, String>> {
    btree_map(
        prop_oneof![3 => "[a-z_]{1,12}", 1 => any_text(1, 20)],
        prop_oneof![3 => "[A-Za-z0-9 ]{0,12}", 1 => any_text(0, 30)],
        0..4,
    )
}

/// A valid event of any type: the fields a type requires are there, the ones it forbids are not.
fn event() -> impl Strategy<Value = Event> {
    select(EventType::ALL.to_vec())
        .prop_flat_map(|kind| {
            let optional = || option::of(text(1, 256));
            (
                (Just(kind), id(), ts(), optional(), text(1, 256)),
                (option::of(1u32..), text(1, 256), qty_for(kind), text(1, 16)),
                (
                    optional(),
                    optional(),
                    optional(),
                    optional(),
                    any::<bool>(),
                ),
                (optional(), optional(), optional(), attrs()),
            )
        })
        .prop_map(
            |(
                (kind, id, ts, device, order),
                (line, sku, qty, uom),
                (location, lot, serial, reason, with_order),
                (carrier, tracking, po, attrs),
            )| {
                let needs_order = matches!(kind, EventType::Pick | EventType::Ship);
                Event {
                    id,
                    kind,
                    ts,
                    device,
                    order: (needs_order || with_order).then_some(order),
                    line,
                    sku,
                    qty,
                    uom,
                    location: match kind {
                        EventType::Count => location.or_else(|| Some("A-01-03".into())),
                        _ => location,
                    },
                    lot,
                    serial,
                    reason: match kind {
                        EventType::Adjust => reason.or_else(|| Some("damaged".into())),
                        _ => reason,
                    },
                    carrier: carrier.filter(|_| kind == EventType::Ship),
                    tracking: tracking.filter(|_| kind == EventType::Ship),
                    po: po.filter(|_| kind == EventType::Receive),
                    attrs,
                }
            },
        )
}

fn site() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9_-]{0,63}"
}

/// A consistent batch: a valid site and 1-5 events with strictly increasing sequence numbers.
fn batch() -> impl Strategy<Value = BatchFrame> {
    (
        site(),
        any::<u128>(),
        0..u64::MAX - 10_000,
        vec((1u64..1000, any::<i64>(), event()), 1..6),
        option::of(vec(any::<u8>(), 0..64)),
    )
        .prop_map(|(site, epoch, start, entries, signature)| {
            let acked_through = start;
            let mut seq = start;
            let events: Vec<BatchEntry> = entries
                .into_iter()
                .map(|(step, received_at_ms, event)| {
                    seq += step;
                    BatchEntry {
                        seq,
                        received_at_ms,
                        event,
                    }
                })
                .collect();
            BatchFrame {
                site,
                epoch: Epoch(epoch),
                acked_through,
                first_seq: events[0].seq,
                last_seq: seq,
                events,
                signature,
            }
        })
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        Just(Outcome::Stored),
        Just(Outcome::Duplicate),
        text(1, 40).prop_map(|erp_ref| Outcome::Posted { erp_ref }),
        any_text(0, 80).prop_map(|reason| Outcome::DeadLettered { reason }),
    ]
}

fn ack() -> impl Strategy<Value = AckFrame> {
    (
        site(),
        any::<u128>(),
        any::<u64>(),
        option::of(prop_oneof![
            Just(BatchRefusal::Gap),
            Just(BatchRefusal::OutboxFull)
        ]),
        vec(
            (any::<u64>(), id(), outcome()).prop_map(|(seq, id, outcome)| EventOutcome {
                seq,
                id,
                outcome,
            }),
            0..8,
        ),
    )
        .prop_map(|(site, epoch, acked_through, refused, outcomes)| AckFrame {
            site,
            epoch: Epoch(epoch),
            acked_through,
            refused,
            outcomes,
        })
}

/// Overwrites some bytes and maybe cuts the tail off.
fn mutate(
    mut bytes: Vec<u8>,
    edits: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    if !bytes.is_empty() {
        for (at, byte) in edits {
            let at = at.index(bytes.len());
            bytes[at] = *byte;
        }
    }
    if let Some(cut) = cut {
        let len = cut.index(bytes.len() + 1);
        bytes.truncate(len);
    }
    bytes
}

fn edits() -> impl Strategy<Value = Vec<(prop::sample::Index, u8)>> {
    vec((any::<prop::sample::Index>(), any::<u8>()), 0..6)
}

/// The raw JSON text of a value for one field: sometimes right, mostly wrong in some way.
fn raw_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("null".to_string()),
        Just("true".to_string()),
        "-?(0|[1-9][0-9]{0,32})(\\.[0-9]{1,32})?([eE][+-]?[0-9]{1,3})?",
        any_text(0, 40).prop_map(|s| serde_json::to_string(&s).unwrap()),
        "[a-z0-9 .:_+-]{0,12}".prop_map(|s| format!("\"{s}\"")),
        "-?[0-9]{1,3}(\\.[0-9]{1,3})?([eE]-?[0-9])?".prop_map(|s| format!("\"{s}\"")),
        ts().prop_map(|s| format!("\"{s}\"")),
        select(EventType::ALL.to_vec()).prop_map(|k| format!("\"{k}\"")),
        Just("[]".to_string()),
        Just("{\"k\":\"v\",\"n\":1}".to_string()),
    ]
}

/// A JSON object of plausible and implausible fields, as raw text.
fn raw_object() -> impl Strategy<Value = String> {
    let key = select(vec![
        "v", "id", "type", "ts", "device", "order", "line", "sku", "qty", "uom", "location", "lot",
        "serial", "reason", "carrier", "tracking", "po", "attrs", "site", "extra",
    ]);
    vec((key, raw_value()), 0..20).prop_map(|fields| {
        let body: Vec<String> = fields
            .into_iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        format!("{{{}}}", body.join(","))
    })
}

// ---------- helpers ----------

fn json_bytes(event: &Event) -> Vec<u8> {
    serde_json::to_vec(&event.to_json()).unwrap()
}

/// The event's JSON with `qty` as a bare JSON number in the given notation.
fn with_numeric_qty(event: &Event, qty: &str) -> String {
    let mut json = event.to_json();
    json.as_object_mut().unwrap().remove("qty");
    let rest = serde_json::to_string(&json).unwrap();
    format!("{{\"qty\":{qty},{}", &rest[1..])
}

/// What the rules promise about any event that parses.
fn check_event_rules(event: &Event) -> Result<(), TestCaseError> {
    prop_assert!(!event.id.is_empty() && event.id.chars().count() <= 64);
    prop_assert!(!event.sku.is_empty() && !event.uom.is_empty());
    match event.kind {
        EventType::Pick | EventType::Ship => {
            prop_assert!(event.qty > Decimal::ZERO);
            prop_assert!(event.order.is_some());
        }
        EventType::Receive => prop_assert!(event.qty > Decimal::ZERO),
        EventType::Adjust => {
            prop_assert!(!event.qty.is_zero());
            prop_assert!(event.reason.is_some());
        }
        EventType::Count => {
            prop_assert!(event.qty >= Decimal::ZERO);
            prop_assert!(event.location.is_some());
        }
    }
    prop_assert!(
        event.kind == EventType::Ship || (event.carrier.is_none() && event.tracking.is_none())
    );
    prop_assert!(event.kind == EventType::Receive || event.po.is_none());
    prop_assert!(event.line != Some(0));
    Ok(())
}

fn check_batch_invariants(frame: &BatchFrame) -> Result<(), TestCaseError> {
    prop_assert!(!frame.events.is_empty());
    prop_assert!(frame.first_seq <= frame.last_seq);
    prop_assert_eq!(frame.events[0].seq, frame.first_seq);
    prop_assert_eq!(frame.events[frame.events.len() - 1].seq, frame.last_seq);
    prop_assert!(frame.events.windows(2).all(|w| w[0].seq < w[1].seq));
    prop_assert!(backhaul_events::topics::check_site_id(&frame.site).is_ok());
    Ok(())
}

// ---------- properties ----------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn valid_events_round_trip_through_json(event in event()) {
        let bytes = json_bytes(&event);
        prop_assert!(bytes.len() <= MAX_EVENT_BYTES);
        let parsed = parse_event(&bytes);
        prop_assert_eq!(parsed.as_ref(), Ok(&event));
        let parsed = parsed.unwrap();
        // Exact: the same digits, normalized.
        prop_assert_eq!(parsed.qty.to_string(), event.qty.normalize().to_string());
        // And the canonical form is the same, once the sender's trailing zeros are gone.
        let normalized = Event { qty: event.qty.normalize(), ..event };
        prop_assert_eq!(parsed.to_json(), normalized.to_json());
    }

    #[test]
    fn qty_as_a_json_number_is_exact_in_every_notation(event in event()) {
        let (mantissa, scale) = (event.qty.mantissa(), event.qty.scale());
        for qty in [
            event.qty.to_string(),
            format!("{mantissa}e-{scale}"),
            format!("{mantissa}E-{scale}"),
        ] {
            let text = with_numeric_qty(&event, &qty);
            let parsed = parse_event(text.as_bytes());
            prop_assert_eq!(parsed.as_ref().map(|e| e.qty), Ok(event.qty), "qty {}", qty);
            prop_assert_eq!(parsed.as_ref(), Ok(&event), "qty {}", qty);
        }
    }

    #[test]
    fn ack_frames_round_trip(frame in ack()) {
        let bytes = frame.encode().unwrap();
        prop_assert_eq!(bytes[0], FRAME_VERSION);
        prop_assert_eq!(AckFrame::decode(&bytes, bytes.len()), Ok(frame.clone()));
        prop_assert_eq!(
            AckFrame::decode(&bytes, bytes.len() - 1),
            Err(FrameError::TooLarge { len: bytes.len(), max: bytes.len() - 1 })
        );
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..600)) {
        if let Ok(frame) = BatchFrame::decode(&bytes, usize::MAX) {
            check_batch_invariants(&frame)?;
        }
        let _ = AckFrame::decode(&bytes, usize::MAX);
        if let Ok(event) = parse_event(&bytes) {
            check_event_rules(&event)?;
        }
    }

    #[test]
    fn random_bytes_after_the_version_byte_never_panic(body in vec(any::<u8>(), 0..600)) {
        let mut bytes = vec![FRAME_VERSION];
        bytes.extend(body);
        if let Ok(frame) = BatchFrame::decode(&bytes, usize::MAX) {
            check_batch_invariants(&frame)?;
        }
        if let Ok(frame) = AckFrame::decode(&bytes, usize::MAX) {
            prop_assert!(backhaul_events::topics::check_site_id(&frame.site).is_ok());
        }
    }

    #[test]
    fn mutated_ack_frames_never_panic(
        frame in ack(),
        edits in edits(),
        cut in option::of(any::<prop::sample::Index>()),
    ) {
        let bytes = mutate(frame.encode().unwrap(), &edits, cut);
        if let Ok(decoded) = AckFrame::decode(&bytes, usize::MAX) {
            // Whatever decodes means one thing: encoded again, it decodes to itself. (Not
            // always to the same bytes: postcard also reads over-long varints, like 0x80 0x00
            // for 0.)
            let again = decoded.encode().unwrap();
            prop_assert_eq!(AckFrame::decode(&again, usize::MAX).unwrap(), decoded);
        }
    }

    #[test]
    fn random_text_never_panics_the_parser(text in ".{0,300}") {
        if let Ok(event) = parse_event(text.as_bytes()) {
            check_event_rules(&event)?;
        }
    }

    #[test]
    fn random_objects_parse_to_valid_events_or_name_every_problem(object in raw_object()) {
        match parse_event(object.as_bytes()) {
            Ok(event) => {
                check_event_rules(&event)?;
                prop_assert_eq!(parse_event(&json_bytes(&event)), Ok(event));
            }
            Err(violations) => {
                prop_assert!(!violations.is_empty());
                for v in violations.iter() {
                    prop_assert!(!v.field.is_empty() && !v.rule.is_empty(), "{:?}", v);
                }
            }
        }
    }

    #[test]
    fn mutated_event_json_never_panics(
        event in event(),
        edits in edits(),
        cut in option::of(any::<prop::sample::Index>()),
    ) {
        let bytes = mutate(json_bytes(&event), &edits, cut);
        if let Ok(event) = parse_event(&bytes) {
            check_event_rules(&event)?;
            prop_assert_eq!(parse_event(&json_bytes(&event)), Ok(event));
        }
    }
}

proptest! {
    // Batches carry several whole events each: fewer cases keep the suite fast.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn batch_frames_round_trip(frame in batch()) {
        let bytes = frame.encode().unwrap();
        prop_assert_eq!(bytes[0], FRAME_VERSION);
        let decoded = BatchFrame::decode(&bytes, bytes.len());
        prop_assert_eq!(decoded.as_ref(), Ok(&frame));
        let stamped: Vec<_> = decoded.unwrap().stamped().collect();
        prop_assert_eq!(stamped.len(), frame.events.len());
        for (record, entry) in stamped.iter().zip(&frame.events) {
            prop_assert_eq!(&record.site, &frame.site);
            prop_assert_eq!(record.epoch, frame.epoch);
            prop_assert_eq!(record.seq, entry.seq);
            prop_assert_eq!(&record.event, &entry.event);
        }
    }

    #[test]
    fn batch_frames_over_the_limit_are_too_large(frame in batch(), under in 1usize..64) {
        let bytes = frame.encode().unwrap();
        let max = bytes.len().saturating_sub(under);
        prop_assert_eq!(
            BatchFrame::decode(&bytes, max),
            Err(FrameError::TooLarge { len: bytes.len(), max })
        );
    }

    #[test]
    fn a_wrong_version_byte_is_unsupported(
        frame in batch(),
        // Version 3 is a compressed batch: its own tests cover a body that is not zstd.
        version in any::<u8>().prop_filter("a version this build reads", |v| {
            *v != FRAME_VERSION && *v != COMPRESSED_FRAME_VERSION
        }),
    ) {
        let mut bytes = frame.encode().unwrap();
        bytes[0] = version;
        prop_assert_eq!(
            BatchFrame::decode(&bytes, usize::MAX),
            Err(FrameError::UnsupportedVersion(version))
        );
        prop_assert_eq!(
            AckFrame::decode(&bytes, usize::MAX),
            Err(FrameError::UnsupportedVersion(version))
        );
    }

    #[test]
    fn mutated_batch_frames_never_panic(
        frame in batch(),
        edits in edits(),
        cut in option::of(any::<prop::sample::Index>()),
    ) {
        let bytes = mutate(frame.encode().unwrap(), &edits, cut);
        if let Ok(decoded) = BatchFrame::decode(&bytes, usize::MAX) {
            check_batch_invariants(&decoded)?;
            prop_assert_eq!(
                BatchFrame::decode(&decoded.encode().unwrap(), usize::MAX),
                Ok(decoded)
            );
        }
        let _ = AckFrame::decode(&bytes, usize::MAX);
    }

    #[test]
    fn batches_out_of_order_are_inconsistent(frame in batch(), swap in any::<prop::sample::Index>()) {
        // Repeat one entry: first and last still match, but the run does not increase.
        let mut broken = frame.clone();
        let at = swap.index(broken.events.len());
        broken.events.insert(at + 1, broken.events[at].clone());
        prop_assert!(matches!(
            BatchFrame::decode(&broken.encode().unwrap(), usize::MAX),
            Err(FrameError::Inconsistent(_))
        ));
    }
}

// ---------- fixed cases ----------

fn sample_event() -> Event {
    parse_event(
        br#"{"v":1,"id":"evt-1","type":"pick","ts":"2026-11-22T10:15:00Z","order":"SO-1","sku":"S","qty":"1.5"}"#,
    )
    .unwrap()
}

fn sample_batch() -> BatchFrame {
    let entry = |seq| BatchEntry {
        seq,
        received_at_ms: 1_763_806_500_000,
        event: sample_event(),
    };
    BatchFrame {
        site: "wh-east".into(),
        epoch: Epoch(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        acked_through: 8,
        first_seq: 10,
        last_seq: 12,
        events: vec![entry(10), entry(11), entry(12)],
        signature: None,
    }
}

fn sample_ack() -> AckFrame {
    AckFrame {
        site: "wh-east".into(),
        epoch: Epoch(7),
        acked_through: 12,
        refused: None,
        outcomes: vec![EventOutcome {
            seq: 12,
            id: "evt-1".into(),
            outcome: Outcome::Posted {
                erp_ref: "ERP-9".into(),
            },
        }],
    }
}

#[track_caller]
fn assert_inconsistent(frame: &BatchFrame) -> String {
    match BatchFrame::decode(&frame.encode().unwrap(), usize::MAX) {
        Err(FrameError::Inconsistent(why)) => why,
        other => panic!("{frame:?} decoded as {other:?}"),
    }
}

#[test]
fn the_sample_frames_round_trip() {
    let batch = sample_batch();
    assert_eq!(
        BatchFrame::decode(&batch.encode().unwrap(), 1 << 20),
        Ok(batch)
    );
    let ack = sample_ack();
    assert_eq!(AckFrame::decode(&ack.encode().unwrap(), 1 << 20), Ok(ack));
}

#[test]
fn frames_over_the_limit_are_refused_before_decoding() {
    let bytes = sample_batch().encode().unwrap();
    let max = bytes.len() - 1;
    let err = BatchFrame::decode(&bytes, max).unwrap_err();
    assert_eq!(
        err,
        FrameError::TooLarge {
            len: bytes.len(),
            max
        }
    );
    assert_eq!(
        err.to_string(),
        format!(
            "frame of {} bytes is over the limit of {max} bytes",
            bytes.len()
        )
    );
    assert!(BatchFrame::decode(&bytes, bytes.len()).is_ok());
    // Size comes first: even garbage is TooLarge, not Malformed.
    assert_eq!(
        AckFrame::decode(&[0xff; 10], 9),
        Err(FrameError::TooLarge { len: 10, max: 9 })
    );
}

#[test]
fn wrong_versions_and_empty_frames_are_refused() {
    let mut bytes = sample_ack().encode().unwrap();
    for version in [0, 2, 255] {
        bytes[0] = version;
        let err = AckFrame::decode(&bytes, usize::MAX).unwrap_err();
        assert_eq!(err, FrameError::UnsupportedVersion(version));
        assert_eq!(
            err.to_string(),
            format!(
                "frame version {version} is not supported (this build reads version 1, and 3 \
                 for batches compressed with zstd)"
            )
        );
    }
    assert_eq!(BatchFrame::decode(&[], usize::MAX), Err(FrameError::Empty));
    assert_eq!(AckFrame::decode(&[], usize::MAX), Err(FrameError::Empty));
}

#[test]
fn truncated_and_padded_frames_are_malformed() {
    let bytes = sample_batch().encode().unwrap();
    for len in 1..bytes.len() {
        assert!(
            matches!(
                BatchFrame::decode(&bytes[..len], usize::MAX),
                Err(FrameError::Malformed(_))
            ),
            "cut at {len}"
        );
    }
    let mut padded = bytes.clone();
    padded.push(0);
    assert_eq!(
        BatchFrame::decode(&padded, usize::MAX),
        Err(FrameError::Malformed(
            "1 trailing bytes after the frame".into()
        ))
    );
}

#[test]
fn first_seq_after_last_seq_is_inconsistent() {
    let mut frame = sample_batch();
    frame.first_seq = 13;
    let why = assert_inconsistent(&frame);
    assert_eq!(why, "first_seq 13 is after last_seq 12");
}

#[test]
fn a_batch_must_start_after_what_was_acknowledged() {
    let mut frame = sample_batch();
    frame.acked_through = 10;
    let why = assert_inconsistent(&frame);
    assert_eq!(why, "first_seq 10 is not after acked_through 10");
}

#[test]
fn a_batch_without_events_is_inconsistent() {
    let mut frame = sample_batch();
    frame.events.clear();
    assert_eq!(assert_inconsistent(&frame), "a batch holds no events");
}

#[test]
fn sequence_numbers_must_increase() {
    let mut frame = sample_batch();
    frame.events[1].seq = 10;
    assert_eq!(
        assert_inconsistent(&frame),
        "sequence numbers must increase, but 10 is followed by 10"
    );
    let mut frame = sample_batch();
    frame.events.swap(0, 1);
    frame.events[0].seq = 10;
    frame.events[1].seq = 9;
    assert_eq!(
        assert_inconsistent(&frame),
        "sequence numbers must increase, but 10 is followed by 9"
    );
}

#[test]
fn events_must_span_first_to_last_seq() {
    let mut frame = sample_batch();
    frame.last_seq = 20;
    assert_eq!(
        assert_inconsistent(&frame),
        "events run from 10 to 12 but the batch says 10 to 20"
    );
    let mut frame = sample_batch();
    frame.first_seq = 9;
    assert_eq!(
        assert_inconsistent(&frame),
        "events run from 10 to 12 but the batch says 9 to 12"
    );
}

#[test]
fn bad_site_ids_are_inconsistent() {
    let too_long = "a".repeat(65);
    for site in [
        "",
        "WH-East",
        "-east",
        "_east",
        "wh/east",
        "wh east",
        "wh+",
        too_long.as_str(),
    ] {
        let mut frame = sample_batch();
        frame.site = site.into();
        let why = assert_inconsistent(&frame);
        assert!(why.starts_with("site: "), "{why}");

        let mut ack = sample_ack();
        ack.site = site.into();
        assert!(
            matches!(
                AckFrame::decode(&ack.encode().unwrap(), usize::MAX),
                Err(FrameError::Inconsistent(why)) if why.starts_with("site: ")
            ),
            "{site:?}"
        );
    }
    let mut frame = sample_batch();
    frame.site = "a".repeat(64);
    assert!(BatchFrame::decode(&frame.encode().unwrap(), usize::MAX).is_ok());
}

#[test]
fn a_huge_length_prefix_does_not_allocate_or_panic() {
    // Version, then a site string claiming u64::MAX bytes.
    let mut bytes = vec![FRAME_VERSION];
    bytes.extend([0xff; 9]);
    bytes.push(0x01);
    assert!(matches!(
        BatchFrame::decode(&bytes, usize::MAX),
        Err(FrameError::Malformed(_))
    ));
    assert!(matches!(
        AckFrame::decode(&bytes, usize::MAX),
        Err(FrameError::Malformed(_))
    ));
}

// ---------- compressed batches ----------

proptest! {
    #[test]
    fn batches_round_trip_compressed(frame in batch()) {
        let bytes = frame.encode_with(Compression::Zstd).unwrap();
        // Compressed, or as it is when compressing would not make it smaller.
        prop_assert!(bytes.len() <= frame.encode().unwrap().len());
        prop_assert_eq!(BatchFrame::decode(&bytes, 1 << 24).unwrap(), frame);
    }

    #[test]
    fn random_bytes_after_the_compressed_version_byte_never_panic(
        body in vec(any::<u8>(), 0..512)
    ) {
        let mut bytes = vec![COMPRESSED_FRAME_VERSION];
        bytes.extend(body);
        let _ = BatchFrame::decode(&bytes, 1 << 20);
    }
}

/// A day's scans as a warehouse makes them: ids counting up, a few hundred SKUs and locations,
/// orders of a few lines, timestamps a second or so apart.
fn warehouse_batch(events: u64) -> (BatchFrame, usize) {
    let mut json_bytes = 0;
    let entries = (0..events)
        .map(|i| {
            let json = format!(
                r#"{{"v":1,"id":"wh-east-{:08}","type":"pick","ts":"2026-11-22T10:{:02}:{:02}Z","order":"SO-{}","line":{},"sku":"SKU-{:05}","qty":"{}","location":"A-{:02}-{:02}","device":"scanner-{:02}"}}"#,
                1_000_000 + i * 7,
                (i / 60) % 60,
                i % 60,
                400_000 + i / 4,
                i % 4 + 1,
                (i * 7_919) % 400,
                i % 9 + 1,
                (i * 31) % 40,
                (i * 17) % 12,
                i % 24,
            );
            json_bytes += json.len();
            BatchEntry {
                seq: i + 1,
                received_at_ms: 1_763_806_500_000 + i as i64 * 1_013,
                event: parse_event(json.as_bytes()).unwrap(),
            }
        })
        .collect();
    let frame = BatchFrame {
        site: "wh-east".into(),
        epoch: Epoch(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef),
        acked_through: 0,
        first_seq: 1,
        last_seq: events,
        events: entries,
        signature: None,
    };
    (frame, json_bytes)
}

#[test]
fn a_compressed_batch_carries_at_most_a_quarter_of_its_events_json() {
    for events in [100u64, 500, 2000] {
        let (frame, json_bytes) = warehouse_batch(events);
        let plain = frame.encode_with(Compression::None).unwrap();
        let compressed = frame.encode_with(Compression::Zstd).unwrap();
        let share = compressed.len() as f64 / json_bytes as f64;
        eprintln!(
            "{events} events: JSON {json_bytes} B, plain frame {} B, compressed {} B ({:.1} % of the JSON, {:.1} B per event)",
            plain.len(),
            compressed.len(),
            share * 100.0,
            compressed.len() as f64 / events as f64
        );
        assert!(
            share <= 0.25,
            "{events} events: {:.1} % of their JSON",
            share * 100.0
        );
        assert_eq!(BatchFrame::decode(&compressed, 1 << 24).unwrap(), frame);
    }
}

#[test]
fn a_compressed_batch_is_refused_by_its_stated_size_before_it_is_decompressed() {
    let (frame, _) = warehouse_batch(2000);
    let compressed = frame.encode_with(Compression::Zstd).unwrap();
    let plain_len = frame.encode().unwrap().len() - 1;
    // Small on the wire, too large once decompressed.
    let error = BatchFrame::decode(&compressed, compressed.len() + 1).unwrap_err();
    assert_eq!(
        error,
        FrameError::TooLarge {
            len: plain_len,
            max: compressed.len() + 1
        }
    );
    // Cut short, it is malformed, not a panic.
    let cut = &compressed[..compressed.len() / 2];
    assert!(matches!(
        BatchFrame::decode(cut, 1 << 24),
        Err(FrameError::Malformed(_))
    ));
    // A zstd stream that does not state its size is refused.
    let mut unsized_frame = vec![COMPRESSED_FRAME_VERSION];
    let mut encoder = zstd_stream_without_size(&frame.encode().unwrap()[1..]);
    unsized_frame.append(&mut encoder);
    let error = BatchFrame::decode(&unsized_frame, 1 << 24).unwrap_err();
    assert!(
        error.to_string().contains("state its decompressed size"),
        "{error}"
    );
}

/// zstd's streaming encoder writes no content size in the frame header.
fn zstd_stream_without_size(plain: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    encoder.write_all(plain).unwrap();
    encoder.finish().unwrap()
}

#[test]
fn a_reader_of_version_1_frames_names_the_version_of_a_compressed_one() {
    let compressed = warehouse_batch(100)
        .0
        .encode_with(Compression::Zstd)
        .unwrap();
    // An acknowledgement reader, like any version-1-only reader, refuses it by its first byte.
    let error = AckFrame::decode(&compressed, 1 << 20).unwrap_err();
    assert_eq!(
        error,
        FrameError::UnsupportedVersion(COMPRESSED_FRAME_VERSION)
    );
    assert!(error.to_string().contains("frame version 3"), "{error}");
}

fn tally() -> backhaul_events::TallyFrame {
    backhaul_events::TallyFrame {
        site: "wh1".into(),
        epoch: Epoch(7),
        acked_through: 10,
        at_ms: 1_765_000_000_000,
        days: vec![
            backhaul_events::DayTally {
                day: 20_000,
                epoch: Epoch(7),
                first_seq: 1,
                last_seq: 7,
                counts: [2, 1, 1, 1, 2],
            },
            backhaul_events::DayTally {
                day: 20_001,
                epoch: Epoch(7),
                first_seq: 8,
                last_seq: 12,
                counts: [5, 0, 0, 0, 0],
            },
        ],
        waiting: vec![backhaul_events::WaitingAtSite {
            seq: 11,
            id: "pick-11".into(),
            received_at_ms: 1_765_000_000_000,
        }],
        waiting_total: 2,
    }
}

fn tally_error(frame: &backhaul_events::TallyFrame) -> String {
    let bytes = frame.encode().unwrap();
    match backhaul_events::TallyFrame::decode(&bytes, 1 << 20) {
        Ok(_) => panic!("decoded: {frame:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_tally_round_trips_and_a_forged_one_is_refused_naming_the_rule() {
    let good = tally();
    let bytes = good.encode().unwrap();
    assert_eq!(
        backhaul_events::TallyFrame::decode(&bytes, 1 << 20).unwrap(),
        good
    );

    // A day that claims the whole sequence space would keep a relay busy for ever.
    let mut huge = tally();
    huge.days[0].first_seq = 0;
    huge.days[0].last_seq = u64::MAX;
    assert!(
        tally_error(&huge).contains("sequence numbers it spans"),
        "{}",
        tally_error(&huge)
    );
    // More events than sequence numbers.
    let mut crowded = tally();
    crowded.days[1].counts = [6, 0, 0, 0, 0];
    assert!(tally_error(&crowded).contains("counts (6) must fit the 5"));
    let mut overflow = tally();
    overflow.days[1].counts = [u64::MAX, 1, 0, 0, 0];
    assert!(tally_error(&overflow).contains("must fit"));
    // Days out of order, and an id a terminal would choke on.
    let mut unordered = tally();
    unordered.days.swap(0, 1);
    assert!(tally_error(&unordered).contains("days: must increase"));
    let mut control = tally();
    control.waiting[0].id = "pick\u{1b}[2J".into();
    assert!(tally_error(&control).contains("without control characters"));
    // Over its own size limit, whatever the broker allows.
    let mut long = tally();
    long.waiting = (0..200)
        .map(|n| backhaul_events::WaitingAtSite {
            seq: n,
            id: "x".repeat(64),
            received_at_ms: 0,
        })
        .collect();
    long.site = "wh1".into();
    let bytes = long.encode().unwrap();
    assert!(bytes.len() < backhaul_events::TallyFrame::MAX_BYTES);
    let mut padded = bytes.clone();
    padded.resize(backhaul_events::TallyFrame::MAX_BYTES + 1, 0);
    assert!(matches!(
        backhaul_events::TallyFrame::decode(&padded, 8 << 20),
        Err(backhaul_events::FrameError::TooLarge { .. })
    ));
}
