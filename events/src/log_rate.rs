//! How often one kind of log line may be written. A hostile client can cause a refusal, a
//! reject or a closed connection thousands of times a second; the journal gets the first few
//! of each period and then one line saying how many more there were, so a flood never floods
//! the disk or hides the lines an operator needs.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One kind of log line's allowance: `lines` per `period`.
pub struct LogRate {
    lines: u32,
    period: Duration,
    state: Mutex<Window>,
}

struct Window {
    started: Option<Instant>,
    written: u32,
    suppressed: u64,
}

/// May a line be written now? If so, how many were held back since the last one written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allowance {
    Write { suppressed: u64 },
    Suppress,
}

impl LogRate {
    pub const fn new(lines: u32, period: Duration) -> LogRate {
        LogRate {
            lines,
            period,
            state: Mutex::new(Window {
                started: None,
                written: 0,
                suppressed: 0,
            }),
        }
    }

    /// Ten lines every ten seconds: enough to see what is happening, never a flood.
    pub const fn per_ten_seconds() -> LogRate {
        LogRate::new(10, Duration::from_secs(10))
    }

    pub fn allow(&self) -> Allowance {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Allowance {
        let Ok(mut window) = self.state.lock() else {
            return Allowance::Write { suppressed: 0 };
        };
        if window
            .started
            .is_none_or(|started| now.saturating_duration_since(started) >= self.period)
        {
            window.started = Some(now);
            window.written = 0;
        }
        if window.written >= self.lines {
            window.suppressed += 1;
            return Allowance::Suppress;
        }
        window.written += 1;
        Allowance::Write {
            suppressed: std::mem::take(&mut window.suppressed),
        }
    }
}

/// Writes a `tracing` line at `level` if `rate` allows, with `suppressed = N` (how many lines
/// of this kind were held back since the last one written) among its fields.
#[macro_export]
macro_rules! rate_limited {
    ($rate:expr, $level:ident, $($rest:tt)+) => {
        if let $crate::log_rate::Allowance::Write { suppressed } = $rate.allow() {
            ::tracing::$level!(suppressed, $($rest)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_writes_the_allowance_then_reports_what_it_held_back() {
        let rate = LogRate::new(3, Duration::from_secs(10));
        let start = Instant::now();
        let written: Vec<Allowance> = (0..10).map(|_| rate.allow_at(start)).collect();
        assert_eq!(
            written
                .iter()
                .filter(|a| matches!(a, Allowance::Write { .. }))
                .count(),
            3
        );
        assert_eq!(
            rate.allow_at(start + Duration::from_secs(10)),
            Allowance::Write { suppressed: 7 }
        );
        assert_eq!(
            rate.allow_at(start + Duration::from_secs(11)),
            Allowance::Write { suppressed: 0 }
        );
    }
}
