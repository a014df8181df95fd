//! The agent's durable event log: one redb database in the state directory, written by a
//! single group-commit thread so that events arriving together share one fdatasync.
//!
//! What it owns: sequence numbers within the log's epoch, deduplication by event id while an
//! event is in the log, the disk quota, deletion of what the relay acknowledged, giving freed
//! space back to the file system, the bounded reject store, and the daily tally of what was
//! accepted, kept `log.tally_days` after the events themselves are gone.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use backhaul_events::admin::ErpRefusal;
use backhaul_events::service::Heartbeat;
use backhaul_events::{DayTally, Epoch, Event, EventType, Refusal, Violation};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
pub(crate) const EVENTS_TABLE: TableDefinition<u64, &[u8]> = EVENTS;
const IDS: TableDefinition<&str, u64> = TableDefinition::new("event_ids");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const REJECTS: TableDefinition<u64, &[u8]> = TableDefinition::new("rejects");
/// Events the ERP refused, as the relay reported them: the relay's time and number (big
/// endian, so a re-sent refusal lands on itself and the oldest come first) → JSON
/// [`ErpRefusal`], as the admin API shows it. Kept, like rejects, up to `max_rejects`.
const ERP_REFUSALS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("erp_refusals");
/// Days since 1970-01-01 (UTC) → [`DayTally`] (postcard): what the log accepted that day.
const TALLY: TableDefinition<i32, &[u8]> = TableDefinition::new("tally");
const MS_PER_DAY: i64 = 86_400_000;

const META_EPOCH: &str = "epoch";
const META_NEXT_SEQ: &str = "next_seq";
const META_LIVE_BYTES: &str = "live_bytes";
const META_NEXT_REJECT: &str = "next_reject";
/// The highest sequence number the relay acknowledged: salvage must not bring back what is
/// below it, though copies of it may linger on freed pages.
pub(crate) const META_ACKED_THROUGH: &str = "acked_through";

/// Bytes counted for an event beyond its encoded record: its keys in both tables.
const PER_EVENT_OVERHEAD: u64 = 8 + 8 + 16;
/// The longest raw payload kept with a reject.
const MAX_REJECT_PAYLOAD: usize = 16 * 1024;
/// Rejects waiting for the writer, in bytes, at most. Past this a reject is answered and
/// counted but not kept: clients that send nothing but bad events (faster than the disk keeps
/// them) must neither grow the agent's memory nor delay the flushes good events wait for.
const MAX_QUEUED_REJECT_BYTES: u64 = 1 << 20;
/// Rejects written by one commit, in bytes, at most; the rest wait for the next commits. Good
/// events never wait behind more than this much of a flood of bad ones.
const REJECT_BYTES_PER_COMMIT: u64 = 64 * 1024;

#[derive(Debug, Clone)]
pub struct LogOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub cache_size: usize,
    pub group_commit_delay: Duration,
    pub group_commit_max_events: usize,
    pub max_rejects: u64,
    /// Days the daily tally is kept (the current day included).
    pub tally_days: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(
        "the event log {path} cannot be opened: {reason}. Nothing in it was deleted. \
         `backhaul-agent salvage --config FILE` (with the service stopped) copies every event \
         it can still read into a new log and keeps the damaged file under quarantine/"
    )]
    Damaged { path: PathBuf, reason: String },
    #[error("the event log {path} is in use by another process")]
    InUse { path: PathBuf },
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("event log storage error: {0}")]
    Storage(String),
    #[error("the event log has stopped")]
    Closed,
}

fn storage<E: std::fmt::Display>(e: E) -> LogError {
    LogError::Storage(e.to_string())
}

/// An event as kept in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedEvent {
    pub received_at_ms: i64,
    pub event: Event,
}

/// What became of one event offered to the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Durable under this sequence number.
    Stored { seq: u64 },
    /// An event with this id is already in the log, under this sequence number.
    Duplicate { seq: u64 },
    /// The disk quota is full; the producer must keep the event and retry.
    QuotaExceeded,
}

/// An event refused at the edge, kept for inspection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectRecord {
    pub at_ms: i64,
    pub transport: String,
    /// The MQTT client id and topic, or the HTTP peer address.
    pub sender: String,
    /// The payload as received (lossy UTF-8), cut at 16 KiB.
    pub payload: String,
    pub payload_truncated: bool,
    pub violations: Vec<Violation>,
}

impl RejectRecord {
    /// Roughly what the record takes in memory and on disk.
    fn weight(&self) -> u64 {
        let violations: usize = self
            .violations
            .iter()
            .map(|v| v.field.len() + v.rule.len() + 16)
            .sum();
        (self.payload.len() + self.sender.len() + self.transport.len() + violations + 64) as u64
    }

    pub fn new(
        transport: &str,
        sender: String,
        payload: &[u8],
        violations: Vec<Violation>,
    ) -> Self {
        let cut = payload.len().min(MAX_REJECT_PAYLOAD);
        RejectRecord {
            at_ms: now_ms(),
            transport: transport.to_string(),
            sender,
            payload: String::from_utf8_lossy(&payload[..cut]).into_owned(),
            payload_truncated: cut < payload.len(),
            violations,
        }
    }
}

/// Which stored rejects to read.
#[derive(Debug, Clone, Copy)]
pub enum RejectsPage {
    /// Those with a smaller id, newest first.
    Before(u64),
    /// Those with a larger id, oldest first.
    After(u64),
}

