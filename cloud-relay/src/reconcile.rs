//! Reconciliation of a site's days with the ERP, for `backhaul-relay reconcile` and
//! `GET /v1/reconcile`: per day and event type, what the site's agent accepted (its tally),
//! what the relay stored, still holds, posted, dead-lettered or discarded, and what the ERP
//! itself holds of what was posted; then every event that differs and where it is now.
//!
//! What it owns: gathering the relay's side from the outbox (waiting events, dead letters, and
//! the traces of events that left it, so as far back as `outbox.trace_days`), comparing it
//! with the site's tally sequence number by sequence number, and the report with its table,
//! JSON and CSV forms. Asking the ERP is the connector's ([`crate::connector::Connector::holdings`]).
//!
//! A day is the UTC day the agent received the event, on every side: the site counts by it, and
//! the relay knows it from each event's receive time.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use backhaul_events::{Epoch, EventType, StampedEvent, TallyFrame};
use serde::{Deserialize, Serialize};
use time::Date;

use crate::outbox::{Outbox, OutboxError};
use crate::trace::Finished;

/// The location of events that name none: the warehouse's storage location.
pub const WAREHOUSE_STORAGE: &str = "(storage)";

/// Differences listed at most; the rest are counted.
pub const DIFFERENCES_LISTED: usize = 1000;
/// Entries read from the outbox per call.
const PAGE: usize = 5000;
/// Repeats of a site read at most.
const REPEATS_READ: usize = 100_000;
const MS_PER_DAY: i64 = 86_400_000;
const UNIX_EPOCH_JULIAN_DAY: i32 = 2_440_588;

/// Where an event the relay knows of is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayState {
    /// In the outbox, waiting for delivery.
    Waiting,
    Posted {
        erp_ref: String,
    },
    DeadLettered {
        reason: String,
    },
    /// Dead-lettered, then discarded by an operator.
    Discarded {
        reason: String,
    },
    /// Dropped at intake as a repeat of an id already stored (under another sequence
    /// number): the ERP gets it once.
    Repeated,
}

/// An event of the site the relay knows of.
#[derive(Debug, Clone)]
pub struct Known {
    pub id: String,
    pub epoch: Epoch,
    pub seq: u64,
    pub kind: EventType,
    pub received_at_ms: i64,
    pub state: RelayState,
    /// What the quantities per SKU and location need of the event.
    pub sku: String,
    pub qty: rust_decimal::Decimal,
    pub location: Option<String>,
    pub order: Option<String>,
}

/// One SKU at one location: the net quantity the site's events imply, against what the ERP
/// booked from the documents delivery made for them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct QuantityRow {
    pub sku: String,
    /// The events' location, or [`WAREHOUSE_STORAGE`].
    pub location: String,
    /// Events of this SKU and location that move stock.
    pub events: u64,
    pub implied: String,
    pub booked: String,
    pub differs: bool,
}

/// What the ERP says of the events posted to it, by event id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErpHoldings {
    /// The connector cannot ask this ERP; why.
    NotAvailable(String),
    /// Asked: for each posted event the ERP no longer holds, why (deleted, cancelled). An id
    /// not listed is held.
    Checked { missing: HashMap<String, String> },
}

/// One day and event type of the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Row {
    pub day: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Accepted at the site; `None` when the site's tally does not reach this day.
    pub accepted: Option<u64>,
    /// Accepted at the site and not known to the relay; `None` before the trace horizon,
    /// where the relay no longer knows what it delivered.
    pub not_at_relay: Option<u64>,
    /// Known to the relay: waiting + posted + dead-lettered + discarded + repeats.
    pub at_relay: u64,
    pub waiting: u64,
    pub posted: u64,
    pub dead_lettered: u64,
    pub discarded: u64,
    /// Accepted again by the site after the first copy had left it; dropped by the relay.
    #[serde(default)]
    pub repeats: u64,
    /// Posted and held by the ERP; `None` when the ERP cannot be asked.
    pub in_erp: Option<u64>,
    /// Posted, but the ERP no longer holds it.
    pub not_in_erp: Option<u64>,
}

