//! Salvage of a damaged event log: what `backhaul-agent salvage` does when the log refuses to
//! open.
//!
//! What it owns: finding every event still legible in the damaged file, writing those events
//! into a new log (a new epoch) in their original order with their original ids and receive
//! times, keeping the damaged file under `quarantine/` (it is never deleted or changed), and
//! the report of the sequence ranges that could not be read.
//!
//! The damaged file is read without trusting redb's tree: a scribbled branch page or allocator
//! state must not hide the leaves below it. Every 4 KiB-aligned page is tried as a leaf of the
//! events table (u64 keys, byte values: a count, the values' end offsets, the keys, the values)
//! and every value on it must decode as a logged event that passes the event rules again, so a
//! page of another table or of garbage yields nothing. Freed pages may hold older copies of
//! events: copies at or below the relay's acknowledged mark are left out, and an id is written
//! once. The relay deduplicates by id, so an event it already had is stored once.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use backhaul_events::event::parse_event;
use serde::Serialize;

use crate::log::{Appended, EVENTS_TABLE, EventLog, LogOptions, LoggedEvent, META_ACKED_THROUGH};

/// redb's page size; every page starts at a multiple of it.
const PAGE_BYTES: u64 = 4096;
/// The largest leaf considered: an event is at most 16 KiB of JSON, so a leaf holding one is
/// far below this.
const MAX_LEAF_BYTES: usize = 1 << 20;
/// Bytes read from the damaged file at a time (plus one largest leaf of overlap).
const CHUNK_BYTES: usize = 8 << 20;
/// redb's page type byte of a leaf.
const LEAF: u8 = 1;
/// Events appended to the new log per flush.
const APPEND_BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum SalvageError {
    #[error("there is no event log at {0}")]
    NoLog(PathBuf),
    #[error(
        "the event log {0} opens without error: there is nothing to salvage (--force salvages \
         it anyway)"
    )]
    NotDamaged(PathBuf),
    #[error(
        "the event log {0} was not closed cleanly and needs the crash repair the agent makes \
         when it starts: start the agent (systemctl start backhaul-agent); if it still refuses \
         the log, run salvage with --force"
    )]
    NeedsRepair(PathBuf),
    #[error("the event log {0} is in use: stop the agent (systemctl stop backhaul-agent) first")]
    InUse(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the new log could not be written: {0}")]
    NewLog(#[from] crate::log::LogError),
    #[error(
        "the new log's disk quota ({max_bytes} bytes) is full after {written} events: raise \
         log.max_bytes and run salvage again (the damaged file is unchanged)"
    )]
    QuotaFull { max_bytes: u64, written: u64 },
}

fn io<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SalvageError + 'a {
    move |source| SalvageError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// A run of sequence numbers of the damaged log's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SeqRange {
    pub first: u64,
    pub last: u64,
}

