//! The relay's outbox: batches from every site made durable in one redb database before they
//! are acknowledged, stored once however often they arrive, and kept until delivered.
//!
//! What it owns: per-site and per-epoch progress (the highest sequence number stored without a
//! gap, which is what an acknowledgement promises), deduplication by event id within a site,
//! the queue per ordering key, and the delivery position of the ledger.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use backhaul_events::{BatchFrame, EventOutcome, Outcome, StampedEvent};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};

/// Events waiting for delivery, by outbox sequence number (arrival order).
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
/// The queue of each ordering key: key bytes followed by the outbox sequence number.
const BY_KEY: TableDefinition<&[u8], ()> = TableDefinition::new("by_ordering_key");
/// Event ids seen per site: site, 0, id → outbox sequence number.
const SEEN_IDS: TableDefinition<&[u8], u64> = TableDefinition::new("seen_ids");
/// The same ids by the outbox sequence number that recorded them, oldest first, so the
/// deduplication window can be kept to a bounded number of ids.
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

const META_NEXT_OUTBOX_SEQ: &str = "next_outbox_seq";
const META_LEDGER_COMMITTED_LEN: &str = "ledger_committed_len";

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
}

fn storage<E: std::fmt::Display>(e: E) -> OutboxError {
    OutboxError::Storage(e.to_string())
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
}

impl SiteRecord {
    pub fn outbox_depth(&self) -> u64 {
        self.events_stored
            .saturating_sub(self.events_delivered)
            .saturating_sub(self.events_dead_lettered)
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
    /// The batch started past a gap and was not stored; the agent will re-send in order.
    pub gap: bool,
    pub outcomes: Vec<EventOutcome>,
}

pub struct Outbox {
    db: Database,
    /// How many event ids are remembered for deduplication (outbox.dedup_ids).
    dedup_ids: u64,
    path: PathBuf,
    sites: Mutex<BTreeMap<String, SiteRecord>>,
}

fn site_key(site: &str, tail: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(site.len() + 1 + tail.len());
    key.extend_from_slice(site.as_bytes());
    key.push(0);
    key.extend_from_slice(tail);
    key
}

/// The queue an event waits in: its site and ordering key. Prefix-free, so the entries of one
/// queue are exactly the keys that start with it followed by 8 bytes of outbox sequence.
pub fn queue_of(event: &StampedEvent) -> Vec<u8> {
    site_key(&event.site, &event.ordering_key().to_bytes())
}

fn queue_key(event: &StampedEvent, outbox_seq: u64) -> Vec<u8> {
    let mut key = queue_of(event);
    key.extend_from_slice(&outbox_seq.to_be_bytes());
    key
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

/// Puts events into the outbox: the event, its place in its key's queue, and its id in the
/// deduplication window. Intake and replay both go through here, so a replayed event is
/// queued exactly like a new one.
struct Enqueue<'txn> {
    outbox: redb::Table<'txn, u64, &'static [u8]>,
    by_key: redb::Table<'txn, &'static [u8], ()>,
    seen: redb::Table<'txn, &'static [u8], u64>,
    seen_order: redb::Table<'txn, u64, &'static [u8]>,
    meta: redb::Table<'txn, &'static str, u64>,
    next: u64,
}

impl<'txn> Enqueue<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Enqueue<'txn>, OutboxError> {
        let meta = txn.open_table(META).map_err(storage)?;
        let next = meta
            .get(META_NEXT_OUTBOX_SEQ)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(1);
        Ok(Enqueue {
            outbox: txn.open_table(OUTBOX).map_err(storage)?,
            by_key: txn.open_table(BY_KEY).map_err(storage)?,
            seen: txn.open_table(SEEN_IDS).map_err(storage)?,
            seen_order: txn.open_table(SEEN_ORDER).map_err(storage)?,
            meta,
            next,
        })
    }

