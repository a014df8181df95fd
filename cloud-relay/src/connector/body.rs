//! Body mappings of the HTTP connector: the JSON an ERP wants for each event type, built from
//! `[sink.http.body.TYPE]` tables, checked at start and filled per event.
//!
//! A `[sink.http.body.TYPE]` table (TYPE one of pick, ship, receive, adjust, count) replaces
//! the canonical JSON of that type's events with a JSON object of the ERP's own shape; types
//! without one are posted as before. Headers and answers are the same either way.
//!
//! ```toml
//! [sink.http.body.pick]
//! "salesOrder" = "{order}"
//! "line.number" = "{line:number}"   # dotted keys nest objects: {"line": {"number": 3, ...}}
//! "line.item" = "{sku}"
//! "line.quantity" = "{qty:number}"  # a JSON number with every digit of the exact qty
//! "postingDate" = "{ts:date}"       # 2026-11-22T23:30:00-05:00 gives "2026-11-22"
//! "source" = "backhaul {site}"      # text around placeholders is kept
//! "company" = 1                     # whole numbers and true/false are posted as they are
//! ```
//!
//! - Each key is a path of names separated by dots; the names nest objects. A TOML table
//!   (`line.number = ...` unquoted, or `[sink.http.body.pick.line]`) nests the same way. A
//!   path is either a value or an object, never both, and is given once. Keys are posted
//!   sorted by name (byte order). A JSON key cannot itself contain a dot.
//! - Values are texts with placeholders, whole numbers or booleans. Placeholders: the
//!   canonical event's fields `v`, `id`, `type`, `ts`, `device`, `order`, `line`, `sku`,
//!   `qty`, `uom`, `location`, `lot`, `serial`, `reason`, `carrier`, `tracking`, `po`,
//!   `attrs.NAME` (one attribute; NAME cannot hold `:`, `{` or `}`), and the agent's stamp
//!   `site`, `epoch`, `seq`, `received_at_ms`. `{{` and `}}` are literal braces.
//! - Conversions: none gives the field's text (`qty` as its exact decimal text); `:number`,
//!   on `v`, `line`, `qty`, `seq` and `received_at_ms` only, makes a value that is exactly
//!   that one placeholder a JSON number, written from the exact decimal so no digit is lost
//!   (inside a longer text it is the same as no conversion); `:date`, on `ts` only, is the
//!   calendar date of `ts` in its own offset, `YYYY-MM-DD`.
//! - A key whose placeholders name an optional field the event does not have (`order`,
//!   `line`, `lot`, an attribute, ...) is left out of the body, and so is an object left
//!   with no keys. Nothing checks that the ERP's required fields are there: an ERP that
//!   refuses the body answers 4xx, and the event goes to the dead-letter queue.
//! - Every mistake is refused at start, naming the key: an unknown type table, an unknown
//!   placeholder or conversion, `:number` on a field that is not a number, `:date` on any
//!   field but `ts`, a key that is both a value and an object, an unclosed `{` or a lone `}`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use backhaul_events::{EventType, StampedEvent};
use serde::Deserialize;

/// Compiles the `[sink.http.body.TYPE]` tables; an error names the key and what was expected.
pub fn compile(
    body: &BTreeMap<String, BTreeMap<String, BodyValue>>,
) -> Result<BTreeMap<EventType, BodyMapping>, (String, String)> {
    let mut mappings = BTreeMap::new();
    for (kind, table) in body {
        let base = format!("sink.http.body.{}", toml_key(kind));
        let Ok(kind) = kind.parse::<EventType>() else {
            return Err((
                base,
                "an event type: pick, ship, receive, adjust or count".into(),
            ));
        };
        if table.is_empty() {
            return Err((
                base,
                "at least one body key (leave the table out to post the canonical JSON)".into(),
            ));
        }
        let mut root = Object::new();
        add_keys(&mut root, &base, &[], table)?;
        mappings.insert(kind, BodyMapping { root });
    }
    Ok(mappings)
}

/// One value of a body mapping as the configuration gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyValue {
    /// Text with `{placeholder}`s.
    Template(String),
    /// A whole number, posted as a JSON number (kept as its decimal text).
    Integer(String),
    Bool(bool),
    /// A TOML table: its keys nest under this one, as dotted keys do.
    Table(BTreeMap<String, BodyValue>),
}