impl SeqRange {
    pub fn count(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// What a salvage did.
#[derive(Debug, Clone, Serialize)]
pub struct SalvageReport {
    pub damaged_file: PathBuf,
    /// Where the damaged file is now, unchanged.
    pub quarantined_as: PathBuf,
    pub file_bytes: u64,
    pub pages_scanned: u64,
    /// The damaged log's epoch, when a copy of it could be read.
    pub old_epoch: Option<String>,
    pub new_epoch: String,
    /// Everything at or below this the relay had acknowledged (when the mark could be read).
    pub acked_through: Option<u64>,
    /// The damaged log's next sequence number, when it could be read.
    pub next_seq: Option<u64>,
    /// Events written into the new log, in their original order.
    pub recovered: u64,
    /// Sequence numbers above the acknowledged mark that no legible page holds.
    pub unreadable: Vec<SeqRange>,
    pub unreadable_events: u64,
    /// Copies of events the relay had already acknowledged, found on freed pages and left out.
    pub acknowledged_copies_skipped: u64,
}

/// Where a legible event lies in the damaged file.
#[derive(Debug, Clone, Copy)]
struct Found {
    seq: u64,
    offset: u64,
    len: u32,
}

#[derive(Debug, Default)]
struct Scan {
    found: Vec<Found>,
    pages: u64,
    epoch: Option<u128>,
    next_seq: Option<u64>,
    acked_through: Option<u64>,
}

/// Salvages the log in `options.dir`. The new log gets `options`' quota and settings.
pub async fn salvage(options: LogOptions, force: bool) -> Result<SalvageReport, SalvageError> {
    let path = options.dir.join("events.redb");
    if !path.exists() {
        return Err(SalvageError::NoLog(path));
    }
    match probe(&path)? {
        Probe::Damaged => {}
        _ if force => {}
        Probe::Sound => return Err(SalvageError::NotDamaged(path)),
        Probe::NeedsRepair => return Err(SalvageError::NeedsRepair(path)),
    }
    let scan_path = path.clone();
    let scan = tokio::task::spawn_blocking(move || scan_file(&scan_path))
        .await
        .map_err(|e| SalvageError::Io {
            action: "scanning",
            path: path.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
    let file_bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);

    // The new log is built beside the old one and only takes its place once complete, so an
    // interrupted salvage leaves the damaged log where it was.
    let staging = options.dir.join("salvage.partial");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;
    }
    let new_options = LogOptions {
        dir: staging.clone(),
        ..options.clone()
    };
    let (new_epoch, written, skipped, recovered_seqs) =
        write_new_log(&path, &scan, new_options).await?;

    let quarantine = options.dir.join("quarantine");
    std::fs::create_dir_all(&quarantine).map_err(io("creating", &quarantine))?;
    let stamp = time::OffsetDateTime::now_utc()
        .format(time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_else(|_| "unknown-time".into());
    let mut quarantined_as = quarantine.join(format!("events-{stamp}.redb"));
    let mut n = 1;
    while quarantined_as.exists() {
        n += 1;
        quarantined_as = quarantine.join(format!("events-{stamp}-{n}.redb"));
    }
    // A second name for the damaged file first, then the new log replaces the old name in
    // one step: at every moment `events.redb` is one whole log, old or new.
    std::fs::hard_link(&path, &quarantined_as).map_err(io("keeping in quarantine", &path))?;
    File::open(&quarantine)
        .and_then(|dir| dir.sync_all())
        .map_err(io("syncing", &quarantine))?;
    let new_file = staging.join("events.redb");
    std::fs::rename(&new_file, &path).map_err(io("moving the new log into place", &new_file))?;
    File::open(&options.dir)
        .and_then(|dir| dir.sync_all())
        .map_err(io("syncing", &options.dir))?;
    std::fs::remove_dir_all(&staging).map_err(io("removing", &staging))?;

    let unreadable = unreadable_ranges(&scan, &recovered_seqs);
    let unreadable_events = unreadable.iter().map(SeqRange::count).sum();
    Ok(SalvageReport {
        damaged_file: path,
        quarantined_as,
        file_bytes,
        pages_scanned: scan.pages,
        old_epoch: scan.epoch.map(|e| backhaul_events::Epoch(e).to_string()),
        new_epoch,
        acked_through: scan.acked_through,
        next_seq: scan.next_seq,
        recovered: written,
        unreadable,
        unreadable_events,
        acknowledged_copies_skipped: skipped,
    })
}

/// What a look at the log without changing it found.
enum Probe {
    Sound,
    /// Not closed cleanly: redb's crash repair, which the agent runs when it opens the log,
    /// is all it needs, and a read-only open does not make it.
    NeedsRepair,
    Damaged,
}

/// Whether redb refuses the file or any of its events, without changing it (a read-only open
/// takes no write lock and repairs nothing). A log the agent holds is refused as in use.
fn probe(path: &Path) -> Result<Probe, SalvageError> {
    // A check cut short (a crash, power lost) leaves its copy: it is never needed again.
    let _ = std::fs::remove_file(repair_check_path(path));
    // redb may panic on a page it cannot make sense of, opening the file as well as reading
    // it; that is an answer here, not news for the operator's terminal.
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let looked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let db = match redb::Builder::new().open_read_only(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(()),
            Err(redb::DatabaseError::RepairAborted) => return Ok(repaired_copy_is_sound(path)),
            Err(_) => return Ok(Probe::Damaged),
        };
        Ok(if every_event_legible(&db) {
            Probe::Sound
        } else {
            Probe::Damaged
        })
    }));
    std::panic::set_hook(quiet);
    match looked {
        Ok(Ok(probe)) => Ok(probe),
        Ok(Err(())) => Err(SalvageError::InUse(path.to_path_buf())),
        Err(_) => Ok(Probe::Damaged),
    }
}