    fn push(&mut self, event: &StampedEvent) -> Result<(), OutboxError> {
        let seq = self.next;
        let bytes = postcard::to_stdvec(event).map_err(storage)?;
        self.outbox.insert(seq, bytes.as_slice()).map_err(storage)?;
        self.by_key
            .insert(queue_key(event, seq).as_slice(), ())
            .map_err(storage)?;
        let id_key = site_key(&event.site, event.event.id.as_bytes());
        self.seen.insert(id_key.as_slice(), seq).map_err(storage)?;
        self.seen_order
            .insert(seq, id_key.as_slice())
            .map_err(storage)?;
        self.next += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<(), OutboxError> {
        self.meta
            .insert(META_NEXT_OUTBOX_SEQ, self.next)
            .map_err(storage)
            .map(|_| ())
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

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Outbox {
    pub fn open(dir: &Path, cache_size: usize, dedup_ids: u64) -> Result<Arc<Outbox>, OutboxError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            OutboxError::Storage(format!(
                "cannot create the state directory {}: {e}",
                dir.display()
            ))
        })?;
        let path = dir.join("outbox.redb");
        let mut builder = Database::builder();
        builder.set_cache_size(cache_size);
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
        let txn = db.begin_write().map_err(storage)?;
        let mut sites = BTreeMap::new();
        {
            {
                let table = OUTBOX;
                txn.open_table(table).map_err(storage)?;
            }
            txn.open_table(BY_KEY).map_err(storage)?;
            txn.open_table(SEEN_IDS).map_err(storage)?;
            txn.open_table(SEEN_ORDER).map_err(storage)?;
            txn.open_table(EPOCHS).map_err(storage)?;
            txn.open_table(META).map_err(storage)?;
            txn.open_table(DLQ).map_err(storage)?;
            let table = txn.open_table(SITES).map_err(storage)?;
            for entry in table.iter().map_err(storage)? {
                let (key, value) = entry.map_err(storage)?;
                if let Ok(record) = serde_json::from_slice::<SiteRecord>(value.value()) {
                    sites.insert(key.value().to_string(), record);
                }
            }
        }
        txn.commit().map_err(storage)?;
        Ok(Arc::new(Outbox {
            dedup_ids,
            db,
            path,
            sites: Mutex::new(sites),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn sites(&self) -> Vec<SiteRecord> {
        self.sites
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default()
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
        // The site table is read, changed and written back by every writer: hold it for the
        // whole transaction so no writer works from a copy another one is about to replace.
        let mut current = self
            .sites
            .lock()
            .map_err(|_| OutboxError::Storage("the site table lock is poisoned".into()))?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_quick_repair(true);
        let mut sites = current.clone();
        let mut results = Vec::with_capacity(batches.len());
        for batch in batches {
            results.push(self.store_one(&txn, batch, &mut sites)?);
        }
        self.forget_old_ids(&txn)?;
        let touched: Vec<&SiteRecord> = results.iter().filter_map(|r| sites.get(&r.site)).collect();
        write_sites(&txn, touched)?;
        txn.commit().map_err(storage)?;
        *current = sites;
        Ok(results)
    }

    fn store_one(
        &self,
        txn: &WriteTransaction,
        batch: &BatchFrame,
        sites: &mut BTreeMap<String, SiteRecord>,
    ) -> Result<Stored, OutboxError> {
        let mut epochs = txn.open_table(EPOCHS).map_err(storage)?;
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
        record.last_seen_ms = now_ms();
        record.epoch = batch.epoch.to_string();
        let mut result = Stored {
            site: batch.site.clone(),
            epoch: batch.epoch,
            acked_through: known.unwrap_or(0),
            stored: 0,
            duplicates: 0,
            gap: false,
            outcomes: Vec::new(),
        };
        // An epoch seen before must continue without a gap: an acknowledgement promises
        // everything up to its number. A new epoch starts wherever its first batch starts,
        // because what came before was acknowledged by an earlier outbox or never existed.
        if let Some(highest) = known
            && batch.first_seq > highest + 1
        {
            result.gap = true;
            record.highest_seq = highest;
            return Ok(result);
        }
        let highest = known.unwrap_or(0);
        let mut queue = Enqueue::open(txn)?;
        for stamped in batch.stamped() {
            if known.is_some() && stamped.seq <= highest {
                result.duplicates += 1;
                continue;
            }
            let id_key = site_key(&stamped.site, stamped.event.id.as_bytes());
            if queue
                .seen
                .get(id_key.as_slice())
                .map_err(storage)?
                .is_some()
            {
                result.duplicates += 1;
                result.outcomes.push(EventOutcome {
                    seq: stamped.seq,
                    id: stamped.event.id.clone(),
                    outcome: Outcome::Duplicate,
                });
                continue;
            }
            queue.push(&stamped)?;
            result.stored += 1;
        }
        queue.finish()?;
        let through = highest.max(batch.last_seq);
        epochs
            .insert(epoch_key.as_slice(), through)
            .map_err(storage)?;
        result.acked_through = through;
        record.highest_seq = through;
        record.events_stored += result.stored;
        record.events_duplicate += result.duplicates;
        Ok(result)
    }

    /// The oldest undelivered events, in arrival order, with their outbox sequence numbers.
    pub fn pending(&self, limit: usize) -> Result<Vec<(u64, StampedEvent)>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let table = txn.open_table(OUTBOX).map_err(storage)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage)?.take(limit) {
            let (key, value) = entry.map_err(storage)?;
            let event: StampedEvent = postcard::from_bytes(value.value()).map_err(|e| {
                OutboxError::Storage(format!(
                    "outbox record {} cannot be decoded: {e}",
                    key.value()
                ))
            })?;
            out.push((key.value(), event));
        }
        Ok(out)
    }

    pub fn ledger_committed_len(&self) -> Result<u64, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        Ok(meta
            .get(META_LEDGER_COMMITTED_LEN)
            .map_err(storage)?
            .map(|v| v.value())
            .unwrap_or(0))
    }

    /// The outbox entry of an event, if it is still waiting.
    pub fn find_pending(
        &self,
        site: &str,
        id: &str,
    ) -> Result<Option<(u64, StampedEvent)>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let seen = txn.open_table(SEEN_IDS).map_err(storage)?;
        let Some(outbox_seq) = seen
            .get(site_key(site, id.as_bytes()).as_slice())
            .map_err(storage)?
            .map(|v| v.value())
        else {
            return Ok(None);
        };
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        match outbox.get(outbox_seq).map_err(storage)? {
            Some(value) => {
                let event = postcard::from_bytes(value.value()).map_err(storage)?;
                Ok(Some((outbox_seq, event)))
            }
            None => Ok(None),
        }
    }
}