impl<'de> Deserialize<'de> for BodyValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ValueVisitor;
        impl<'de> serde::de::Visitor<'de> for ValueVisitor {
            type Value = BodyValue;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a text with {placeholders}, a whole number, true or false, or a table")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<BodyValue, E> {
                Ok(BodyValue::Template(v.to_string()))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<BodyValue, E> {
                Ok(BodyValue::Template(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<BodyValue, E> {
                Ok(BodyValue::Integer(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<BodyValue, E> {
                Ok(BodyValue::Integer(v.to_string()))
            }
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<BodyValue, E> {
                Ok(BodyValue::Bool(v))
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut map: M,
            ) -> Result<BodyValue, M::Error> {
                let mut table = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    // How the TOML deserializer hands over its date and time values.
                    if key.starts_with("$__toml_private") {
                        return Err(serde::de::Error::custom(
                            "a TOML date or time is not a body value: quote it as a text",
                        ));
                    }
                    let value = map.next_value::<BodyValue>()?;
                    table.insert(key, value);
                }
                Ok(BodyValue::Table(table))
            }
        }
        d.deserialize_any(ValueVisitor)
    }
}

/// A compiled body mapping: the JSON object to post, with placeholders to fill per event.
#[derive(Debug, Clone)]
pub struct BodyMapping {
    root: Object,
}

type Object = BTreeMap<String, Node>;

#[derive(Debug, Clone)]
enum Node {
    Leaf(Leaf),
    Object(Object),
}

#[derive(Debug, Clone)]
enum Leaf {
    /// JSON text posted as it is (a string without placeholders, a number, a boolean).
    Constant(String),
    /// Exactly one `{field:number}`: a JSON number.
    Number(Field),
    /// Text with placeholders: a JSON string.
    Text(Vec<Piece>),
}

#[derive(Debug, Clone)]
enum Piece {
    Literal(String),
    Field(Field, Conversion),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conversion {
    None,
    Number,
    Date,
}

/// What a placeholder can name: the canonical event's fields and the agent's stamp.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    V,
    Id,
    Type,
    Ts,
    Device,
    Order,
    Line,
    Sku,
    Qty,
    Uom,
    Location,
    Lot,
    Serial,
    Reason,
    Carrier,
    Tracking,
    Po,
    Attr(String),
    Site,
    Epoch,
    Seq,
    ReceivedAtMs,
}

/// The placeholders in the order the docs and errors list them.
const PLACEHOLDERS: &str = "v, id, type, ts, device, order, line, sku, qty, uom, location, lot, \
     serial, reason, carrier, tracking, po, attrs.NAME, site, epoch, seq, received_at_ms";
const NUMERIC: &str = "v, line, qty, seq, received_at_ms";

impl Field {
    fn named(name: &str) -> Option<Field> {
        Some(match name {
            "v" => Field::V,
            "id" => Field::Id,
            "type" => Field::Type,
            "ts" => Field::Ts,
            "device" => Field::Device,
            "order" => Field::Order,
            "line" => Field::Line,
            "sku" => Field::Sku,
            "qty" => Field::Qty,
            "uom" => Field::Uom,
            "location" => Field::Location,
            "lot" => Field::Lot,
            "serial" => Field::Serial,
            "reason" => Field::Reason,
            "carrier" => Field::Carrier,
            "tracking" => Field::Tracking,
            "po" => Field::Po,
            "site" => Field::Site,
            "epoch" => Field::Epoch,
            "seq" => Field::Seq,
            "received_at_ms" => Field::ReceivedAtMs,
            _ => match name.strip_prefix("attrs.") {
                Some(attr) if !attr.is_empty() => Field::Attr(attr.to_string()),
                _ => return None,
            },
        })
    }

    fn is_numeric(&self) -> bool {
        matches!(
            self,
            Field::V | Field::Line | Field::Qty | Field::Seq | Field::ReceivedAtMs
        )
    }

    /// The field's text, `None` when the event does not have it. Numbers are their exact
    /// decimal text (`qty` keeps its scale), valid as JSON numbers.
    fn text<'a>(&self, stamped: &'a StampedEvent) -> Option<Cow<'a, str>> {
        let event = &stamped.event;
        let optional = |value: &'a Option<String>| value.as_deref().map(Cow::Borrowed);
        match self {
            Field::V => Some(Cow::Borrowed("1")),
            Field::Id => Some(Cow::Borrowed(&event.id)),
            Field::Type => Some(Cow::Borrowed(event.kind.as_str())),
            Field::Ts => Some(Cow::Borrowed(&event.ts)),
            Field::Device => optional(&event.device),
            Field::Order => optional(&event.order),
            Field::Line => event.line.map(|line| Cow::Owned(line.to_string())),
            Field::Sku => Some(Cow::Borrowed(&event.sku)),
            Field::Qty => Some(Cow::Owned(event.qty.to_string())),
            Field::Uom => Some(Cow::Borrowed(&event.uom)),
            Field::Location => optional(&event.location),
            Field::Lot => optional(&event.lot),
            Field::Serial => optional(&event.serial),
            Field::Reason => optional(&event.reason),
            Field::Carrier => optional(&event.carrier),
            Field::Tracking => optional(&event.tracking),
            Field::Po => optional(&event.po),
            Field::Attr(name) => event.attrs.get(name).map(|v| Cow::Borrowed(v.as_str())),
            Field::Site => Some(Cow::Borrowed(&stamped.site)),
            Field::Epoch => Some(Cow::Owned(stamped.epoch.to_string())),
            Field::Seq => Some(Cow::Owned(stamped.seq.to_string())),
            Field::ReceivedAtMs => Some(Cow::Owned(stamped.received_at_ms.to_string())),
        }
    }
}

/// A TOML key as it would be written: bare when it can be, quoted otherwise.
fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_string()
    } else {
        format!("{key:?}")
    }
}