/// Whether redb reads every event of the log and each is a valid event.
fn every_event_legible(db: &impl redb::ReadableDatabase) -> bool {
    use redb::ReadableTable;
    (|| {
        let txn = db.begin_read().ok()?;
        let table = txn.open_table(EVENTS_TABLE).ok()?;
        for entry in table.iter().ok()? {
            let (_, value) = entry.ok()?;
            legible_event(value.value())?;
        }
        Some(())
    })()
    .is_some()
}

/// A log that was not closed cleanly, repaired on a copy beside it (removed after): whether
/// the repair is all it needs. A copy that cannot be made (no room) counts as damaged, and
/// salvage goes on as it would for one.
fn repaired_copy_is_sound(path: &Path) -> Probe {
    /// Removes the copy however the check ends, a panic in redb included.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let copy = Scratch(repair_check_path(path));
    if std::fs::copy(path, &copy.0).is_err() {
        // No room for the copy: the agent's own repair, in place, is the next step to try;
        // salvage --force is there if the agent still refuses the log.
        return Probe::NeedsRepair;
    }
    // Opened as the agent opens its log, so the answer is the agent's.
    let sound = redb::Builder::new()
        .set_check_integrity_on_open(true)
        .open(&copy.0)
        .is_ok_and(|db| every_event_legible(&db));
    if sound {
        Probe::NeedsRepair
    } else {
        Probe::Damaged
    }
}

/// Where the repair check copies a log: beside it, so on the same file system.
fn repair_check_path(path: &Path) -> PathBuf {
    path.with_extension("redb.repair-check")
}

/// Writes the legible events above the acknowledged mark into a new log, in sequence order,
/// each id once. Returns the new epoch, the count written, the acknowledged copies skipped and
/// the old sequence numbers recovered (ascending).
async fn write_new_log(
    damaged: &Path,
    scan: &Scan,
    options: LogOptions,
) -> Result<(String, u64, u64, Vec<u64>), SalvageError> {
    let max_bytes = options.max_bytes;
    let file = File::open(damaged).map_err(io("opening", damaged))?;
    let log = tokio::task::spawn_blocking(move || EventLog::open(options))
        .await
        .map_err(|e| crate::log::LogError::Storage(e.to_string()))??;
    let new_epoch = log.epoch().to_string();
    let mut order: Vec<Found> = scan.found.clone();
    order.sort_by_key(|f| (f.seq, f.offset));
    let mut ids = HashSet::new();
    let mut recovered_seqs = Vec::new();
    let mut skipped = 0u64;
    let mut written = 0u64;
    let mut batch = Vec::with_capacity(APPEND_BATCH);
    let mut value = Vec::new();
    for found in order {
        if scan.acked_through.is_some_and(|acked| found.seq <= acked) {
            skipped += 1;
            continue;
        }
        value.resize(found.len as usize, 0);
        file.read_exact_at(&mut value, found.offset)
            .map_err(io("reading", damaged))?;
        let Some(record) = legible_event(&value) else {
            continue;
        };
        if !ids.insert(record.event.id.clone()) {
            continue;
        }
        if recovered_seqs.last() != Some(&found.seq) {
            recovered_seqs.push(found.seq);
        }
        batch.push((record.event, record.received_at_ms));
        if batch.len() == APPEND_BATCH {
            written += append(&log, std::mem::take(&mut batch), max_bytes, written).await?;
        }
    }
    if !batch.is_empty() {
        written += append(&log, batch, max_bytes, written).await?;
    }
    log.close().await;
    Ok((new_epoch, written, skipped, recovered_seqs))
}

async fn append(
    log: &EventLog,
    batch: Vec<(backhaul_events::Event, i64)>,
    max_bytes: u64,
    written_before: u64,
) -> Result<u64, SalvageError> {
    let mut written = 0;
    for outcome in log.append_received(batch).await? {
        match outcome {
            Appended::Stored { .. } => written += 1,
            Appended::Duplicate { .. } => {}
            Appended::QuotaExceeded => {
                return Err(SalvageError::QuotaFull {
                    max_bytes,
                    written: written_before + written,
                });
            }
        }
    }
    Ok(written)
}

