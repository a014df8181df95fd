//! The forwarder's window: which batches are between the log and the relay, what to send next,
//! and when to send everything again. A state machine with named transitions and no I/O (time
//! is passed in), so the rules are unit-tested on their own:
//!
//! - batches go only while the link is up and fewer than `capacity` are unacknowledged;
//! - a batch smaller than `batch_max_events` waits up to `linger` for more events, but only
//!   while other batches are in flight: into an empty window it goes at once, so a quiet site's
//!   event is not held back for nothing;
//! - an acknowledgement frees the window up to its number at once, and counts as progress;
//! - after a reconnect, a gap refusal (after a short wait for earlier acks still on their way)
//!   or `ack_timeout` without any progress, everything unacknowledged is sent again from the
//!   log, starting after the last acknowledged number.

use std::collections::VecDeque;
use std::time::Duration;

use backhaul_events::BatchRefusal;
use tokio::time::Instant;

/// How long a gap refusal waits for acknowledgements of earlier batches before re-sending.
pub const GAP_RESEND_DELAY: Duration = Duration::from_secs(1);

/// How the window is sized and timed (from `[uplink]`).
#[derive(Debug, Clone, Copy)]
pub struct WindowSettings {
    pub capacity: usize,
    pub batch_max_events: u64,
    pub linger: Duration,
    pub ack_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct InFlight {
    first: u64,
    last: u64,
    events: u64,
    sent_at: Instant,
}

/// What an acknowledgement asks of the forwarder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AckAnswer {
    /// Delete the log through this number (then call [`Window::deleted_through`]).
    pub delete_through: Option<u64>,
    /// The relay refused the batch because its outbox is full or its database unavailable:
    /// it holds back, and is not stalled.
    pub relay_full: bool,
}

/// What an acknowledgement timeout found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut {
    /// Batches that go again, from the log.
    pub resent: usize,
    /// The first unacknowledged batch, for the log line.
    pub first: u64,
    pub last: u64,
    /// The relay answered "full" recently: it holds back, it is not stalled.
    pub relay_full: bool,
}

#[derive(Debug)]
pub struct Window {
    settings: WindowSettings,
    ready: bool,
    acked_through: u64,
    next_to_send: u64,
    highest_sent: u64,
    in_flight: VecDeque<InFlight>,
    linger_until: Option<Instant>,
    last_progress: Instant,
    gap_resend_at: Option<Instant>,
    full_refused_at: Option<Instant>,
}

impl Window {
    /// A window over a log whose events up to `acked_through` were acknowledged and deleted.
    pub fn new(settings: WindowSettings, acked_through: u64, now: Instant) -> Window {
        Window {
            settings,
            ready: false,
            acked_through,
            next_to_send: acked_through + 1,
            highest_sent: acked_through,
            in_flight: VecDeque::new(),
            linger_until: None,
            last_progress: now,
            gap_resend_at: None,
            full_refused_at: None,
        }
    }

    pub fn acked_through(&self) -> u64 {
        self.acked_through
    }

    pub fn batches_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn events_in_flight(&self) -> u64 {
        self.in_flight.iter().map(|b| b.events).sum()
    }

    /// The first number of the next batch to read from the log, if one should go now; the
    /// log's next number is `next_seq`.
    pub fn next_batch(&mut self, next_seq: u64, now: Instant) -> Option<u64> {
        if !self.ready || self.in_flight.len() >= self.settings.capacity.max(1) {
            return None;
        }
        if self.next_to_send >= next_seq {
            return None;
        }
        let available = next_seq - self.next_to_send;
        let small = available < self.settings.batch_max_events;
        if small && !self.settings.linger.is_zero() && !self.in_flight.is_empty() {
            let deadline = *self
                .linger_until
                .get_or_insert_with(|| now + self.settings.linger);
            if now < deadline {
                return None;
            }
        }
        self.linger_until = None;
        Some(self.next_to_send)
    }

    /// The log held nothing from the number [`Window::next_batch`] gave (acknowledged and
    /// deleted meanwhile): go on from `next_seq`.
    pub fn skip_to(&mut self, next_seq: u64) {
        self.next_to_send = self.next_to_send.max(next_seq);
    }

    /// A batch `first..=last` of `events` was published; whether it was sent before.
    pub fn sent(&mut self, first: u64, last: u64, events: u64, now: Instant) -> bool {
        let resend = first <= self.highest_sent;
        self.highest_sent = self.highest_sent.max(last);
        self.in_flight.push_back(InFlight {
            first,
            last,
            events,
            sent_at: now,
        });
        self.next_to_send = last + 1;
        resend
    }

