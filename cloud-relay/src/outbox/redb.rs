//! The outbox of one relay in one redb database on its disk.
//!
//! What it owns: per-site and per-epoch progress (the highest sequence number stored without a
//! gap, which is what an acknowledgement promises), deduplication by event id within a site,
//! the queue per ordering key, the connector's [`CommitToken`] committed with deliveries, and
//! each site's refusals until its agent has them.
//!
//! Intake is the hot path: per event it writes two records with increasing keys, the event and
//! its id in the deduplication window. Nothing on disk is keyed by event id or ordering key,
//! because with thousands of orders and SKUs such keys spread every commit over the whole tree
//! and the cost per event grows with the outbox. Ids are looked up in an in-memory index of
//! the window; the queues per key are kept in memory for the oldest waiting events only (the
//! [`Frontier`]), loaded from the outbox in arrival order as delivery moves on.

use std::collections::{BTreeMap, HashMap, VecDeque};

use hashbrown::HashTable;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use backhaul_events::{
    BatchFrame, Epoch, Event, EventOutcome, Outcome, Refusal, StampedEvent, TallyFrame,
};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::Serialize;

use super::{
    Admission, DeadLetter, Head, Outbox, OutboxError, Repeat, SiteRecord, Stored, admit,
    decode_record, now_ms, queue_bytes, queue_of, site_key,
};
use crate::connector::CommitToken;
use crate::trace::{BatchRecord, EventTrace};

/// Events waiting for delivery, by outbox sequence number (arrival order).
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// The deduplication window: site, 0, id by the outbox sequence number that recorded it,
/// oldest first, so the window can be kept to a bounded number of ids. Looked up through
/// [`SeenIds`], which is rebuilt from it at open.
const SEEN_ORDER: TableDefinition<u64, &[u8]> = TableDefinition::new("seen_order");
/// Ids forgotten per transaction at most, so pruning never holds up an acknowledgement long.
const PRUNE_PER_COMMIT: usize = 20_000;
/// Highest sequence number stored without a gap, per site and epoch: site, 0, epoch.
const EPOCHS: TableDefinition<&[u8], u64> = TableDefinition::new("epochs");
/// Per-site summary (JSON).
const SITES: TableDefinition<&str, &[u8]> = TableDefinition::new("sites");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Events the ERP refused for good, by their outbox sequence number (so replay keeps order).
const DLQ: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
/// Refusals kept for each site until its agent acknowledges them: site, 0, number (big
/// endian) → postcard [`Refusal`].
const REFUSALS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("refusals");

/// What became of events that left the outbox, for `trace`: site, 0, id → postcard
/// [`EventTrace`].
const TRACES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("traces");
/// The batches stored: site, 0, epoch, first seq (big endian) → postcard [`BatchRecord`].
const BATCHES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("batches");
/// Traces and batches by age, to forget them after the retention: time (ms, big endian), then
/// the key in [`TRACES`] (tag 0) or [`BATCHES`] (tag 1).
const TRACE_AGES: TableDefinition<&[u8], ()> = TableDefinition::new("trace_ages");
/// Events dropped as repeats of a stored id: site, 0, epoch, seq (big endian) → postcard
/// [`Repeat`]; forgotten with the traces (tag 2 in [`TRACE_AGES`]).
const REPEATS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("repeats");
/// Each site's latest tally: site → postcard [`TallyFrame`].
const TALLIES: TableDefinition<&str, &[u8]> = TableDefinition::new("tallies");
/// Traces and batches forgotten per commit at most.
const FORGET_PER_COMMIT: usize = 10_000;

const META_NEXT_OUTBOX_SEQ: &str = "next_outbox_seq";
/// The connector's commit token (named when the ledger was its only user).
const META_CONNECTOR_COMMIT: &str = "ledger_committed_len";
/// Bytes of the records of waiting events and dead letters: what `outbox.max_bytes` caps.
const META_HELD_BYTES: &str = "held_bytes";

fn storage<E: std::fmt::Display>(e: E) -> OutboxError {
    OutboxError::Storage(e.to_string())
}

/// How the outbox is opened.
#[derive(Debug, Clone, Copy)]
pub struct OutboxOptions {
    /// redb's page cache, in bytes.
    pub cache_size: usize,
    /// How many event ids are remembered for deduplication (outbox.dedup_ids).
    pub dedup_ids: u64,
    /// How many of the oldest waiting events the per-key queues hold in memory.
    pub frontier_events: usize,
    /// Once the waiting events and dead letters take this many bytes, batches are refused
    /// (the agents keep them) until deliveries make room.
    pub max_bytes: u64,
    /// Whether the batch that carried each event is recorded for its trace (off when
    /// `outbox.trace_days` is 0: nothing would ever read or forget them).
    pub keep_batches: bool,
}

pub struct RedbOutbox {
    db: Database,
    options: OutboxOptions,
    path: PathBuf,
    /// Held by every writer for its whole transaction: the site table is read, changed and
    /// written back, and the id index must change only with what was committed. Only the
    /// writers' blocking threads take it; readers use `published`, so no async task ever
    /// waits for a disk flush.
    state: Mutex<WriterState>,
    /// What the last commit left, for readers (status, metrics, admin).
    published: RwLock<Published>,
    frontier: Mutex<Frontier>,
}

#[derive(Default)]
struct Published {
    sites: Arc<BTreeMap<String, SiteRecord>>,
    held_bytes: u64,
}

struct WriterState {
    /// Shared with [`Published`] once committed: a writer changes its own copy.
    sites: Arc<BTreeMap<String, SiteRecord>>,
    seen: SeenIds,
    /// As `META_HELD_BYTES`, as of the last commit.
    held_bytes: u64,
}

/// The deduplication window in memory, 9 bytes per id (1M ids: 18 MiB): each id is one
/// `u64` holding the high half of a 64-bit hash of site and id, and the low half of the outbox
/// sequence number under which `SEEN_ORDER` recorded it. Ids sharing a half-hash are all kept,
/// and every candidate is confirmed against `SEEN_ORDER`, so a collision costs a read, never
/// an event dropped as a duplicate nor a duplicate let through. The full sequence number is
/// the one with those low 32 bits nearest below the newest recorded: the window spans fewer
/// than 2^32 numbers, since each recorded id takes one and at most `dedup_ids` are kept.
struct SeenIds {
    hasher: RandomState,
    by_hash: HashTable<u64>,
    /// The highest sequence number recorded so far.
    newest: u64,
}

impl SeenIds {
    fn new() -> SeenIds {
        SeenIds {
            hasher: RandomState::new(),
            by_hash: HashTable::new(),
            newest: 0,
        }
    }

    fn hash(&self, id_key: &[u8]) -> u64 {
        self.hasher.hash_one(id_key)
    }

