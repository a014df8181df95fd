//! The binary frames between agent and relay: a batch of logged events, the relay's
//! acknowledgement, what the ERP did with the events, the refusals the relay keeps for a site
//! until its agent acknowledges them, that acknowledgement, and the site's daily tally of what
//! it accepted (for reconciliation with the ERP). Each frame is one version byte
//! followed by postcard; a batch may instead be version 3, the same postcard compressed with
//! zstd, so that a site's uplink carries a fraction of its events' size. A relay that reads only
//! version 1 refuses version 3 by its first byte, naming the version.
//!
//! Decoding takes bytes from the network, so it never panics, refuses frames over a size
//! limit before looking inside, and checks that a batch is consistent with itself.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::event::Event;
use crate::stamped::{Epoch, StampedEvent};
use crate::topics::check_site_id;

/// The frame format version of every frame: postcard as it is.
pub const FRAME_VERSION: u8 = 1;
/// The version of a compressed batch: postcard in one zstd frame that states its size. (2 is
/// a sealed frame's, [`crate::signing::SEALED_FRAME_VERSION`].)
pub const COMPRESSED_FRAME_VERSION: u8 = 3;
/// zstd's level for batches. Level 3 compresses a batch of events to about a fifth of their
/// JSON at several hundred MB/s, so it never slows a drain; higher levels gain a few percent
/// for several times the CPU.
const ZSTD_LEVEL: i32 = 3;

/// How a batch is written on the uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Version 1, for relays older than compressed batches.
    None,
    #[default]
    Zstd,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("frame of {len} bytes is over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error(
        "frame version {0} is not supported (this build reads version {FRAME_VERSION}, and \
         {COMPRESSED_FRAME_VERSION} for batches compressed with zstd)"
    )]
    UnsupportedVersion(u8),
    #[error("frame cannot be decoded: {0}")]
    Malformed(String),
    #[error("frame is inconsistent: {0}")]
    Inconsistent(String),
    #[error("frame cannot be encoded: {0}")]
    Encode(String),
}

/// One event inside a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchEntry {
    pub seq: u64,
    pub received_at_ms: i64,
    pub event: Event,
}

/// A run of events from one site's log, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFrame {
    pub site: String,
    pub epoch: Epoch,
    /// Everything of this epoch up to here had been acknowledged to the agent when it sent the
    /// batch, by this relay's outbox or another one, and is gone from the agent's log. A relay
    /// that holds less (an outbox moved aside or restored from a backup) continues from here,
    /// and refuses a batch that starts further on: what lies between was never stored.
    pub acked_through: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: Vec<BatchEntry>,
    /// Reserved for per-site batch signatures; `None` until signing exists.
    pub signature: Option<Vec<u8>>,
}

/// What became of one event, as far as the relay knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Durable in the relay's outbox.
    Stored,
    /// Already in the outbox from an earlier batch; stored once.
    Duplicate,
    /// The ERP has it; `erp_ref` is the ERP's record id.
    Posted { erp_ref: String },
    /// The ERP refused it for good; it waits in the dead-letter queue.
    DeadLettered { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventOutcome {
    pub seq: u64,
    pub id: String,
    pub outcome: Outcome,
}

/// The relay's answer to a batch: everything of this epoch up to and including
/// `acked_through` is durable in its outbox, and the agent may delete it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckFrame {
    pub site: String,
    pub epoch: Epoch,
    pub acked_through: u64,
    /// Set when the batch was not stored, with why.
    pub refused: Option<BatchRefusal>,
    pub outcomes: Vec<EventOutcome>,
}

/// Why the relay did not store a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchRefusal {
    /// It starts past what the outbox holds: batches before it never arrived. The agent
    /// re-sends from its first unacknowledged event.
    Gap,
    /// The outbox is at its disk cap (`outbox.max_bytes`) while the ERP catches up. The agent
    /// keeps the events and offers them again later.
    OutboxFull,
    /// The outbox's database cannot be reached or cannot take writes (PostgreSQL down, its
    /// disk full). The agent keeps the events and offers them again later. Agents older than
    /// this answer cannot read it and show the link as stalled.
    OutboxUnavailable,
}