/// Adds the keys of one TOML table of a mapping to the JSON object tree. `base` is the TOML
/// path of the table (for errors), `prefix` its JSON path.
fn add_keys(
    root: &mut Object,
    base: &str,
    prefix: &[&str],
    table: &BTreeMap<String, BodyValue>,
) -> Result<(), (String, String)> {
    for (key, value) in table {
        let toml_path = format!("{base}.{}", toml_key(key));
        let mut path = prefix.to_vec();
        path.extend(key.split('.'));
        if key.split('.').any(str::is_empty) {
            return Err((
                toml_path,
                "a body key of names separated by dots, none of them empty".into(),
            ));
        }
        let leaf = match value {
            BodyValue::Table(table) => {
                add_keys(root, &toml_path, &path, table)?;
                continue;
            }
            BodyValue::Template(text) => {
                compile_template(text).map_err(|e| (toml_path.clone(), e))?
            }
            BodyValue::Integer(text) => Leaf::Constant(text.clone()),
            BodyValue::Bool(value) => Leaf::Constant(value.to_string()),
        };
        insert(root, &path, leaf).map_err(|e| (toml_path, e))?;
    }
    Ok(())
}

/// Puts a leaf at a JSON path, refusing a key that would be both a value and an object.
fn insert(root: &mut Object, path: &[&str], leaf: Leaf) -> Result<(), String> {
    let Some((last, parents)) = path.split_last() else {
        return Err("a body key".into());
    };
    let both = |upto: &[&str]| {
        format!(
            "a body key that is a value or an object, not both: {} is both",
            upto.join(".")
        )
    };
    let mut object = root;
    for (depth, part) in parents.iter().enumerate() {
        let node = object
            .entry(part.to_string())
            .or_insert_with(|| Node::Object(Object::new()));
        object = match node {
            Node::Object(inner) => inner,
            Node::Leaf(_) => return Err(both(&path[..=depth])),
        };
    }
    match object.entry(last.to_string()) {
        std::collections::btree_map::Entry::Vacant(slot) => {
            slot.insert(Node::Leaf(leaf));
            Ok(())
        }
        std::collections::btree_map::Entry::Occupied(slot) => match slot.get() {
            Node::Object(_) => Err(both(path)),
            Node::Leaf(_) => Err(format!(
                "each body key once: {} is given twice",
                path.join(".")
            )),
        },
    }
}

