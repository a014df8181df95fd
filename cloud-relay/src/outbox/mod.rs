//! The relay's outbox: batches from every site made durable before they are acknowledged,
//! stored once however often they arrive, and kept until delivered.
//!
//! What it owns: the [`Outbox`] seam the intake, the delivery engine, the connectors and the
//! admin API use, and what every backend shares (site records, results, dead letters, heads).
//! Two backends sit behind it: [`redb::RedbOutbox`], one file on the relay's disk, for one
//! relay; and [`postgres::PgOutbox`], for any number of relays on one PostgreSQL, which keeps
//! what a relay acknowledged when that relay's machine is lost.

pub mod postgres;
pub mod redb;

use std::path::PathBuf;

use backhaul_events::{
    BatchFrame, BatchRefusal, Epoch, EventOutcome, Refusal, StampedEvent, TallyFrame,
};
use serde::{Deserialize, Serialize};

use crate::connector::CommitToken;
use crate::trace::{BatchRecord, EventTrace};

pub use self::redb::{OutboxOptions, RedbOutbox};

/// A relay's outbox, whatever keeps it. Every method may block on storage: the async parts of
/// the relay call them from `spawn_blocking`, except the readers of published state
/// ([`Outbox::sites`], [`Outbox::held_bytes`] and the other counters), which never wait for
/// storage.
pub trait Outbox: Send + Sync {
    /// Where the outbox is, for status and logs (a path, or a database without its password).
    fn location(&self) -> String;

    /// Stores batches durably, all or none; one result per batch, in order.
    fn store(&self, batches: &[BatchFrame]) -> Result<Vec<Stored>, OutboxError>;

    /// The first waiting event of up to `limit` queues, oldest first, skipping the queues
    /// `skip` says no to (in flight, or waiting to retry here). With several relays on one
    /// outbox, a queue returned is this relay's until it completes its head or stops asking.
    fn heads(&self, limit: usize, skip: &dyn Fn(&[u8]) -> bool) -> Result<Vec<Head>, OutboxError>;

    /// Records the end of deliveries durably: posted events leave the outbox, refused ones
    /// move to the dead-letter queue, and the connector's token is recorded with them.
    fn complete(
        &self,
        posted: &[(u64, StampedEvent)],
        dead: &[(u64, StampedEvent, String, u32)],
        commit: Option<CommitToken>,
    ) -> Result<(), OutboxError>;

    /// The oldest undelivered events, in arrival order, with their outbox sequence numbers.
    fn pending(&self, limit: usize) -> Result<Vec<(u64, StampedEvent)>, OutboxError> {
        self.pending_after(0, limit)
    }

