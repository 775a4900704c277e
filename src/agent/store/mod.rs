//! The SQLite ring buffer: the schema ([`schema`]), the one writer thread
//! that owns the write connection ([`writer`]), and the read-only queries
//! behind the local API ([`read`]).
//!
//! Invariant: this is the only module of the agent that runs SQL. The ingest
//! path hands rows to the writer over a bounded channel and never waits on
//! SQLite; readers use their own read-only connections (WAL) and never block
//! the writer.

pub mod artifacts;
pub mod duration;
mod insert;
pub mod journal;
pub mod marks;
pub mod read;
pub mod schema;
pub mod sync;
pub mod writer;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::agent::record::Trusted;
use crate::wire::Level;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("database {path} is unreadable: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(
        "database {path} has schema version {found}, newer than this logbookd understands ({supported}); \
         upgrade logbookd or move the file away (it was left untouched)"
    )]
    Newer {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// One record on its way to the writer, already in its stored form: the
/// connection task serializes metadata once, so the writer only binds.
#[derive(Debug, Clone)]
pub struct Row {
    pub timestamp_ns: i64,
    pub level: Level,
    pub module: String,
    pub message: String,
    /// JSON object text, or empty when there is no metadata.
    pub metadata: String,
    pub trusted: Arc<Trusted>,
    /// Events the client says it dropped before this record (the tracing
    /// layer's `logbook_dropped`), counted as a gap.
    pub client_dropped: u64,
    /// The mark this record asks for (its `event` field), stored with it
    /// in the session it joins.
    pub mark: Option<Box<crate::agent::marks::MarkSpec>>,
}

impl Row {
    /// Rough size, for bounding transactions by bytes.
    pub fn approx_bytes(&self) -> usize {
        self.module.len() + self.message.len() + self.metadata.len() + 48
    }
}

/// Counters shared by the ingest listeners, the writer and the API. Plain
/// atomics: the ingest path only ever increments.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// `accepted` per [`crate::agent::ingest::PROTOCOLS`] entry.
    pub accepted_by: [AtomicU64; 4],
    pub truncated: AtomicU64,
    /// Per [`crate::agent::ingest::json::BadRecord`] reason, in `ALL` order.
    pub bad: [AtomicU64; 3],
    /// Per [`crate::agent::ingest::FORMAT_BAD_REASONS`] (syslog and Forward
    /// input the listeners refused).
    pub bad_formats: [AtomicU64; 5],
    /// Records a listener could not queue (the pipeline was full).
    pub refused: AtomicU64,
    pub connections: AtomicU64,
    pub connections_open: AtomicI64,
    pub committed: AtomicU64,
    /// Records SQLite refused to store even after the writer made room and
    /// tried again (each is also counted in a `disk_full` or
    /// `write_failed` gap).
    pub write_failed: AtomicU64,
    /// Marks refused (an invalid `event` field, or a session's limit).
    pub marks_refused: AtomicU64,
    /// The last commit failed for want of space (cleared by the next one
    /// that goes through).
    pub disk_full: AtomicBool,
    /// Times the database went bad while the agent ran and was moved aside.
    pub quarantined: AtomicU64,
    /// Where the last bad database was moved to.
    pub quarantined_to: Mutex<Option<PathBuf>>,
    pub commits: AtomicU64,
    /// Seq blocks reserved (each one synced commit; see
    /// `writer::Writer::seq_reserved`).
    pub seq_reservations: AtomicU64,
    /// Records in the database (committed minus evicted).
    pub records_stored: AtomicI64,
    pub records_synced: AtomicI64,
    pub evicted_synced: AtomicU64,
    pub evicted_unsynced: AtomicU64,
    /// Bumped by the writer after each commit that deleted records, and
    /// when it replaces the database. The uploader reads it before it
    /// reads a batch: while it has not moved, every record of that batch
    /// is still stored, and an acknowledgement is marked without counting
    /// rows (`sync::mark_records`).
    pub deletions: AtomicU64,
    /// Bytes of `agent.db` plus its WAL after the last commit.
    pub disk_bytes: AtomicU64,
    /// Bumped by the writer on every loop turn, so the watchdog can tell a
    /// live writer from a stuck one.
    pub writer_heartbeat: AtomicU64,
    pub last_seq: AtomicI64,
    /// Woken after every commit, so the uploader is driven by new input as
    /// well as by its timer.
    pub committed_notify: tokio::sync::Notify,
    /// When the last committed transaction that stored records began (its
    /// first message reached the writer): how long the newest records the
    /// uploader finds have waited, for `sync.linger`.
    pub records_began: Mutex<Option<std::time::Instant>>,
    /// Woken after a session opens, ends or changes, so the artifact
    /// watcher refreshes the directories it watches then, not by polling.
    pub sessions_changed: tokio::sync::Notify,
    /// The last committed seq, sent after every commit (also those that
    /// only change a session), so each live follow of the local API wakes
    /// and reads what is new; the writer never waits on its receivers.
    pub committed_seq: tokio::sync::watch::Sender<u64>,
    /// Row batches the writer has stored, freed by the ingest threads.
    pub spent: Spent,
}

/// Row batches the writer has stored, handed back to be freed by the
/// ingest threads that allocated them. glibc returns a freed block to the
/// arena of the thread that allocated it, under that arena's lock: a
/// writer freeing every row itself waits on the listeners' allocations
/// (`perf` found three quarters of the writer's sleeps on that lock). The
/// writer is the pipeline's one serial stage, so its time is the one that
/// counts. Bounded: past [`SPENT_MAX`] batches, and when ingest is idle,
/// the writer frees them itself.
#[derive(Debug, Default)]
pub struct Spent(Mutex<Vec<Vec<Row>>>);

/// Batches [`Spent`] holds at most (each at most one pipeline message).
/// The writer hands back a transaction's batches after it commits (it keeps
/// them until then, to write them again if the commit fails), and a
/// transaction holds a few dozen messages of a busy pipeline.
pub const SPENT_MAX: usize = 128;

impl Spent {
    /// The writer is done with `rows`.
    pub fn put(&self, rows: Vec<Row>) {
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() < SPENT_MAX {
            held.push(rows);
        } else {
            drop(held);
            drop(rows);
        }
    }

    /// Frees every batch held, unless another thread is at it.
    pub fn free(&self) {
        let batches = match self.0.try_lock() {
            Ok(mut held) => std::mem::take(&mut *held),
            Err(_) => return,
        };
        drop(batches);
    }

    /// Batches held now.
    pub fn batches(&self) -> usize {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Stats {
    pub fn get(a: &AtomicU64) -> u64 {
        a.load(Ordering::Relaxed)
    }

    /// Called by the writer after each commit: wakes every live follow.
    pub fn committed(&self) {
        self.committed_seq
            .send_replace(self.last_seq.load(Ordering::Relaxed).max(0) as u64);
    }
}

/// Current time, Unix nanoseconds.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// `CLOCK_BOOTTIME` in nanoseconds: monotonic, counts suspend, restarts at
/// boot (so it is only compared within one boot id).
pub fn boottime_ns() -> i64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// RFC 3339 with nanoseconds, UTC.
pub fn rfc3339(ns: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns as i128)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}