    /// Connected and subscribed: everything unacknowledged goes again. Returns how many
    /// batches were in flight.
    pub fn link_up(&mut self) -> usize {
        self.ready = true;
        self.gap_resend_at = None;
        self.resend_all()
    }

    /// Whether the link was up.
    pub fn link_down(&mut self) -> bool {
        std::mem::replace(&mut self.ready, false)
    }

    /// The relay's acknowledgement of everything through `acked_through`, with its refusal.
    pub fn acknowledged(
        &mut self,
        acked_through: u64,
        refused: Option<BatchRefusal>,
        now: Instant,
    ) -> AckAnswer {
        let mut relay_full = false;
        match refused {
            // The relay holds less than the batch builds on: batches sent while it was away
            // never reached it. Acknowledgements of earlier batches may still be on their way.
            Some(BatchRefusal::Gap) => {
                self.gap_resend_at.get_or_insert(now + GAP_RESEND_DELAY);
            }
            // Back-pressure: the events stay here and go again after the ack timeout, by when
            // deliveries may have made room.
            Some(BatchRefusal::OutboxFull | BatchRefusal::OutboxUnavailable) => {
                self.full_refused_at = Some(now);
                relay_full = true;
            }
            None => {}
        }
        // Never past what was sent: an acknowledgement cannot cover what the relay never had.
        let sent_through = self.next_to_send.saturating_sub(1).max(self.acked_through);
        let through = acked_through.min(sent_through);
        AckAnswer {
            delete_through: (through > self.acked_through).then_some(through),
            relay_full,
        }
    }

    /// The log deletes through `through`: the window frees up to there.
    pub fn deleted_through(&mut self, through: u64, now: Instant) {
        if through <= self.acked_through {
            return;
        }
        self.acked_through = through;
        self.last_progress = now;
        while self.in_flight.front().is_some_and(|b| b.last <= through) {
            self.in_flight.pop_front();
        }
    }

    /// When a gap refusal's re-send is due, while the link is up.
    pub fn gap_resend_at(&self) -> Option<Instant> {
        self.gap_resend_at.filter(|_| self.ready)
    }

    /// The gap's re-send: everything unacknowledged goes again; how many batches.
    pub fn resend_after_gap(&mut self) -> usize {
        self.gap_resend_at = None;
        self.resend_all()
    }

    /// When a batch waiting for more events should go anyway.
    pub fn linger_until(&self) -> Option<Instant> {
        self.linger_until
    }

    /// When the wait for an acknowledgement ends, while the link is up. A slow link that
    /// acknowledges late but steadily makes progress: only a wait without any goes again.
    pub fn ack_deadline(&self) -> Option<Instant> {
        let front = self.in_flight.front().filter(|_| self.ready)?;
        Some(front.sent_at.max(self.last_progress) + self.settings.ack_timeout)
    }

    /// No acknowledgement by the deadline: everything unacknowledged goes again.
    pub fn timed_out(&mut self, now: Instant) -> Option<TimedOut> {
        let front = *self.in_flight.front()?;
        let relay_full = self
            .full_refused_at
            .is_some_and(|at| now.saturating_duration_since(at) < self.settings.ack_timeout);
        Some(TimedOut {
            resent: self.resend_all(),
            first: front.first,
            last: front.last,
            relay_full,
        })
    }