/// A snapshot of the log's state for status, metrics and the quota check.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LogStats {
    pub epoch: String,
    pub next_seq: u64,
    pub backlog_events: u64,
    pub backlog_bytes: u64,
    pub oldest_seq: Option<u64>,
    pub oldest_received_at_ms: Option<i64>,
    pub max_bytes: u64,
    pub quota_exceeded: bool,
    pub rejects_stored: u64,
    /// Bytes of the stored rejects, which count in the disk quota.
    pub rejects_bytes: u64,
    /// Rejects answered but not kept: acknowledged events filled the quota, or rejects came
    /// faster than the disk kept them.
    pub rejects_not_kept: u64,
    pub erp_refusals_stored: u64,
    pub file_bytes: u64,
    pub flushes: u64,
    pub compactions: u64,
}

enum Request {
    Append {
        events: Vec<(Event, i64)>,
        enqueued: Instant,
        reply: oneshot::Sender<Result<Vec<Appended>, LogError>>,
    },
    Reject {
        record: Box<RejectRecord>,
        enqueued: Instant,
        reply: oneshot::Sender<Result<(), LogError>>,
        _queued: QueuedReject,
    },
    AckThrough {
        seq: u64,
        reply: oneshot::Sender<Result<u64, LogError>>,
    },
}

/// A reject's bytes among those waiting for the writer, given back when its request is done
/// with, however that ends.
struct QueuedReject {
    bytes: u64,
    queued: Arc<AtomicU64>,
}

impl QueuedReject {
    /// A place for `bytes` more, if the queue has room.
    fn take(queued: &Arc<AtomicU64>, bytes: u64) -> Option<QueuedReject> {
        queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now + bytes <= MAX_QUEUED_REJECT_BYTES).then_some(now + bytes)
            })
            .ok()?;
        Some(QueuedReject {
            bytes,
            queued: queued.clone(),
        })
    }
}