/// What the ERP did with a site's events, published on the site's outcomes topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeFrame {
    pub site: String,
    pub outcomes: Vec<EventOutcome>,
}

impl OutcomeFrame {
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode(self)
    }

    pub fn decode(bytes: &[u8], max_len: usize) -> Result<OutcomeFrame, FrameError> {
        let frame: OutcomeFrame = decode(bytes, max_len)?;
        check_site_id(&frame.site)
            .map_err(|e| FrameError::Inconsistent(format!("site: expected {e}")))?;
        Ok(frame)
    }
}

/// An event the ERP refused for good. The relay numbers each site's refusals and keeps them
/// until the site's agent acknowledges them, so the warehouse learns of every one, however
/// long its agent was away.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// Increasing per site at the relay; what the agent acknowledges.
    pub number: u64,
    /// The event's sequence number in the agent's log, and its id.
    pub seq: u64,
    pub id: String,
    /// The ERP's reason.
    pub reason: String,
    /// When the relay dead-lettered the event (ms since the Unix epoch).
    pub at_ms: i64,
}

/// Refusals the relay still keeps for a site, oldest first, on the site's refusals topic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalFrame {
    pub site: String,
    pub refusals: Vec<Refusal>,
}

impl RefusalFrame {
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode(self)
    }

    pub fn decode(bytes: &[u8], max_len: usize) -> Result<RefusalFrame, FrameError> {
        let frame: RefusalFrame = decode(bytes, max_len)?;
        check_site_id(&frame.site)
            .map_err(|e| FrameError::Inconsistent(format!("site: expected {e}")))?;
        Ok(frame)
    }
}

/// The agent has every refusal of its site up to `through` on its disk: the relay may forget
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusalAckFrame {
    pub site: String,
    pub through: u64,
}

impl RefusalAckFrame {
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode(self)
    }

    pub fn decode(bytes: &[u8], max_len: usize) -> Result<RefusalAckFrame, FrameError> {
        let frame: RefusalAckFrame = decode(bytes, max_len)?;
        check_site_id(&frame.site)
            .map_err(|e| FrameError::Inconsistent(format!("site: expected {e}")))?;
        Ok(frame)
    }
}

/// What a site accepted on one day (UTC, by the time its agent received each event): how many
/// events of each type, and the sequence numbers they took. A day's events are one run of
/// sequence numbers of one epoch unless the log was rebuilt that day, so the run names every
/// accepted event compactly: the relay knows each one's id by its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayTally {
    /// Days since 1970-01-01.
    pub day: i32,
    pub epoch: Epoch,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Accepted events per type, in the order of [`crate::EventType::ALL`].
    pub counts: [u64; 5],
}

// `counts` has a place for each event type.
const _: () = assert!(crate::event::EventType::ALL.len() == 5);

impl DayTally {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// An event the site accepted that the relay has not acknowledged yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitingAtSite {
    pub seq: u64,
    pub id: String,
    pub received_at_ms: i64,
}

/// A site's tally of the days its agent keeps (`log.tally_days`), sent by the agent when it
/// connects and whenever it changed, on the site's tally topic. Each frame replaces the last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TallyFrame {
    pub site: String,
    pub epoch: Epoch,
    /// Everything of the epoch up to here was acknowledged by a relay.
    pub acked_through: u64,
    /// When the agent made the tally (ms since the Unix epoch).
    pub at_ms: i64,
    pub days: Vec<DayTally>,
    /// The oldest events still waiting at the site, at most [`TallyFrame::WAITING_LISTED`].
    pub waiting: Vec<WaitingAtSite>,
    /// Events waiting at the site in all.
    pub waiting_total: u64,
}

