//! The outbox in PostgreSQL, shared by any number of relays: what one relay acknowledged
//! survives the loss of its machine, and whichever relay takes a batch off the broker can
//! store it, because contiguity per site and epoch is checked in the database.
//!
//! What it owns: the schema and its migrations (schema `backhaul`, applied at open under an
//! advisory lock, so relays starting together migrate once); intake in one transaction per
//! call under a row lock of each site it touches, which stores each batch's new events as one
//! staged row; indexing of staged rows into the queue per ordering key, a site at a time in
//! arrival order, with exact deduplication by a unique (site, event id) key and no window; the
//! queues, which one relay at a time holds under a lease while it delivers a key's head; dead
//! letters, replay, refusals, and a snapshot of the site records for readers that never wait
//! for the database.
//!
//! Why staging: an acknowledgement needs the batch durable and contiguous, not indexed. One
//! row per batch makes intake cost a few statements whatever the batch holds; the per-event
//! rows and indexes are written by whichever relay indexes next, off the agent's path.
//!
//! Why parking: a `$share` group hands a site's consecutive batches to different relays,
//! which commit them in any order. A batch that starts past a gap is kept (parked), not
//! acknowledged; the relay that stores the batch closing the gap joins the parked ones that
//! continue it and acknowledges through them all. Refusing instead would cost the agent a
//! re-send of its whole window for every race.
//!
//! Every transaction takes its locks in one order (sites by name, then queues by key), so
//! relays do not deadlock each other; one that PostgreSQL aborts anyway as a deadlock or a
//! serialisation failure is run again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Condvar, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use backhaul_events::config::Secret;
use backhaul_events::{BatchFrame, BatchRefusal, Epoch, Refusal, StampedEvent, TallyFrame};
use postgres::error::SqlState;
use postgres::{Client, NoTls, Transaction};

use super::{
    Admission, DeadLetter, Head, Outbox, OutboxError, Repeat, SiteRecord, Stored, admit,
    decode_record, now_ms, queue_of,
};
use crate::connector::CommitToken;
use crate::trace::{BatchRecord, EventTrace};

/// The schema's migrations, in order; `schema_version` holds how many were applied.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE backhaul.sites (
    site text PRIMARY KEY,
    epoch text NOT NULL DEFAULT '',
    highest_seq bigint NOT NULL DEFAULT 0,
    last_seen_ms bigint NOT NULL DEFAULT 0,
    events_stored bigint NOT NULL DEFAULT 0,
    events_duplicate bigint NOT NULL DEFAULT 0,
    events_delivered bigint NOT NULL DEFAULT 0,
    events_dead_lettered bigint NOT NULL DEFAULT 0,
    events_discarded bigint NOT NULL DEFAULT 0,
    refusals_numbered bigint NOT NULL DEFAULT 0,
    refusals_unacknowledged bigint NOT NULL DEFAULT 0,
    held_bytes bigint NOT NULL DEFAULT 0
);
CREATE TABLE backhaul.epochs (
    site text NOT NULL,
    epoch text NOT NULL,
    highest bigint NOT NULL,
    PRIMARY KEY (site, epoch)
);
CREATE TABLE backhaul.event_ids (
    site text NOT NULL,
    event_id text NOT NULL,
    PRIMARY KEY (site, event_id)
);
CREATE SEQUENCE backhaul.outbox_seq;
CREATE TABLE backhaul.events (
    outbox_seq bigint PRIMARY KEY DEFAULT nextval('backhaul.outbox_seq'),
    queue bytea NOT NULL,
    site text NOT NULL,
    event_id text NOT NULL,
    record bytea NOT NULL
);
CREATE INDEX events_by_queue ON backhaul.events (queue, outbox_seq);
CREATE INDEX events_by_id ON backhaul.events (site, event_id);
CREATE TABLE backhaul.queues (
    queue bytea PRIMARY KEY,
    waiting bigint NOT NULL,
    lease_owner text,
    lease_until timestamptz
);
CREATE INDEX queues_waiting ON backhaul.queues (queue) WHERE waiting > 0;
CREATE INDEX queues_by_holder ON backhaul.queues (lease_owner) WHERE lease_owner IS NOT NULL;
CREATE TABLE backhaul.dead_letters (
    id bigint PRIMARY KEY,
    site text NOT NULL,
    letter bytea NOT NULL
);
CREATE TABLE backhaul.refusals (
    site text NOT NULL,
    number bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (site, number)
);
CREATE TABLE backhaul.meta (
    key text PRIMARY KEY,
    value bigint NOT NULL
);
"#,
    r#"
CREATE TABLE backhaul.staged (
    id bigserial PRIMARY KEY,
    site text NOT NULL,
    epoch text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    events bigint NOT NULL,
    record bytea NOT NULL,
    parked boolean NOT NULL
);
CREATE INDEX staged_by_site ON backhaul.staged (site, id) WHERE NOT parked;
CREATE INDEX staged_parked ON backhaul.staged (site, epoch, first_seq) WHERE parked;
"#,
    r#"
CREATE TABLE backhaul.batches (
    site text NOT NULL,
    epoch text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    events bigint NOT NULL,
    stored_at_ms bigint NOT NULL,
    PRIMARY KEY (site, epoch, first_seq)
);
CREATE INDEX batches_by_age ON backhaul.batches (stored_at_ms);
CREATE TABLE backhaul.traces (
    site text NOT NULL,
    event_id text NOT NULL,
    finished_ms bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (site, event_id)
);
CREATE INDEX traces_by_age ON backhaul.traces (finished_ms);
"#,
    r#"
CREATE TABLE backhaul.tallies (
    site text PRIMARY KEY,
    at_ms bigint NOT NULL,
    frame bytea NOT NULL
);
"#,
    r#"
CREATE TABLE backhaul.repeats (
    site text NOT NULL,
    epoch text NOT NULL,
    seq bigint NOT NULL,
    stored_at_ms bigint NOT NULL,
    record bytea NOT NULL,
    PRIMARY KEY (site, epoch, seq)
);
CREATE INDEX repeats_by_age ON backhaul.repeats (stored_at_ms);
"#,
];

/// An arbitrary constant naming the migration lock among the database's advisory locks.
const MIGRATION_LOCK: i64 = 0x6261_636b_6861_756c;
const META_CONNECTOR_COMMIT: &str = "connector_commit";
/// How often readers' snapshot of the sites is refreshed from the database.
const REFRESH_EVERY: Duration = Duration::from_millis(500);
/// Transactions aborted by a deadlock or serialisation failure are run again this often.
const RETRIES: usize = 8;
/// How far past what is stored a batch may start and still be parked until the batches
/// before it arrive (a few agent windows); one further on is refused as a gap.
const PARK_SPAN: u64 = 200_000;
/// Events indexed in one transaction, at most one batch more (a few MB of records in memory).
const INDEX_EVENTS: i64 = 8_000;
/// Names the indexing locks among the database's advisory locks (with a hash of the site).
const INDEX_LOCK: i32 = 0x6268_6978;