/// An event that is not where a complete day would have it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Difference {
    pub day: String,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub id: Option<String>,
    pub epoch: String,
    pub seq: u64,
    /// `waiting_at_site`, `not_at_relay`, `waiting_at_relay`, `dead_lettered`, `discarded` or
    /// `not_in_erp`.
    pub state: String,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub site: String,
    pub from: String,
    pub to: String,
    /// When the site's agent made the tally the report uses; `None`: none has arrived.
    pub tally_at_ms: Option<i64>,
    /// Events waiting at the site when it made the tally.
    pub waiting_at_site: Option<u64>,
    /// The connector asked, and whether it could be.
    pub erp: String,
    pub erp_checked: bool,
    /// The relay keeps what became of events for this many days (`outbox.trace_days`).
    pub trace_days: u64,
    pub rows: Vec<Row>,
    /// Per SKU and location, for an ERP that books stock (Tryton); `None` otherwise.
    #[serde(default)]
    pub quantities: Option<Vec<QuantityRow>>,
    pub differences: Vec<Difference>,
    pub differences_total: u64,
    pub notes: Vec<String>,
}

/// Reads a calendar day, `YYYY-MM-DD`; the error names `what` and the form.
pub fn parse_day(what: &str, text: &str) -> Result<Date, String> {
    let format = time::macros::format_description!("[year]-[month]-[day]");
    match Date::parse(text, format) {
        Ok(day) if text.len() == 10 => Ok(day),
        _ => Err(format!("{what}: a calendar day, YYYY-MM-DD (got {text:?})")),
    }
}

/// Days since 1970-01-01 of a calendar day.
pub fn day_number(day: Date) -> i32 {
    day.to_julian_day() - UNIX_EPOCH_JULIAN_DAY
}

fn day_text(day: i32) -> String {
    Date::from_julian_day(day + UNIX_EPOCH_JULIAN_DAY)
        .map(|d| d.to_string())
        .unwrap_or_else(|_| format!("day {day}"))
}