    /// The table's own hash of an entry or of a lookup: from the half-hash alone, because
    /// that is all an entry keeps.
    fn table_hash(high: u32) -> u64 {
        u64::from(high).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn entry(hash: u64, seq: u64) -> u64 {
        (hash & 0xFFFF_FFFF_0000_0000) | (seq & 0xFFFF_FFFF)
    }

    fn record(&mut self, hash: u64, seq: u64) {
        let high = (hash >> 32) as u32;
        self.by_hash
            .insert_unique(Self::table_hash(high), Self::entry(hash, seq), |entry| {
                Self::table_hash((entry >> 32) as u32)
            });
        self.newest = self.newest.max(seq);
    }

    /// The sequence numbers that may have recorded the id of `hash`, newest first.
    fn candidates(&self, hash: u64) -> Vec<u64> {
        let high = (hash >> 32) as u32;
        let newest = self.newest;
        let mut seqs: Vec<u64> = self
            .by_hash
            .iter_hash(Self::table_hash(high))
            .filter(|entry| (**entry >> 32) as u32 == high)
            .map(|entry| {
                let behind = (newest as u32).wrapping_sub(*entry as u32);
                newest - u64::from(behind).min(newest)
            })
            .collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        seqs
    }

    /// Applies what a committed transaction recorded and forgot.
    fn apply(&mut self, recorded: HashMap<u64, u64>, forgotten: Vec<(u64, u64)>) {
        self.by_hash.reserve(recorded.len(), |entry| {
            Self::table_hash((entry >> 32) as u32)
        });
        for (hash, seq) in recorded {
            self.record(hash, seq);
        }
        for (hash, seq) in forgotten {
            let wanted = Self::entry(hash, seq);
            if let Ok(found) = self
                .by_hash
                .find_entry(Self::table_hash((hash >> 32) as u32), |entry| {
                    *entry == wanted
                })
            {
                found.remove();
            }
        }
    }
}

/// The per-key queues of the oldest waiting events: at most `capacity` of them, loaded from
/// the outbox in arrival order. The first event of each queue here is the head of that queue,
/// because every older event of the outbox is here or delivered. A queue whose events all lie
/// beyond the frontier waits until delivery moves it on; memory stays bounded however large
/// the outbox grows.
struct Frontier {
    capacity: usize,
    /// Every event up to here is in the frontier or has left the outbox.
    loaded_through: u64,
    queues: HashMap<Vec<u8>, VecDeque<u64>>,
    /// Each queue by the outbox sequence number of its head, oldest first.
    by_head: BTreeMap<u64, Vec<u8>>,
    events: usize,
    /// The last look found the frontier full and every queue in it held back, so keys
    /// beyond it were waiting.
    blocked: bool,
    warned_at: Option<std::time::Instant>,
}

impl Frontier {
    fn new(capacity: usize) -> Frontier {
        Frontier {
            capacity: capacity.max(1),
            loaded_through: 0,
            queues: HashMap::new(),
            by_head: BTreeMap::new(),
            events: 0,
            blocked: false,
            warned_at: None,
        }
    }

    fn push(&mut self, queue: Vec<u8>, outbox_seq: u64) {
        self.loaded_through = self.loaded_through.max(outbox_seq);
        self.events += 1;
        match self.queues.get_mut(&queue) {
            Some(seqs) => seqs.push_back(outbox_seq),
            None => {
                self.by_head.insert(outbox_seq, queue.clone());
                self.queues.insert(queue, VecDeque::from([outbox_seq]));
            }
        }
    }

    fn remove(&mut self, queue: &[u8], outbox_seq: u64) {
        let Some(seqs) = self.queues.get_mut(queue) else {
            return;
        };
        let Some(at) = seqs.iter().position(|s| *s == outbox_seq) else {
            return;
        };
        seqs.remove(at);
        self.events -= 1;
        if at == 0 {
            self.by_head.remove(&outbox_seq);
            match seqs.front() {
                Some(next) => {
                    self.by_head.insert(*next, queue.to_vec());
                }
                None => {
                    self.queues.remove(queue);
                }
            }
        }
    }
}

/// A stamped event by reference, serialised exactly like [`StampedEvent`], so intake stores
/// the events of a batch without copying them first.
#[derive(Serialize)]
struct StampedRef<'a> {
    site: &'a str,
    epoch: Epoch,
    seq: u64,
    received_at_ms: i64,
    event: &'a Event,
}

impl<'a> StampedRef<'a> {
    fn of(event: &'a StampedEvent) -> StampedRef<'a> {
        StampedRef {
            site: &event.site,
            epoch: event.epoch,
            seq: event.seq,
            received_at_ms: event.received_at_ms,
            event: &event.event,
        }
    }
}

/// Puts events into the outbox: the event, its place in its key's queue, and its id in the
/// deduplication window. Intake and replay both go through here, so a replayed event is
/// queued exactly like a new one.
struct Enqueue<'txn, 's> {
    outbox: redb::Table<'txn, u64, &'static [u8]>,
    seen_order: redb::Table<'txn, u64, &'static [u8]>,
    meta: redb::Table<'txn, &'static str, u64>,
    next: u64,
    /// The committed window.
    seen: &'s SeenIds,
    /// Ids recorded by this transaction, applied to `seen` once it commits.
    recorded: HashMap<u64, u64>,
    /// Bytes of the event records put in by this transaction.
    bytes_added: u64,
    encoded: Vec<u8>,
}

impl<'txn, 's> Enqueue<'txn, 's> {
    fn open(
        txn: &'txn WriteTransaction,
        seen: &'s SeenIds,
    ) -> Result<Enqueue<'txn, 's>, OutboxError> {
        let meta = txn.open_table(META).map_err(storage)?;
        let next = meta
            .get(META_NEXT_OUTBOX_SEQ)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(1);
        Ok(Enqueue {
            outbox: txn.open_table(OUTBOX).map_err(storage)?,
            seen_order: txn.open_table(SEEN_ORDER).map_err(storage)?,
            meta,
            next,
            seen,
            recorded: HashMap::new(),
            bytes_added: 0,
            encoded: Vec::new(),
        })
    }