impl Outbox {
    /// The first waiting event of up to `limit` queues, skipping the queues `skip` says no to
    /// (in flight, or waiting to retry). Seeks from queue to queue, so the cost grows with the
    /// number of queues visited, not with the number of events waiting.
    pub fn heads(
        &self,
        limit: usize,
        skip: impl Fn(&[u8]) -> bool,
    ) -> Result<Vec<Head>, OutboxError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let by_key = txn.open_table(BY_KEY).map_err(storage)?;
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        let mut heads = Vec::new();
        let mut start: Option<Vec<u8>> = None;
        while heads.len() < limit {
            let next = match &start {
                None => by_key
                    .first()
                    .map_err(storage)?
                    .map(|(k, _)| k.value().to_vec()),
                Some(after) => by_key
                    .range::<&[u8]>((
                        std::ops::Bound::Excluded(after.as_slice()),
                        std::ops::Bound::Unbounded,
                    ))
                    .map_err(storage)?
                    .next()
                    .transpose()
                    .map_err(storage)?
                    .map(|(k, _)| k.value().to_vec()),
            };
            let Some(entry) = next else { break };
            if entry.len() < 8 {
                return Err(OutboxError::Storage(
                    "a queue entry is shorter than its sequence number".into(),
                ));
            }
            let (queue, seq_bytes) = entry.split_at(entry.len() - 8);
            let mut last_of_queue = queue.to_vec();
            last_of_queue.extend_from_slice(&[0xff; 8]);
            start = Some(last_of_queue);
            if skip(queue) {
                continue;
            }
            let mut seq = [0u8; 8];
            seq.copy_from_slice(seq_bytes);
            let outbox_seq = u64::from_be_bytes(seq);
            let Some(value) = outbox.get(outbox_seq).map_err(storage)? else {
                continue;
            };
            let event: StampedEvent = postcard::from_bytes(value.value()).map_err(storage)?;
            heads.push(Head {
                queue: queue.to_vec(),
                outbox_seq,
                event,
            });
        }
        Ok(heads)
    }

    /// Records the end of deliveries in one durable transaction: posted events leave the
    /// outbox, refused ones move to the dead-letter queue. `ledger_len` is how long the ledger
    /// file is once these lines are in it (ledger connector only).
    pub fn complete(
        &self,
        posted: &[(u64, StampedEvent)],
        dead: &[(u64, StampedEvent, String, u32)],
        ledger_len: Option<u64>,
    ) -> Result<(), OutboxError> {
        // The site table is read, changed and written back by every writer: hold it for the
        // whole transaction so no writer works from a copy another one is about to replace.
        let mut current = self
            .sites
            .lock()
            .map_err(|_| OutboxError::Storage("the site table lock is poisoned".into()))?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_quick_repair(true);
        let mut sites = current.clone();
        {
            let mut outbox = txn.open_table(OUTBOX).map_err(storage)?;
            let mut by_key = txn.open_table(BY_KEY).map_err(storage)?;
            let mut dlq = txn.open_table(DLQ).map_err(storage)?;
            for (outbox_seq, event) in posted {
                if outbox.remove(*outbox_seq).map_err(storage)?.is_some() {
                    by_key
                        .remove(queue_key(event, *outbox_seq).as_slice())
                        .map_err(storage)?;
                    if let Some(record) = sites.get_mut(&event.site) {
                        record.events_delivered += 1;
                    }
                }
            }
            for (outbox_seq, event, reason, attempts) in dead {
                if outbox.remove(*outbox_seq).map_err(storage)?.is_some() {
                    by_key
                        .remove(queue_key(event, *outbox_seq).as_slice())
                        .map_err(storage)?;
                    let letter = DeadLetter {
                        id: *outbox_seq,
                        reason: reason.clone(),
                        at_ms: now_ms(),
                        attempts: *attempts,
                        event: event.clone(),
                    };
                    let json = serde_json::to_vec(&letter).map_err(storage)?;
                    dlq.insert(*outbox_seq, json.as_slice()).map_err(storage)?;
                    if let Some(record) = sites.get_mut(&event.site) {
                        record.events_dead_lettered += 1;
                    }
                }
            }
            if let Some(len) = ledger_len {
                let mut meta = txn.open_table(META).map_err(storage)?;
                meta.insert(META_LEDGER_COMMITTED_LEN, len)
                    .map_err(storage)?;
            }
            write_sites(&txn, sites.values())?;
        }
        txn.commit().map_err(storage)?;
        *current = sites;
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
        // The site table is read, changed and written back by every writer: hold it for the
        // whole transaction so no writer works from a copy another one is about to replace.
        let mut current = self
            .sites
            .lock()
            .map_err(|_| OutboxError::Storage("the site table lock is poisoned".into()))?;
        let mut txn = self.db.begin_write().map_err(storage)?;
        txn.set_quick_repair(true);
        let mut sites = current.clone();
        let mut taken = Vec::new();
        {
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
            let mut queue = Enqueue::open(&txn)?;
            for id in wanted {
                let letter: DeadLetter = match dlq.remove(id).map_err(storage)? {
                    Some(value) => serde_json::from_slice(value.value()).map_err(storage)?,
                    None => continue,
                };
                if let Some(record) = sites.get_mut(&letter.event.site) {
                    record.events_dead_lettered = record.events_dead_lettered.saturating_sub(1);
                }
                if requeue {
                    queue.push(&letter.event)?;
                }
                taken.push(id);
            }
            queue.finish()?;
            write_sites(&txn, sites.values())?;
        }
        txn.commit().map_err(storage)?;
        *current = sites;
        Ok(taken)
    }
}

impl Outbox {
    /// Keeps the deduplication window to `dedup_ids` ids: the oldest are forgotten. A batch
    /// re-sent later is still recognised by its sequence numbers; only an event re-sent under
    /// a new sequence number after that many newer ones would be stored again, and connectors
    /// write idempotently by event id.
    fn forget_old_ids(&self, txn: &WriteTransaction) -> Result<(), OutboxError> {
        let mut order = txn.open_table(SEEN_ORDER).map_err(storage)?;
        let mut seen = txn.open_table(SEEN_IDS).map_err(storage)?;
        let excess = order.len().map_err(storage)?.saturating_sub(self.dedup_ids);
        for _ in 0..excess.min(PRUNE_PER_COMMIT as u64) {
            let Some((seq, key)) = order
                .pop_first()
                .map_err(storage)?
                .map(|(s, k)| (s.value(), k.value().to_vec()))
            else {
                break;
            };
            // A replayed event was recorded again under a newer number: keep that one.
            let current = seen
                .get(key.as_slice())
                .map_err(storage)?
                .map(|v| v.value());
            if current == Some(seq) {
                seen.remove(key.as_slice()).map_err(storage)?;
            }
        }
        Ok(())
    }
}