/// How the PostgreSQL outbox is opened.
#[derive(Clone)]
pub struct PgOptions {
    /// Connection parameters: a URL (`postgresql://user@host:5432/db`) or key=value pairs
    /// (`host=/run/postgresql dbname=backhaul`).
    pub url: String,
    pub password: Option<Secret>,
    /// This relay among those sharing the outbox: the holder of its leases.
    pub relay_id: String,
    /// How long a queue stays with a relay that stops renewing its lease (a relay that died).
    pub lease: Duration,
    pub max_bytes: u64,
    /// Connections this relay keeps open at most.
    pub connections: usize,
    /// Whether the batch that carried each event is recorded for its trace (off when
    /// `outbox.trace_days` is 0).
    pub keep_batches: bool,
}

pub struct PgOutbox {
    config: postgres::Config,
    /// The server and database, for errors and status (never the password).
    server: String,
    relay_id: String,
    lease_secs: f64,
    max_bytes: u64,
    keep_batches: bool,
    idle: Mutex<Vec<Client>>,
    connections: usize,
    open_connections: Mutex<usize>,
    freed: Condvar,
    published: RwLock<Snapshot>,
    /// Nudges the refresher after a write, so readers see it soon.
    nudge: (Mutex<bool>, Condvar),
}

/// A batch's new events as one staged row holds them; the site is the row's.
#[derive(serde::Serialize)]
struct StagedRef<'a> {
    epoch: backhaul_events::Epoch,
    entries: &'a [backhaul_events::BatchEntry],
}

#[derive(serde::Deserialize)]
struct Staged {
    epoch: backhaul_events::Epoch,
    entries: Vec<backhaul_events::BatchEntry>,
}

fn storage<E: std::fmt::Display>(e: E) -> OutboxError {
    OutboxError::Storage(e.to_string())
}