fn day_of_ms(ms: i64) -> i32 {
    ms.div_euclid(MS_PER_DAY)
        .clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// Everything the relay knows of the site's events: waiting, dead letters, and the traces of
/// events that left the outbox. Only the events received on `days` are returned; `seen` gets
/// the sequence numbers of all of them, whatever their day.
///
/// The three are read one after another while delivery goes on, so an event may move between
/// them meanwhile: waiting events are read first and traces last, so a moving event is found
/// at least once, and where it is found twice the later place wins (posted over waiting, a
/// queued dead letter over the trace of its refusal).
pub fn relay_side(
    outbox: &dyn Outbox,
    site: &str,
    days: std::ops::RangeInclusive<i32>,
    seen: &mut BTreeSet<(Epoch, u64)>,
) -> Result<Vec<Known>, OutboxError> {
    let mut known: HashMap<String, Known> = HashMap::new();
    let mut keep = |event: &StampedEvent, state: RelayState, known: &mut HashMap<String, Known>| {
        seen.insert((event.epoch, event.seq));
        if !days.contains(&day_of_ms(event.received_at_ms)) {
            return;
        }
        if let Some(kept) = known.get(&event.event.id)
            && rank(&kept.state) > rank(&state)
        {
            return;
        }
        known.insert(
            event.event.id.clone(),
            Known {
                id: event.event.id.clone(),
                epoch: event.epoch,
                seq: event.seq,
                kind: event.event.kind,
                received_at_ms: event.received_at_ms,
                state,
                sku: event.event.sku.clone(),
                qty: event.event.qty,
                location: event.event.location.clone(),
                order: event.event.order.clone(),
            },
        );
    };
    let mut after = 0;
    loop {
        let page = outbox.pending_after(after, PAGE)?;
        let Some(&(last, _)) = page.last() else { break };
        after = last;
        for (_, event) in page.iter().filter(|(_, e)| e.site == site) {
            keep(event, RelayState::Waiting, &mut known);
        }
        if page.len() < PAGE {
            break;
        }
    }
    let mut after = 0;
    loop {
        let page = outbox.dead_letters(after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for letter in page.iter().filter(|l| l.event.site == site) {
            let state = RelayState::DeadLettered {
                reason: letter.reason.clone(),
            };
            keep(&letter.event, state, &mut known);
        }
        if page.len() < PAGE {
            break;
        }
    }
    let mut after = String::new();
    loop {
        let page = outbox.site_traces(site, &after, PAGE)?;
        let Some(last) = page.last() else { break };
        after = last.event.event.id.clone();
        for trace in &page {
            let state = match trace.finished {
                Finished::Posted => RelayState::Posted {
                    erp_ref: trace.erp_ref.clone().unwrap_or_default(),
                },
                // Unless it was found waiting (replayed) or queued as a dead letter above.
                Finished::DeadLettered => RelayState::Discarded {
                    reason: trace.reason.clone().unwrap_or_default(),
                },
            };
            keep(&trace.event, state, &mut known);
        }
        if page.len() < PAGE {
            break;
        }
    }
    let mut known: Vec<Known> = known.into_values().collect();
    for repeat in outbox.site_repeats(site, REPEATS_READ)? {
        seen.insert((repeat.epoch, repeat.seq));
        if days.contains(&day_of_ms(repeat.received_at_ms)) {
            known.push(Known {
                id: repeat.id,
                epoch: repeat.epoch,
                seq: repeat.seq,
                kind: repeat.kind,
                received_at_ms: repeat.received_at_ms,
                state: RelayState::Repeated,
                sku: String::new(),
                qty: rust_decimal::Decimal::ZERO,
                location: None,
                order: None,
            });
        }
    }
    known.sort_by_key(|k| (k.epoch, k.seq));
    Ok(known)
}

/// Which of two places an event was found in is where it is now: posted is final; a waiting
/// event (one replayed) is past its dead letter; a queued dead letter is past a trace that
/// only says it was refused.
fn rank(state: &RelayState) -> u8 {
    match state {
        RelayState::Discarded { .. } | RelayState::Repeated => 0,
        RelayState::DeadLettered { .. } => 1,
        RelayState::Waiting => 2,
        RelayState::Posted { .. } => 3,
    }
}

/// Everything the report is made of.
pub struct Inputs<'a> {
    pub site: &'a str,
    pub from: Date,
    pub to: Date,
    pub tally: Option<&'a TallyFrame>,
    pub known: &'a [Known],
    /// Sequence numbers of every event of the site the relay knows, whatever its day.
    pub seen: &'a BTreeSet<(Epoch, u64)>,
    pub erp_name: &'a str,
    pub erp: &'a ErpHoldings,
    pub trace_days: u64,
    pub now_ms: i64,
    pub quantities: Option<Result<Vec<QuantityRow>, String>>,
}

pub fn report(inputs: &Inputs<'_>) -> Report {
    let (from, to) = (day_number(inputs.from), day_number(inputs.to));
    let checked = match inputs.erp {
        ErpHoldings::Checked { missing } => Some(missing),
        ErpHoldings::NotAvailable(_) => None,
    };
    let mut rows: BTreeMap<(i32, usize), Row> = BTreeMap::new();
    let erp_asked = checked.is_some();
    let mut differences = Differences::default();

    let tally_days: HashMap<i32, &backhaul_events::DayTally> = inputs
        .tally
        .map(|t| t.days.iter().map(|d| (d.day, d)).collect())
        .unwrap_or_default();
    // The days the tally covers: from its oldest to the day it was made.
    let tally_covers = inputs.tally.and_then(|t| {
        let oldest = t.days.iter().map(|d| d.day).min()?;
        Some(oldest..=day_of_ms(t.at_ms))
    });
    for day in from..=to {
        if let Some(tally) = tally_days.get(&day) {
            for (kind, &count) in tally.counts.iter().enumerate() {
                row(&mut rows, day, kind, erp_asked).accepted = Some(count);
            }
        } else if tally_covers
            .as_ref()
            .is_some_and(|days| days.contains(&day))
        {
            // The tally reaches this day and the site accepted nothing on it.
            for kind in 0..EventType::ALL.len() {
                row(&mut rows, day, kind, erp_asked).accepted = Some(0);
            }
        }
    }
    let kind_index = |kind: EventType| EventType::ALL.iter().position(|k| *k == kind).unwrap_or(0);
    for known in inputs.known {
        let day = day_of_ms(known.received_at_ms);
        let r = row(&mut rows, day, kind_index(known.kind), erp_asked);
        r.at_relay += 1;
        let difference = |state: &str, detail: String| Difference {
            day: day_text(day),
            kind: Some(known.kind.as_str().to_string()),
            id: Some(known.id.clone()),
            epoch: known.epoch.to_string(),
            seq: known.seq,
            state: state.to_string(),
            detail,
        };
        match &known.state {
            RelayState::Waiting => {
                r.waiting += 1;
                differences.push(difference(
                    "waiting_at_relay",
                    "in the relay's outbox, waiting for delivery".into(),
                ));
            }
            RelayState::Posted { erp_ref } => {
                r.posted += 1;
                match checked.map(|missing| missing.get(&known.id)) {
                    Some(Some(why)) => {
                        if let Some(n) = r.not_in_erp.as_mut() {
                            *n += 1;
                        }
                        differences.push(difference(
                            "not_in_erp",
                            format!("posted to the ERP as {erp_ref}, but {why}"),
                        ));
                    }
                    Some(None) => {
                        if let Some(n) = r.in_erp.as_mut() {
                            *n += 1;
                        }
                    }
                    None => {}
                }
            }
            RelayState::DeadLettered { reason } => {
                r.dead_lettered += 1;
                differences.push(difference(
                    "dead_lettered",
                    format!("in the dead-letter queue: {reason}"),
                ));
            }
            RelayState::Repeated => r.repeats += 1,
            RelayState::Discarded { reason } => {
                r.discarded += 1;
                differences.push(difference(
                    "discarded",
                    format!("dead-lettered, then discarded by an operator: {reason}"),
                ));
            }
        }
    }

    // What the site accepted that the relay does not know, sequence number by sequence number:
    // the gaps between the numbers the relay has, walked only as far as the list goes. Before
    // the trace horizon the relay has forgotten what it delivered, so only what the site still
    // holds is looked for there.
    let horizon_day = day_of_ms(inputs.now_ms) - inputs.trace_days as i32 + 1;
    let mut notes = Vec::new();
    if let Some(tally) = inputs.tally {
        let waiting: HashMap<u64, &str> = tally
            .waiting
            .iter()
            .map(|w| (w.seq, w.id.as_str()))
            .collect();
        for day in from..=to {
            let Some(day_tally) = tally_days.get(&day) else {
                continue;
            };
            let epoch = day_tally.epoch;
            let held_at_site = if epoch == tally.epoch {
                tally.acked_through.saturating_add(1)
            } else {
                u64::MAX
            };
            let ranges = if day < horizon_day {
                vec![(held_at_site.max(day_tally.first_seq), day_tally.last_seq)]
            } else {
                vec![
                    (
                        day_tally.first_seq,
                        day_tally.last_seq.min(held_at_site.saturating_sub(1)),
                    ),
                    (held_at_site.max(day_tally.first_seq), day_tally.last_seq),
                ]
            };
            for (lo, hi) in ranges.into_iter().filter(|(lo, hi)| lo <= hi) {
                let at_site = lo >= held_at_site;
                let (state, detail) = if at_site {
                    (
                        "waiting_at_site",
                        "at the site, not yet acknowledged by a relay",
                    )
                } else {
                    (
                        "not_at_relay",
                        "acknowledged by a relay but not in its records: delivered in the last \
                         seconds (its trace is written just after; ask again), a repeat beyond \
                         what the relay lists, or lost with its outbox",
                    )
                };
                let missing = missing_seqs(inputs.seen, epoch, lo, hi, differences.room());
                for &seq in &missing.listed {
                    differences.push(Difference {
                        day: day_text(day),
                        kind: None,
                        id: waiting.get(&seq).map(|id| id.to_string()),
                        epoch: epoch.to_string(),
                        seq,
                        state: state.into(),
                        detail: detail.into(),
                    });
                }
                differences.count_unlisted(missing.total - missing.listed.len() as u64);
            }
        }
        if inputs.trace_days > 0 && from < horizon_day {
            notes.push(format!(
                "the relay keeps what became of delivered events for {} days \
                 (outbox.trace_days): before {} its columns count only what is still \
                 waiting or dead-lettered",
                inputs.trace_days,
                day_text(horizon_day)
            ));
        }
    } else {
        notes.push(format!(
            "no tally from site {} has reached this relay: the site's agent sends one when it \
             connects (agents older than reconciliation do not)",
            inputs.site
        ));
    }
    if inputs.trace_days == 0 {
        notes.push(
            "outbox.trace_days is 0: the relay keeps nothing of delivered events, so posted \
             events are not counted"
                .into(),
        );
    }
    let quantities = match &inputs.quantities {
        Some(Ok(rows)) => Some(rows.clone()),
        Some(Err(why)) => {
            notes.push(format!(
                "quantities per SKU and location were not compared: {why}"
            ));
            None
        }
        None => None,
    };
    if let ErpHoldings::NotAvailable(why) = inputs.erp {
        notes.push(format!("the ERP was not asked: {why}"));
    }
    let mut more_at_relay = Vec::new();
    for (&(day, _), r) in rows.iter_mut() {
        let Some(accepted) = r.accepted else { continue };
        if day >= horizon_day {
            r.not_at_relay = Some(accepted.saturating_sub(r.at_relay));
        }
        if r.at_relay > accepted {
            more_at_relay.push(format!("{} {}", r.day, r.kind));
        }
    }
    if !more_at_relay.is_empty() {
        notes.push(format!(
            "the relay knows more events than the site's tally counts on {}: the site's log was \
             rebuilt (salvage, or a new state directory) since, and its tally starts again",
            more_at_relay.join(", ")
        ));
    }
    Report {
        site: inputs.site.to_string(),
        from: inputs.from.to_string(),
        to: inputs.to.to_string(),
        tally_at_ms: inputs.tally.map(|t| t.at_ms),
        waiting_at_site: inputs.tally.map(|t| t.waiting_total),
        erp: inputs.erp_name.to_string(),
        erp_checked: checked.is_some(),
        trace_days: inputs.trace_days,
        rows: rows.into_values().collect(),
        quantities,
        differences: differences.listed,
        differences_total: differences.total,
        notes,
    }
}

/// The differences found, the first [`DIFFERENCES_LISTED`] of them listed.
#[derive(Default)]
struct Differences {
    listed: Vec<Difference>,
    total: u64,
}

impl Differences {
    fn push(&mut self, difference: Difference) {
        self.total += 1;
        if self.listed.len() < DIFFERENCES_LISTED {
            self.listed.push(difference);
        }
    }

    fn room(&self) -> usize {
        DIFFERENCES_LISTED - self.listed.len()
    }

    fn count_unlisted(&mut self, n: u64) {
        self.total += n;
    }
}

/// Sequence numbers `lo..=hi` of `epoch` that `seen` lacks: how many, and the first `limit`.
struct Missing {
    total: u64,
    listed: Vec<u64>,
}

fn missing_seqs(
    seen: &BTreeSet<(Epoch, u64)>,
    epoch: Epoch,
    lo: u64,
    hi: u64,
    limit: usize,
) -> Missing {
    let mut missing = Missing {
        total: 0,
        listed: Vec::new(),
    };
    let note = |from: u64, to: u64, missing: &mut Missing| {
        if from > to {
            return;
        }
        missing.total += to - from + 1;
        let mut seq = from;
        while missing.listed.len() < limit && seq <= to {
            missing.listed.push(seq);
            seq += 1;
        }
    };
    let mut next = lo;
    for &(_, seq) in seen.range((epoch, lo)..=(epoch, hi)) {
        if seq > next {
            note(next, seq - 1, &mut missing);
        }
        next = seq.saturating_add(1);
    }
    if next <= hi {
        note(next, hi, &mut missing);
    }
    missing
}

/// The row of a day and event type, made empty when it is first needed.
fn row(rows: &mut BTreeMap<(i32, usize), Row>, day: i32, kind: usize, erp_asked: bool) -> &mut Row {
    rows.entry((day, kind)).or_insert_with(|| Row {
        day: day_text(day),
        kind: EventType::ALL[kind].as_str().to_string(),
        in_erp: erp_asked.then_some(0),
        not_in_erp: erp_asked.then_some(0),
        ..Row::default()
    })
}

fn cell(value: Option<u64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The report as a terminal table, then the differences.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "site {}, {} to {} (UTC days the agent received the events); ERP: {}",
        report.site,
        report.from,
        report.to,
        if report.erp_checked {
            report.erp.clone()
        } else {
            format!("{} (not asked)", report.erp)
        }
    );
    let headers = [
        "day",
        "type",
        "accepted",
        "not at relay",
        "relay",
        "waiting",
        "posted",
        "dead",
        "discarded",
        "repeats",
        "in ERP",
        "not in ERP",
    ];
    let mut lines = vec![headers.map(str::to_string).to_vec()];
    for r in &report.rows {
        lines.push(vec![
            r.day.clone(),
            r.kind.clone(),
            cell(r.accepted),
            cell(r.not_at_relay),
            r.at_relay.to_string(),
            r.waiting.to_string(),
            r.posted.to_string(),
            r.dead_lettered.to_string(),
            r.discarded.to_string(),
            r.repeats.to_string(),
            cell(r.in_erp),
            cell(r.not_in_erp),
        ]);
    }
    let widths: Vec<usize> = (0..headers.len())
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    for line in &lines {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (text, width))| {
                if c < 2 {
                    format!("{text:<width$}")
                } else {
                    format!("{text:>width$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    if let Some(quantities) = &report.quantities {
        let _ = writeln!(
            out,
            "\nper SKU and location: net of receipts, adjustments, picks and ships (counts set \
             a level and are left out), against the ERP's done moves"
        );
        let mut lines =
            vec![["sku", "location", "events", "implied", "booked", ""].map(str::to_string)];
        for q in quantities {
            lines.push([
                q.sku.clone(),
                q.location.clone(),
                q.events.to_string(),
                q.implied.clone(),
                q.booked.clone(),
                if q.differs {
                    "differs".into()
                } else {
                    String::new()
                },
            ]);
        }
        let widths: Vec<usize> = (0..6)
            .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
            .collect();
        for line in &lines {
            let text = format!(
                "{:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {:>w4$}  {}",
                line[0],
                line[1],
                line[2],
                line[3],
                line[4],
                line[5],
                w0 = widths[0],
                w1 = widths[1],
                w2 = widths[2],
                w3 = widths[3],
                w4 = widths[4],
            );
            let _ = writeln!(out, "{}", text.trim_end());
        }
    }
    if report.differences_total == 0 {
        let _ = writeln!(out, "\nno differences");
    } else {
        let _ = writeln!(out, "\n{} differences:", report.differences_total);
        for d in &report.differences {
            let _ = writeln!(
                out,
                "  {} {} {} seq {}: {} ({})",
                d.day,
                d.kind.as_deref().unwrap_or("?"),
                d.id.as_deref().unwrap_or("(id not known here)"),
                d.seq,
                d.state,
                d.detail
            );
        }
        if report.differences_total > report.differences.len() as u64 {
            let _ = writeln!(
                out,
                "  ... and {} more (--json lists the first {DIFFERENCES_LISTED})",
                report.differences_total - report.differences.len() as u64
            );
        }
    }
    for note in &report.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}

/// The rows as CSV, then a blank line and the differences as CSV.
pub fn csv(report: &Report) -> String {
    let mut out = String::from(
        "site,day,type,accepted_at_site,not_at_relay,at_relay,waiting,posted,dead_lettered,\
         discarded,in_erp,not_in_erp,repeats\n",
    );
    let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
    for r in &report.rows {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{}",
            csv_field(&report.site),
            r.day,
            r.kind,
            opt(r.accepted),
            opt(r.not_at_relay),
            r.at_relay,
            r.waiting,
            r.posted,
            r.dead_lettered,
            r.discarded,
            opt(r.in_erp),
            opt(r.not_in_erp),
            r.repeats
        );
    }
    if let Some(quantities) = &report.quantities {
        out.push_str("\nsite,sku,location,events,implied,booked,differs\n");
        for q in quantities {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{}",
                csv_field(&report.site),
                csv_field(&q.sku),
                csv_field(&q.location),
                q.events,
                q.implied,
                q.booked,
                q.differs
            );
        }
    }
    out.push_str("\nsite,day,type,id,epoch,seq,state,detail\n");
    for d in &report.differences {
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{}",
            csv_field(&report.site),
            d.day,
            d.kind.as_deref().unwrap_or_default(),
            csv_field(d.id.as_deref().unwrap_or_default()),
            d.epoch,
            d.seq,
            d.state,
            csv_field(&d.detail)
        );
    }
    out
}

/// A CSV field, quoted when it holds a separator, a quote or a line break (RFC 4180).
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_sequence_numbers_are_counted_in_full_and_listed_up_to_the_limit() {
        let epoch = Epoch(9);
        let seen: BTreeSet<(Epoch, u64)> = [1, 2, 5, 9]
            .into_iter()
            .map(|seq| (epoch, seq))
            .chain([(Epoch(8), 3)])
            .collect();
        let missing = missing_seqs(&seen, epoch, 1, 10, 3);
        assert_eq!(missing.total, 6);
        assert_eq!(missing.listed, vec![3, 4, 6]);
        // A day spanning a huge run costs what the relay holds, not what the day spans.
        let missing = missing_seqs(&seen, epoch, 1, u64::MAX - 1, 2);
        assert_eq!(missing.total, u64::MAX - 1 - 4);
        assert_eq!(missing.listed, vec![3, 4]);
        let none = missing_seqs(&seen, epoch, 1, 2, 10);
        assert_eq!((none.total, none.listed.len()), (0, 0));
    }
}