/// The sequence numbers above the acknowledged mark and below the next one that no legible
/// page holds. Without a readable next sequence number, the last recovered one stands in (so
/// a lost tail cannot be told).
fn unreadable_ranges(scan: &Scan, recovered: &[u64]) -> Vec<SeqRange> {
    let first = scan.acked_through.map_or_else(
        || recovered.first().copied().unwrap_or(1),
        |acked| acked + 1,
    );
    let end = scan
        .next_seq
        .or_else(|| recovered.last().map(|s| s + 1))
        .unwrap_or(first);
    let mut ranges = Vec::new();
    let mut expected = first;
    for &seq in recovered.iter().filter(|&&s| s >= first && s < end) {
        if seq > expected {
            ranges.push(SeqRange {
                first: expected,
                last: seq - 1,
            });
        }
        expected = seq + 1;
    }
    if expected < end {
        ranges.push(SeqRange {
            first: expected,
            last: end - 1,
        });
    }
    ranges
}

/// Reads the damaged file page by page and notes every legible event and the log's marks.
fn scan_file(path: &Path) -> Result<Scan, SalvageError> {
    let file = File::open(path).map_err(io("opening", path))?;
    let len = file.metadata().map_err(io("reading", path))?.len();
    let mut scan = Scan::default();
    let mut window = Vec::with_capacity(CHUNK_BYTES + MAX_LEAF_BYTES);
    let mut chunk_start = 0u64;
    while chunk_start < len {
        let want = ((len - chunk_start) as usize).min(CHUNK_BYTES + MAX_LEAF_BYTES);
        window.resize(want, 0);
        file.read_exact_at(&mut window, chunk_start)
            .map_err(io("reading", path))?;
        let chunk_end = (chunk_start + CHUNK_BYTES as u64).min(len);
        let mut page = chunk_start;
        while page < chunk_end {
            let at = (page - chunk_start) as usize;
            scan.pages += 1;
            scan_page(&window[at..], page, &mut scan);
            page += PAGE_BYTES;
        }
        chunk_start = chunk_end;
    }
    Ok(scan)
}

fn u32_at(bytes: &[u8], at: usize) -> Option<usize> {
    let raw: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_le_bytes(raw) as usize)
}

fn scan_page(page: &[u8], file_offset: u64, scan: &mut Scan) {
    if page.first() != Some(&LEAF) || page.len() < 4 {
        return;
    }
    let pairs = u16::from_le_bytes([page[2], page[3]]) as usize;
    if pairs == 0 {
        return;
    }
    if !scan_events_leaf(page, pairs, file_offset, scan) {
        scan_meta_leaf(page, pairs, scan);
    }
}

/// A leaf of the events table: u64 keys (fixed width), byte values. True when the page is one
/// and every value on it is a legible event.
fn scan_events_leaf(page: &[u8], pairs: usize, file_offset: u64, scan: &mut Scan) -> bool {
    let keys_start = 4 + 4 * pairs;
    let values_start = keys_start + 8 * pairs;
    let mut found = Vec::with_capacity(pairs);
    let mut start = values_start;
    let mut previous_key = None;
    for i in 0..pairs {
        let Some(end) = u32_at(page, 4 + 4 * i) else {
            return false;
        };
        if end <= start || end > MAX_LEAF_BYTES || end > page.len() {
            return false;
        }
        let Some(key) = page
            .get(keys_start + 8 * i..keys_start + 8 * i + 8)
            .and_then(|k| <[u8; 8]>::try_from(k).ok())
            .map(u64::from_le_bytes)
        else {
            return false;
        };
        if previous_key.is_some_and(|p| key <= p) || key == 0 {
            return false;
        }
        previous_key = Some(key);
        if legible_event(&page[start..end]).is_none() {
            return false;
        }
        found.push(Found {
            seq: key,
            offset: file_offset + start as u64,
            len: (end - start) as u32,
        });
        start = end;
    }
    scan.found.extend(found);
    true
}