    /// Undelivered events after outbox sequence number `after`, in arrival order.
    fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StampedEvent)>, OutboxError>;

    /// The connector's token as of the last committed delivery.
    fn committed_token(&self) -> Result<Option<CommitToken>, OutboxError>;

    /// The outbox entry of an event, if it is still waiting.
    fn find_pending(
        &self,
        site: &str,
        id: &str,
    ) -> Result<Option<(u64, StampedEvent)>, OutboxError>;

    /// Dead letters in the order their events arrived, starting after `after`.
    fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, OutboxError>;

    /// Sends dead letters back through the normal path, in their original order (all of them
    /// when `ids` is `None`); returns the ids replayed.
    fn replay(&self, ids: Option<&[u64]>) -> Result<Vec<u64>, OutboxError>;

    /// Drops dead letters for good; returns the ids discarded.
    fn discard(&self, ids: &[u64]) -> Result<Vec<u64>, OutboxError>;

    /// The oldest `limit` refusals kept for `site`.
    fn refusals(&self, site: &str, limit: usize) -> Result<Vec<Refusal>, OutboxError>;

    /// The site's agent has every refusal up to `through`: they are forgotten. Returns how
    /// many were.
    fn acknowledge_refusals(&self, site: &str, through: u64) -> Result<u64, OutboxError>;

    /// Every site, as last published.
    fn sites(&self) -> Vec<SiteRecord>;

    /// Bytes of the waiting events and dead letters, which `max_bytes` caps.
    fn held_bytes(&self) -> u64;

    fn max_bytes(&self) -> u64;

    /// Events waiting for delivery.
    fn depth(&self) -> u64;

    fn dead_letter_count(&self) -> u64;

    /// Whether the site's agent has refusals to take.
    fn has_refusals_for(&self, site: &str) -> bool {
        self.sites()
            .iter()
            .any(|s| s.site == site && s.refusals_unacknowledged > 0)
    }

    /// The sites with refusals their agents have not acknowledged yet.
    fn sites_with_refusals(&self) -> Vec<String> {
        self.sites()
            .into_iter()
            .filter(|s| s.refusals_unacknowledged > 0)
            .map(|s| s.site)
            .collect()
    }

    /// Whether the last look for work found only held-back keys among the oldest waiting
    /// events, with newer keys waiting behind them.
    fn frontier_blocked(&self) -> bool {
        false
    }

    /// Keeps what became of events that left the outbox (merged into what is kept of the same
    /// event), and forgets what finished before `forget_before_ms`, with the batches stored
    /// before it. A trace is diagnosis, not a promise: the backends may lose the latest ones
    /// in a crash.
    fn record_traces(
        &self,
        traces: &[EventTrace],
        forget_before_ms: i64,
    ) -> Result<(), OutboxError>;

    /// What became of event `id` of `site`, if it left the outbox within the retention.
    fn trace(&self, site: &str, id: &str) -> Result<Option<EventTrace>, OutboxError>;

    /// What is kept of the site's events that left the outbox, by id, from just after
    /// `after_id` (`""` from the first), at most `limit`.
    fn site_traces(
        &self,
        site: &str,
        after_id: &str,
        limit: usize,
    ) -> Result<Vec<EventTrace>, OutboxError>;

    /// Events of the site dropped as repeats of an id the outbox already had (under another
    /// sequence number: a producer that sent an event again after its first copy had left
    /// the agent's log), kept as long as traces, at most `limit`.
    fn site_repeats(&self, site: &str, limit: usize) -> Result<Vec<Repeat>, OutboxError>;

    /// The batch that carried `seq` of the site's `epoch`, if it is still kept.
    fn batch_of(
        &self,
        site: &str,
        epoch: Epoch,
        seq: u64,
    ) -> Result<Option<BatchRecord>, OutboxError>;

    /// Keeps each site's latest tally (what its agent accepted per day), replacing the one
    /// kept, in one transaction. The last received wins, whatever the agent's clock says. A
    /// tally is for reconciliation, not a promise: the backends may lose the latest in a
    /// crash, and the agent sends it again.
    fn record_tallies(&self, tallies: &[TallyFrame]) -> Result<(), OutboxError>;

    /// The site's latest tally, if its agent sent one.
    fn tally(&self, site: &str) -> Result<Option<TallyFrame>, OutboxError>;

    /// Hands back what this relay holds for delivery, at a clean stop.
    fn release(&self) -> Result<(), OutboxError> {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(
        "the outbox {path} cannot be opened: {reason}. Nothing in it was deleted; move it aside \
         to start empty (agents re-send what they still hold), or restore it from a backup"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("the outbox {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("outbox storage error: {0}")]
    Storage(String),
    /// The storage server cannot be reached or cannot take writes now (PostgreSQL down, its
    /// disk full): nothing is acknowledged, and the work is tried again later.
    #[error("the outbox's database {server} is unavailable: {reason}")]
    Unavailable { server: String, reason: String },
}

impl OutboxError {
    /// Whether the error passes with time (the database comes back), rather than meaning the
    /// outbox itself cannot be trusted any more.
    pub fn is_transient(&self) -> bool {
        matches!(self, OutboxError::Unavailable { .. })
    }
}

/// What the relay knows of one site.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SiteRecord {
    pub site: String,
    /// The epoch of the site's most recent batch.
    pub epoch: String,
    /// Highest sequence number of that epoch stored without a gap.
    pub highest_seq: u64,
    pub last_seen_ms: i64,
    pub events_stored: u64,
    pub events_duplicate: u64,
    pub events_delivered: u64,
    #[serde(default)]
    pub events_dead_lettered: u64,
    /// Dead letters discarded for good: they left the outbox without being delivered.
    #[serde(default)]
    pub events_discarded: u64,
    /// The number of the site's latest refusal.
    #[serde(default)]
    pub refusals_numbered: u64,
    /// Refusals kept until the site's agent acknowledges them.
    #[serde(default)]
    pub refusals_unacknowledged: u64,
}

impl SiteRecord {
    pub fn outbox_depth(&self) -> u64 {
        self.events_stored
            .saturating_sub(self.events_delivered)
            .saturating_sub(self.events_dead_lettered)
            .saturating_sub(self.events_discarded)
    }
}

/// The result of storing one batch.
#[derive(Debug, Clone)]
pub struct Stored {
    pub site: String,
    pub epoch: backhaul_events::Epoch,
    /// What the acknowledgement promises: everything of the epoch up to here is durable.
    pub acked_through: u64,
    pub stored: u64,
    pub duplicates: u64,
    /// Set when the batch was not stored: it started past a gap (the agent re-sends in
    /// order), or the outbox is full.
    pub refused: Option<BatchRefusal>,
    /// Set when the batch is of an epoch its site has moved on from: a replay of an old
    /// frame, or a second agent that calls itself this site. Nothing is stored and nothing
    /// is to be acknowledged.
    pub stale_epoch: bool,
    pub outcomes: Vec<EventOutcome>,
}

/// How a batch stands against what the outbox holds of its site: the rules every backend
/// applies before it stores a batch's events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Of an epoch the site has moved on from: nothing is stored or acknowledged.
    StaleEpoch,
    /// Not now: the agent keeps the batch and sends it again.
    Refused(BatchRefusal),
    /// To be stored: the site's epoch is durable through `from`, and the batch continues it.
    Take { from: u64 },
}