impl Drop for QueuedReject {
    fn drop(&mut self) {
        self.queued.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Told the duration of each durable flush and how many requests it served.
type FlushObserver = Box<dyn Fn(Duration, usize) + Send>;

struct Shared {
    db: RwLock<Database>,
    epoch: Epoch,
    path: PathBuf,
    stats: Mutex<LogStats>,
    flush_observer: Mutex<Option<FlushObserver>>,
    /// The next sequence number after each flush, for readers waiting for new events.
    appended: tokio::sync::watch::Sender<u64>,
    /// The latest durable events, for `backhaul-agent tail`; forwarding may already have
    /// deleted them from the log.
    recent: Mutex<VecDeque<(u64, LoggedEvent)>>,
    /// Beaten by the writer each time round its loop.
    heartbeat: Mutex<Option<Heartbeat>>,
    /// Set once the writer thread has ended, however it ended.
    writer_ended: tokio::sync::watch::Sender<bool>,
    max_rejects: u64,
    /// Bytes of the rejects waiting for the writer.
    queued_reject_bytes: Arc<AtomicU64>,
    /// Rejects not kept because the queue to the writer was full.
    rejects_shed: AtomicU64,
}

/// Tells waiters the writer ended when the writer thread drops it: on return or in a panic.
/// It holds the sender, not the log, so that by then the writer's hold on the database is gone.
struct WriterEnded(tokio::sync::watch::Sender<bool>);

impl Drop for WriterEnded {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// How often the writer considers compacting, busy or idle.
const COMPACTION_CHECK_EVERY: Duration = Duration::from_secs(2);
/// The writer compacts the file only when at most this much of it is live.
const COMPACT_AT_MOST_LIVE_BYTES: u64 = 4 << 20;

/// How many of the latest events `tail` can see.
const RECENT_EVENTS: usize = 1000;

/// A handle to the log; cheap to clone. The writer thread stops when every handle is gone.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
    requests: mpsc::Sender<Request>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl EventLog {
    /// Opens the log in `options.dir`, creating it (and a new epoch) when there is none.
    /// A damaged file fails the open; it is never truncated or replaced.
    pub fn open(options: LogOptions) -> Result<EventLog, LogError> {
        std::fs::create_dir_all(&options.dir).map_err(|source| LogError::StateDir {
            path: options.dir.clone(),
            source,
        })?;
        let path = options.dir.join("events.redb");
        let existed = path.exists();
        let mut builder = Database::builder();
        builder.set_cache_size(options.cache_size);
        // A plain open trusts the file; a damaged page could then panic on read. Verifying
        // every page at open turns damage into a clear error instead.
        builder.set_check_integrity_on_open(true);
        let db = match if existed {
            builder.open(&path)
        } else {
            builder.create(&path)
        } {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(LogError::InUse { path });
            }
            Err(e) => {
                return Err(LogError::Damaged {
                    path,
                    reason: e.to_string(),
                });
            }
        };
        let (epoch, stats) = initialise(&db, &path, &options)?;
        let next_seq = stats.next_seq;
        let shared = Arc::new(Shared {
            appended: tokio::sync::watch::Sender::new(next_seq),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_EVENTS)),
            db: RwLock::new(db),
            epoch,
            path: path.clone(),
            stats: Mutex::new(stats),
            flush_observer: Mutex::new(None),
            heartbeat: Mutex::new(None),
            writer_ended: tokio::sync::watch::Sender::new(false),
            max_rejects: options.max_rejects,
            queued_reject_bytes: Arc::new(AtomicU64::new(0)),
            rejects_shed: AtomicU64::new(0),
        });
        let (requests, receiver) = mpsc::channel();
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || {
                let _ended = WriterEnded(writer_shared.writer_ended.clone());
                Writer::new(writer_shared, options).run(receiver)
            })
            .map_err(|e| LogError::Storage(format!("cannot start the log writer: {e}")))?;
        let log = EventLog { shared, requests };
        log.compact_now()?;
        Ok(log)
    }

    pub fn epoch(&self) -> Epoch {
        self.shared.epoch
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Called after every durable flush with its duration and the number of requests it served.
    pub fn set_flush_observer(&self, observer: impl Fn(Duration, usize) + Send + 'static) {
        if let Ok(mut slot) = self.shared.flush_observer.lock() {
            *slot = Some(Box::new(observer));
        }
    }

    /// Has the writer beat `heartbeat` each time round its loop (at least every two seconds).
    pub fn set_heartbeat(&self, heartbeat: Heartbeat) {
        if let Ok(mut slot) = self.shared.heartbeat.lock() {
            *slot = Some(heartbeat);
        }
    }

    /// Resolves when the writer thread has ended (it panicked, or every handle was dropped):
    /// from then on nothing can be made durable.
    pub async fn writer_ended(&self) {
        let mut ended = self.shared.writer_ended.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// Closes the log: the writer finishes what was queued, and the file is let go once this
    /// resolves (unless another handle to the log is alive).
    pub async fn close(self) {
        let EventLog { shared, requests } = self;
        drop(requests);
        let mut ended = shared.writer_ended.subscribe();
        let _ = ended.wait_for(|ended| *ended).await;
    }

    /// Durable events with a sequence number above `after`, from the latest thousand.
    pub fn recent(&self, after: u64, limit: usize) -> Vec<(u64, LoggedEvent)> {
        self.shared
            .recent
            .lock()
            .map(|r| {
                r.iter()
                    .filter(|(seq, _)| *seq > after)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Changes to the next sequence number whenever a flush adds events.
    pub fn watch_appends(&self) -> tokio::sync::watch::Receiver<u64> {
        self.shared.appended.subscribe()
    }

    pub fn stats(&self) -> LogStats {
        let mut stats = self
            .shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default();
        stats.rejects_not_kept += self.shared.rejects_shed.load(Ordering::Relaxed);
        stats
    }

    /// Appends events; the returned future resolves only after they are flushed to disk.
    /// The request is queued at once, before the future is first polled, so a caller can keep
    /// many appends in flight and still see their results in order.
    pub fn append(
        &self,
        events: Vec<Event>,
    ) -> impl Future<Output = Result<Vec<Appended>, LogError>> + Send + 'static {
        let received_at = now_ms();
        self.append_received(events.into_iter().map(|e| (e, received_at)).collect())
    }

    /// Appends events that were received earlier, at the time each carries (salvage keeps
    /// the original times, so the backlog's age stays honest).
    pub fn append_received(
        &self,
        events: Vec<(Event, i64)>,
    ) -> impl Future<Output = Result<Vec<Appended>, LogError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = self.requests.send(Request::Append {
            events,
            enqueued: Instant::now(),
            reply,
        });
        async move {
            sent.map_err(|_| LogError::Closed)?;
            answer.await.map_err(|_| LogError::Closed)?
        }
    }

    /// Keeps a rejected event for inspection; the future resolves once it is stored. Queued at
    /// once, like [`EventLog::append`].
    pub fn record_reject(
        &self,
        record: RejectRecord,
    ) -> impl Future<Output = Result<(), LogError>> + Send + 'static {
        let (reply, answer) = oneshot::channel();
        let sent = match QueuedReject::take(&self.shared.queued_reject_bytes, record.weight()) {
            Some(queued) => Some(self.requests.send(Request::Reject {
                record: Box::new(record),
                enqueued: Instant::now(),
                reply,
                _queued: queued,
            })),
            None => {
                self.shared.rejects_shed.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        async move {
            match sent {
                Some(sent) => {
                    sent.map_err(|_| LogError::Closed)?;
                    answer.await.map_err(|_| LogError::Closed)?
                }
                None => Ok(()),
            }
        }
    }

    /// Deletes every event up to and including `seq`; returns how many were deleted.
    pub async fn ack_through(&self, seq: u64) -> Result<u64, LogError> {
        self.request_ack_through(seq)?.await
    }

    /// Queues the deletion at once, behind every earlier request, and returns what resolves
    /// to the number of events deleted once it is committed. The forwarder does not wait for
    /// it: an acknowledgement is already durable at the relay, and events a crash leaves
    /// behind are re-sent and dropped there as repeats.
    pub fn request_ack_through(
        &self,
        seq: u64,
    ) -> Result<impl Future<Output = Result<u64, LogError>> + use<>, LogError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::AckThrough { seq, reply })
            .map_err(|_| LogError::Closed)?;
        Ok(async move { answer.await.map_err(|_| LogError::Closed)? })
    }

    /// Reads events in sequence order from `from_seq`, at most `max_events` of them and
    /// stopping once `max_bytes` of records have been read (at least one is always returned).
    pub fn read_from(
        &self,
        from_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, LoggedEvent)>, LogError> {
        let db = self.shared.db.read().map_err(|_| LogError::Closed)?;
        let txn = db.begin_read().map_err(storage)?;
        let table = match txn.open_table(EVENTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for entry in table.range(from_seq..).map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            let raw = value.value();
            let record: LoggedEvent = postcard::from_bytes(raw).map_err(|e| {
                LogError::Storage(format!("record {} cannot be decoded: {e}", key.value()))
            })?;
            bytes += raw.len();
            out.push((key.value(), record));
            if out.len() >= max_events || bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// The most recent rejects, newest first.
    pub fn recent_rejects(&self, limit: usize) -> Result<Vec<RejectRecord>, LogError> {
        Ok(self
            .rejects_page(RejectsPage::Before(u64::MAX), limit)?
            .into_iter()
            .map(|(_, record)| record)
            .collect())
    }

    /// A page of stored rejects with their ids: newest first below an id, or oldest first
    /// above one (to follow new ones).
    pub fn rejects_page(
        &self,
        page: RejectsPage,
        limit: usize,
    ) -> Result<Vec<(u64, RejectRecord)>, LogError> {
        let db = self.shared.db.read().map_err(|_| LogError::Closed)?;
        let txn = db.begin_read().map_err(storage)?;
        let table = match txn.open_table(REJECTS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let entries: Box<dyn Iterator<Item = _>> = match page {
            RejectsPage::Before(id) => Box::new(table.range(..id).map_err(storage)?.rev()),
            RejectsPage::After(id) => {
                Box::new(table.range(id.saturating_add(1)..).map_err(storage)?)
            }
        };
        let mut out = Vec::new();
        for entry in entries.take(limit) {
            let (key, value) = entry.map_err(storage)?;
            if let Ok(record) = serde_json::from_slice(value.value()) {
                out.push((key.value(), record));
            }
        }
        Ok(out)
    }

    /// Stores refusals the relay reported, durably, before the relay is told it may forget
    /// them; a refusal already stored is stored once. The oldest beyond `max_rejects` go.
    pub fn store_erp_refusals(&self, refusals: &[Refusal]) -> Result<(), LogError> {
        let db = self.shared.db.read().map_err(|_| LogError::Closed)?;
        let txn = db.begin_write().map_err(storage)?;
        let stored = {
            let mut table = txn.open_table(ERP_REFUSALS).map_err(storage)?;
            for refusal in refusals {
                let mut key = [0u8; 16];
                key[..8].copy_from_slice(&refusal.at_ms.to_be_bytes());
                key[8..].copy_from_slice(&refusal.number.to_be_bytes());
                let record = ErpRefusal {
                    id: refusal.id.clone(),
                    seq: refusal.seq,
                    reason: refusal.reason.clone(),
                    refused_at_ms: refusal.at_ms,
                    reported_at_ms: now_ms(),
                };
                if table.get(key.as_slice()).map_err(storage)?.is_some() {
                    continue;
                }
                let json = serde_json::to_vec(&record).map_err(storage)?;
                table
                    .insert(key.as_slice(), json.as_slice())
                    .map_err(storage)?;
            }
            while table.len().map_err(storage)? > self.shared.max_rejects {
                table.pop_first().map_err(storage)?;
            }
            table.len().map_err(storage)?
        };
        txn.commit().map_err(storage)?;
        if let Ok(mut stats) = self.shared.stats.lock() {
            stats.erp_refusals_stored = stored;
        }
        Ok(())
    }

    /// The daily tally of what the log accepted, oldest day first.
    pub fn tally(&self) -> Result<Vec<DayTally>, LogError> {
        let db = self.shared.db.read().map_err(|_| LogError::Closed)?;
        let txn = db.begin_read().map_err(storage)?;
        let table = match txn.open_table(TALLY) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let mut days = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (_, value) = entry.map_err(storage)?;
            match postcard::from_bytes::<DayTally>(value.value()) {
                Ok(day) => days.push(day),
                Err(e) => tracing::warn!(error = %e, "a day of the tally cannot be read; left out"),
            }
        }
        Ok(days)
    }

    /// The newest `limit` refusals, newest first.
    pub fn erp_refusals(&self, limit: usize) -> Result<Vec<ErpRefusal>, LogError> {
        let db = self.shared.db.read().map_err(|_| LogError::Closed)?;
        let txn = db.begin_read().map_err(storage)?;
        let table = txn.open_table(ERP_REFUSALS).map_err(storage)?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(storage)?.rev().take(limit) {
            let (_, value) = entry.map_err(storage)?;
            if let Ok(record) = serde_json::from_slice(value.value()) {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Gives the file's free pages back to the file system now.
    pub fn compact_now(&self) -> Result<bool, LogError> {
        compact(&self.shared)
    }
}

fn compact(shared: &Shared) -> Result<bool, LogError> {
    let mut db = shared.db.write().map_err(|_| LogError::Closed)?;
    let mut compacted = false;
    // Each pass can free more of the file's tail; stop when one finds nothing to move.
    for _ in 0..8 {
        match db.compact() {
            Ok(true) => compacted = true,
            Ok(false) => break,
            Err(e) => return Err(storage(e)),
        }
    }
    drop(db);
    if compacted && let Ok(mut stats) = shared.stats.lock() {
        stats.compactions += 1;
        stats.file_bytes = file_len(&shared.path);
    }
    Ok(compacted)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_u64(table: &redb::Table<&str, &[u8]>, key: &str) -> Result<Option<u64>, LogError> {
    match table.get(key).map_err(storage)? {
        Some(value) => {
            let bytes: [u8; 8] = value
                .value()
                .try_into()
                .map_err(|_| LogError::Storage(format!("meta {key} is not 8 bytes")))?;
            Ok(Some(u64::from_be_bytes(bytes)))
        }
        None => Ok(None),
    }
}

fn write_u64(table: &mut redb::Table<&str, &[u8]>, key: &str, value: u64) -> Result<(), LogError> {
    table
        .insert(key, value.to_be_bytes().as_slice())
        .map_err(storage)?;
    Ok(())
}

/// Reads (or, for a new log, creates) the epoch and counters.
fn initialise(
    db: &Database,
    path: &Path,
    options: &LogOptions,
) -> Result<(Epoch, LogStats), LogError> {
    let txn = db.begin_write().map_err(storage)?;
    let (epoch, next_seq, live_bytes, oldest, backlog_events, rejects_stored) = {
        let mut meta = txn.open_table(META).map_err(storage)?;
        let stored_epoch = meta
            .get(META_EPOCH)
            .map_err(storage)?
            .map(|value| value.value().to_vec());
        let epoch = match stored_epoch {
            Some(value) => {
                let bytes: [u8; 16] =
                    value.as_slice().try_into().map_err(|_| LogError::Damaged {
                        path: path.to_path_buf(),
                        reason: "the epoch record is not 16 bytes".into(),
                    })?;
                Epoch(u128::from_be_bytes(bytes))
            }
            None => {
                // Zero is never used, so a missing epoch can never look valid.
                let epoch = Epoch(rand::random::<u128>().max(1));
                meta.insert(META_EPOCH, epoch.0.to_be_bytes().as_slice())
                    .map_err(storage)?;
                epoch
            }
        };
        let next_seq = read_u64(&meta, META_NEXT_SEQ)?.unwrap_or(1);
        let live_bytes = read_u64(&meta, META_LIVE_BYTES)?.unwrap_or(0);
        let events = txn.open_table(EVENTS).map_err(storage)?;
        let oldest = match events.first().map_err(storage)? {
            Some((key, value)) => {
                let record: LoggedEvent =
                    postcard::from_bytes(value.value()).map_err(|e| LogError::Damaged {
                        path: path.to_path_buf(),
                        reason: format!("record {} cannot be decoded: {e}", key.value()),
                    })?;
                Some((key.value(), record.received_at_ms))
            }
            None => None,
        };
        let backlog_events = events.len().map_err(storage)?;
        txn.open_table(IDS).map_err(storage)?;
        let rejects = txn.open_table(REJECTS).map_err(storage)?;
        let rejects_stored = rejects.len().map_err(storage)?;
        let mut rejects_bytes = 0u64;
        for entry in rejects.iter().map_err(storage)? {
            rejects_bytes += entry.map_err(storage)?.1.value().len() as u64;
        }
        drop(rejects);
        let erp_refusals_stored = txn
            .open_table(ERP_REFUSALS)
            .map_err(storage)?
            .len()
            .map_err(storage)?;
        (
            epoch,
            next_seq,
            live_bytes,
            oldest,
            backlog_events,
            (rejects_stored, rejects_bytes, erp_refusals_stored),
        )
    };
    let (rejects_stored, rejects_bytes, erp_refusals_stored) = rejects_stored;
    txn.commit().map_err(storage)?;
    let stats = LogStats {
        epoch: epoch.to_string(),
        next_seq,
        backlog_events,
        backlog_bytes: live_bytes,
        oldest_seq: oldest.map(|o| o.0),
        oldest_received_at_ms: oldest.map(|o| o.1),
        max_bytes: options.max_bytes,
        // A log reopened full stays full until the relay acknowledges something: say so now,
        // not at the next refusal.
        quota_exceeded: live_bytes + (backhaul_events::MAX_EVENT_BYTES as u64) > options.max_bytes,
        rejects_stored,
        rejects_bytes,
        rejects_not_kept: 0,
        erp_refusals_stored,
        file_bytes: file_len(path),
        flushes: 0,
        compactions: 0,
    };
    Ok((epoch, stats))
}

/// The single thread that writes the log.
struct Writer {
    shared: Arc<Shared>,
    options: LogOptions,
    last_compaction_check: Instant,
}

impl Writer {
    fn new(shared: Arc<Shared>, options: LogOptions) -> Writer {
        Writer {
            shared,
            options,
            last_compaction_check: Instant::now(),
        }
    }

    fn run(mut self, receiver: mpsc::Receiver<Request>) {
        // Rejects past a commit's share, oldest first; bounded by MAX_QUEUED_REJECT_BYTES.
        let mut deferred: VecDeque<Request> = VecDeque::new();
        loop {
            if let Ok(heartbeat) = self.shared.heartbeat.lock()
                && let Some(heartbeat) = heartbeat.as_ref()
            {
                heartbeat.beat();
            }
            let first = match deferred.pop_front() {
                Some(request) => request,
                None => match receiver.recv_timeout(COMPACTION_CHECK_EVERY) {
                    Ok(request) => request,
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        self.maybe_compact();
                        continue;
                    }
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                },
            };
            let batch = self.gather(first, &receiver, &mut deferred);
            self.commit(batch);
            self.maybe_compact();
        }
    }

    /// Takes every waiting request, and waits for more until the first has waited the group
    /// commit delay or the batch is full. Rejects past [`REJECT_BYTES_PER_COMMIT`] go to
    /// `deferred`, and the oldest of those come first in the next batch.
    fn gather(
        &self,
        first: Request,
        receiver: &mpsc::Receiver<Request>,
        deferred: &mut VecDeque<Request>,
    ) -> Vec<Request> {
        let deadline = match &first {
            Request::Append { enqueued, .. } | Request::Reject { enqueued, .. } => {
                *enqueued + self.options.group_commit_delay
            }
            Request::AckThrough { .. } => Instant::now(),
        };
        let mut reject_bytes = reject_weight(&first);
        let mut batch = vec![first];
        while reject_bytes < REJECT_BYTES_PER_COMMIT
            && let Some(next) = deferred.pop_front()
        {
            reject_bytes += reject_weight(&next);
            batch.push(next);
        }
        let mut events: usize = batch.iter().map(event_count).sum();
        while events < self.options.group_commit_max_events {
            let next = match receiver.try_recv() {
                Ok(request) => request,
                Err(_) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match receiver.recv_timeout(deadline - now) {
                        Ok(request) => request,
                        Err(_) => break,
                    }
                }
            };
            let weight = reject_weight(&next);
            if weight > 0 && reject_bytes + weight > REJECT_BYTES_PER_COMMIT {
                deferred.push_back(next);
                continue;
            }
            reject_bytes += weight;
            events += event_count(&next);
            batch.push(next);
        }
        batch
    }

    fn commit(&mut self, batch: Vec<Request>) {
        let started = Instant::now();
        let served = batch.len();
        let result = self.write(&batch);
        match result {
            Ok(outcomes) => {
                let flush = started.elapsed();
                if let Ok(observer) = self.shared.flush_observer.lock()
                    && let Some(observer) = observer.as_ref()
                {
                    observer(flush, served);
                }
                for (request, outcome) in batch.into_iter().zip(outcomes) {
                    match (request, outcome) {
                        (Request::Append { reply, .. }, Outcome::Appended(list)) => {
                            let _ = reply.send(Ok(list));
                        }
                        (Request::Reject { reply, .. }, Outcome::Rejected) => {
                            let _ = reply.send(Ok(()));
                        }
                        (Request::AckThrough { reply, .. }, Outcome::Acked(n)) => {
                            let _ = reply.send(Ok(n));
                        }
                        _ => {}
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log write failed; nothing in it was acknowledged");
                // Counters may have moved inside the failed transaction: reload them.
                if let Ok(db) = self.shared.db.read()
                    && let Ok((_, stats)) = initialise(&db, &self.shared.path, &self.options)
                    && let Ok(mut current) = self.shared.stats.lock()
                {
                    *current = stats;
                }
                let message = e.to_string();
                for request in batch {
                    let error = || LogError::Storage(message.clone());
                    match request {
                        Request::Append { reply, .. } => drop(reply.send(Err(error()))),
                        Request::Reject { reply, .. } => drop(reply.send(Err(error()))),
                        Request::AckThrough { reply, .. } => drop(reply.send(Err(error()))),
                    }
                }
            }
        }
    }

    fn write(&mut self, batch: &[Request]) -> Result<Vec<Outcome>, LogError> {
        let db = self.shared.db.read().map_err(|_| LogError::Closed)?;
        let mut stats = self.stats();
        let mut txn = db.begin_write().map_err(storage)?;
        // Recovery after a crash then takes milliseconds instead of a walk of the whole file.
        txn.set_quick_repair(true);
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            // Opened once per transaction: opening them per request cost a fifth of the
            // writer's time when every MQTT publish is its own request.
            let mut tables = Tables {
                events: txn.open_table(EVENTS).map_err(storage)?,
                ids: txn.open_table(IDS).map_err(storage)?,
                meta: txn.open_table(META).map_err(storage)?,
                rejects: txn.open_table(REJECTS).map_err(storage)?,
                tally: txn.open_table(TALLY).map_err(storage)?,
                accepted: std::collections::BTreeMap::new(),
            };
            for request in batch {
                outcomes.push(match request {
                    Request::Append { events, .. } => {
                        Outcome::Appended(self.append(&mut tables, events, &mut stats)?)
                    }
                    Request::Reject { record, .. } => {
                        self.reject(&mut tables, record, &mut stats)?;
                        Outcome::Rejected
                    }
                    Request::AckThrough { seq, .. } => {
                        Outcome::Acked(self.delete_through(&mut tables, *seq, &mut stats)?)
                    }
                });
            }
            tables.merge_tally(self.options.tally_days)?;
            write_u64(&mut tables.meta, META_NEXT_SEQ, stats.next_seq)?;
            write_u64(&mut tables.meta, META_LIVE_BYTES, stats.backlog_bytes)?;
        }
        txn.commit().map_err(storage)?;
        drop(db);
        stats.flushes += 1;
        stats.file_bytes = file_len(&self.shared.path);
        let next_seq = stats.next_seq;
        if let Ok(mut current) = self.shared.stats.lock() {
            stats.compactions = current.compactions;
            // Refusals are stored outside the writer, by the forwarder: keep its count.
            stats.erp_refusals_stored = current.erp_refusals_stored;
            *current = stats;
        }
        if let Ok(mut recent) = self.shared.recent.lock() {
            for (request, outcome) in batch.iter().zip(&outcomes) {
                if let (Request::Append { events, .. }, Outcome::Appended(results)) =
                    (request, outcome)
                {
                    for ((event, received_at_ms), result) in events.iter().zip(results) {
                        if let Appended::Stored { seq } = result {
                            if recent.len() == RECENT_EVENTS {
                                recent.pop_front();
                            }
                            let record = LoggedEvent {
                                received_at_ms: *received_at_ms,
                                event: event.clone(),
                            };
                            recent.push_back((*seq, record));
                        }
                    }
                }
            }
        }
        self.shared.appended.send_if_modified(|seen| {
            let changed = *seen != next_seq;
            *seen = next_seq;
            changed
        });
        Ok(outcomes)
    }

    fn stats(&self) -> LogStats {
        self.shared
            .stats
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    fn append(
        &self,
        tables: &mut Tables<'_>,
        events: &[(Event, i64)],
        stats: &mut LogStats,
    ) -> Result<Vec<Appended>, LogError> {
        let Tables {
            events: table,
            ids,
            rejects,
            ..
        } = tables;
        let mut out = Vec::with_capacity(events.len());
        let mut accepted = Vec::with_capacity(events.len());
        let mut buf = Vec::with_capacity(512);
        for (event, received_at_ms) in events {
            if let Some(seq) = ids.get(event.id.as_str()).map_err(storage)? {
                out.push(Appended::Duplicate { seq: seq.value() });
                continue;
            }
            buf.clear();
            let record = LoggedEventRef {
                received_at_ms: *received_at_ms,
                event,
            };
            buf = postcard::to_extend(&record, std::mem::take(&mut buf)).map_err(storage)?;
            let size = buf.len() as u64 + event.id.len() as u64 + PER_EVENT_OVERHEAD;
            // Rejects share the quota but never keep a good event out.
            while stats.backlog_bytes + stats.rejects_bytes + size > self.options.max_bytes
                && stats.rejects_bytes > 0
            {
                match rejects.pop_first().map_err(storage)? {
                    Some((_, value)) => {
                        stats.rejects_bytes = stats
                            .rejects_bytes
                            .saturating_sub(value.value().len() as u64);
                        stats.rejects_stored = stats.rejects_stored.saturating_sub(1);
                    }
                    None => stats.rejects_bytes = 0,
                }
            }
            if stats.backlog_bytes + size > self.options.max_bytes {
                stats.quota_exceeded = true;
                out.push(Appended::QuotaExceeded);
                continue;
            }
            let seq = stats.next_seq;
            table.insert(seq, buf.as_slice()).map_err(storage)?;
            ids.insert(event.id.as_str(), seq).map_err(storage)?;
            stats.next_seq += 1;
            stats.backlog_bytes += size;
            stats.quota_exceeded = false;
            stats.backlog_events += 1;
            if stats.oldest_seq.is_none() {
                stats.oldest_seq = Some(seq);
                stats.oldest_received_at_ms = Some(*received_at_ms);
            }
            out.push(Appended::Stored { seq });
            accepted.push((*received_at_ms, event.kind, seq));
        }
        for (received_at_ms, kind, seq) in accepted {
            tables.count_accepted(self.shared.epoch, received_at_ms, kind, seq);
        }
        Ok(out)
    }

    /// Keeps a refused event for inspection. Rejects count in the disk quota beside the
    /// backlog but always give way to it: the oldest go to make room, and a reject that finds
    /// the quota full of acknowledged events is not kept (it was answered and counted).
    fn reject(
        &self,
        tables: &mut Tables<'_>,
        record: &RejectRecord,
        stats: &mut LogStats,
    ) -> Result<(), LogError> {
        let bytes = serde_json::to_vec(record).map_err(storage)?;
        let size = bytes.len() as u64;
        while stats.backlog_bytes + stats.rejects_bytes + size > self.options.max_bytes {
            if !tables.drop_oldest_reject(stats)? {
                stats.rejects_not_kept += 1;
                return Ok(());
            }
        }
        let key = read_u64(&tables.meta, META_NEXT_REJECT)?.unwrap_or(1);
        write_u64(&mut tables.meta, META_NEXT_REJECT, key + 1)?;
        tables
            .rejects
            .insert(key, bytes.as_slice())
            .map_err(storage)?;
        stats.rejects_bytes += size;
        stats.rejects_stored += 1;
        while stats.rejects_stored > self.options.max_rejects {
            if !tables.drop_oldest_reject(stats)? {
                break;
            }
        }
        Ok(())
    }

    fn delete_through(
        &self,
        tables: &mut Tables<'_>,
        seq: u64,
        stats: &mut LogStats,
    ) -> Result<u64, LogError> {
        if read_u64(&tables.meta, META_ACKED_THROUGH)?.is_none_or(|acked| acked < seq) {
            write_u64(&mut tables.meta, META_ACKED_THROUGH, seq)?;
        }
        let Tables {
            events: table, ids, ..
        } = tables;
        let mut deleted = 0u64;
        let mut freed = 0u64;
        {
            let extracted = table
                .extract_from_if(..=seq, |_, _| true)
                .map_err(storage)?;
            for entry in extracted {
                let (key, value) = entry.map_err(storage)?;
                let raw = value.value();
                let record: LoggedEvent = postcard::from_bytes(raw).map_err(|e| {
                    LogError::Storage(format!("record {} cannot be decoded: {e}", key.value()))
                })?;
                ids.remove(record.event.id.as_str()).map_err(storage)?;
                freed += raw.len() as u64 + record.event.id.len() as u64 + PER_EVENT_OVERHEAD;
                deleted += 1;
            }
        }
        stats.backlog_bytes = stats.backlog_bytes.saturating_sub(freed);
        stats.backlog_events = table.len().map_err(storage)?;
        match table.first().map_err(storage)? {
            Some((key, value)) => {
                let received = postcard::from_bytes::<LoggedEvent>(value.value())
                    .map(|r| r.received_at_ms)
                    .ok();
                stats.oldest_seq = Some(key.value());
                stats.oldest_received_at_ms = received;
            }
            None => {
                stats.oldest_seq = None;
                stats.oldest_received_at_ms = None;
            }
        }
        if deleted > 0 {
            stats.quota_exceeded = false;
        }
        Ok(deleted)
    }

    /// Shrinks the file once most of it is free space, so an acknowledged backlog really gives
    /// its disk back. Checked at most every few seconds, and only when nothing is waiting.
    ///
    /// Compaction moves the live events to the front of the file and holds them in memory
    /// while it does, so it waits until what is left is small: a draining backlog is compacted
    /// once it has nearly drained, not midway. Until then redb reuses the freed pages, and the
    /// quota still bounds the file.
    fn maybe_compact(&mut self) {
        if self.last_compaction_check.elapsed() < COMPACTION_CHECK_EVERY {
            return;
        }
        self.last_compaction_check = Instant::now();
        let stats = self.stats();
        let file = file_len(&self.shared.path);
        let worth_it = file > 16 << 20
            && file > 4 * stats.backlog_bytes.max(1)
            && stats.backlog_bytes <= COMPACT_AT_MOST_LIVE_BYTES;
        if worth_it {
            let started = Instant::now();
            match compact(&self.shared) {
                Ok(_) => tracing::info!(
                    before_bytes = file,
                    after_bytes = file_len(&self.shared.path),
                    took_ms = started.elapsed().as_millis() as u64,
                    "event log compacted"
                ),
                Err(e) => tracing::warn!(error = %e, "event log compaction failed"),
            }
        }
    }
}

/// The log's tables, open for one write transaction.
struct Tables<'txn> {
    events: redb::Table<'txn, u64, &'static [u8]>,
    ids: redb::Table<'txn, &'static str, u64>,
    meta: redb::Table<'txn, &'static str, &'static [u8]>,
    rejects: redb::Table<'txn, u64, &'static [u8]>,
    tally: redb::Table<'txn, i32, &'static [u8]>,
    /// What this transaction accepted, by day, merged into `tally` before it commits.
    accepted: std::collections::BTreeMap<i32, DayTally>,
}

impl Tables<'_> {
    fn count_accepted(&mut self, epoch: Epoch, received_at_ms: i64, kind: EventType, seq: u64) {
        let day = day_of(received_at_ms);
        let tally = self.accepted.entry(day).or_insert(DayTally {
            day,
            epoch,
            first_seq: seq,
            last_seq: seq,
            counts: [0; 5],
        });
        tally.first_seq = tally.first_seq.min(seq);
        tally.last_seq = tally.last_seq.max(seq);
        tally.counts[kind_index(kind)] += 1;
    }

    /// Adds this transaction's accepted events to the stored tally, and forgets the days
    /// more than `keep_days` before today, or after it (a clock that was set wrong): days are
    /// judged by today's date, never by an event's, so one wrong receive time cannot wipe the
    /// days before it.
    fn merge_tally(&mut self, keep_days: u32) -> Result<(), LogError> {
        let accepted = std::mem::take(&mut self.accepted);
        if accepted.is_empty() {
            return Ok(());
        }
        let mut new_day = false;
        for (day, delta) in accepted {
            let merged = match self.tally.get(day).map_err(storage)? {
                Some(stored) => match postcard::from_bytes::<DayTally>(stored.value()) {
                    // A log keeps one epoch: a stored day of another one is not this log's.
                    Ok(mut stored) if stored.epoch == delta.epoch => {
                        stored.first_seq = stored.first_seq.min(delta.first_seq);
                        stored.last_seq = stored.last_seq.max(delta.last_seq);
                        for (count, add) in stored.counts.iter_mut().zip(delta.counts) {
                            *count += add;
                        }
                        stored
                    }
                    _ => delta,
                },
                None => {
                    new_day = true;
                    delta
                }
            };
            let bytes = postcard::to_allocvec(&merged).map_err(storage)?;
            self.tally.insert(day, bytes.as_slice()).map_err(storage)?;
        }
        if new_day {
            let keep = keep_days.max(1) as i32;
            let today = day_of(now_ms());
            let oldest_kept = today.saturating_sub(keep - 1);
            let newest_kept = today.saturating_add(keep);
            self.tally
                .retain_in(..oldest_kept, |_, _| false)
                .map_err(storage)?;
            self.tally
                .retain_in(newest_kept.saturating_add(1).., |_, _| false)
                .map_err(storage)?;
        }
        Ok(())
    }

    /// Forgets the oldest reject; false when there is none.
    fn drop_oldest_reject(&mut self, stats: &mut LogStats) -> Result<bool, LogError> {
        match self.rejects.pop_first().map_err(storage)? {
            Some((_, value)) => {
                stats.rejects_bytes = stats
                    .rejects_bytes
                    .saturating_sub(value.value().len() as u64);
                stats.rejects_stored = stats.rejects_stored.saturating_sub(1);
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

/// [`LoggedEvent`] by reference: the same postcard bytes, without copying the event.
#[derive(Serialize)]
struct LoggedEventRef<'a> {
    received_at_ms: i64,
    event: &'a Event,
}

enum Outcome {
    Appended(Vec<Appended>),
    Rejected,
    Acked(u64),
}

/// What a reject request writes, in bytes (0 for any other request).
fn reject_weight(request: &Request) -> u64 {
    match request {
        Request::Reject { record, .. } => record.weight(),
        _ => 0,
    }
}

fn event_count(request: &Request) -> usize {
    match request {
        Request::Append { events, .. } => events.len(),
        _ => 1,
    }
}

/// The UTC day of a time in ms since the Unix epoch, as days since 1970-01-01.
pub fn day_of(ms: i64) -> i32 {
    ms.div_euclid(MS_PER_DAY)
        .clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// Where an event type's count sits in [`DayTally::counts`].
pub fn kind_index(kind: EventType) -> usize {
    EventType::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}