/// A leaf of the meta table (string keys, byte values): the epoch, the next sequence number and
/// the acknowledged mark. Old copies linger on freed pages; both numbers only grow, so the
/// largest copy is the latest.
fn scan_meta_leaf(page: &[u8], pairs: usize, scan: &mut Scan) {
    let key_ends = 4;
    let value_ends = 4 + 4 * pairs;
    let mut key_start = 4 + 8 * pairs;
    let mut entries = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let Some(end) = u32_at(page, key_ends + 4 * i) else {
            return;
        };
        if end < key_start || end > page.len().min(MAX_LEAF_BYTES) {
            return;
        }
        entries.push((key_start, end));
        key_start = end;
    }
    let mut value_start = key_start;
    for (i, &(ks, ke)) in entries.iter().enumerate() {
        let Some(end) = u32_at(page, value_ends + 4 * i) else {
            return;
        };
        if end < value_start || end > page.len().min(MAX_LEAF_BYTES) {
            return;
        }
        let value = &page[value_start..end];
        value_start = end;
        let u64_value = <[u8; 8]>::try_from(value).ok().map(u64::from_be_bytes);
        match (&page[ks..ke], u64_value) {
            (b"next_seq", Some(next)) => {
                scan.next_seq = scan.next_seq.max(Some(next));
            }
            (key, Some(acked)) if key == META_ACKED_THROUGH.as_bytes() => {
                scan.acked_through = scan.acked_through.max(Some(acked));
            }
            (b"epoch", _) => {
                if let Ok(bytes) = <[u8; 16]>::try_from(value) {
                    let epoch = u128::from_be_bytes(bytes);
                    if epoch != 0 {
                        scan.epoch = Some(epoch);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The logged event in `value`, when it decodes completely and the event passes the event
/// rules again (a page of garbage can decode by chance; it cannot also be a valid event).
fn legible_event(value: &[u8]) -> Option<LoggedEvent> {
    let (record, rest): (LoggedEvent, _) = postcard::take_from_bytes(value).ok()?;
    if !rest.is_empty() || record.received_at_ms <= 0 {
        return None;
    }
    let json = serde_json::to_vec(&record.event.to_json()).ok()?;
    match parse_event(&json) {
        Ok(again) if again == record.event => Some(record),
        _ => None,
    }
}

/// The report as the terminal shows it.
pub fn render(report: &SalvageReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "salvaged {}", report.damaged_file.display());
    let _ = writeln!(
        out,
        "  scanned          {} pages ({} bytes)",
        report.pages_scanned, report.file_bytes
    );
    let _ = writeln!(
        out,
        "  old epoch        {}",
        report.old_epoch.as_deref().unwrap_or("(unreadable)")
    );
    let _ = writeln!(out, "  new epoch        {}", report.new_epoch);
    let mark = |m: Option<u64>| m.map_or_else(|| "(unreadable)".to_string(), |m| m.to_string());
    let _ = writeln!(
        out,
        "  acknowledged     through seq {}",
        mark(report.acked_through)
    );
    let _ = writeln!(out, "  next seq         {}", mark(report.next_seq));
    if report.acked_through.is_none() {
        let _ = writeln!(
            out,
            "  note             the log holds no acknowledged mark (an agent older than salvage \
             wrote it, or the page is unreadable): events the relay already had may be among \
             those recovered; the relay drops repeats it still remembers (outbox.dedup_ids) \
             and the connectors write idempotently by id"
        );
    }
    let _ = writeln!(
        out,
        "  recovered        {} events, written to the new log in their order",
        report.recovered
    );
    let _ = writeln!(
        out,
        "  skipped          {} old copies of events the relay had acknowledged",
        report.acknowledged_copies_skipped
    );
    if report.unreadable.is_empty() {
        let _ = writeln!(out, "  unreadable       none");
    } else {
        let _ = writeln!(
            out,
            "  unreadable       {} events in {} ranges of seq:",
            report.unreadable_events,
            report.unreadable.len()
        );
        for range in &report.unreadable {
            if range.first == range.last {
                let _ = writeln!(out, "                   {}", range.first);
            } else {
                let _ = writeln!(
                    out,
                    "                   {}-{} ({} events)",
                    range.first,
                    range.last,
                    range.count()
                );
            }
        }
    }
    let _ = writeln!(
        out,
        "  damaged file     kept unchanged as {}",
        report.quarantined_as.display()
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(acked: Option<u64>, next: Option<u64>, recovered: &[u64]) -> Vec<(u64, u64)> {
        let scan = Scan {
            acked_through: acked,
            next_seq: next,
            ..Scan::default()
        };
        unreadable_ranges(&scan, recovered)
            .into_iter()
            .map(|r| (r.first, r.last))
            .collect()
    }

    #[test]
    fn unreadable_ranges_are_the_gaps_between_the_marks() {
        assert_eq!(
            ranges(Some(10), Some(21), &[11, 12, 15, 20]),
            vec![(13, 14), (16, 19)]
        );
        assert_eq!(ranges(Some(10), Some(25), &[12]), vec![(11, 11), (13, 24)]);
        assert_eq!(ranges(None, None, &[3, 4, 6]), vec![(5, 5)]);
        assert_eq!(ranges(Some(5), Some(6), &[]), Vec::<(u64, u64)>::new());
    }
}