    fn resend_all(&mut self) -> usize {
        let batches = self.in_flight.len();
        self.in_flight.clear();
        self.next_to_send = self.acked_through + 1;
        batches
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> WindowSettings {
        WindowSettings {
            capacity: 2,
            batch_max_events: 100,
            linger: Duration::from_millis(20),
            ack_timeout: Duration::from_secs(30),
        }
    }

    fn up(acked_through: u64, now: Instant) -> Window {
        let mut window = Window::new(settings(), acked_through, now);
        window.link_up();
        window
    }

    #[test]
    fn nothing_goes_while_the_link_is_down_and_the_window_bounds_what_is_in_flight() {
        let now = Instant::now();
        let mut window = Window::new(settings(), 0, now);
        assert_eq!(window.next_batch(1000, now), None);
        window.link_up();
        assert_eq!(window.next_batch(1000, now), Some(1));
        window.sent(1, 100, 100, now);
        assert_eq!(window.next_batch(1000, now), Some(101));
        window.sent(101, 200, 100, now);
        assert_eq!(window.next_batch(1000, now), None, "the window is full");
        assert_eq!(
            (window.batches_in_flight(), window.events_in_flight()),
            (2, 200)
        );
    }

    #[test]
    fn a_small_batch_goes_at_once_into_an_empty_window_and_lingers_behind_others() {
        let now = Instant::now();
        let mut window = up(0, now);
        assert_eq!(
            window.next_batch(4, now),
            Some(1),
            "an empty window: no linger"
        );
        window.sent(1, 3, 3, now);
        assert_eq!(
            window.next_batch(6, now),
            None,
            "two events behind a batch linger"
        );
        assert_eq!(window.linger_until(), Some(now + Duration::from_millis(20)));
        let later = now + Duration::from_millis(20);
        assert_eq!(window.next_batch(6, later), Some(4));
        assert_eq!(window.linger_until(), None);
        // A full batch never lingers.
        window.sent(4, 5, 2, later);
        window.deleted_through(5, later);
        window.sent(6, 6, 1, later);
        assert_eq!(window.next_batch(7 + 100, later), Some(7));
    }

    #[test]
    fn an_acknowledgement_frees_the_window_and_never_covers_what_was_not_sent() {
        let now = Instant::now();
        let mut window = up(0, now);
        window.sent(1, 100, 100, now);
        window.sent(101, 200, 100, now);
        let answer = window.acknowledged(150, None, now);
        assert_eq!(answer.delete_through, Some(150));
        window.deleted_through(150, now);
        assert_eq!(window.batches_in_flight(), 1, "the first batch is done");
        assert_eq!(
            window.acknowledged(120, None, now).delete_through,
            None,
            "stale"
        );
        assert_eq!(
            window.acknowledged(5000, None, now).delete_through,
            Some(200),
            "an ack past what was sent is clamped"
        );
        window.deleted_through(200, now);
        assert_eq!(window.batches_in_flight(), 0);
        assert_eq!(window.acked_through(), 200);
    }

    #[test]
    fn a_reconnect_sends_everything_unacknowledged_again_from_the_log() {
        let now = Instant::now();
        let mut window = up(10, now);
        window.sent(11, 20, 10, now);
        window.sent(21, 30, 10, now);
        window.deleted_through(20, now);
        assert!(window.link_down());
        assert_eq!(window.next_batch(100, now), None);
        assert_eq!(window.ack_deadline(), None, "no timeout while down");
        assert_eq!(window.link_up(), 1);
        assert_eq!(window.next_batch(100, now), Some(21));
        assert!(window.sent(21, 30, 10, now), "a re-send is counted as one");
        assert!(!window.sent(31, 40, 10, now));
    }

    #[test]
    fn only_a_wait_without_progress_times_out_and_a_full_relay_is_not_stalled() {
        let now = Instant::now();
        let mut window = up(0, now);
        window.sent(1, 10, 10, now);
        window.sent(11, 20, 10, now);
        assert_eq!(window.ack_deadline(), Some(now + Duration::from_secs(30)));
        // Progress at 25 s moves the deadline of the batch still waiting.
        let progress = now + Duration::from_secs(25);
        window.deleted_through(10, progress);
        assert_eq!(
            window.ack_deadline(),
            Some(progress + Duration::from_secs(30))
        );
        let full_at = progress + Duration::from_secs(1);
        let answer = window.acknowledged(10, Some(BatchRefusal::OutboxFull), full_at);
        assert!(answer.relay_full);
        let deadline = progress + Duration::from_secs(30);
        let timed_out = window.timed_out(deadline).expect("a batch was waiting");
        assert_eq!(
            timed_out,
            TimedOut {
                resent: 1,
                first: 11,
                last: 20,
                relay_full: true
            }
        );
        assert_eq!(window.next_batch(21, deadline), Some(11));
    }

    #[test]
    fn a_gap_refusal_waits_a_moment_for_earlier_acks_then_sends_again() {
        let now = Instant::now();
        let mut window = up(0, now);
        window.sent(1, 10, 10, now);
        window.sent(11, 20, 10, now);
        let answer = window.acknowledged(0, Some(BatchRefusal::Gap), now);
        assert_eq!(answer.delete_through, None);
        assert_eq!(window.gap_resend_at(), Some(now + GAP_RESEND_DELAY));
        // A second refusal does not push the re-send further away.
        window.acknowledged(0, Some(BatchRefusal::Gap), now + Duration::from_millis(500));
        assert_eq!(window.gap_resend_at(), Some(now + GAP_RESEND_DELAY));
        window.acknowledged(10, None, now);
        window.deleted_through(10, now);
        assert_eq!(window.resend_after_gap(), 1);
        assert_eq!(window.gap_resend_at(), None);
        assert_eq!(window.next_batch(21, now), Some(11));
    }
}