/// Reads a non-negative count (`bigint`) as `u64`.
fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// `u64` as `bigint`; outbox numbers and counts never come near `i64::MAX`.
fn big(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl PgOutbox {
    /// Connects, applies the schema's migrations and starts the readers' snapshot.
    pub fn open(options: PgOptions) -> Result<Arc<PgOutbox>, OutboxError> {
        let mut config: postgres::Config = options.url.parse().map_err(|e| {
            OutboxError::Storage(format!(
                "outbox.url is not a PostgreSQL connection string: {e}"
            ))
        })?;
        if let Some(password) = &options.password {
            config.password(password.expose());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        config.application_name(&format!("backhaul-relay {}", options.relay_id));
        let server = describe(&config);
        let outbox = Arc::new(PgOutbox {
            config,
            server,
            relay_id: options.relay_id,
            lease_secs: options.lease.as_secs_f64(),
            max_bytes: options.max_bytes,
            keep_batches: options.keep_batches,
            idle: Mutex::new(Vec::new()),
            connections: options.connections.max(2),
            open_connections: Mutex::new(0),
            freed: Condvar::new(),
            published: RwLock::new(Snapshot::default()),
            nudge: (Mutex::new(false), Condvar::new()),
        });
        outbox.migrate()?;
        outbox.refresh()?;
        let weak = Arc::downgrade(&outbox);
        std::thread::Builder::new()
            .name("outbox-snapshot".into())
            .spawn(move || refresh_loop(weak))
            .map_err(storage)?;
        Ok(outbox)
    }

    fn error(&self, e: postgres::Error) -> OutboxError {
        let transient = e.is_closed()
            || match e.code() {
                None => true,
                Some(code) => {
                    let class = &code.code()[..2];
                    // Connection exceptions, insufficient resources (a full disk), operator
                    // intervention (shutdown, cannot connect now).
                    matches!(class, "08" | "53" | "57")
                }
            };
        if transient {
            OutboxError::Unavailable {
                server: self.server.clone(),
                reason: e.to_string(),
            }
        } else {
            OutboxError::Storage(format!("{}: {e}", self.server))
        }
    }

    /// A connection of the pool; at most `connections` are open at once.
    fn connection(&self) -> Result<Pooled<'_>, OutboxError> {
        loop {
            if let Some(client) = self.idle.lock().map_err(storage)?.pop() {
                if !client.is_closed() {
                    return Ok(Pooled {
                        outbox: self,
                        client: Some(client),
                    });
                }
                self.closed_one();
                continue;
            }
            let mut open = self.open_connections.lock().map_err(storage)?;
            if *open < self.connections {
                *open += 1;
                drop(open);
                return match self.config.connect(NoTls) {
                    Ok(client) => Ok(Pooled {
                        outbox: self,
                        client: Some(client),
                    }),
                    Err(e) => {
                        self.closed_one();
                        Err(self.error(e))
                    }
                };
            }
            let _unused = self
                .freed
                .wait_timeout(open, Duration::from_millis(100))
                .map_err(storage)?;
        }
    }

    fn closed_one(&self) {
        if let Ok(mut open) = self.open_connections.lock() {
            *open = open.saturating_sub(1);
        }
        self.freed.notify_one();
    }

    /// Runs `work` in a transaction and commits it, again when PostgreSQL aborts it as a
    /// deadlock or a serialisation failure.
    /// The postcard record in the first column of the one row `sql` finds, if any.
    fn one_record<T: serde::de::DeserializeOwned>(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Option<T>, OutboxError> {
        let row = self.transaction(|txn| Ok(txn.query_opt(sql, params)?))?;
        match row {
            Some(row) => {
                let bytes: Vec<u8> = row.get(0);
                postcard::from_bytes(&bytes).map(Some).map_err(storage)
            }
            None => Ok(None),
        }
    }

    fn transaction<T>(
        &self,
        mut work: impl FnMut(&mut Transaction<'_>) -> Result<T, Failure>,
    ) -> Result<T, OutboxError> {
        let mut pooled = self.connection()?;
        let client = pooled.client()?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = (|| {
                let mut txn = client.transaction()?;
                let value = work(&mut txn)?;
                txn.commit()?;
                Ok::<T, Failure>(value)
            })();
            match outcome {
                Ok(value) => {
                    self.nudge();
                    return Ok(value);
                }
                Err(Failure::Db(e))
                    if attempt < RETRIES
                        && matches!(
                            e.code(),
                            Some(&SqlState::T_R_DEADLOCK_DETECTED)
                                | Some(&SqlState::T_R_SERIALIZATION_FAILURE)
                        ) =>
                {
                    std::thread::sleep(Duration::from_millis(5 * attempt as u64));
                }
                Err(Failure::Db(e)) => return Err(self.error(e)),
                Err(Failure::Outbox(e)) => return Err(e),
            }
        }
    }

    fn nudge(&self) {
        if let Ok(mut due) = self.nudge.0.lock() {
            *due = true;
            self.nudge.1.notify_one();
        }
    }

    fn migrate(&self) -> Result<(), OutboxError> {
        let known = MIGRATIONS.len() as i32;
        let applied = self.transaction(|txn| {
            txn.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            txn.batch_execute(
                "CREATE SCHEMA IF NOT EXISTS backhaul;
                 CREATE TABLE IF NOT EXISTS backhaul.schema_version (version integer NOT NULL);",
            )?;
            let version: i32 = txn
                .query_opt("SELECT version FROM backhaul.schema_version", &[])?
                .map(|row| row.get(0))
                .unwrap_or(0);
            if version > known {
                return Ok(Err(version));
            }
            for migration in &MIGRATIONS[version as usize..] {
                txn.batch_execute(migration)?;
            }
            txn.execute("DELETE FROM backhaul.schema_version", &[])?;
            txn.execute(
                "INSERT INTO backhaul.schema_version (version) VALUES ($1)",
                &[&known],
            )?;
            Ok(Ok(version))
        })?;
        match applied {
            Ok(from) if from < known => {
                tracing::info!(server = %self.server, from, to = known, "outbox schema migrated");
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(version) => Err(OutboxError::Storage(format!(
                "the outbox database {} has schema version {version}, newer than this relay's \
                 {known}: run a relay at least as new as the one that last wrote it",
                self.server
            ))),
        }
    }

    /// Reads every site record into the readers' snapshot.
    fn refresh(&self) -> Result<(), OutboxError> {
        let mut pooled = self.connection()?;
        let client = pooled.client()?;
        let rows = client
            .query(
                "SELECT site, epoch, highest_seq, last_seen_ms, events_stored, events_duplicate,
                        events_delivered, events_dead_lettered, refusals_numbered,
                        refusals_unacknowledged, held_bytes, events_discarded
                 FROM backhaul.sites ORDER BY site",
                &[],
            )
            .map_err(|e| self.error(e))?;
        let sites: Vec<SiteRecord> = rows
            .iter()
            .map(|row| SiteRecord {
                site: row.get(0),
                epoch: row.get(1),
                highest_seq: count(row.get(2)),
                last_seen_ms: row.get(3),
                events_stored: count(row.get(4)),
                events_duplicate: count(row.get(5)),
                events_delivered: count(row.get(6)),
                events_dead_lettered: count(row.get(7)),
                refusals_numbered: count(row.get(8)),
                refusals_unacknowledged: count(row.get(9)),
                events_discarded: count(row.get(11)),
            })
            .collect();
        let snapshot = Snapshot {
            held_bytes: rows.iter().map(|row| count(row.get(10))).sum(),
            sites: Arc::new(sites),
        };
        if let Ok(mut published) = self.published.write() {
            *published = snapshot;
        }
        Ok(())
    }

    /// Locks the sites of `names` (creating the ones not seen before), in name order.
    fn lock_sites(
        txn: &mut Transaction<'_>,
        names: &BTreeSet<&str>,
    ) -> Result<BTreeMap<String, SiteRow>, Failure> {
        let names: Vec<&str> = names.iter().copied().collect();
        txn.execute(
            "INSERT INTO backhaul.sites (site) SELECT unnest($1::text[]) ORDER BY 1
             ON CONFLICT (site) DO NOTHING",
            &[&names],
        )?;
        let rows = txn.query(
            "SELECT site, epoch FROM backhaul.sites WHERE site = ANY($1) ORDER BY site FOR UPDATE",
            &[&names],
        )?;
        Ok(rows
            .iter()
            .map(|row| {
                (
                    row.get::<_, String>(0),
                    SiteRow {
                        epoch: row.get(1),
                        ..SiteRow::default()
                    },
                )
            })
            .collect())
    }

    fn store_batch(
        txn: &mut Transaction<'_>,
        batch: &BatchFrame,
        site: &mut SiteRow,
        full: bool,
        keep_batches: bool,
    ) -> Result<Stored, Failure> {
        let epoch = batch.epoch.to_string();
        let known: Option<u64> = txn
            .query_opt(
                "SELECT highest FROM backhaul.epochs WHERE site = $1 AND epoch = $2",
                &[&batch.site, &epoch],
            )?
            .map(|row| count(row.get(0)));
        let mut result = Stored::before(batch, known);
        let from = match admit(batch, known, &site.epoch, full) {
            Admission::StaleEpoch => {
                result.stale_epoch = true;
                return Ok(result);
            }
            Admission::Refused(BatchRefusal::Gap)
                if !full
                    && batch.first_seq
                        <= known.unwrap_or(0).max(batch.acked_through) + PARK_SPAN =>
            {
                // Another relay is most likely storing the batches before this one right
                // now: keep it, acknowledge nothing new, and let whoever closes the gap
                // acknowledge through it.
                site.seen = true;
                site.epoch = epoch.clone();
                site.highest_seq = Some(known.unwrap_or(0));
                Self::park(txn, batch, &epoch, site, keep_batches)?;
                return Ok(result);
            }
            Admission::Refused(refusal) => {
                site.seen = true;
                site.epoch = epoch;
                site.highest_seq = Some(known.unwrap_or(0));
                result.refused = Some(refusal);
                return Ok(result);
            }
            Admission::Take { from } => from,
        };
        if site.epoch != epoch {
            // A new epoch: batches parked in the old one will never continue anything.
            let dropped = txn.query(
                "DELETE FROM backhaul.staged WHERE site = $1 AND parked AND epoch <> $2
                 RETURNING length(record)",
                &[&batch.site, &epoch],
            )?;
            for row in &dropped {
                site.held_bytes -= i64::from(row.get::<_, i32>(0));
            }
        }
        site.seen = true;
        site.epoch = epoch.clone();
        // Events are in sequence order: what is new is the tail past what is stored.
        let skip = batch
            .events
            .iter()
            .take_while(|entry| known.is_some_and(|highest| entry.seq <= highest))
            .count();
        let fresh = &batch.events[skip..];
        result.duplicates += skip as u64;
        if !fresh.is_empty() {
            Self::stage(txn, batch, &epoch, fresh, false, site, keep_batches)?;
            result.stored = fresh.len() as u64;
        }
        let through = Self::unpark(txn, batch, &epoch, from.max(batch.last_seq), site)?;
        txn.execute(
            "INSERT INTO backhaul.epochs (site, epoch, highest) VALUES ($1, $2, $3)
             ON CONFLICT (site, epoch) DO UPDATE SET highest = EXCLUDED.highest",
            &[&batch.site, &epoch, &big(through)],
        )?;
        result.acked_through = through;
        site.highest_seq = Some(through);
        site.stored += result.stored as i64;
        site.duplicates += result.duplicates as i64;
        Ok(result)
    }

    /// Keeps a batch that starts past a gap, unless the same batch is parked already.
    fn park(
        txn: &mut Transaction<'_>,
        batch: &BatchFrame,
        epoch: &str,
        site: &mut SiteRow,
        keep_batches: bool,
    ) -> Result<(), Failure> {
        let first = big(batch.first_seq);
        let last = big(batch.last_seq);
        let parked = txn.query_opt(
            "SELECT 1 FROM backhaul.staged
             WHERE site = $1 AND epoch = $2 AND parked AND first_seq = $3 AND last_seq = $4",
            &[&batch.site, &epoch, &first, &last],
        )?;
        if parked.is_some() {
            return Ok(());
        }
        Self::stage(txn, batch, epoch, &batch.events, true, site, keep_batches)
    }

    /// Stores `entries` of `batch` (its new tail, or all of it when parked) as one row.
    fn stage(
        txn: &mut Transaction<'_>,
        batch: &BatchFrame,
        epoch: &str,
        entries: &[backhaul_events::BatchEntry],
        parked: bool,
        site: &mut SiteRow,
        keep_batches: bool,
    ) -> Result<(), Failure> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let record = postcard::to_stdvec(&StagedRef {
            epoch: batch.epoch,
            entries,
        })
        .map_err(storage)?;
        if keep_batches {
            txn.execute(
                "INSERT INTO backhaul.batches
                 (site, epoch, first_seq, last_seq, events, stored_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
                &[
                    &batch.site,
                    &epoch,
                    &big(batch.first_seq),
                    &big(batch.last_seq),
                    &big(batch.events.len() as u64),
                    &now_ms(),
                ],
            )?;
        }
        txn.execute(
            "INSERT INTO backhaul.staged
                 (site, epoch, first_seq, last_seq, events, record, parked)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &batch.site,
                &epoch,
                &big(first.seq),
                &big(batch.last_seq),
                &big(entries.len() as u64),
                &record,
                &parked,
            ],
        )?;
        site.held_bytes += record.len() as i64;
        Ok(())
    }

    /// The epoch is stored without a gap through `through`: parked batches that now continue
    /// it join the staged ones (after it, in sequence order), without what is stored already.
    /// Returns how far the epoch is stored now.
    fn unpark(
        txn: &mut Transaction<'_>,
        batch: &BatchFrame,
        epoch: &str,
        mut through: u64,
        site: &mut SiteRow,
    ) -> Result<u64, Failure> {
        loop {
            let rows = txn.query(
                "SELECT id, first_seq, last_seq, record FROM backhaul.staged
                 WHERE site = $1 AND epoch = $2 AND parked AND first_seq <= $3
                 ORDER BY first_seq, id",
                &[&batch.site, &epoch, &big(through + 1)],
            )?;
            if rows.is_empty() {
                return Ok(through);
            }
            for row in rows {
                let id: i64 = row.get(0);
                let (first, last) = (count(row.get(1)), count(row.get(2)));
                let record: Vec<u8> = row.get(3);
                site.held_bytes -= record.len() as i64;
                if last <= through {
                    txn.execute("DELETE FROM backhaul.staged WHERE id = $1", &[&id])?;
                    site.duplicates += (last + 1 - first) as i64;
                    continue;
                }
                let mut staged: Staged = postcard::from_bytes(&record).map_err(|e| {
                    OutboxError::Storage(format!("parked batch {id} cannot be decoded: {e}"))
                })?;
                let before = staged.entries.len();
                staged.entries.retain(|entry| entry.seq > through);
                site.duplicates += (before - staged.entries.len()) as i64;
                let record = postcard::to_stdvec(&StagedRef {
                    epoch: staged.epoch,
                    entries: &staged.entries,
                })
                .map_err(storage)?;
                site.held_bytes += record.len() as i64;
                site.stored += staged.entries.len() as i64;
                // A new number puts it after the batch that closed the gap, for the indexer.
                txn.execute(
                    "UPDATE backhaul.staged SET parked = false, record = $2, events = $3,
                         first_seq = $4, id = nextval('backhaul.staged_id_seq')
                     WHERE id = $1",
                    &[
                        &id,
                        &record,
                        &big(staged.entries.len() as u64),
                        &big(staged.entries.first().map_or(last, |e| e.seq)),
                    ],
                )?;
                through = last;
            }
        }
    }

    /// Adds what a transaction changed to its sites' records. Transactions that change queues
    /// write their sites last: every transaction takes queue rows (in key order) before site
    /// rows (in name order), so relays never wait on each other in a circle.
    fn write_sites(
        txn: &mut Transaction<'_>,
        sites: &BTreeMap<String, SiteRow>,
    ) -> Result<(), Failure> {
        let now = now_ms();
        for (name, row) in sites {
            let highest = row.highest_seq.map(big);
            txn.execute(
                "UPDATE backhaul.sites SET
                    epoch = CASE WHEN $4 THEN $2 ELSE epoch END,
                    highest_seq = COALESCE($3, highest_seq),
                    last_seen_ms = CASE WHEN $4 THEN $5 ELSE last_seen_ms END,
                    events_stored = events_stored + $6,
                    events_duplicate = events_duplicate + $7,
                    events_delivered = events_delivered + $8,
                    events_dead_lettered = events_dead_lettered + $9,
                    events_discarded = events_discarded + $13,
                    refusals_numbered = refusals_numbered + $10,
                    refusals_unacknowledged = refusals_unacknowledged + $11,
                    held_bytes = GREATEST(held_bytes + $12, 0)
                 WHERE site = $1",
                &[
                    name,
                    &row.epoch,
                    &highest,
                    &row.seen,
                    &now,
                    &row.stored,
                    &row.duplicates,
                    &row.delivered,
                    &row.dead_lettered,
                    &row.refusals_numbered,
                    &row.refusals_unacknowledged,
                    &row.held_bytes,
                    &row.discarded,
                ],
            )?;
        }
        Ok(())
    }

    /// Indexes staged batches of the sites no other relay is indexing right now: their new
    /// events join their queues in arrival order, each id once per site. Returns how many
    /// events were indexed.
    fn index_staged(&self) -> Result<usize, OutboxError> {
        self.transaction(|txn| {
            let candidates: Vec<String> = txn
                .query(
                    "SELECT DISTINCT site FROM backhaul.staged WHERE NOT parked
                     ORDER BY site LIMIT 256",
                    &[],
                )?
                .iter()
                .map(|row| row.get(0))
                .collect();
            let mut mine = BTreeSet::new();
            for site in &candidates {
                // Two relays indexing one site would interleave its batches in the queues.
                let free: bool = txn
                    .query_one(
                        "SELECT pg_try_advisory_xact_lock($1, hashtext($2))",
                        &[&INDEX_LOCK, site],
                    )?
                    .get(0);
                if free {
                    mine.insert(site.as_str());
                }
            }
            if mine.is_empty() {
                return Ok(0);
            }
            let mut sites: BTreeMap<String, SiteRow> = mine
                .iter()
                .map(|site| (site.to_string(), SiteRow::default()))
                .collect();
            let names: Vec<&str> = mine.iter().copied().collect();
            // Each site's oldest batches, by arrival: a prefix of every site's staged rows.
            let sizes = txn.query(
                "SELECT id, events FROM backhaul.staged WHERE site = ANY($1) AND NOT parked
                 ORDER BY id LIMIT 1000",
                &[&names],
            )?;
            let mut through = 0i64;
            let mut events = 0i64;
            for row in &sizes {
                through = row.get(0);
                events += row.get::<_, i64>(1);
                if events >= INDEX_EVENTS {
                    break;
                }
            }
            let rows = txn.query(
                "DELETE FROM backhaul.staged WHERE site = ANY($1) AND id <= $2 AND NOT parked
                 RETURNING id, site, record",
                &[&names, &through],
            )?;
            let mut rows: Vec<(i64, String, Vec<u8>)> = rows
                .into_iter()
                .map(|row| (row.get(0), row.get(1), row.get(2)))
                .collect();
            rows.sort_by_key(|(id, _, _)| *id);
            let mut stamped = Vec::with_capacity(events.max(0) as usize);
            for (id, site, record) in rows {
                let staged: Staged = postcard::from_bytes(&record).map_err(|e| {
                    OutboxError::Storage(format!("staged batch {id} cannot be decoded: {e}"))
                })?;
                if let Some(row) = sites.get_mut(&site) {
                    row.held_bytes -= record.len() as i64;
                }
                stamped.extend(staged.entries.into_iter().map(|entry| StampedEvent {
                    site: site.clone(),
                    epoch: staged.epoch,
                    seq: entry.seq,
                    received_at_ms: entry.received_at_ms,
                    event: entry.event,
                }));
            }
            let (id_sites, ids): (Vec<&str>, Vec<&str>) = stamped
                .iter()
                .map(|e| (e.site.as_str(), e.event.id.as_str()))
                .unzip();
            let inserted = txn.query(
                "INSERT INTO backhaul.event_ids (site, event_id)
                 SELECT s, i FROM unnest($1::text[], $2::text[]) AS u(s, i)
                 ON CONFLICT DO NOTHING RETURNING site, event_id",
                &[&id_sites, &ids],
            )?;
            let mut new_ids: HashMap<(String, String), usize> = HashMap::new();
            for row in &inserted {
                *new_ids.entry((row.get(0), row.get(1))).or_default() += 1;
            }
            let (mut queues, mut event_sites, mut event_ids, mut records) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut per_queue: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
            let mut repeats = Vec::new();
            for event in &stamped {
                let first = new_ids
                    .get_mut(&(event.site.clone(), event.event.id.clone()))
                    .filter(|n| **n > 0)
                    .map(|n| *n -= 1)
                    .is_some();
                let Some(site) = sites.get_mut(&event.site) else {
                    continue;
                };
                if !first {
                    // Stored once already, under another sequence number (a new epoch, or
                    // an id the agent had forgotten): counted, not delivered twice.
                    site.stored -= 1;
                    site.duplicates += 1;
                    if self.keep_batches {
                        let repeat = Repeat {
                            epoch: event.epoch,
                            seq: event.seq,
                            id: event.event.id.clone(),
                            kind: event.event.kind,
                            received_at_ms: event.received_at_ms,
                        };
                        repeats.push((
                            event.site.as_str(),
                            event.epoch.to_string(),
                            big(event.seq),
                            postcard::to_stdvec(&repeat).map_err(storage)?,
                        ));
                    }
                    continue;
                }
                let queue = queue_of(event);
                let record = postcard::to_stdvec(event).map_err(storage)?;
                site.held_bytes += record.len() as i64;
                *per_queue.entry(queue.clone()).or_default() += 1;
                queues.push(queue);
                event_sites.push(event.site.as_str());
                event_ids.push(event.event.id.as_str());
                records.push(record);
            }
            if !records.is_empty() {
                txn.execute(
                    "INSERT INTO backhaul.events (queue, site, event_id, record)
                     SELECT q, s, i, r FROM unnest($1::bytea[], $2::text[], $3::text[], $4::bytea[])
                         WITH ORDINALITY AS u(q, s, i, r, n)
                     ORDER BY n",
                    &[&queues, &event_sites, &event_ids, &records],
                )?;
                add_waiting(txn, &per_queue)?;
            }
            if !repeats.is_empty() {
                let (mut sites, mut epochs, mut seqs, mut records) =
                    (Vec::new(), Vec::new(), Vec::new(), Vec::new());
                for (site, epoch, seq, record) in repeats {
                    sites.push(site);
                    epochs.push(epoch);
                    seqs.push(seq);
                    records.push(record);
                }
                txn.execute(
                    "INSERT INTO backhaul.repeats (site, epoch, seq, stored_at_ms, record)
                     SELECT s, e, q, $4, r
                     FROM unnest($1::text[], $2::text[], $3::bigint[], $5::bytea[]) AS u(s, e, q, r)
                     ON CONFLICT DO NOTHING",
                    &[&sites, &epochs, &seqs, &now_ms(), &records],
                )?;
            }
            Self::write_sites(txn, &sites)?;
            Ok(stamped.len())
        })
    }

    /// Renews the leases of the queues this relay holds; returns those with events waiting.
    fn renew(&self, txn: &mut Transaction<'_>) -> Result<Vec<Vec<u8>>, Failure> {
        let rows = txn.query(
            "UPDATE backhaul.queues q SET lease_until = now() + make_interval(secs => $2)
             FROM (SELECT queue FROM backhaul.queues WHERE lease_owner = $1
                   ORDER BY queue FOR UPDATE) mine
             WHERE q.queue = mine.queue RETURNING q.queue, q.waiting",
            &[&self.relay_id, &self.lease_secs],
        )?;
        Ok(rows
            .iter()
            .filter(|row| row.get::<_, i64>(1) > 0)
            .map(|row| row.get(0))
            .collect())
    }

    /// Takes up to `wanted` more queues with events waiting: free ones, or ones whose holder
    /// stopped renewing its lease (a relay that died). Rows another relay is changing are
    /// passed over, not waited for.
    fn claim(&self, txn: &mut Transaction<'_>, wanted: usize) -> Result<Vec<Vec<u8>>, Failure> {
        let rows = txn.query(
            "UPDATE backhaul.queues q
             SET lease_owner = $1, lease_until = now() + make_interval(secs => $2)
             FROM (SELECT queue FROM backhaul.queues
                   WHERE waiting > 0
                     AND (lease_owner IS NULL OR lease_until < now())
                   LIMIT $3 FOR UPDATE SKIP LOCKED) free
             WHERE q.queue = free.queue
             RETURNING q.queue",
            &[&self.relay_id, &self.lease_secs, &big(wanted as u64)],
        )?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

/// Adds waiting events to their queues' counts, in key order.
fn add_waiting(
    txn: &mut Transaction<'_>,
    per_queue: &BTreeMap<Vec<u8>, i64>,
) -> Result<(), Failure> {
    let keys: Vec<&[u8]> = per_queue.keys().map(Vec::as_slice).collect();
    let counts: Vec<i64> = per_queue.values().copied().collect();
    txn.execute(
        "INSERT INTO backhaul.queues (queue, waiting)
         SELECT q, n FROM unnest($1::bytea[], $2::bigint[]) AS u(q, n) ORDER BY q
         ON CONFLICT (queue) DO UPDATE SET waiting = backhaul.queues.waiting + EXCLUDED.waiting",
        &[&keys, &counts],
    )?;
    Ok(())
}

/// Takes events out of their queues' counts, in key order, and frees the queues: their heads
/// are done, so whichever relay comes next may take them.
fn take_waiting(
    txn: &mut Transaction<'_>,
    per_queue: &BTreeMap<Vec<u8>, i64>,
) -> Result<(), Failure> {
    if per_queue.is_empty() {
        return Ok(());
    }
    let keys: Vec<&[u8]> = per_queue.keys().map(Vec::as_slice).collect();
    let counts: Vec<i64> = per_queue.values().copied().collect();
    txn.execute(
        "UPDATE backhaul.queues q
         SET waiting = GREATEST(q.waiting - u.n, 0), lease_owner = NULL, lease_until = NULL
         FROM (SELECT * FROM unnest($1::bytea[], $2::bigint[]) AS t(q, n) ORDER BY q) u
         WHERE q.queue = u.q",
        &[&keys, &counts],
    )?;
    txn.execute(
        "DELETE FROM backhaul.queues WHERE queue = ANY($1) AND waiting = 0",
        &[&keys],
    )?;
    Ok(())
}

/// Why a transaction's work failed: the database, or something of ours (an event that
/// cannot be encoded, a record that cannot be decoded).
enum Failure {
    Db(postgres::Error),
    Outbox(OutboxError),
}

impl From<postgres::Error> for Failure {
    fn from(e: postgres::Error) -> Failure {
        Failure::Db(e)
    }
}

impl From<OutboxError> for Failure {
    fn from(e: OutboxError) -> Failure {
        Failure::Outbox(e)
    }
}

/// What readers see of the database, refreshed in the background.
#[derive(Default)]
struct Snapshot {
    sites: Arc<Vec<SiteRecord>>,
    held_bytes: u64,
}

/// What a transaction changes in one site's record, added to it when written.
#[derive(Debug, Default)]
struct SiteRow {
    epoch: String,
    /// Set when a batch of the site was taken (not a replay of an old epoch).
    seen: bool,
    highest_seq: Option<u64>,
    stored: i64,
    duplicates: i64,
    delivered: i64,
    dead_lettered: i64,
    discarded: i64,
    refusals_numbered: i64,
    refusals_unacknowledged: i64,
    held_bytes: i64,
}

/// A connection borrowed from the pool, given back when dropped (unless it broke).
struct Pooled<'a> {
    outbox: &'a PgOutbox,
    client: Option<Client>,
}

impl Pooled<'_> {
    fn client(&mut self) -> Result<&mut Client, OutboxError> {
        self.client
            .as_mut()
            .ok_or_else(|| OutboxError::Storage("a pooled connection was given back".into()))
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if client.is_closed() {
            self.outbox.closed_one();
            return;
        }
        if let Ok(mut idle) = self.outbox.idle.lock() {
            idle.push(client);
        }
        self.outbox.freed.notify_one();
    }
}

fn refresh_loop(outbox: Weak<PgOutbox>) {
    let mut failing_since: Option<Instant> = None;
    loop {
        let Some(outbox) = outbox.upgrade() else {
            return;
        };
        match outbox.refresh() {
            Ok(()) => failing_since = None,
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!(error = %e, "the outbox's site records cannot be read; status shows the last ones read");
                    failing_since = Some(Instant::now());
                }
            }
        }
        let (due, wake) = (&outbox.nudge.0, &outbox.nudge.1);
        let Ok(mut pending) = due.lock() else {
            return;
        };
        if !*pending {
            pending = match wake.wait_timeout(pending, REFRESH_EVERY) {
                Ok((guard, _)) => guard,
                Err(_) => return,
            };
        }
        *pending = false;
    }
}

