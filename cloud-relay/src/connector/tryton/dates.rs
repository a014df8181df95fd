//! The calendar: the day an event is booked on. The event's own day (its `ts` in its own
//! offset), Tryton's today and the end of its latest closed stock period, and dates as
//! Tryton's JSON-RPC carries them. Tryton's dates are read again whenever they could change
//! the outcome (a date to clamp, a date in a closed period) and reused only otherwise, because
//! periods get closed and days pass while the relay runs. Which date fields each document gets
//! belongs to the flows.

use std::time::{Duration, Instant};

use backhaul_events::Event;
use serde_json::{Map, Value, json};
use time::Date;

use super::rpc::{RpcError, records, truncate};
use super::{Inner, SETUP_RETRY, lock};
use crate::connector::Delivery;

/// How long Tryton's date and closed stock periods, once read, serve the deliveries that they
/// give nothing to do (no date to clamp, none in a closed period).
const CALENDAR_TTL: Duration = Duration::from_secs(60);

/// Tryton's today (in the company's time zone) and the end of its latest closed stock period.
#[derive(Debug, Clone, Copy)]
pub(super) struct Calendar {
    pub(super) today: Date,
    pub(super) closed_until: Option<Date>,
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

impl Inner {
    /// Tryton's today and its closed stock periods, read again unless a recent reading has
    /// nothing to say about these dates: a date after today (to be clamped) or in a closed
    /// period (to be refused) is always judged on a fresh reading.
    pub(super) async fn calendar(&self, dates: &[Date]) -> Result<Calendar, Delivery> {
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
}

/// The calendar day of the event's `ts` in its own offset: the warehouse's day as the scanner
/// wrote it.
pub(super) fn event_date(event: &Event) -> Result<Date, Delivery> {
    time::OffsetDateTime::parse(&event.ts, &time::format_description::well_known::Rfc3339)
        .map(|ts| ts.date())
        .map_err(|e| Delivery::Permanent {
            reason: format!("the event's ts {:?} is not an RFC 3339 time: {e}", event.ts),
        })
}

/// A date as Tryton's JSON-RPC carries it.
pub(super) fn date_value(date: Date) -> Value {
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
pub(super) fn with_dates(mut values: Value, dates: Option<Map<String, Value>>) -> Value {
    if let (Some(object), Some(dates)) = (values.as_object_mut(), dates) {
        object.extend(dates);
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