/// Decides a batch of a site whose latest epoch is `site_epoch`, when the outbox holds that
/// batch's epoch through `known` (`None`: an epoch never seen).
pub(crate) fn admit(
    batch: &BatchFrame,
    known: Option<u64>,
    site_epoch: &str,
    full: bool,
) -> Admission {
    // An epoch is a log's life: once a site's agent starts a new one, it never writes in an
    // older one again. A batch of an epoch stored before but no longer the site's is a
    // replay (a signature is valid forever) or a second agent with this site's name.
    if known.is_some() && !site_epoch.is_empty() && site_epoch != batch.epoch.to_string() {
        return Admission::StaleEpoch;
    }
    // A batch must continue without a gap from what is durable: an acknowledgement promises
    // everything up to its number. Durable is what this outbox holds, or what the agent says
    // was acknowledged (by an outbox since moved aside or restored from a backup, or by
    // another relay): the agent has deleted that, so nothing can come before it. A batch that
    // starts further on follows batches that never arrived here, and waits for the re-send.
    let from = known.unwrap_or(0).max(batch.acked_through);
    if batch.first_seq > from + 1 {
        return Admission::Refused(BatchRefusal::Gap);
    }
    // Full: nothing new goes in, but a re-sent batch already stored is still acknowledged.
    if full && batch.last_seq > known.unwrap_or(0) {
        return Admission::Refused(BatchRefusal::OutboxFull);
    }
    Admission::Take { from }
}

impl Stored {
    /// A batch's result before anything of it is stored: it acknowledges what was durable.
    pub(crate) fn before(batch: &BatchFrame, known: Option<u64>) -> Stored {
        Stored {
            site: batch.site.clone(),
            epoch: batch.epoch,
            acked_through: known.unwrap_or(0),
            stored: 0,
            duplicates: 0,
            refused: None,
            stale_epoch: false,
            outcomes: Vec::new(),
        }
    }
}

/// An event dropped at intake as a repeat of an id already stored: the ERP has it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Repeat {
    pub epoch: Epoch,
    pub seq: u64,
    pub id: String,
    pub kind: backhaul_events::EventType,
    pub received_at_ms: i64,
}

impl Repeat {
    /// The repeats among a batch's results, described from the batch's own entries.
    pub(crate) fn of(batch: &BatchFrame, outcomes: &[EventOutcome]) -> Vec<Repeat> {
        outcomes
            .iter()
            .filter(|o| matches!(o.outcome, backhaul_events::Outcome::Duplicate))
            .filter_map(|o| {
                let at = batch.events.binary_search_by_key(&o.seq, |e| e.seq).ok()?;
                let entry = &batch.events[at];
                Some(Repeat {
                    epoch: batch.epoch,
                    seq: entry.seq,
                    id: entry.event.id.clone(),
                    kind: entry.event.kind,
                    received_at_ms: entry.received_at_ms,
                })
            })
            .collect()
    }
}

/// A dead letter: the event, the ERP's reason, and when it happened.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub reason: String,
    pub at_ms: i64,
    pub attempts: u32,
    pub event: StampedEvent,
}

/// The first event of one queue, ready to be delivered.
#[derive(Debug, Clone)]
pub struct Head {
    pub queue: Vec<u8>,
    pub outbox_seq: u64,
    pub event: StampedEvent,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The queue an event waits in: its site and ordering key.
pub fn queue_of(event: &StampedEvent) -> Vec<u8> {
    queue_bytes(&event.site, &event.event)
}

fn queue_bytes(site: &str, event: &backhaul_events::Event) -> Vec<u8> {
    site_key(site, &backhaul_events::OrderingKey::of(event).to_bytes())
}

/// `site`, a zero byte, `tail`: keys that sort by site first.
fn site_key(site: &str, tail: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(site.len() + 1 + tail.len());
    key.extend_from_slice(site.as_bytes());
    key.push(0);
    key.extend_from_slice(tail);
    key
}

/// Decodes an event record as the outbox keeps it (postcard).
fn decode_record(outbox_seq: u64, bytes: &[u8]) -> Result<StampedEvent, OutboxError> {
    postcard::from_bytes(bytes).map_err(|e| {
        OutboxError::Storage(format!("outbox record {outbox_seq} cannot be decoded: {e}"))
    })
}