/// `host:port/dbname` of a connection configuration, without user or password.
fn describe(config: &postgres::Config) -> String {
    use postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(host)) => host.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("postgresql {host}:{port}/{db}")
}

impl PgOutbox {
    /// Reads dead letters (`letter` is the JSON of [`DeadLetter`]) with `id > after`.
    fn read_letters(
        txn: &mut Transaction<'_>,
        ids: Option<&[u64]>,
        lock: bool,
    ) -> Result<Vec<DeadLetter>, Failure> {
        let rows = match ids {
            Some(ids) => {
                let ids: Vec<i64> = ids.iter().map(|id| big(*id)).collect();
                let sql = if lock {
                    "SELECT id, letter FROM backhaul.dead_letters WHERE id = ANY($1)
                     ORDER BY id FOR UPDATE"
                } else {
                    "SELECT id, letter FROM backhaul.dead_letters WHERE id = ANY($1) ORDER BY id"
                };
                txn.query(sql, &[&ids])?
            }
            None => txn.query(
                "SELECT id, letter FROM backhaul.dead_letters ORDER BY id FOR UPDATE",
                &[],
            )?,
        };
        rows.iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(1);
                serde_json::from_slice(&bytes).map_err(|e| {
                    Failure::Outbox(OutboxError::Storage(format!(
                        "dead letter {} cannot be decoded: {e}",
                        row.get::<_, i64>(0)
                    )))
                })
            })
            .collect()
    }

    fn take_dead_letters(
        &self,
        ids: Option<&[u64]>,
        requeue: bool,
    ) -> Result<Vec<u64>, OutboxError> {
        self.transaction(|txn| {
            let letters = Self::read_letters(txn, ids, true)?;
            if letters.is_empty() {
                return Ok(Vec::new());
            }
            let mut sites: BTreeMap<String, SiteRow> = letters
                .iter()
                .map(|l| (l.event.site.clone(), SiteRow::default()))
                .collect();
            let taken: Vec<i64> = letters.iter().map(|l| big(l.id)).collect();
            let freed = txn.query(
                "DELETE FROM backhaul.dead_letters WHERE id = ANY($1)
                 RETURNING site, length(letter)",
                &[&taken],
            )?;
            for row in &freed {
                if let Some(site) = sites.get_mut(&row.get::<_, String>(0)) {
                    site.held_bytes -= i64::from(row.get::<_, i32>(1));
                    site.dead_lettered -= 1;
                    if !requeue {
                        site.discarded += 1;
                    }
                }
            }
            if requeue {
                let mut per_queue: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
                for letter in &letters {
                    let queue = queue_of(&letter.event);
                    let record = postcard::to_stdvec(&letter.event).map_err(storage)?;
                    if let Some(site) = sites.get_mut(&letter.event.site) {
                        site.held_bytes += record.len() as i64;
                    }
                    txn.execute(
                        "INSERT INTO backhaul.events (queue, site, event_id, record)
                         VALUES ($1, $2, $3, $4)",
                        &[&queue, &letter.event.site, &letter.event.event.id, &record],
                    )?;
                    *per_queue.entry(queue).or_default() += 1;
                }
                add_waiting(txn, &per_queue)?;
            }
            Self::write_sites(txn, &sites)?;
            Ok(letters.iter().map(|l| l.id).collect())
        })
    }
}