impl TallyFrame {
    /// Waiting events a tally names by id at most; the rest are counted.
    pub const WAITING_LISTED: usize = 200;
    /// Days a tally carries at most.
    pub const MAX_DAYS: usize = 400;

    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode(self)
    }

    /// Bytes a tally frame may take: 400 days and 200 waiting ids fit in a fraction of it.
    pub const MAX_BYTES: usize = 256 * 1024;
    /// Sequence numbers one day may span: far above any warehouse's day, far below what would
    /// keep a relay busy.
    pub const MAX_DAY_SPAN: u64 = 1 << 32;

    /// Decodes and checks a tally from the network: a valid site, days in increasing order,
    /// each day's counts no more than its sequence numbers span, waiting events with valid ids.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<TallyFrame, FrameError> {
        let frame: TallyFrame = decode(bytes, max_len.min(Self::MAX_BYTES))?;
        let inconsistent = |what: String| Err(FrameError::Inconsistent(what));
        check_site_id(&frame.site)
            .map_err(|e| FrameError::Inconsistent(format!("site: expected {e}")))?;
        if frame.days.len() > Self::MAX_DAYS || frame.waiting.len() > Self::WAITING_LISTED {
            return inconsistent(format!(
                "days and waiting: at most {} days and {} waiting events (got {} and {})",
                Self::MAX_DAYS,
                Self::WAITING_LISTED,
                frame.days.len(),
                frame.waiting.len()
            ));
        }
        if let Some(pair) = frame.days.windows(2).find(|w| w[0].day >= w[1].day) {
            return inconsistent(format!(
                "days: must increase, but day {} is followed by day {}",
                pair[0].day, pair[1].day
            ));
        }
        for day in &frame.days {
            if day.first_seq > day.last_seq {
                return inconsistent(format!(
                    "day {}: first_seq {} is after last_seq {}",
                    day.day, day.first_seq, day.last_seq
                ));
            }
            let span = (day.last_seq - day.first_seq).saturating_add(1);
            let total = day
                .counts
                .iter()
                .try_fold(0u64, |sum, n| sum.checked_add(*n))
                .unwrap_or(u64::MAX);
            if span > Self::MAX_DAY_SPAN || total > span {
                return inconsistent(format!(
                    "day {}: its counts ({total}) must fit the {span} sequence numbers it spans, \
                     at most {}",
                    day.day,
                    Self::MAX_DAY_SPAN
                ));
            }
        }
        for waiting in &frame.waiting {
            let chars = waiting.id.chars().count();
            if chars == 0
                || chars > crate::event::MAX_ID_CHARS
                || waiting.id.chars().any(char::is_control)
            {
                return inconsistent(format!(
                    "waiting seq {}: id must be 1-{} characters without control characters",
                    waiting.seq,
                    crate::event::MAX_ID_CHARS
                ));
            }
        }
        Ok(frame)
    }
}

fn encode<T: Serialize>(frame: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![FRAME_VERSION];
    postcard::to_io(frame, &mut out).map_err(|e| FrameError::Encode(e.to_string()))?;
    Ok(out)
}

fn decode<T: DeserializeOwned>(bytes: &[u8], max_len: usize) -> Result<T, FrameError> {
    if bytes.len() > max_len {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max: max_len,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(FrameError::Empty)?;
    if version != FRAME_VERSION {
        return Err(FrameError::UnsupportedVersion(version));
    }
    decode_body(body)
}

/// A compressed batch's postcard, refused when it says it is larger than `max_len` before
/// anything is decompressed, and when it holds more than it says.
fn decompress(body: &[u8], max_len: usize) -> Result<Vec<u8>, FrameError> {
    let size = match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(size)) => size,
        Ok(None) => {
            return Err(FrameError::Malformed(
                "a compressed batch must state its decompressed size".into(),
            ));
        }
        Err(_) => {
            return Err(FrameError::Malformed(
                "the compressed batch is not a zstd frame".into(),
            ));
        }
    };
    let len = usize::try_from(size).unwrap_or(usize::MAX);
    if len > max_len {
        return Err(FrameError::TooLarge { len, max: max_len });
    }
    let mut plain = vec![0u8; len];
    let written = zstd::bulk::decompress_to_buffer(body, &mut plain)
        .map_err(|e| FrameError::Malformed(format!("the compressed batch: {e}")))?;
    if written != len {
        return Err(FrameError::Malformed(format!(
            "the compressed batch holds {written} bytes but says {len}"
        )));
    }
    Ok(plain)
}

fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    let (frame, rest) =
        postcard::take_from_bytes(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes after the frame",
            rest.len()
        )));
    }
    Ok(frame)
}

impl BatchFrame {
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode(self)
    }

    /// The batch as `compression` writes it on the uplink (uncompressed when compressing
    /// would not make it smaller).
    pub fn encode_with(&self, compression: Compression) -> Result<Vec<u8>, FrameError> {
        match compression {
            Compression::None => encode(self),
            Compression::Zstd => {
                let plain = encode(self)?;
                let compressed = zstd::bulk::compress(&plain[1..], ZSTD_LEVEL)
                    .map_err(|e| FrameError::Encode(format!("zstd: {e}")))?;
                // A batch of one or two events can come out larger: it goes as it is.
                if compressed.len() + 1 >= plain.len() {
                    return Ok(plain);
                }
                let mut out = Vec::with_capacity(compressed.len() + 1);
                out.push(COMPRESSED_FRAME_VERSION);
                out.extend(compressed);
                Ok(out)
            }
        }
    }

    /// Decodes a batch, compressed or not, and checks it: a valid site id, a non-empty run of
    /// events with strictly increasing sequence numbers inside `first_seq..=last_seq`.
    /// `max_len` bounds the frame as received and, for a compressed one, what it holds.
    pub fn decode(bytes: &[u8], max_len: usize) -> Result<BatchFrame, FrameError> {
        let frame: BatchFrame = match bytes.split_first() {
            Some((&COMPRESSED_FRAME_VERSION, body)) => {
                if bytes.len() > max_len {
                    return Err(FrameError::TooLarge {
                        len: bytes.len(),
                        max: max_len,
                    });
                }
                decode_body(&decompress(body, max_len)?)?
            }
            _ => decode(bytes, max_len)?,
        };
        frame.check()?;
        Ok(frame)
    }

    fn check(&self) -> Result<(), FrameError> {
        check_site_id(&self.site)
            .map_err(|e| FrameError::Inconsistent(format!("site: expected {e}")))?;
        if self.first_seq <= self.acked_through {
            return Err(FrameError::Inconsistent(format!(
                "first_seq {} is not after acked_through {}",
                self.first_seq, self.acked_through
            )));
        }
        if self.first_seq > self.last_seq {
            return Err(FrameError::Inconsistent(format!(
                "first_seq {} is after last_seq {}",
                self.first_seq, self.last_seq
            )));
        }
        let (Some(first), Some(last)) = (self.events.first(), self.events.last()) else {
            return Err(FrameError::Inconsistent("a batch holds no events".into()));
        };
        if first.seq != self.first_seq || last.seq != self.last_seq {
            return Err(FrameError::Inconsistent(format!(
                "events run from {} to {} but the batch says {} to {}",
                first.seq, last.seq, self.first_seq, self.last_seq
            )));
        }
        if let Some(pair) = self.events.windows(2).find(|w| w[0].seq >= w[1].seq) {
            return Err(FrameError::Inconsistent(format!(
                "sequence numbers must increase, but {} is followed by {}",
                pair[0].seq, pair[1].seq
            )));
        }
        Ok(())
    }

    /// The batch's events as stamped records.
    pub fn stamped(&self) -> impl Iterator<Item = StampedEvent> + '_ {
        self.events.iter().map(|entry| StampedEvent {
            site: self.site.clone(),
            epoch: self.epoch,
            seq: entry.seq,
            received_at_ms: entry.received_at_ms,
            event: entry.event.clone(),
        })
    }
}

impl AckFrame {
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        encode(self)
    }

    pub fn decode(bytes: &[u8], max_len: usize) -> Result<AckFrame, FrameError> {
        let frame: AckFrame = decode(bytes, max_len)?;
        check_site_id(&frame.site)
            .map_err(|e| FrameError::Inconsistent(format!("site: expected {e}")))?;
        Ok(frame)
    }
}