/// Compiles a text with `{field}` and `{field:conversion}` placeholders; `{{` and `}}` stand
/// for literal braces. The error says what was expected.
fn compile_template(text: &str) -> Result<Leaf, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if let Some(after) = rest.strip_prefix("{{") {
            literal.push('{');
            rest = after;
        } else if let Some(after) = rest.strip_prefix("}}") {
            literal.push('}');
            rest = after;
        } else if let Some(after) = rest.strip_prefix('{') {
            let end = after
                .find(['{', '}'])
                .filter(|&i| after[i..].starts_with('}'));
            let Some(end) = end else {
                let start: String = rest.chars().take(24).collect();
                return Err(format!(
                    "every {{ closed by a }}: \"{start}\" is not (write {{{{ for a literal {{)"
                ));
            };
            let (field, conversion) = placeholder(&after[..end])?;
            if !literal.is_empty() {
                pieces.push(Piece::Literal(std::mem::take(&mut literal)));
            }
            pieces.push(Piece::Field(field, conversion));
            rest = &after[end + 1..];
        } else if rest.starts_with('}') {
            return Err("a } only where it closes a placeholder (write }} for a literal })".into());
        } else {
            literal.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(match pieces.as_slice() {
        [] => Leaf::Constant(json_string("")),
        [Piece::Literal(text)] => Leaf::Constant(json_string(text)),
        [Piece::Field(field, Conversion::Number)] => Leaf::Number(field.clone()),
        _ => Leaf::Text(pieces),
    })
}

/// `name` or `name:conversion`, checked against the known fields and conversions.
fn placeholder(inside: &str) -> Result<(Field, Conversion), String> {
    let (name, conversion) = match inside.split_once(':') {
        Some((name, conversion)) => (name, Some(conversion)),
        None => (inside, None),
    };
    let Some(field) = Field::named(name) else {
        return Err(format!(
            "a known placeholder instead of {{{inside}}}: one of {PLACEHOLDERS}"
        ));
    };
    let conversion = match conversion {
        None => Conversion::None,
        Some("number") if field.is_numeric() => Conversion::Number,
        Some("number") => {
            return Err(format!(
                ":number only on a numeric field ({NUMERIC}), not in {{{inside}}}"
            ));
        }
        Some("date") if field == Field::Ts => Conversion::Date,
        Some("date") => return Err(format!(":date only on ts, not in {{{inside}}}")),
        Some(_) => {
            return Err(format!(
                "a known conversion instead of {{{inside}}}: :number (on {NUMERIC}) or :date (on ts)"
            ));
        }
    };
    Ok((field, conversion))
}

/// A JSON string literal.
fn json_string(text: &str) -> String {
    serde_json::Value::from(text).to_string()
}

impl BodyMapping {
    /// The JSON body for one event. A key whose placeholders name a field the event does not
    /// have is left out, and so is an object left with no keys. Fails only on a `ts` that is
    /// not RFC 3339, which validated events never have.
    pub fn render(&self, event: &StampedEvent) -> Result<String, String> {
        Ok(render_object(&self.root, event)?.unwrap_or_else(|| "{}".into()))
    }
}

fn render_object(object: &Object, event: &StampedEvent) -> Result<Option<String>, String> {
    let mut out = String::new();
    for (key, node) in object {
        let value = match node {
            Node::Object(inner) => render_object(inner, event)?,
            Node::Leaf(leaf) => render_leaf(leaf, event)?,
        };
        if let Some(value) = value {
            out.push(if out.is_empty() { '{' } else { ',' });
            out.push_str(&json_string(key));
            out.push(':');
            out.push_str(&value);
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    out.push('}');
    Ok(Some(out))
}

fn render_leaf(leaf: &Leaf, event: &StampedEvent) -> Result<Option<String>, String> {
    Ok(match leaf {
        Leaf::Constant(json) => Some(json.clone()),
        // Integers and rust_decimal's plain (never exponent) text are valid JSON numbers.
        Leaf::Number(field) => field.text(event).map(Cow::into_owned),
        Leaf::Text(pieces) => {
            let mut text = String::new();
            for piece in pieces {
                match piece {
                    Piece::Literal(literal) => text.push_str(literal),
                    Piece::Field(field, conversion) => {
                        let Some(value) = field.text(event) else {
                            return Ok(None);
                        };
                        if *conversion == Conversion::Date {
                            text.push_str(&calendar_date(&value)?);
                        } else {
                            text.push_str(&value);
                        }
                    }
                }
            }
            Some(json_string(&text))
        }
    })
}

/// The calendar date of an RFC 3339 time in its own offset, as YYYY-MM-DD.
fn calendar_date(ts: &str) -> Result<String, String> {
    let date = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("the event's ts {ts:?} is not an RFC 3339 time: {e}"))?
        .date();
    Ok(format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    ))
}