impl Outbox for PgOutbox {
    fn site_traces(
        &self,
        site: &str,
        after_id: &str,
        limit: usize,
    ) -> Result<Vec<EventTrace>, OutboxError> {
        let rows = self.transaction(|txn| {
            Ok(txn.query(
                "SELECT record FROM backhaul.traces WHERE site = $1 AND event_id > $2
                 ORDER BY event_id LIMIT $3",
                &[&site, &after_id, &big(limit as u64)],
            )?)
        })?;
        rows.iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(0);
                postcard::from_bytes(&bytes).map_err(storage)
            })
            .collect()
    }

    fn record_traces(
        &self,
        traces: &[EventTrace],
        forget_before_ms: i64,
    ) -> Result<(), OutboxError> {
        self.transaction(|txn| {
            for trace in traces {
                let site = &trace.event.site;
                let id = &trace.event.event.id;
                let mut trace = trace.clone();
                let earlier = txn.query_opt(
                    "SELECT record FROM backhaul.traces WHERE site = $1 AND event_id = $2
                     FOR UPDATE",
                    &[site, id],
                )?;
                if let Some(row) = earlier {
                    let bytes: Vec<u8> = row.get(0);
                    if let Ok(earlier) = postcard::from_bytes::<EventTrace>(&bytes) {
                        trace.merge_after(earlier);
                    }
                }
                let record = postcard::to_stdvec(&trace).map_err(storage)?;
                txn.execute(
                    "INSERT INTO backhaul.traces (site, event_id, finished_ms, record)
                     VALUES ($1, $2, $3, $4)
                     ON CONFLICT (site, event_id)
                     DO UPDATE SET finished_ms = EXCLUDED.finished_ms, record = EXCLUDED.record",
                    &[site, id, &trace.finished_at_ms, &record],
                )?;
            }
            // A bounded bite per call, so a lowered retention never holds up delivery.
            txn.execute(
                "DELETE FROM backhaul.traces WHERE ctid IN (SELECT ctid FROM backhaul.traces
                 WHERE finished_ms < $1 LIMIT 10000)",
                &[&forget_before_ms],
            )?;
            txn.execute(
                "DELETE FROM backhaul.batches WHERE ctid IN (SELECT ctid FROM backhaul.batches
                 WHERE stored_at_ms < $1 LIMIT 10000)",
                &[&forget_before_ms],
            )?;
            txn.execute(
                "DELETE FROM backhaul.repeats WHERE ctid IN (SELECT ctid FROM backhaul.repeats
                 WHERE stored_at_ms < $1 LIMIT 10000)",
                &[&forget_before_ms],
            )?;
            Ok(())
        })
    }

    fn trace(&self, site: &str, id: &str) -> Result<Option<EventTrace>, OutboxError> {
        self.one_record(
            "SELECT record FROM backhaul.traces WHERE site = $1 AND event_id = $2",
            &[&site, &id],
        )
    }

    fn site_repeats(&self, site: &str, limit: usize) -> Result<Vec<Repeat>, OutboxError> {
        let rows = self.transaction(|txn| {
            Ok(txn.query(
                "SELECT record FROM backhaul.repeats WHERE site = $1 ORDER BY epoch, seq LIMIT $2",
                &[&site, &big(limit as u64)],
            )?)
        })?;
        rows.iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(0);
                postcard::from_bytes(&bytes).map_err(storage)
            })
            .collect()
    }

    fn record_tallies(&self, tallies: &[TallyFrame]) -> Result<(), OutboxError> {
        let frames = tallies
            .iter()
            .map(|tally| postcard::to_allocvec(tally).map(|frame| (tally, frame)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(storage)?;
        self.transaction(|txn| {
            for (tally, frame) in &frames {
                txn.execute(
                    "INSERT INTO backhaul.tallies (site, at_ms, frame) VALUES ($1, $2, $3)
                     ON CONFLICT (site) DO UPDATE SET at_ms = EXCLUDED.at_ms,
                     frame = EXCLUDED.frame",
                    &[&tally.site, &tally.at_ms, frame],
                )?;
            }
            Ok(())
        })
    }

    fn tally(&self, site: &str) -> Result<Option<TallyFrame>, OutboxError> {
        self.one_record(
            "SELECT frame FROM backhaul.tallies WHERE site = $1",
            &[&site],
        )
    }

    fn batch_of(
        &self,
        site: &str,
        epoch: Epoch,
        seq: u64,
    ) -> Result<Option<BatchRecord>, OutboxError> {
        let epoch = epoch.to_string();
        let row = self.transaction(|txn| {
            Ok(txn.query_opt(
                "SELECT first_seq, last_seq, events, stored_at_ms FROM backhaul.batches
                 WHERE site = $1 AND epoch = $2 AND first_seq <= $3 AND last_seq >= $3
                 ORDER BY first_seq DESC LIMIT 1",
                &[&site, &epoch, &big(seq)],
            )?)
        })?;
        Ok(row.map(|row| BatchRecord {
            first_seq: count(row.get(0)),
            last_seq: count(row.get(1)),
            events: count(row.get(2)),
            stored_at_ms: row.get(3),
        }))
    }

    fn location(&self) -> String {
        self.server.clone()
    }

    fn store(&self, batches: &[BatchFrame]) -> Result<Vec<Stored>, OutboxError> {
        let full = self.held_bytes() >= self.max_bytes;
        self.transaction(|txn| {
            let names: BTreeSet<&str> = batches.iter().map(|b| b.site.as_str()).collect();
            let mut sites = Self::lock_sites(txn, &names)?;
            let mut results = Vec::with_capacity(batches.len());
            for batch in batches {
                let site = sites.entry(batch.site.clone()).or_default();
                results.push(Self::store_batch(
                    txn,
                    batch,
                    site,
                    full,
                    self.keep_batches,
                )?);
            }
            Self::write_sites(txn, &sites)?;
            Ok(results)
        })
    }

    fn heads(&self, limit: usize, skip: &dyn Fn(&[u8]) -> bool) -> Result<Vec<Head>, OutboxError> {
        self.index_staged()?;
        let rows = self.transaction(|txn| {
            let held = self.renew(txn)?;
            let mut free: Vec<Vec<u8>> = held.into_iter().filter(|q| !skip(q)).collect();
            if free.len() < limit {
                free.extend(self.claim(txn, limit - free.len())?);
            }
            if free.is_empty() {
                return Ok(Vec::new());
            }
            Ok(txn.query(
                "SELECT DISTINCT ON (queue) queue, outbox_seq, record
                 FROM backhaul.events WHERE queue = ANY($1)
                 ORDER BY queue, outbox_seq",
                &[&free],
            )?)
        })?;
        let mut heads = Vec::with_capacity(rows.len());
        for row in rows {
            let queue: Vec<u8> = row.get(0);
            let outbox_seq = count(row.get(1));
            let record: Vec<u8> = row.get(2);
            heads.push(Head {
                queue,
                outbox_seq,
                event: decode_record(outbox_seq, &record)?,
            });
        }
        heads.sort_by_key(|h| h.outbox_seq);
        heads.truncate(limit);
        Ok(heads)
    }

    fn complete(
        &self,
        posted: &[(u64, StampedEvent)],
        dead: &[(u64, StampedEvent, String, u32)],
        commit: Option<CommitToken>,
    ) -> Result<(), OutboxError> {
        self.transaction(|txn| {
            let mut sites: BTreeMap<String, SiteRow> = posted
                .iter()
                .map(|(_, e)| e.site.clone())
                .chain(dead.iter().map(|(_, e, _, _)| e.site.clone()))
                .map(|site| (site, SiteRow::default()))
                .collect();
            let seqs: Vec<i64> = posted
                .iter()
                .map(|(seq, _)| big(*seq))
                .chain(dead.iter().map(|(seq, _, _, _)| big(*seq)))
                .collect();
            let removed = txn.query(
                "DELETE FROM backhaul.events WHERE outbox_seq = ANY($1)
                 RETURNING outbox_seq, length(record)",
                &[&seqs],
            )?;
            let removed: HashMap<u64, i64> = removed
                .iter()
                .map(|row| (count(row.get(0)), i64::from(row.get::<_, i32>(1))))
                .collect();
            let mut per_queue: BTreeMap<Vec<u8>, i64> = BTreeMap::new();
            for (outbox_seq, event) in posted {
                let Some(bytes) = removed.get(outbox_seq) else {
                    continue;
                };
                *per_queue.entry(queue_of(event)).or_default() += 1;
                if let Some(site) = sites.get_mut(&event.site) {
                    site.held_bytes -= bytes;
                    site.delivered += 1;
                }
            }
            let dead: Vec<_> = dead
                .iter()
                .filter_map(|entry| removed.get(&entry.0).map(|bytes| (entry, *bytes)))
                .collect();
            for ((_, event, _, _), _) in &dead {
                *per_queue.entry(queue_of(event)).or_default() += 1;
            }
            take_waiting(txn, &per_queue)?;
            let names: BTreeSet<&str> = sites.keys().map(String::as_str).collect();
            if !names.is_empty() {
                Self::lock_sites(txn, &names)?;
            }
            let at_ms = now_ms();
            for ((outbox_seq, event, reason, attempts), bytes) in dead {
                let letter = DeadLetter {
                    id: *outbox_seq,
                    reason: reason.clone(),
                    at_ms,
                    attempts: *attempts,
                    event: event.clone(),
                };
                let json = serde_json::to_vec(&letter).map_err(storage)?;
                txn.execute(
                    "INSERT INTO backhaul.dead_letters (id, site, letter) VALUES ($1, $2, $3)
                     ON CONFLICT (id) DO NOTHING",
                    &[&big(*outbox_seq), &event.site, &json],
                )?;
                let number: i64 = txn
                    .query_one(
                        "UPDATE backhaul.sites SET refusals_numbered = refusals_numbered + 1
                         WHERE site = $1 RETURNING refusals_numbered",
                        &[&event.site],
                    )?
                    .get(0);
                let refusal = Refusal {
                    number: count(number),
                    seq: event.seq,
                    id: event.event.id.clone(),
                    reason: reason.clone(),
                    at_ms,
                };
                let bytes_refusal = postcard::to_stdvec(&refusal).map_err(storage)?;
                txn.execute(
                    "INSERT INTO backhaul.refusals (site, number, record) VALUES ($1, $2, $3)",
                    &[&event.site, &number, &bytes_refusal],
                )?;
                if let Some(site) = sites.get_mut(&event.site) {
                    site.held_bytes += json.len() as i64 - bytes;
                    site.dead_lettered += 1;
                    site.refusals_unacknowledged += 1;
                }
            }
            if let Some(CommitToken(token)) = commit {
                txn.execute(
                    "INSERT INTO backhaul.meta (key, value) VALUES ($1, $2)
                     ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                    &[&META_CONNECTOR_COMMIT, &big(token)],
                )?;
            }
            Self::write_sites(txn, &sites)?;
            Ok(())
        })
    }

    fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, StampedEvent)>, OutboxError> {
        self.index_staged()?;
        let rows = self.transaction(|txn| {
            Ok(txn.query(
                "SELECT outbox_seq, record FROM backhaul.events WHERE outbox_seq > $1
                 ORDER BY outbox_seq LIMIT $2",
                &[&big(after), &big(limit as u64)],
            )?)
        })?;
        rows.iter()
            .map(|row| {
                let seq = count(row.get(0));
                let record: Vec<u8> = row.get(1);
                Ok((seq, decode_record(seq, &record)?))
            })
            .collect()
    }

    fn committed_token(&self) -> Result<Option<CommitToken>, OutboxError> {
        let row = self.transaction(|txn| {
            Ok(txn.query_opt(
                "SELECT value FROM backhaul.meta WHERE key = $1",
                &[&META_CONNECTOR_COMMIT],
            )?)
        })?;
        Ok(row.map(|row| CommitToken(count(row.get(0)))))
    }

    fn find_pending(
        &self,
        site: &str,
        id: &str,
    ) -> Result<Option<(u64, StampedEvent)>, OutboxError> {
        let row = self.transaction(|txn| {
            Ok(txn.query_opt(
                "SELECT outbox_seq, record FROM backhaul.events
                 WHERE site = $1 AND event_id = $2 ORDER BY outbox_seq LIMIT 1",
                &[&site, &id],
            )?)
        })?;
        match row {
            Some(row) => {
                let seq = count(row.get(0));
                let record: Vec<u8> = row.get(1);
                Ok(Some((seq, decode_record(seq, &record)?)))
            }
            None => Ok(None),
        }
    }

    fn dead_letters(&self, after: u64, limit: usize) -> Result<Vec<DeadLetter>, OutboxError> {
        let rows = self.transaction(|txn| {
            Ok(txn.query(
                "SELECT letter FROM backhaul.dead_letters WHERE id > $1 ORDER BY id LIMIT $2",
                &[&big(after), &big(limit as u64)],
            )?)
        })?;
        rows.iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(0);
                serde_json::from_slice(&bytes).map_err(storage)
            })
            .collect()
    }

    fn replay(&self, ids: Option<&[u64]>) -> Result<Vec<u64>, OutboxError> {
        self.take_dead_letters(ids, true)
    }

    fn discard(&self, ids: &[u64]) -> Result<Vec<u64>, OutboxError> {
        self.take_dead_letters(Some(ids), false)
    }

    fn refusals(&self, site: &str, limit: usize) -> Result<Vec<Refusal>, OutboxError> {
        let rows = self.transaction(|txn| {
            Ok(txn.query(
                "SELECT record FROM backhaul.refusals WHERE site = $1 ORDER BY number LIMIT $2",
                &[&site, &big(limit as u64)],
            )?)
        })?;
        rows.iter()
            .map(|row| {
                let bytes: Vec<u8> = row.get(0);
                postcard::from_bytes(&bytes).map_err(storage)
            })
            .collect()
    }

    fn acknowledge_refusals(&self, site: &str, through: u64) -> Result<u64, OutboxError> {
        self.transaction(|txn| {
            Self::lock_sites(txn, &BTreeSet::from([site]))?;
            let forgotten = txn.execute(
                "DELETE FROM backhaul.refusals WHERE site = $1 AND number <= $2",
                &[&site, &big(through)],
            )?;
            txn.execute(
                "UPDATE backhaul.sites SET refusals_unacknowledged =
                     GREATEST(refusals_unacknowledged - $2, 0) WHERE site = $1",
                &[&site, &(forgotten as i64)],
            )?;
            Ok(forgotten)
        })
    }

    fn sites(&self) -> Vec<SiteRecord> {
        self.published
            .read()
            .map(|p| p.sites.as_ref().clone())
            .unwrap_or_default()
    }

    fn held_bytes(&self) -> u64 {
        self.published.read().map(|p| p.held_bytes).unwrap_or(0)
    }

    fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn depth(&self) -> u64 {
        self.published
            .read()
            .map(|p| p.sites.iter().map(SiteRecord::outbox_depth).sum())
            .unwrap_or(0)
    }

    fn dead_letter_count(&self) -> u64 {
        self.published
            .read()
            .map(|p| p.sites.iter().map(|s| s.events_dead_lettered).sum())
            .unwrap_or(0)
    }

    fn release(&self) -> Result<(), OutboxError> {
        self.transaction(|txn| {
            txn.execute(
                "UPDATE backhaul.queues SET lease_owner = NULL, lease_until = NULL
                 WHERE lease_owner = $1",
                &[&self.relay_id],
            )?;
            Ok(())
        })
    }
}
