//! The ledger connector: appends each event once to a JSONL file (one event per line, with site,
//! epoch, sequence number and the canonical fields), fsynced, then removes it from the outbox.
//!
//! Exactly once across crashes: the outbox records how long the file was after each committed
//! delivery (the connector's [`CommitToken`]). At start, complete lines past that length were
//! written but not committed: their events are taken as delivered. A torn last line is cut
//! off; its event is still in the outbox. When the outbox cannot record a delivery, the
//! engine stops the relay rather than deliver those events again, so the lines written are
//! reconciled by this same recovery at the next start.

use anyhow::Context;
use backhaul_events::StampedEvent;
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::connector::{CommitToken, Delivered, Delivery};
use crate::outbox::Outbox;

pub struct Ledger {
    path: PathBuf,
    file: File,
    len: u64,
}

/// Of the site's events `ids`, those without a line in the ledger at `path`, each with why.
/// The file is read as it is; a torn last line (a write in progress) is not counted.
pub fn missing_lines(
    path: &Path,
    site: &str,
    ids: &[String],
) -> Result<HashMap<String, String>, String> {
    let file =
        File::open(path).map_err(|e| format!("cannot read the ledger {}: {e}", path.display()))?;
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let mut found: HashSet<String> = HashSet::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("cannot read the ledger {}: {e}", path.display()))?;
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value["site"].as_str() == Some(site)
            && let Some(id) = value["id"].as_str()
            && wanted.contains(id)
        {
            found.insert(id.to_string());
        }
    }
    Ok(ids
        .iter()
        .filter(|id| !found.contains(id.as_str()))
        .map(|id| {
            (
                id.clone(),
                format!("the ledger {} has no line for it", path.display()),
            )
        })
        .collect())
}

impl Ledger {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the ledger and reconciles it with the outbox after a crash.
    pub fn open(path: &Path, outbox: &dyn Outbox) -> anyhow::Result<Ledger> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| {
                format!("cannot create the ledger's directory {}", dir.display())
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open the ledger {}", path.display()))?;
        let committed = outbox.committed_token()?.map_or(0, |token| token.0);
        let len = file.metadata()?.len();
        if len < committed {
            anyhow::bail!(
                "the ledger {} is {len} bytes but {committed} bytes were committed: it was \
                 truncated or replaced outside Backhaul",
                path.display()
            );
        }
        let mut ledger = Ledger {
            path: path.to_path_buf(),
            file,
            len,
        };
        if len > committed {
            ledger.reconcile(committed, outbox)?;
        }
        Ok(ledger)
    }

    fn reconcile(&mut self, committed: u64, outbox: &dyn Outbox) -> anyhow::Result<()> {
        let mut reader = BufReader::new(File::open(&self.path)?);
        reader.seek(SeekFrom::Start(committed))?;
        let mut offset = committed;
        let mut delivered = Vec::new();
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line)?;
            if read == 0 {
                break;
            }
            if !line.ends_with('\n') {
                tracing::warn!(ledger = %self.path.display(), bytes = read, "cutting off a torn last line of the ledger; its event is still in the outbox");
                self.file.set_len(offset)?;
                self.file.sync_data()?;
                self.len = offset;
                break;
            }
            offset += read as u64;
            let value: serde_json::Value = serde_json::from_str(&line).with_context(|| {
                format!(
                    "the ledger {} has an unreadable line at byte {}",
                    self.path.display(),
                    offset - read as u64
                )
            })?;
            if let (Some(site), Some(id)) = (value["site"].as_str(), value["id"].as_str())
                && let Some(entry) = outbox.find_pending(site, id)?
            {
                delivered.push(entry);
            }
        }
        tracing::info!(ledger = %self.path.display(), events = delivered.len(), "ledger lines written before a crash taken as delivered");
        outbox.complete(&delivered, &[], Some(CommitToken(self.len)))?;
        Ok(())
    }

    /// Appends the events, one line each, and fsyncs. On failure nothing of this call stays
    /// in the file. Returns the results and the file's length to commit with them.
    pub fn append(&mut self, events: &[StampedEvent]) -> Delivered {
        let committed = self.len;
        let mut buf = Vec::with_capacity(events.len() * 300);
        let mut offsets = Vec::with_capacity(events.len());
        for event in events {
            offsets.push(committed + buf.len() as u64);
            if let Err(e) = serde_json::to_writer(&mut buf, &event.to_json()) {
                let reason = format!("the event cannot be written as JSON: {e}");
                return vec![Delivery::Permanent { reason }; events.len()].into();
            }
            buf.push(b'\n');
        }
        let written = self
            .file
            .write_all(&buf)
            .and_then(|()| self.file.sync_data());
        match written {
            Ok(()) => {
                self.len += buf.len() as u64;
                let results = offsets
                    .into_iter()
                    .map(|offset| Delivery::Posted {
                        erp_ref: format!("ledger@{offset}"),
                    })
                    .collect();
                Delivered {
                    results,
                    commit: Some(CommitToken(self.len)),
                }
            }
            Err(e) => {
                // Whatever part of the write reached the file is not committed: cut it off so
                // the retry does not write those events twice.
                let _ = self.file.set_len(committed);
                let reason = format!("the ledger {} cannot be written: {e}", self.path.display());
                tracing::error!("{reason}");
                let transient = Delivery::Transient {
                    reason,
                    retry_after: None,
                };
                vec![transient; events.len()].into()
            }
        }
    }
}
