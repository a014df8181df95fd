//! The ledger connector: appends each event once to a JSONL file (one event per line, with site,
//! epoch, sequence number and the canonical fields), fsynced, then removes it from the outbox.
//!
//! Exactly once across crashes: the outbox records how long the file was after each committed
//! delivery. At start, complete lines past that length were written but not committed: their
//! events are taken as delivered. A torn last line is cut off; its event is still in the outbox.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::metrics::RelayMetrics;
use crate::outbox::Outbox;

const DELIVERY_BATCH: usize = 5000;

pub struct Ledger {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Ledger {
    /// Opens the ledger and reconciles it with the outbox after a crash.
    pub fn open(path: &Path, outbox: &Outbox) -> anyhow::Result<Ledger> {
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
        let committed = outbox.ledger_committed_len()?;
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

    fn reconcile(&mut self, committed: u64, outbox: &Outbox) -> anyhow::Result<()> {
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
                && let Some(entry) = outbox.find_pending(site, id)? {
                    delivered.push(entry);
                }
        }
        tracing::info!(ledger = %self.path.display(), events = delivered.len(), "ledger lines written before a crash taken as delivered");
        outbox.delivered(&delivered, self.len)?;
        Ok(())
    }

    /// Delivers outbox events to the file until `stop` is cancelled.
    pub async fn run(
        mut self,
        outbox: Arc<Outbox>,
        metrics: Arc<RelayMetrics>,
        wake: Arc<tokio::sync::Notify>,
        stop: CancellationToken,
    ) {
        loop {
            let pending = {
                let outbox = outbox.clone();
                tokio::task::spawn_blocking(move || outbox.pending(DELIVERY_BATCH)).await
            };
            let pending = match pending {
                Ok(Ok(pending)) => pending,
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "the outbox cannot be read");
                    Vec::new()
                }
                Err(e) => {
                    tracing::error!(error = %e, "the outbox reader failed");
                    Vec::new()
                }
            };
            if pending.is_empty() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = wake.notified() => continue,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
            let outbox_for_write = outbox.clone();
            let committed = self.len;
            let written = tokio::task::block_in_place(|| -> anyhow::Result<()> {
                let mut buf = Vec::with_capacity(pending.len() * 300);
                for (_, event) in &pending {
                    serde_json::to_writer(&mut buf, &event.to_json())?;
                    buf.push(b'\n');
                }
                self.file.write_all(&buf)?;
                self.file.sync_data()?;
                self.len += buf.len() as u64;
                outbox_for_write.delivered(&pending, self.len)?;
                Ok(())
            });
            match written {
                Ok(()) => {
                    metrics.events_delivered.inc_by(pending.len() as u64);
                }
                Err(e) => {
                    // Whatever part of the write reached the file is not committed: cut it off
                    // so the retry does not write those events twice.
                    self.len = committed;
                    let _ = self.file.set_len(committed);
                    tracing::error!(error = %e, ledger = %self.path.display(), "ledger write failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }
}