    /// Whether the id (site, 0, id), whose hash is `hash`, is in the window, committed or
    /// recorded by this transaction.
    fn is_seen(&self, id_key: &[u8], hash: u64) -> Result<bool, OutboxError> {
        let here = self.recorded.get(&hash).copied();
        for seq in here.into_iter().chain(self.seen.candidates(hash)) {
            if self
                .seen_order
                .get(seq)
                .map_err(storage)?
                .is_some_and(|recorded| recorded.value() == id_key)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn push(
        &mut self,
        event: &StampedRef<'_>,
        id_key: &[u8],
        hash: u64,
    ) -> Result<(), OutboxError> {
        let seq = self.next;
        self.encoded.clear();
        self.encoded =
            postcard::to_extend(event, std::mem::take(&mut self.encoded)).map_err(storage)?;
        self.outbox
            .insert(seq, self.encoded.as_slice())
            .map_err(storage)?;
        self.bytes_added += self.encoded.len() as u64;
        self.seen_order.insert(seq, id_key).map_err(storage)?;
        self.recorded.insert(hash, seq);
        self.next += 1;
        Ok(())
    }

    /// Ends the enqueueing with `held_bytes` before it (what the outbox held, less what this
    /// transaction took out); returns the ids recorded, to apply to the window after the
    /// commit, and the bytes held after it.
    fn finish(mut self, held_bytes: u64) -> Result<(HashMap<u64, u64>, u64), OutboxError> {
        self.meta
            .insert(META_NEXT_OUTBOX_SEQ, self.next)
            .map_err(storage)?;
        let held = held_bytes + self.bytes_added;
        self.meta.insert(META_HELD_BYTES, held).map_err(storage)?;
        Ok((self.recorded, held))
    }
}

/// Writes site records into the transaction's site table.
fn write_sites<'a>(
    txn: &WriteTransaction,
    records: impl IntoIterator<Item = &'a SiteRecord>,
) -> Result<(), OutboxError> {
    let mut table = txn.open_table(SITES).map_err(storage)?;
    for record in records {
        let json = serde_json::to_vec(record).map_err(storage)?;
        table
            .insert(record.site.as_str(), json.as_slice())
            .map_err(storage)?;
    }
    Ok(())
}

impl RedbOutbox {
    pub fn open(dir: &Path, options: OutboxOptions) -> Result<Arc<RedbOutbox>, OutboxError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            OutboxError::Storage(format!(
                "cannot create the state directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("outbox.redb");
        let mut builder = Database::builder();
        builder.set_cache_size(options.cache_size);
        builder.set_check_integrity_on_open(true);
        let opened = if path.exists() {
            builder.open(&path)
        } else {
            builder.create(&path)
        };
        let mut db = match opened {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(OutboxError::InUse { path });
            }
            Err(e) => {
                return Err(OutboxError::Damaged {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        // Give space freed by earlier deliveries back to the file system.
        let _ = db.compact();
        let mut sites = BTreeMap::new();
        let held_bytes;
        let mut seen = SeenIds::new();
        let txn = db.begin_write().map_err(storage)?;
        {
            // Readers need every table to exist.
            txn.open_table(OUTBOX).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            txn.open_table(EPOCHS).map_err(storage)?;
            txn.open_table(DLQ).map_err(storage)?;
            txn.open_table(REFUSALS).map_err(storage)?;
            let table = txn.open_table(SITES).map_err(storage)?;
            for entry in table.iter().map_err(storage)? {
                let (key, value) = entry.map_err(storage)?;
                if let Ok(record) = serde_json::from_slice::<SiteRecord>(value.value()) {
                    sites.insert(key.value().to_string(), record);
                }
            }
            held_bytes = held_bytes_at_open(&txn)?;
            let order = txn.open_table(SEEN_ORDER).map_err(storage)?;
            seen.by_hash
                .reserve(order.len().map_err(storage)? as usize, |entry| {
                    SeenIds::table_hash((entry >> 32) as u32)
                });
            for entry in order.iter().map_err(storage)? {
                let (seq, id_key) = entry.map_err(storage)?;
                let hash = seen.hash(id_key.value());
                seen.record(hash, seq.value());
            }
        }
        txn.commit().map_err(storage)?;
        let sites = Arc::new(sites);
        Ok(Arc::new(RedbOutbox {
            db,
            options,
            path,
            published: RwLock::new(Published {
                sites: sites.clone(),
                held_bytes,
            }),
            state: Mutex::new(WriterState {
                sites,
                seen,
                held_bytes,
            }),
            frontier: Mutex::new(Frontier::new(options.frontier_events)),
        }))
    }

    fn lock_state(&self) -> Result<MutexGuard<'_, WriterState>, OutboxError> {
        self.state
            .lock()
            .map_err(|_| OutboxError::Storage("the outbox state lock is poisoned".into()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sites(&self) -> Vec<SiteRecord> {
        self.published
            .read()
            .map(|p| p.sites.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Bytes of the waiting events and dead letters, which `max_bytes` caps.
    pub fn held_bytes(&self) -> u64 {
        self.published.read().map(|p| p.held_bytes).unwrap_or(0)
    }

    /// Records what a writer committed and makes it visible to readers.
    fn publish(&self, state: &mut WriterState, sites: BTreeMap<String, SiteRecord>, held: u64) {
        state.sites = Arc::new(sites);
        state.held_bytes = held;
        if let Ok(mut published) = self.published.write() {
            *published = Published {
                sites: state.sites.clone(),
                held_bytes: held,
            };
        }
    }

    /// Whether the site's agent has refusals to take (read without the writers' lock).
    pub fn has_refusals_for(&self, site: &str) -> bool {
        self.published.read().is_ok_and(|p| {
            p.sites
                .get(site)
                .is_some_and(|s| s.refusals_unacknowledged > 0)
        })
    }

    /// Whether the last look for work found only held-back keys among the oldest waiting
    /// events, with newer keys waiting behind them.
    pub fn frontier_blocked(&self) -> bool {
        self.frontier.lock().map(|f| f.blocked).unwrap_or(false)
    }

    pub fn max_bytes(&self) -> u64 {
        self.options.max_bytes
    }

    pub fn depth(&self) -> u64 {
        self.db
            .begin_read()
            .ok()
            .and_then(|t| t.open_table(OUTBOX).ok())
            .and_then(|t| t.len().ok())
            .unwrap_or(0)
    }

    /// Stores batches in one durable transaction; one result per batch, in order.
    pub fn store(&self, batches: &[BatchFrame]) -> Result<Vec<Stored>, OutboxError> {
        let mut state = self.lock_state()?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_quick_repair(true);
        let mut sites = (*state.sites).clone();
        let mut results = Vec::with_capacity(batches.len());
        // Checked per commit, so the cap can be passed by one commit's batches.
        let full = state.held_bytes >= self.options.max_bytes;
        let (recorded, held_bytes, forgotten) = {
            let mut queue = Enqueue::open(&txn, &state.seen)?;
            let mut epochs = txn.open_table(EPOCHS).map_err(storage)?;
            let mut kept = txn.open_table(BATCHES).map_err(storage)?;
            let mut ages = txn.open_table(TRACE_AGES).map_err(storage)?;
            let mut repeats = txn.open_table(REPEATS).map_err(storage)?;
            let stored_at_ms = now_ms();
            for batch in batches {
                let result = store_batch(&mut queue, &mut epochs, batch, &mut sites, full)?;
                if self.options.keep_batches {
                    for repeat in Repeat::of(batch, &result.outcomes) {
                        let key = batch_key(&batch.site, repeat.epoch, repeat.seq);
                        let bytes = postcard::to_stdvec(&repeat).map_err(storage)?;
                        repeats
                            .insert(key.as_slice(), bytes.as_slice())
                            .map_err(storage)?;
                        ages.insert(age_key(stored_at_ms, 2, &key).as_slice(), ())
                            .map_err(storage)?;
                    }
                }
                if result.stored > 0 && self.options.keep_batches {
                    let key = batch_key(&batch.site, batch.epoch, batch.first_seq);
                    let record = BatchRecord {
                        first_seq: batch.first_seq,
                        last_seq: batch.last_seq,
                        events: batch.events.len() as u64,
                        stored_at_ms,
                    };
                    let bytes = postcard::to_stdvec(&record).map_err(storage)?;
                    kept.insert(key.as_slice(), bytes.as_slice())
                        .map_err(storage)?;
                    ages.insert(age_key(stored_at_ms, 1, &key).as_slice(), ())
                        .map_err(storage)?;
                }
                results.push(result);
            }
            let (recorded, held_bytes) = queue.finish(state.held_bytes)?;
            (
                recorded,
                held_bytes,
                self.forget_old_ids(&txn, &state.seen)?,
            )
        };
        let touched: Vec<&SiteRecord> = results.iter().filter_map(|r| sites.get(&r.site)).collect();
        write_sites(&txn, touched)?;
        txn.commit().map_err(storage)?;
        self.publish(&mut state, sites, held_bytes);
        state.seen.apply(recorded, forgotten);
        Ok(results)
    }

    /// The oldest undelivered events, in arrival order, with their outbox sequence numbers.
    pub fn pending(&self, limit: usize) -> Result<Vec<(u64, StampedEvent)>, OutboxError> {
        self.pending_after(0, limit)
    }

    /// Undelivered events after outbox sequence number `after`, in arrival order.
    pub fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StampedEvent)>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(OUTBOX).map_err(storage)?;
        let mut out = Vec::new();
        for entry in table
            .range(after.saturating_add(1)..)
            .map_err(storage)?
            .take(limit)
        {
            let (key, value) = entry.map_err(storage)?;
            out.push((key.value(), decode_record(key.value(), value.value())?));
        }
        Ok(out)
    }

    /// The connector's token as of the last committed delivery.
    pub fn committed_token(&self) -> Result<Option<CommitToken>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        Ok(meta
            .get(META_CONNECTOR_COMMIT)
            .map_err(storage)?
            .map(|v| CommitToken(v.value())))
    }

    /// The outbox entry of an event, if it is still waiting.
    pub fn find_pending(
        &self,
        site: &str,
        id: &str,
    ) -> Result<Option<(u64, StampedEvent)>, OutboxError> {
        let id_key = site_key(site, id.as_bytes());
        let candidates = {
            let state = self.lock_state()?;
            state.seen.candidates(state.seen.hash(&id_key))
        };
        let txn = self.db.begin_read().map_err(storage)?;
        let order = txn.open_table(SEEN_ORDER).map_err(storage)?;
        let mut recorded_at = None;
        for seq in candidates {
            if order
                .get(seq)
                .map_err(storage)?
                .is_some_and(|recorded| recorded.value() == id_key.as_slice())
            {
                recorded_at = Some(seq);
                break;
            }
        }
        let Some(outbox_seq) = recorded_at else {
            return Ok(None);
        };
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        match outbox.get(outbox_seq).map_err(storage)? {
            Some(value) => Ok(Some((
                outbox_seq,
                decode_record(outbox_seq, value.value())?,
            ))),
            None => Ok(None),
        }
    }
}

/// What the waiting events and dead letters take, as kept in `META_HELD_BYTES`; counted once
/// when an outbox has no count yet.
fn held_bytes_at_open(txn: &WriteTransaction) -> Result<u64, OutboxError> {
    let mut meta = txn.open_table(META).map_err(storage)?;
    if let Some(held) = meta.get(META_HELD_BYTES).map_err(storage)? {
        return Ok(held.value());
    }
    let mut held = 0u64;
    for table in [OUTBOX, DLQ] {
        for entry in txn
            .open_table(table)
            .map_err(storage)?
            .iter()
            .map_err(storage)?
        {
            held += entry.map_err(storage)?.1.value().len() as u64;
        }
    }
    meta.insert(META_HELD_BYTES, held).map_err(storage)?;
    Ok(held)
}

/// Stores one batch: checks it continues its epoch without a gap, drops what is already
/// there, and queues the rest.
fn store_batch(
    queue: &mut Enqueue<'_, '_>,
    epochs: &mut redb::Table<'_, &'static [u8], u64>,
    batch: &BatchFrame,
    sites: &mut BTreeMap<String, SiteRecord>,
    full: bool,
) -> Result<Stored, OutboxError> {
    let epoch_key = site_key(&batch.site, &batch.epoch.0.to_be_bytes());
    let known = epochs
        .get(epoch_key.as_slice())
        .map_err(storage)?
        .map(|v| v.value());
    let record = sites
        .entry(batch.site.clone())
        .or_insert_with(|| SiteRecord {
            site: batch.site.clone(),
            ..SiteRecord::default()
        });
    let mut result = Stored::before(batch, known);
    let from = match admit(batch, known, &record.epoch, full) {
        Admission::StaleEpoch => {
            result.stale_epoch = true;
            return Ok(result);
        }
        Admission::Refused(refusal) => {
            record.last_seen_ms = now_ms();
            record.epoch = batch.epoch.to_string();
            record.highest_seq = known.unwrap_or(0);
            result.refused = Some(refusal);
            return Ok(result);
        }
        Admission::Take { from } => from,
    };
    record.last_seen_ms = now_ms();
    record.epoch = batch.epoch.to_string();
    if let Some(highest) = known
        && batch.acked_through > highest
    {
        tracing::info!(site = %batch.site, epoch = %batch.epoch, held_through = highest, agent_acked_through = batch.acked_through, "the agent's events up to its acknowledged number were acknowledged by another outbox; continuing from there");
    }
    let mut id_key = Vec::new();
    for entry in &batch.events {
        if known.is_some_and(|highest| entry.seq <= highest) {
            result.duplicates += 1;
            continue;
        }
        id_key.clear();
        id_key.extend_from_slice(batch.site.as_bytes());
        id_key.push(0);
        id_key.extend_from_slice(entry.event.id.as_bytes());
        let hash = queue.seen.hash(&id_key);
        if queue.is_seen(&id_key, hash)? {
            result.duplicates += 1;
            result.outcomes.push(EventOutcome {
                seq: entry.seq,
                id: entry.event.id.clone(),
                outcome: Outcome::Duplicate,
            });
            continue;
        }
        let stamped = StampedRef {
            site: &batch.site,
            epoch: batch.epoch,
            seq: entry.seq,
            received_at_ms: entry.received_at_ms,
            event: &entry.event,
        };
        queue.push(&stamped, &id_key, hash)?;
        result.stored += 1;
    }
    let through = from.max(batch.last_seq);
    epochs
        .insert(epoch_key.as_slice(), through)
        .map_err(storage)?;
    result.acked_through = through;
    record.highest_seq = through;
    record.events_stored += result.stored;
    record.events_duplicate += result.duplicates;
    Ok(result)
}
impl RedbOutbox {
    /// The first waiting event of up to `limit` queues, oldest first, skipping the queues
    /// `skip` says no to (in flight, or waiting to retry). Looks only at the frontier, so the
    /// cost grows with the number of queues visited, not with the number of events waiting.
    pub fn heads(
        &self,
        limit: usize,
        skip: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<Head>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        let mut frontier = self
            .frontier
            .lock()
            .map_err(|_| OutboxError::Storage("the frontier lock is poisoned".into()))?;
        let room = frontier.capacity.saturating_sub(frontier.events);
        if room > 0 {
            let from = frontier.loaded_through + 1;
            for entry in outbox.range(from..).map_err(storage)?.take(room) {
                let (seq, value) = entry.map_err(storage)?;
                let event = decode_record(seq.value(), value.value())?;
                frontier.push(queue_bytes(&event.site, &event.event), seq.value());
            }
        }
        let mut heads = Vec::new();
        let mut vanished = Vec::new();
        for (&outbox_seq, queue) in &frontier.by_head {
            if heads.len() >= limit {
                break;
            }
            if skip(queue) {
                continue;
            }
            match outbox.get(outbox_seq).map_err(storage)? {
                Some(value) => heads.push(Head {
                    queue: queue.clone(),
                    outbox_seq,
                    event: decode_record(outbox_seq, value.value())?,
                }),
                None => vanished.push((queue.clone(), outbox_seq)),
            }
        }
        // Left the outbox some other way (the ledger's recovery after a crash).
        for (queue, outbox_seq) in vanished {
            frontier.remove(&queue, outbox_seq);
        }
        frontier.blocked = heads.is_empty() && frontier.events >= frontier.capacity;
        if frontier.blocked
            && frontier
                .warned_at
                .is_none_or(|at| at.elapsed() >= std::time::Duration::from_secs(60))
        {
            frontier.warned_at = Some(std::time::Instant::now());
            tracing::warn!(
                frontier_events = frontier.capacity,
                "the oldest waiting events all belong to keys held back (in flight or retrying): \
                 newer keys wait until those move"
            );
        }
        Ok(heads)
    }

    /// Records the end of deliveries in one durable transaction: posted events leave the
    /// outbox, refused ones move to the dead-letter queue, and the connector's token is
    /// recorded with them.
    pub fn complete(
        &self,
        posted: &[(u64, StampedEvent)],
        dead: &[(u64, StampedEvent, String, u32)],
        commit: Option<CommitToken>,
    ) -> Result<(), OutboxError> {
        let mut state = self.lock_state()?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_quick_repair(true);
        let mut sites = (*state.sites).clone();
        let mut held_bytes = state.held_bytes;
        {
            let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
            let mut dlq = txn.open_table(DLQ).map_err(storage)?;
            let mut refusals = txn.open_table(REFUSALS).map_err(storage)?;
            // The bytes of the record taken out, if it was still there.
            let mut take_out = |outbox_seq: u64| -> Result<Option<u64>, OutboxError> {
                let removed = outbox.remove(outbox_seq).map_err(storage)?;
                Ok(removed.map(|record| record.value().len() as u64))
            };
            for (outbox_seq, event) in posted {
                if let Some(bytes) = take_out(*outbox_seq)? {
                    held_bytes = held_bytes.saturating_sub(bytes);
                    if let Some(record) = sites.get_mut(&event.site) {
                        record.events_delivered += 1;
                    }
                }
            }
            for (outbox_seq, event, reason, attempts) in dead {
                if let Some(bytes) = take_out(*outbox_seq)? {
                    held_bytes = held_bytes.saturating_sub(bytes);
                    let letter = DeadLetter {
                        id: *outbox_seq,
                        reason: reason.clone(),
                        at_ms: now_ms(),
                        attempts: *attempts,
                        event: event.clone(),
                    };
                    let json = serde_json::to_vec(&letter).map_err(storage)?;
                    dlq.insert(*outbox_seq, json.as_slice()).map_err(storage)?;
                    held_bytes += json.len() as u64;
                    if let Some(record) = sites.get_mut(&event.site) {
                        record.events_dead_lettered += 1;
                        record.refusals_numbered += 1;
                        record.refusals_unacknowledged += 1;
                        let refusal = Refusal {
                            number: record.refusals_numbered,
                            seq: event.seq,
                            id: event.event.id.clone(),
                            reason: reason.clone(),
                            at_ms: letter.at_ms,
                        };
                        let bytes = postcard::to_stdvec(&refusal).map_err(storage)?;
                        refusals
                            .insert(
                                refusal_key(&event.site, refusal.number).as_slice(),
                                bytes.as_slice(),
                            )
                            .map_err(storage)?;
                    }
                }
            }
            let mut meta = txn.open_table(META).map_err(storage)?;
            if let Some(CommitToken(token)) = commit {
                meta.insert(META_CONNECTOR_COMMIT, token).map_err(storage)?;
            }
            meta.insert(META_HELD_BYTES, held_bytes).map_err(storage)?;
            write_sites(&txn, sites.values())?;
        }
        txn.commit().map_err(storage)?;
        self.publish(&mut state, sites, held_bytes);
        drop(state);
        let mut frontier = self
            .frontier
            .lock()
            .map_err(|_| OutboxError::Storage("the frontier lock is poisoned".into()))?;
        if frontier.events > 0 {
            let done = posted
                .iter()
                .map(|(seq, event)| (*seq, event))
                .chain(dead.iter().map(|(seq, event, _, _)| (*seq, event)));
            for (outbox_seq, event) in done {
                frontier.remove(&queue_of(event), outbox_seq);
            }
        }
        Ok(())
    }

    /// Dead letters in the order their events arrived, starting after `after`.
    pub fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let dlq = txn.open_table(DLQ).map_err(storage)?;
        let mut out = Vec::new();
        for entry in dlq
            .range(after.saturating_add(1)..)
            .map_err(storage)?
            .take(limit)
        {
            let (_, value) = entry.map_err(storage)?;
            out.push(serde_json::from_slice(value.value()).map_err(storage)?);
        }
        Ok(out)
    }

    pub fn dead_letter_count(&self) -> u64 {
        self.db
            .begin_read()
            .ok()
            .and_then(|t| t.open_table(DLQ).ok())
            .and_then(|t| t.len().ok())
            .unwrap_or(0)
    }

    /// Sends dead letters back through the normal path, in their original order (all of them
    /// when `ids` is `None`); returns the ids replayed.
    pub fn replay(&self, ids: Option<&[u64]>) -> Result<Vec<u64>, OutboxError> {
        self.take_dead_letters(ids, true)
    }

    /// Drops dead letters for good; returns the ids discarded.
    pub fn discard(&self, ids: &[u64]) -> Result<Vec<u64>, OutboxError> {
        self.take_dead_letters(Some(ids), false)
    }

    fn take_dead_letters(
        &self,
        ids: Option<&[u64]>,
        requeue: bool,
    ) -> Result<Vec<u64>, OutboxError> {
        let mut state = self.lock_state()?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_quick_repair(true);
        let mut sites = (*state.sites).clone();
        let mut taken = Vec::new();
        let mut held_bytes = state.held_bytes;
        let (recorded, held_bytes) = {
            let mut dlq = txn.open_table(DLQ).map_err(storage)?;
            let mut wanted: Vec<u64> = match ids {
                Some(ids) => ids.to_vec(),
                None => {
                    let mut all = Vec::new();
                    for entry in dlq.iter().map_err(storage)? {
                        all.push(entry.map_err(storage)?.0.value());
                    }
                    all
                }
            };
            wanted.sort_unstable();
            wanted.dedup();
            let mut queue = Enqueue::open(&txn, &state.seen)?;
            for id in wanted {
                let letter: DeadLetter = match dlq.remove(id).map_err(storage)? {
                    Some(value) => {
                        held_bytes = held_bytes.saturating_sub(value.value().len() as u64);
                        serde_json::from_slice(value.value()).map_err(storage)?
                    }
                    None => continue,
                };
                if let Some(record) = sites.get_mut(&letter.event.site) {
                    record.events_dead_lettered = record.events_dead_lettered.saturating_sub(1);
                    if !requeue {
                        record.events_discarded += 1;
                    }
                }
                if requeue {
                    let id_key = site_key(&letter.event.site, letter.event.event.id.as_bytes());
                    let hash = queue.seen.hash(&id_key);
                    queue.push(&StampedRef::of(&letter.event), &id_key, hash)?;
                }
                taken.push(id);
            }
            let finished = queue.finish(held_bytes)?;
            write_sites(&txn, sites.values())?;
            finished
        };
        txn.commit().map_err(storage)?;
        self.publish(&mut state, sites, held_bytes);
        state.seen.apply(recorded, Vec::new());
        Ok(taken)
    }
}

fn refusal_key(site: &str, number: u64) -> Vec<u8> {
    site_key(site, &number.to_be_bytes())
}

impl RedbOutbox {
    /// The sites with refusals their agents have not acknowledged yet.
    pub fn sites_with_refusals(&self) -> Vec<String> {
        self.published
            .read()
            .map(|p| {
                p.sites
                    .values()
                    .filter(|s| s.refusals_unacknowledged > 0)
                    .map(|s| s.site.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The oldest `limit` refusals kept for `site`.
    pub fn refusals(&self, site: &str, limit: usize) -> Result<Vec<Refusal>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(REFUSALS).map_err(storage)?;
        let (from, to) = (refusal_key(site, 0), refusal_key(site, u64::MAX));
        let mut out = Vec::new();
        for entry in table
            .range(from.as_slice()..=to.as_slice())
            .map_err(storage)?
            .take(limit)
        {
            let (_, value) = entry.map_err(storage)?;
            out.push(postcard::from_bytes(value.value()).map_err(storage)?);
        }
        Ok(out)
    }

    /// The site's agent has every refusal up to `through`: they are forgotten. Returns how
    /// many were.
    pub fn acknowledge_refusals(&self, site: &str, through: u64) -> Result<u64, OutboxError> {
        let mut state = self.lock_state()?;
        let Some(record) = state.sites.get(site) else {
            return Ok(0);
        };
        if record.refusals_unacknowledged == 0 {
            return Ok(0);
        }
        let mut record = record.clone();
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_quick_repair(true);
        let mut forgotten = 0;
        {
            let mut table = txn.open_table(REFUSALS).map_err(storage)?;
            let (from, to) = (refusal_key(site, 0), refusal_key(site, through));
            let keys: Vec<Vec<u8>> = table
                .range(from.as_slice()..=to.as_slice())
                .map_err(storage)?
                .map(|entry| entry.map(|(key, _)| key.value().to_vec()))
                .collect::<Result<_, _>>()
                .map_err(storage)?;
            for key in keys {
                table.remove(key.as_slice()).map_err(storage)?;
                forgotten += 1;
            }
            record.refusals_unacknowledged =
                record.refusals_unacknowledged.saturating_sub(forgotten);
            write_sites(&txn, [&record])?;
        }
        txn.commit().map_err(storage)?;
        let mut sites = (*state.sites).clone();
        sites.insert(site.to_string(), record);
        let held = state.held_bytes;
        self.publish(&mut state, sites, held);
        Ok(forgotten)
    }
}

impl RedbOutbox {
    /// Keeps the deduplication window to `dedup_ids` ids: the oldest are forgotten. A batch
    /// re-sent later is still recognised by its sequence numbers; only an event re-sent under
    /// a new sequence number after that many newer ones would be stored again, and connectors
    /// write idempotently by event id.
    /// Returns the (hash, sequence) pairs forgotten, to take out of the in-memory window once
    /// the transaction commits.
    fn forget_old_ids(
        &self,
        txn: &WriteTransaction,
        seen: &SeenIds,
    ) -> Result<Vec<(u64, u64)>, OutboxError> {
        let mut order = txn.open_table(SEEN_ORDER).map_err(storage)?;
        let excess = order
            .len()
            .map_err(storage)?
            .saturating_sub(self.options.dedup_ids);
        let mut forgotten = Vec::new();
        for _ in 0..excess.min(PRUNE_PER_COMMIT as u64) {
            let Some((seq, hash)) = order
                .pop_first()
                .map_err(storage)?
                .map(|(s, k)| (s.value(), seen.hash(k.value())))
            else {
                break;
            };
            forgotten.push((hash, seq));
        }
        Ok(forgotten)
    }
}

fn batch_key(site: &str, epoch: Epoch, first_seq: u64) -> Vec<u8> {
    let mut key = site_key(site, &epoch.0.to_be_bytes());
    key.extend_from_slice(&first_seq.to_be_bytes());
    key
}

fn age_key(at_ms: i64, tag: u8, key: &[u8]) -> Vec<u8> {
    let mut age = Vec::with_capacity(9 + key.len());
    age.extend_from_slice(&(at_ms.max(0) as u64).to_be_bytes());
    age.push(tag);
    age.extend_from_slice(key);
    age
}

impl RedbOutbox {
    fn record_traces(
        &self,
        traces: &[EventTrace],
        forget_before_ms: i64,
    ) -> Result<(), OutboxError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        // Made durable by the next intake or delivery commit; a crash may lose the latest.
        txn.set_durability(redb::Durability::None)
            .map_err(storage)?;
        {
            let mut kept = txn.open_table(TRACES).map_err(storage)?;
            let mut batches = txn.open_table(BATCHES).map_err(storage)?;
            let mut ages = txn.open_table(TRACE_AGES).map_err(storage)?;
            let mut repeats = txn.open_table(REPEATS).map_err(storage)?;
            for trace in traces {
                let key = site_key(&trace.event.site, trace.event.event.id.as_bytes());
                let mut trace = trace.clone();
                let earlier = kept
                    .get(key.as_slice())
                    .map_err(storage)?
                    .and_then(|v| postcard::from_bytes::<EventTrace>(v.value()).ok());
                if let Some(earlier) = earlier {
                    ages.remove(age_key(earlier.finished_at_ms, 0, &key).as_slice())
                        .map_err(storage)?;
                    trace.merge_after(earlier);
                }
                let bytes = postcard::to_stdvec(&trace).map_err(storage)?;
                kept.insert(key.as_slice(), bytes.as_slice())
                    .map_err(storage)?;
                ages.insert(age_key(trace.finished_at_ms, 0, &key).as_slice(), ())
                    .map_err(storage)?;
            }
            let limit = age_key(forget_before_ms, 0, &[]);
            let old = ages
                .extract_from_if(..limit.as_slice(), |_, _| true)
                .map_err(storage)?;
            let mut forgotten = Vec::new();
            for entry in old.take(FORGET_PER_COMMIT) {
                let (age, _) = entry.map_err(storage)?;
                forgotten.push(age.value().to_vec());
            }
            for age in forgotten {
                let (tag, key) = (age[8], &age[9..]);
                match tag {
                    0 => kept.remove(key).map_err(storage)?,
                    1 => batches.remove(key).map_err(storage)?,
                    2 => repeats.remove(key).map_err(storage)?,
                    // A tag of a later version: its own table is not this version's to touch.
                    _ => None,
                };
            }
        }
        txn.commit().map_err(storage)
    }

    fn trace(&self, site: &str, id: &str) -> Result<Option<EventTrace>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(TRACES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        let key = site_key(site, id.as_bytes());
        match table.get(key.as_slice()).map_err(storage)? {
            Some(value) => postcard::from_bytes(value.value())
                .map(Some)
                .map_err(storage),
            None => Ok(None),
        }
    }

    fn batch_of(
        &self,
        site: &str,
        epoch: Epoch,
        seq: u64,
    ) -> Result<Option<BatchRecord>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(BATCHES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        let from = batch_key(site, epoch, 0);
        let through = batch_key(site, epoch, seq);
        let last = table
            .range(from.as_slice()..=through.as_slice())
            .map_err(storage)?
            .next_back();
        match last {
            Some(entry) => {
                let (_, value) = entry.map_err(storage)?;
                let record: BatchRecord = postcard::from_bytes(value.value()).map_err(storage)?;
                Ok((record.last_seq >= seq).then_some(record))
            }
            None => Ok(None),
        }
    }
}

impl Outbox for RedbOutbox {
    fn site_traces(
        &self,
        site: &str,
        after_id: &str,
        limit: usize,
    ) -> Result<Vec<EventTrace>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(TRACES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let prefix = site_key(site, &[]);
        let from = site_key(site, after_id.as_bytes());
        let mut traces = Vec::new();
        for entry in table.range(from.as_slice()..).map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            if !key.value().starts_with(&prefix) || traces.len() >= limit {
                break;
            }
            if key.value() == from.as_slice() {
                continue;
            }
            traces.push(postcard::from_bytes(value.value()).map_err(storage)?);
        }
        Ok(traces)
    }

    fn record_traces(
        &self,
        traces: &[EventTrace],
        forget_before_ms: i64,
    ) -> Result<(), OutboxError> {
        RedbOutbox::record_traces(self, traces, forget_before_ms)
    }

    fn trace(&self, site: &str, id: &str) -> Result<Option<EventTrace>, OutboxError> {
        RedbOutbox::trace(self, site, id)
    }

    fn batch_of(
        &self,
        site: &str,
        epoch: Epoch,
        seq: u64,
    ) -> Result<Option<BatchRecord>, OutboxError> {
        RedbOutbox::batch_of(self, site, epoch, seq)
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn store(&self, batches: &[BatchFrame]) -> Result<Vec<Stored>, OutboxError> {
        RedbOutbox::store(self, batches)
    }

    fn heads(&self, limit: usize, skip: &dyn Fn(&[u8]) -> bool) -> Result<Vec<Head>, OutboxError> {
        RedbOutbox::heads(self, limit, skip)
    }

    fn complete(
        &self,
        posted: &[(u64, StampedEvent)],
        dead: &[(u64, StampedEvent, String, u32)],
        commit: Option<CommitToken>,
    ) -> Result<(), OutboxError> {
        RedbOutbox::complete(self, posted, dead, commit)
    }

    fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StampedEvent)>, OutboxError> {
        RedbOutbox::pending_after(self, after, limit)
    }

    fn site_repeats(&self, site: &str, limit: usize) -> Result<Vec<Repeat>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(REPEATS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let prefix = site_key(site, &[]);
        let mut out = Vec::new();
        for entry in table.range(prefix.as_slice()..).map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            if !key.value().starts_with(&prefix) || out.len() >= limit {
                break;
            }
            out.push(postcard::from_bytes(value.value()).map_err(storage)?);
        }
        Ok(out)
    }

    fn record_tallies(&self, tallies: &[TallyFrame]) -> Result<(), OutboxError> {
        let mut txn = self.db.begin_write().map_err(storage)?;
        // Made durable by the next intake or delivery commit; the agent sends it again.
        txn.set_durability(redb::Durability::None)
            .map_err(storage)?;
        {
            let mut table = txn.open_table(TALLIES).map_err(storage)?;
            for tally in tallies {
                let bytes = postcard::to_allocvec(tally).map_err(storage)?;
                table
                    .insert(tally.site.as_str(), bytes.as_slice())
                    .map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }

    fn tally(&self, site: &str) -> Result<Option<TallyFrame>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = match txn.open_table(TALLIES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(storage(e)),
        };
        match table.get(site).map_err(storage)? {
            Some(value) => postcard::from_bytes(value.value())
                .map(Some)
                .map_err(storage),
            None => Ok(None),
        }
    }

    fn committed_token(&self) -> Result<Option<CommitToken>, OutboxError> {
        RedbOutbox::committed_token(self)
    }

    fn find_pending(
        &self,
        site: &str,
        id: &str,
    ) -> Result<Option<(u64, StampedEvent)>, OutboxError> {
        RedbOutbox::find_pending(self, site, id)
    }

    fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        RedbOutbox::dead_letters(self, after, limit)
    }

    fn replay(&self, ids: Option<&[u64]>) -> Result<Vec<u64>, OutboxError> {
        RedbOutbox::replay(self, ids)
    }

    fn discard(&self, ids: &[u64]) -> Result<Vec<u64>, OutboxError> {
        RedbOutbox::discard(self, ids)
    }

    fn refusals(&self, site: &str, limit: usize) -> Result<Vec<Refusal>, OutboxError> {
        RedbOutbox::refusals(self, site, limit)
    }

    fn acknowledge_refusals(&self, site: &str, through: u64) -> Result<u64, OutboxError> {
        RedbOutbox::acknowledge_refusals(self, site, through)
    }

    fn sites(&self) -> Vec<SiteRecord> {
        RedbOutbox::sites(self)
    }

    fn held_bytes(&self) -> u64 {
        RedbOutbox::held_bytes(self)
    }

    fn max_bytes(&self) -> u64 {
        RedbOutbox::max_bytes(self)
    }

    fn depth(&self) -> u64 {
        RedbOutbox::depth(self)
    }

    fn dead_letter_count(&self) -> u64 {
        RedbOutbox::dead_letter_count(self)
    }

    fn has_refusals_for(&self, site: &str) -> bool {
        RedbOutbox::has_refusals_for(self, site)
    }

    fn sites_with_refusals(&self) -> Vec<String> {
        RedbOutbox::sites_with_refusals(self)
    }

    fn frontier_blocked(&self) -> bool {
        RedbOutbox::frontier_blocked(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_sharing_a_half_hash_are_all_kept_and_forgotten_one_by_one() {
        let mut seen = SeenIds::new();
        let (a, b) = (0xDEAD_BEEF_0000_0001_u64, 0xDEAD_BEEF_FFFF_0002_u64);
        seen.record(a, 7);
        seen.record(b, 9);
        assert_eq!(seen.candidates(a), vec![9, 7]);
        assert_eq!(seen.candidates(0x1234_5678_0000_0001), Vec::<u64>::new());
        seen.apply(HashMap::new(), vec![(a, 7)]);
        assert_eq!(seen.candidates(b), vec![9]);
        seen.apply(HashMap::new(), vec![(b, 9)]);
        assert!(seen.candidates(b).is_empty());
    }

    #[test]
    fn a_window_across_a_multiple_of_two_to_the_32_keeps_its_sequence_numbers() {
        let mut seen = SeenIds::new();
        let before = (1u64 << 32) - 3;
        let after = (1u64 << 32) + 5;
        seen.record(0xAAAA_AAAA_0000_0000, before);
        seen.record(0xBBBB_BBBB_0000_0000, after);
        assert_eq!(seen.candidates(0xAAAA_AAAA_1111_1111), vec![before]);
        assert_eq!(seen.candidates(0xBBBB_BBBB_2222_2222), vec![after]);
    }

    #[test]
    fn a_reopened_outbox_finds_the_ids_it_stored_and_drops_their_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let options = OutboxOptions {
            cache_size: 1 << 20,
            dedup_ids: 1000,
            frontier_events: 100,
            max_bytes: 1 << 30,
            keep_batches: true,
        };
        let event = |seq: u64, id: &str| {
            backhaul_events::frame::BatchEntry {
            seq,
            received_at_ms: 0,
            event: backhaul_events::event::parse_event(
                format!(
                    r#"{{"v":1,"id":"{id}","type":"pick","ts":"2026-12-05T10:00:00Z","sku":"S","qty":"1","uom":"EA","order":"O1","location":"L"}}"#
                )
                .as_bytes(),
            )
            .unwrap(),
        }
        };
        let batch = |epoch: u128, first: u64, ids: &[&str]| BatchFrame {
            site: "s1".into(),
            epoch: Epoch(epoch),
            acked_through: first - 1,
            first_seq: first,
            last_seq: first + ids.len() as u64 - 1,
            events: ids
                .iter()
                .enumerate()
                .map(|(i, id)| event(first + i as u64, id))
                .collect(),
            signature: None,
        };
        let ids: Vec<String> = (0..300).map(|i| format!("e{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        {
            let outbox = RedbOutbox::open(dir.path(), options).unwrap();
            let stored = outbox.store(&[batch(1, 1, &refs)]).unwrap();
            assert_eq!((stored[0].stored, stored[0].duplicates), (300, 0));
        }
        let outbox = RedbOutbox::open(dir.path(), options).unwrap();
        assert_eq!(
            outbox
                .find_pending("s1", "e123")
                .unwrap()
                .unwrap()
                .1
                .event
                .id,
            "e123"
        );
        assert!(outbox.find_pending("s1", "e300").unwrap().is_none());
        assert!(outbox.find_pending("s2", "e1").unwrap().is_none());
        // A new epoch repeats every id and adds one.
        let mut again = refs.clone();
        again.push("e300");
        let stored = outbox.store(&[batch(2, 1, &again)]).unwrap();
        assert_eq!((stored[0].stored, stored[0].duplicates), (1, 300));
    }

    #[test]
    fn readers_never_wait_for_a_writer_in_its_commit() {
        let dir = tempfile::tempdir().unwrap();
        let options = OutboxOptions {
            cache_size: 1 << 20,
            dedup_ids: 100,
            frontier_events: 100,
            max_bytes: 1 << 20,
            keep_batches: true,
        };
        let outbox = RedbOutbox::open(dir.path(), options).unwrap();
        // A writer holds its lock for as long as a slow disk takes to flush.
        let writing = outbox.lock_state().unwrap();
        let (done, answered) = std::sync::mpsc::channel();
        let reader = outbox.clone();
        std::thread::spawn(move || {
            let _ = done.send((reader.sites().len(), reader.held_bytes()));
        });
        let answer = answered.recv_timeout(std::time::Duration::from_secs(10));
        drop(writing);
        assert_eq!(
            answer,
            Ok((0, 0)),
            "sites() and held_bytes() waited for the writer"
        );
    }

    #[test]
    fn a_stamped_reference_encodes_like_the_stamped_event() {
        let event = backhaul_events::event::parse_event(
            br#"{"v":1,"id":"e1","type":"count","ts":"2026-11-22T10:15:00Z","sku":"S","qty":1,"location":"L"}"#,
        )
        .unwrap();
        let stamped = StampedEvent {
            site: "wh".into(),
            epoch: Epoch(7),
            seq: 42,
            received_at_ms: 1_700_000_000_000,
            event,
        };
        let by_ref = postcard::to_stdvec(&StampedRef::of(&stamped)).unwrap();
        assert_eq!(by_ref, postcard::to_stdvec(&stamped).unwrap());
        assert_eq!(decode_record(1, &by_ref).unwrap(), stamped);
    }
}
