//! The writer: one dedicated thread owns the write connection, drains the
//! bounded channel and commits rows in transactions bounded by count, bytes
//! and time. Its parts: [`sessions`] (open, close, tag, and the boot-id rule
//! at start), [`bound`] (the size bound, eviction and gap counting) and
//! [`checkpoint`] (WAL checkpoints, mostly on a thread of their own) and
//! [`fault`] (a full disk, a database that goes bad while it runs).
//!
//! Invariant: the only writer of `agent.db`'s content (the checkpointer
//! only copies committed pages). Every reply (flush, session command) is
//! sent after the transaction holding its effect has committed. The rows of
//! the open transaction stay in hand until it commits: each record received
//! is committed or counted in a gap, never lost with a failed commit.

pub(super) mod bound;
mod checkpoint;
mod fault;
#[cfg(test)]
mod model;
mod pins;
mod sessions;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::insert::WriteConn;
use super::read::ViewCtx;
use super::{schema, Row, Stats, StoreError};
use crate::agent::types::{OpenSession, SessionError, SessionView, Target};
use crate::wire::{gap_reason, Level};

/// What the writer is asked to do.
pub enum Msg {
    Rows(Vec<Row>),
    /// Records from the systemd journal and the cursor of the last entry
    /// read (maybe filtered out), committed together.
    Journal(Vec<Row>, String),
    /// Commit everything queued before this; reply with the last seq.
    Flush(oneshot::Sender<u64>),
    Session(
        SessionCmd,
        oneshot::Sender<Result<SessionView, SessionError>>,
    ),
    /// The hub acknowledged a batch: records, session revisions and gap
    /// counters; replies, once committed, with the number of records newly
    /// marked, or with why it could not be recorded (then nothing of it
    /// was, and the uploader must read those records as pending again).
    Acked(super::sync::Acked, SyncReply),
    /// The hub refused a batch for good: count its records as a `rejected`
    /// gap and never send them again; replies like `Acked`.
    SetAside(super::sync::SetAside, SyncReply),
    /// Commit what is queued before this and stop, even if some sender is
    /// still alive (a connection that would not finish).
    Stop,
    /// A mark from the local API, in the active session; replies once it
    /// is committed.
    Mark(
        crate::agent::marks::MarkSpec,
        oneshot::Sender<Result<i64, SessionError>>,
    ),
    /// A change to artifact upload state; replies once it is committed.
    Artifact(
        super::artifacts::ArtifactCmd,
        oneshot::Sender<Result<(), String>>,
    ),
}

/// The writer's answer to an acknowledgement or a set-aside.
pub type SyncReply = oneshot::Sender<Result<u64, String>>;

pub enum SessionCmd {
    Open(OpenSession),
    Stop {
        target: Target,
        failed: bool,
        error: Option<String>,
    },
    Tag {
        target: Target,
        tag: String,
    },
    Untag {
        target: Target,
        tag: String,
    },
}

/// Everything the writer needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    pub db_path: PathBuf,
    pub state_dir: PathBuf,
    pub synchronous_full: bool,
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    /// Most record bytes marks may pin (`buffer.pinned_max`).
    pub pinned_max: u64,
    pub commit_interval: Duration,
    pub commit_records: usize,
    /// How often an idle writer turns anyway: to prove progress to the
    /// watchdog, check the file's header and keep the disk bound
    /// (`agent::idle_turn`).
    pub idle_turn: Duration,
    pub view: ViewCtx,
}

pub struct Writer {
    conn: WriteConn,
    cfg: WriterConfig,
    stats: Arc<Stats>,
    /// The active session: (pk, id).
    current: Option<(i64, Uuid)>,
    /// Log counts of sessions not yet written to their row.
    log_counts: HashMap<i64, u64>,
    /// WAL size that triggers a truncating checkpoint.
    wal_limit: u64,
    /// Most record bytes in one transaction, so one commit cannot blow the
    /// WAL past the bound.
    tx_bytes: usize,
    /// The seq the next record gets. Persisted in `meta` with every commit,
    /// so it never goes back, even when the table empties.
    next_seq: i64,
    /// Every seq below this is covered by a reservation on stable storage
    /// (`meta.seq_reserved`, committed synced): after a power cut the
    /// counter starts here, never below a seq the hub may hold (README
    /// "After a power cut"). 0 until the open reserves.
    seq_reserved: i64,
    /// A [`Msg::Stop`] arrived.
    stopping: bool,
    /// Replies to sync acknowledgements, sent once their commit is done (so
    /// the uploader never reads its own acknowledged work as pending).
    sync_replies: Vec<(SyncReply, u64)>,
    /// Wakes the checkpointer thread (see [`checkpoint::checkpointer`]),
    /// joined when the writer stops; `None` until [`Writer::spawn`], and in
    /// tests.
    checkpoints: Option<(std::sync::mpsc::SyncSender<()>, std::thread::JoinHandle<()>)>,
    /// Record bytes committed since the checkpointer was last woken.
    since_checkpoint: usize,
    /// Held while a checkpoint runs, by this thread or the checkpointer.
    checkpointing: Arc<std::sync::Mutex<()>>,
    /// The row batches of the open transaction, with the session (pk) they
    /// went to, kept until it commits so a failed commit can write them
    /// again (see [`fault`]).
    held: Vec<(Option<i64>, Vec<Row>)>,
    /// Records inserted in the open transaction, counted once it commits.
    tx_records: u64,
    /// A statement of the open transaction failed: it commits no further
    /// and the commit deals with the fault.
    broken: Option<fault::Fault>,
    /// Losses not written down yet (the disk was full, or the file bad):
    /// (session pk or 0, level, reason) → records, added as gaps by the
    /// next transaction that commits.
    pending_gaps: HashMap<(i64, Level, &'static str), i64>,
    /// The file kept in reserve to have room to evict in when the disk fills.
    reserve: fault::Reserve,
}

impl Writer {
    /// Opens the database (moving a corrupt one aside, refusing a newer
    /// one) and applies the boot-id rule to sessions left active.
    pub fn open(cfg: WriterConfig, stats: Arc<Stats>) -> Result<Writer, StoreError> {
        let wal_limit = (cfg.max_bytes / 16).clamp(32 << 10, 16 << 20);
        let conn = Writer::open_conn(&cfg, wal_limit)?;
        let reserve = fault::Reserve::new(&cfg.db_path, wal_limit);
        let mut w = Writer {
            conn,
            tx_bytes: (wal_limit / 4) as usize,
            wal_limit,
            cfg,
            stats,
            current: None,
            log_counts: HashMap::new(),
            next_seq: 1,
            seq_reserved: 0,
            stopping: false,
            sync_replies: Vec::new(),
            checkpoints: None,
            since_checkpoint: 0,
            checkpointing: Arc::default(),
            held: Vec::new(),
            tx_records: 0,
            broken: None,
            pending_gaps: HashMap::new(),
            reserve,
        };
        let stored: i64 = w
            .conn
            .query_row("SELECT count(*) FROM records", [], |r| r.get(0))?;
        let synced = super::sync::count_synced(&w.conn)?;
        let last: i64 = w
            .conn
            .query_row("SELECT coalesce(max(seq), 0) FROM records", [], |r| {
                r.get(0)
            })?;
        w.stats.records_stored.store(stored, Ordering::Relaxed);
        w.stats.records_synced.store(synced, Ordering::Relaxed);
        let persisted: i64 = w.conn.query_row(
            "SELECT coalesce((SELECT value FROM meta WHERE key = 'next_seq'), 1)",
            [],
            |r| r.get(0),
        )?;
        w.next_seq = persisted.max(last + 1);
        w.reserve_seqs_at_open()?;
        w.stats.last_seq.store(w.next_seq - 1, Ordering::Relaxed);
        w.close_sessions_of_earlier_boots()?;
        w.enforce_bound()?;
        Ok(w)
    }

    /// Opens the write connection and sets what the writer relies on.
    fn open_conn(cfg: &WriterConfig, wal_limit: u64) -> Result<WriteConn, StoreError> {
        let conn = schema::open_writer(&cfg.db_path, cfg.synchronous_full)?;
        super::sync::create_tables(&conn)?;
        conn.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
        // Checkpoints run on their own thread (see `checkpointer`); the
        // writer only truncates a WAL that outgrew its limit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(WriteConn::new(conn)?)
    }

    /// The active session, if any (after the boot-id rule).
    pub fn current(&self) -> Option<Uuid> {
        self.current.map(|(_, id)| id)
    }

    /// Spawns the writer thread (and its checkpointer). It runs until every
    /// sender is dropped or [`Msg::Stop`] arrives, then commits what it
    /// holds, joins the checkpointer and returns.
    pub fn spawn(
        mut self,
        rx: mpsc::Receiver<Msg>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let (path, one) = (self.cfg.db_path.clone(), self.checkpointing.clone());
        let checkpointer = std::thread::Builder::new()
            .name("logbook-checkpoint".into())
            .spawn(move || checkpoint::checkpointer(&path, &woken, &one))?;
        self.checkpoints = Some((wake, checkpointer));
        std::thread::Builder::new()
            .name("logbook-writer".into())
            .spawn(move || self.run(rx, rt))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>, rt: tokio::runtime::Handle) {
        // The writer waits (idle, and for a transaction to fill) on a clock
        // of its own: a timer on the agent's runtime is armed and fired by
        // one of its workers, which then wakes this thread, two wake-ups
        // per wait (BENCHMARKS.md, "Idle"). The agent's runtime only if
        // this one cannot be built.
        let own = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(|e| tracing::warn!("the writer's timer: {e}; using the agent's"))
            .ok();
        let mut flushes: Vec<oneshot::Sender<u64>> = Vec::new();
        let mut closed = false;
        while !closed && !self.stopping {
            self.stats.writer_heartbeat.fetch_add(1, Ordering::Relaxed);
            let first = match wait_on(own.as_ref(), &rt, async {
                tokio::time::timeout(self.cfg.idle_turn, rx.recv()).await
            }) {
                Err(_) => {
                    // Idle: nobody else will free what is left.
                    self.stats.spent.free();
                    // A file overwritten under us shows first in its header.
                    self.check_header();
                    // Keep the bound (free space can shrink under us).
                    if let Err(e) = self.enforce_bound() {
                        self.bound_failed(e);
                    }
                    continue;
                }
                Ok(None) => break,
                Ok(Some(m)) => m,
            };
            if let Err(e) = self.conn.execute_batch("BEGIN") {
                tracing::error!("cannot begin a transaction: {e}");
            }
            let began = Instant::now();
            let deadline = began + self.cfg.commit_interval;
            let (mut records, mut bytes) = (0usize, 0usize);
            let mut must_commit = self.handle(first, &mut flushes, &mut records, &mut bytes);
            while !must_commit && records < self.cfg.commit_records && bytes < self.tx_bytes {
                let msg = match rx.try_recv() {
                    Ok(m) => m,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match wait_on(own.as_ref(), &rt, async {
                            tokio::time::timeout(left, rx.recv()).await
                        }) {
                            Ok(Some(m)) => m,
                            Ok(None) => {
                                closed = true;
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                };
                must_commit = self.handle(msg, &mut flushes, &mut records, &mut bytes);
            }
            self.commit();
            self.since_checkpoint += bytes;
            if self.since_checkpoint >= self.tx_bytes {
                if let Some((wake, _)) = &self.checkpoints {
                    // Full means it is still busy with the last one.
                    let _ = wake.try_send(());
                }
                self.since_checkpoint = 0;
            }
            // The bound first, so whoever waits on a flush sees it held.
            if let Err(e) = self.enforce_bound() {
                self.bound_failed(e);
            }
            if records > 0 {
                *self
                    .stats
                    .records_began
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(began);
            }
            self.stats.committed_notify.notify_one();
            self.stats.committed();
            // Only acknowledgements whose commit went through are left here
            // (a failed commit answered its own with the error).
            for (reply, n) in self.sync_replies.drain(..) {
                self.stats
                    .records_synced
                    .fetch_add(n as i64, Ordering::Relaxed);
                let _ = reply.send(Ok(n));
            }
            let last = self.stats.last_seq.load(Ordering::Relaxed).max(0) as u64;
            for f in flushes.drain(..) {
                let _ = f.send(last);
            }
        }
        self.commit();
        self.mark_clean_stop();
        if let Some((wake, checkpointer)) = self.checkpoints.take() {
            // Its last checkpoint done, it ends once its sender is gone.
            drop(wake);
            if checkpointer.join().is_err() {
                tracing::error!("the checkpointer thread panicked");
            }
        }
        tracing::info!("writer stopped; everything received is committed");
    }

    /// Applies one message inside the open transaction. Returns true when
    /// the transaction must commit now (someone waits for it).
    fn handle(
        &mut self,
        msg: Msg,
        flushes: &mut Vec<oneshot::Sender<u64>>,
        records: &mut usize,
        bytes: &mut usize,
    ) -> bool {
        match msg {
            Msg::Rows(rows) => {
                *records += rows.len();
                *bytes += rows.iter().map(Row::approx_bytes).sum::<usize>();
                if self.broken.is_none() && self.next_seq + rows.len() as i64 > self.seq_reserved {
                    // Past the reservation: what is open commits, the next
                    // block is reserved (synced), then these go in.
                    self.commit();
                    if let Err(e) = self.reserve_seqs(rows.len()) {
                        tracing::warn!("reserving seqs failed: {e}");
                        self.broken = Some(fault::classify(&e));
                    }
                    let _ = self.conn.execute_batch("BEGIN");
                }
                let session = self.current.map(|(pk, _)| pk);
                if self.broken.is_none() {
                    if let Err(e) = self.insert_in(session, &rows) {
                        tracing::warn!("storing {} records failed: {e}", rows.len());
                        self.broken = Some(fault::classify(&e));
                    }
                }
                // Kept until the commit; a broken transaction commits now,
                // and the commit writes these again once it can.
                self.held.push((session, rows));
                self.broken.is_some()
            }
            Msg::Journal(rows, cursor) => {
                let must = self.handle(Msg::Rows(rows), flushes, records, bytes);
                if let Err(e) = super::journal::save_cursor(&self.conn, &cursor) {
                    tracing::error!("storing the journal cursor failed: {e}");
                }
                must
            }
            Msg::Flush(reply) => {
                flushes.push(reply);
                true
            }
            Msg::Session(cmd, reply) => {
                // Session changes commit alone: a failed command must not
                // roll back the records around it.
                self.commit();
                let before = self.current;
                let mut out = self.session(cmd);
                if out.is_ok() {
                    if !self.commit() {
                        self.current = before;
                        out = Err(SessionError::Store(
                            "the change could not be committed (see the agent's log)".into(),
                        ));
                    } else {
                        self.stats.sessions_changed.notify_one();
                    }
                } else {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                let _ = reply.send(out);
                let _ = self.conn.execute_batch("BEGIN");
                true
            }
            Msg::Stop => {
                self.stopping = true;
                true
            }
            Msg::Acked(acked, reply) => {
                let deletions = self.stats.deletions.load(Ordering::SeqCst);
                self.sync_change(reply, "recording the hub's acknowledgement", |c| {
                    super::sync::apply_acked(c, &acked, deletions)
                });
                true
            }
            Msg::SetAside(aside, reply) => {
                let deletions = self.stats.deletions.load(Ordering::SeqCst);
                self.sync_change(reply, "setting a refused batch aside", |c| {
                    super::sync::apply_set_aside(c, &aside, deletions)
                });
                true
            }
            Msg::Mark(spec, reply) => {
                // Like session changes: alone, answered after its commit.
                self.commit();
                let out = self.mark(&spec);
                if out.is_ok() {
                    self.commit();
                } else {
                    let _ = self.conn.execute_batch("ROLLBACK");
                }
                let _ = reply.send(out);
                let _ = self.conn.execute_batch("BEGIN");
                true
            }
            Msg::Artifact(cmd, reply) => {
                // Like session changes: alone, committed before the reply,
                // so an acknowledged offset is on disk before the next chunk.
                self.commit();
                let out = super::artifacts::apply(&self.conn, cmd).map_err(|e| e.to_string());
                if let Err(e) = &out {
                    tracing::error!("storing artifact state failed: {e}");
                }
                let _ = reply.send(out);
                let _ = self.conn.execute_batch("BEGIN");
                true
            }
        }
    }

    /// Applies a sync change all or nothing (a savepoint inside the open
    /// transaction), queueing its reply for after the commit; a failure is
    /// answered at once, so the uploader rescans instead of skipping those
    /// records until a restart.
    fn sync_change(
        &mut self,
        reply: SyncReply,
        what: &str,
        apply: impl FnOnce(&Connection) -> rusqlite::Result<u64>,
    ) {
        let out = self
            .conn
            .execute_batch("SAVEPOINT sync_change")
            .and_then(|()| apply(&self.conn));
        match out {
            Ok(n) => {
                if let Err(e) = self.conn.execute_batch("RELEASE sync_change") {
                    tracing::error!("{what} failed: {e}");
                    let _ = reply.send(Err(e.to_string()));
                    return;
                }
                self.sync_replies.push((reply, n));
            }
            Err(e) => {
                tracing::error!("{what} failed: {e}");
                if let fault::Fault::Corrupt = fault::classify(&e) {
                    self.broken = Some(fault::Fault::Corrupt);
                }
                let _ = self
                    .conn
                    .execute_batch("ROLLBACK TO sync_change; RELEASE sync_change");
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }

    /// Inserts `rows` into the open transaction, in `session` (a pk).
    fn insert_in(&mut self, session: Option<i64>, rows: &[Row]) -> rusqlite::Result<()> {
        let mut dropped: u64 = 0;
        for r in rows {
            self.conn.insert(self.next_seq, session, r)?;
            self.next_seq += 1;
            dropped += r.client_dropped;
        }
        for m in rows.iter().filter_map(|r| r.mark.as_deref()) {
            self.mark_of_record(m);
        }
        if dropped > 0 {
            bound::add_gap(
                &self.conn,
                session.unwrap_or(0),
                Level::Info,
                gap_reason::CLIENT_DROPPED,
                dropped as i64,
            )?;
        }
        if let Some(pk) = session {
            *self.log_counts.entry(pk).or_default() += rows.len() as u64;
        }
        self.stats
            .last_seq
            .store(self.next_seq - 1, Ordering::Relaxed);
        self.tx_records += rows.len() as u64;
        Ok(())
    }

    /// Commits the open transaction, if any. When SQLite fails it (or a
    /// statement in it failed), makes room or moves a bad file aside and
    /// writes the transaction's rows again, a few times at most; rows that
    /// still cannot be stored are counted as gaps. Returns whether the
    /// transaction committed with everything in it (a session change or an
    /// artifact state in it is lost otherwise).
    fn commit(&mut self) -> bool {
        if self.conn.is_autocommit() && self.held.is_empty() && self.broken.is_none() {
            return true;
        }
        let mut whole = true;
        let mut last = fault::Fault::Other;
        for attempt in 0..=fault::RETRIES {
            let out = match self.broken.take() {
                Some(f) => Err(f),
                None => self.try_commit(),
            };
            let f = match out {
                Ok(()) => {
                    self.committed_rows();
                    return whole;
                }
                Err(f) => f,
            };
            whole = false;
            self.rolled_back();
            last = f;
            if attempt == fault::RETRIES {
                break;
            }
            match f {
                fault::Fault::Full => self.make_room(),
                fault::Fault::Corrupt => self.quarantine(),
                fault::Fault::Other => {}
            }
            if let Err(f) = self.replay() {
                self.broken = Some(f);
            }
        }
        self.give_up(last);
        false
    }

    /// Writes the counters and pending gaps into the open transaction and
    /// commits it.
    fn try_commit(&mut self) -> Result<(), fault::Fault> {
        let tx = |e: rusqlite::Error| {
            tracing::warn!("commit failed: {e}");
            fault::classify(&e)
        };
        if self.conn.is_autocommit() {
            // No transaction to commit (SQLite rolls one back by itself
            // only on an error, which left `broken` set).
            return Ok(());
        }
        if !self.log_counts.is_empty() {
            let mut count = self
                .conn
                .prepare_cached("UPDATE sessions SET log_count = log_count + ?2 WHERE pk = ?1")
                .map_err(tx)?;
            for (pk, n) in self.log_counts.drain() {
                count.execute(params![pk, n as i64]).map_err(tx)?;
            }
        }
        for (&(session, level, reason), &n) in &self.pending_gaps {
            bound::add_gap(&self.conn, session, level, reason, n).map_err(tx)?;
        }
        set_meta(&self.conn, "next_seq", self.next_seq).map_err(tx)?;
        self.conn.execute_batch("COMMIT").map_err(tx)
    }

    /// Makes sure the next `n` seqs are covered by a reservation on stable
    /// storage, reserving `n` more and a block when not: a transaction of
    /// its own committed with `synchronous = FULL`, which syncs the WAL
    /// (and every transaction before it) before the commit returns. SQLite
    /// changes the safety level only outside a transaction, so the caller
    /// commits what it has open first; no record with a seq past the synced
    /// reservation is ever committed, so none can reach the hub.
    fn reserve_seqs(&mut self, n: usize) -> rusqlite::Result<()> {
        if self.next_seq + n as i64 <= self.seq_reserved {
            return Ok(());
        }
        let end = self.next_seq + n as i64 + SEQ_BLOCK;
        self.synced_tx(|c| set_meta(c, "seq_reserved", end))?;
        self.seq_reserved = end;
        self.stats.seq_reservations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Runs `f` in a transaction committed with `synchronous = FULL`; must
    /// be called outside a transaction.
    fn synced_tx(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> rusqlite::Result<()> {
        let toggle = !self.cfg.synchronous_full;
        if toggle {
            self.conn.pragma_update(None, "synchronous", "FULL")?;
        }
        let out = self
            .conn
            .execute_batch("BEGIN")
            .and_then(|()| f(&self.conn))
            .and_then(|()| self.conn.execute_batch("COMMIT"));
        if out.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        if toggle {
            if let Err(e) = self.conn.pragma_update(None, "synchronous", "NORMAL") {
                tracing::error!("cannot set synchronous back to NORMAL: {e}");
            }
        }
        out
    }

    /// At open: when the last stop was not the agent's own and the kernel
    /// booted since (a power cut or a crash of the machine: the WAL may have
    /// lost its last transactions, and the counter with them), moves the
    /// counter to the end of the last synced reservation; then reserves the
    /// next block, synced, and clears the clean-stop mark. A kill -9 in the
    /// same boot loses nothing committed (the kernel still holds the WAL),
    /// so the counter stays where it is and seqs stay dense.
    fn reserve_seqs_at_open(&mut self) -> Result<(), StoreError> {
        let get = |key: &str| -> rusqlite::Result<Option<i64>> {
            self.conn
                .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        };
        let reserved = get("seq_reserved")?;
        let clean = get("clean_stop")?.is_some();
        let boot = get("open_boot")?;
        let here = boot_key(&self.cfg.view.boot_id);
        if let Some(r) = reserved {
            if !clean && boot != Some(here) && r > self.next_seq {
                tracing::warn!(
                    "the last stop was not the agent's and the device rebooted since: \
                     seqs {}..{} may have been lost with the end of the WAL (and may be \
                     at the hub), so new records start at seq {r}",
                    self.next_seq,
                    r - 1
                );
                self.next_seq = r;
            }
        }
        let (end, next) = (self.next_seq + SEQ_BLOCK, self.next_seq);
        self.synced_tx(|c| {
            set_meta(c, "next_seq", next)?;
            set_meta(c, "seq_reserved", end)?;
            set_meta(c, "open_boot", here)?;
            c.execute("DELETE FROM meta WHERE key = 'clean_stop'", [])
                .map(drop)
        })?;
        self.seq_reserved = end;
        self.stats.seq_reservations.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The writer stops on its own (everything received is committed):
    /// the next open needs no jump of the counter. Not synced: if a power
    /// cut takes this mark, it takes nothing before it (a WAL loses only
    /// its end), and the open jumps to be safe.
    fn mark_clean_stop(&self) {
        if let Err(e) = set_meta(&self.conn, "clean_stop", 1) {
            tracing::warn!("cannot record the clean stop: {e}");
        }
    }

    /// After a commit: count its records, and hand its rows back to be
    /// freed.
    fn committed_rows(&mut self) {
        let n = std::mem::take(&mut self.tx_records);
        self.stats
            .records_stored
            .fetch_add(n as i64, Ordering::Relaxed);
        self.stats.committed.fetch_add(n, Ordering::Relaxed);
        self.stats.commits.fetch_add(1, Ordering::Relaxed);
        if !self.pending_gaps.is_empty() {
            tracing::info!("recorded the losses held back while nothing could be written");
            self.pending_gaps.clear();
        }
        self.stats.disk_full.store(false, Ordering::Relaxed);
        for (_, rows) in self.held.drain(..) {
            self.stats.spent.put(rows);
        }
    }

    /// After a failed commit: nothing of the transaction is left.
    fn rolled_back(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.tx_records = 0;
        self.log_counts.clear();
        // The acknowledgements in it are lost: say so now (the uploader
        // reads those records as pending again).
        for (reply, _) in self.sync_replies.drain(..) {
            let _ = reply.send(Err("commit failed".into()));
        }
    }

    /// Writes the held rows again, in a new transaction.
    fn replay(&mut self) -> Result<(), fault::Fault> {
        let n = self.held.iter().map(|(_, rows)| rows.len()).sum();
        self.reserve_seqs(n).map_err(|e| fault::classify(&e))?;
        self.conn
            .execute_batch("BEGIN")
            .map_err(|e| fault::classify(&e))?;
        let held = std::mem::take(&mut self.held);
        let mut out = Ok(());
        for (session, rows) in &held {
            if let Err(e) = self.insert_in(*session, rows) {
                tracing::warn!("storing {} records again failed: {e}", rows.len());
                out = Err(fault::classify(&e));
                break;
            }
        }
        self.held = held;
        out
    }
}

/// Seqs reserved by one synced commit. One fsync per 65,536 records;
/// after a power cut at most this many seqs are skipped.
const SEQ_BLOCK: i64 = 1 << 16;

/// Sets `meta.key` to `value`.
fn set_meta(conn: &Connection, key: &str, value: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES (?1, ?2) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![key, value])
    .map(drop)
}

/// The boot id as an integer for `meta` (FNV-1a, stable across builds).
fn boot_key(boot_id: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in boot_id.trim().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

/// Runs `f` to completion on the writer's own runtime, or on the agent's
/// when that could not be built.
fn wait_on<F: std::future::Future>(
    own: Option<&tokio::runtime::Runtime>,
    rt: &tokio::runtime::Handle,
    f: F,
) -> F::Output {
    match own {
        Some(r) => r.block_on(f),
        None => rt.block_on(f),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::record::Trusted;

    pub(super) fn writer(dir: &std::path::Path) -> Writer {
        writer_in_boot(dir, "b")
    }

    /// A writer as it opens in the boot `boot_id`.
    pub(super) fn writer_in_boot(dir: &std::path::Path, boot_id: &str) -> Writer {
        let cfg = WriterConfig {
            db_path: dir.join("agent.db"),
            state_dir: dir.to_owned(),
            synchronous_full: false,
            max_bytes: 1 << 30,
            min_free_bytes: 0,
            pinned_max: 1 << 28,
            commit_interval: Duration::from_millis(10),
            commit_records: 1000,
            idle_turn: Duration::from_secs(1),
            view: ViewCtx {
                device_id: "d".into(),
                device_name: "n".into(),
                sessions_dir: dir.join("sessions"),
                boot_id: boot_id.into(),
            },
        };
        Writer::open(cfg, Arc::new(Stats::default())).unwrap()
    }

    pub(super) fn rows(level: Level, n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                timestamp_ns: i as i64,
                level,
                module: "m".into(),
                message: format!("{level} {i}"),
                metadata: String::new(),
                trusted: Arc::new(Trusted::default()),
                client_dropped: 0,
                mark: None,
            })
            .collect()
    }

    /// Inserts in a committed transaction, as the writer loop does.
    pub(super) fn put(w: &mut Writer, rows: Vec<Row>) {
        w.conn.execute_batch("BEGIN").unwrap();
        w.handle(Msg::Rows(rows), &mut Vec::new(), &mut 0, &mut 0);
        assert!(w.broken.is_none(), "the rows went in");
        w.commit();
    }

    pub(super) fn seqs(w: &Writer) -> Vec<i64> {
        let mut stmt = w
            .conn
            .prepare("SELECT seq FROM records ORDER BY seq")
            .unwrap();
        let out = stmt.query_map([], |r| r.get(0)).unwrap();
        out.collect::<rusqlite::Result<_>>().unwrap()
    }

    pub(super) fn gaps(w: &Writer) -> Vec<(i64, i64, String, i64)> {
        let mut stmt = w
            .conn
            .prepare("SELECT session, level, reason, dropped FROM gaps ORDER BY level")
            .unwrap();
        let out = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap();
        out.collect::<rusqlite::Result<_>>().unwrap()
    }

    #[test]
    fn stored_rows_go_back_to_be_freed_elsewhere_within_a_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        w.conn.execute_batch("BEGIN").unwrap();
        for _ in 0..super::super::SPENT_MAX + 3 {
            w.handle(
                Msg::Rows(rows(Level::Info, 2)),
                &mut Vec::new(),
                &mut 0,
                &mut 0,
            );
        }
        w.commit();
        // Held for the ingest threads, at most SPENT_MAX batches (the writer
        // frees the rest itself)...
        assert_eq!(w.stats.spent.batches(), super::super::SPENT_MAX);
        assert_eq!(seqs(&w).len(), 2 * (super::super::SPENT_MAX + 3));
        // ...until an ingest thread (or the idle writer) frees them.
        w.stats.spent.free();
        assert_eq!(w.stats.spent.batches(), 0);
    }

    #[test]
    fn seq_is_never_reused_after_the_table_empties_or_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 3));
        w.evict(10).unwrap();
        assert!(seqs(&w).is_empty());
        drop(w);
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 1));
        assert_eq!(seqs(&w), vec![4]);
    }

    #[test]
    fn client_dropped_is_a_gap_of_the_current_session() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let open = w.session(SessionCmd::Open(OpenSession::default())).unwrap();
        w.commit();
        let mut r = rows(Level::Warn, 1);
        r[0].client_dropped = 9;
        put(&mut w, r.clone());
        put(&mut w, r.clone());
        let pk: i64 = w
            .conn
            .query_row(
                "SELECT pk FROM sessions WHERE id = ?1",
                [open.id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            gaps(&w),
            vec![(pk, Level::Info.code() as i64, "client_dropped".into(), 18)]
        );
    }

    #[test]
    fn an_acknowledgement_sqlite_refuses_is_answered_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 5));
        let acked = || super::super::sync::Acked {
            marks: Vec::new(),
            records: vec![(1, 5)],
            sessions: Vec::new(),
            gaps: vec![(0, Level::Info, "evicted".into(), 3)],
            read_at: None,
        };
        w.conn
            .execute_batch(
                "INSERT INTO gaps(session, level, reason, dropped) VALUES (0, 2, 'evicted', 3);
                 CREATE TEMP TRIGGER full BEFORE INSERT ON meta WHEN NEW.key = 'synced_through'
                 BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
            )
            .unwrap();
        let (tx, mut rx) = oneshot::channel();
        w.conn.execute_batch("BEGIN").unwrap();
        assert!(w.handle(Msg::Acked(acked(), tx), &mut Vec::new(), &mut 0, &mut 0));
        let err = rx.try_recv().unwrap().unwrap_err();
        assert!(err.contains("disk is full"), "{err}");
        w.commit();
        // All or nothing: the gap counter it carried was not marked either.
        let synced_dropped: i64 = w
            .conn
            .query_row("SELECT synced_dropped FROM gaps", [], |r| r.get(0))
            .unwrap();
        assert_eq!(synced_dropped, 0);
        assert_eq!(super::super::sync::count_synced(&w.conn).unwrap(), 0);
        assert!(w.sync_replies.is_empty());
        // Once SQLite works again the same acknowledgement goes through,
        // answered after its commit.
        w.conn.execute_batch("DROP TRIGGER temp.full").unwrap();
        let (tx, _rx) = oneshot::channel();
        w.conn.execute_batch("BEGIN").unwrap();
        w.handle(Msg::Acked(acked(), tx), &mut Vec::new(), &mut 0, &mut 0);
        w.commit();
        assert_eq!(w.sync_replies.len(), 1);
        assert_eq!(w.sync_replies[0].1, 5);
        assert_eq!(super::super::sync::count_synced(&w.conn).unwrap(), 5);
    }

    /// An acknowledgement is counted without reading the table only while
    /// nothing was deleted since its batch was read: records evicted in
    /// flight are not counted synced.
    #[test]
    fn an_acknowledgement_of_records_evicted_in_flight_counts_what_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 5));
        put(&mut w, rows(Level::Debug, 3));
        put(&mut w, rows(Level::Info, 2));
        let ack = |w: &mut Writer, records, read_at| {
            let (tx, _rx) = oneshot::channel();
            let acked = super::super::sync::Acked {
                records,
                read_at,
                ..Default::default()
            };
            w.conn.execute_batch("BEGIN").unwrap();
            w.handle(Msg::Acked(acked, tx), &mut Vec::new(), &mut 0, &mut 0);
            w.commit();
            w.sync_replies.pop().unwrap().1
        };
        let deletions = |w: &Writer| w.stats.deletions.load(Ordering::SeqCst);
        let synced = |w: &Writer| super::super::sync::count_synced(&w.conn).unwrap();
        // 1..=10 read; the debug records 6..=8 evicted (nothing synced yet:
        // unsynced, lowest level first) while the batch was at the hub.
        let read_at = deletions(&w);
        w.evict(3).unwrap();
        assert_ne!(deletions(&w), read_at);
        assert_eq!(ack(&mut w, vec![(1, 10)], Some(read_at)), 7);
        assert_eq!(synced(&w), 7);
        // Nothing deleted since this read: counted from the ranges alone.
        put(&mut w, rows(Level::Info, 5));
        let read_at = deletions(&w);
        assert_eq!(ack(&mut w, vec![(12, 13), (15, 15)], Some(read_at)), 3);
        assert_eq!(synced(&w), 10);
        // Evicting synced records moves the counter too.
        w.evict(1).unwrap();
        assert_ne!(deletions(&w), read_at);
        assert_eq!(ack(&mut w, vec![(11, 15)], Some(read_at)), 2);
        assert_eq!(synced(&w), 11);
    }

    /// What a power cut can leave under `synchronous = normal`: the files as
    /// they were at an earlier commit (the WAL lost its end). The files are
    /// copied while the writer holds them, as the kernel has them.
    fn cut_copy(from: &std::path::Path, to: &std::path::Path) {
        for name in ["agent.db", "agent.db-wal"] {
            let src = from.join(name);
            if src.exists() {
                std::fs::copy(&src, to.join(name)).unwrap();
            }
        }
    }

    fn meta(w: &Writer, key: &str) -> Option<i64> {
        w.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .unwrap()
    }

    #[test]
    fn after_a_power_cut_and_a_reboot_the_counter_starts_past_the_reservation() {
        let (dir, cut) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut w = writer_in_boot(dir.path(), "b1");
        put(&mut w, rows(Level::Info, 5));
        // The cut comes here; records 6..=10 are committed (and may be at
        // the hub) but lost from the copy.
        cut_copy(dir.path(), cut.path());
        put(&mut w, rows(Level::Info, 5));
        assert_eq!(seqs(&w), (1..=10).collect::<Vec<_>>());
        drop(w);
        let mut w = writer_in_boot(cut.path(), "b2");
        assert_eq!(
            seqs(&w),
            (1..=5).collect::<Vec<_>>(),
            "the WAL lost its end"
        );
        put(&mut w, rows(Level::Info, 1));
        let first_new = 1 + SEQ_BLOCK;
        assert_eq!(
            seqs(&w).last(),
            Some(&first_new),
            "never a seq the hub may hold"
        );
        assert_eq!(w.stats.last_seq.load(Ordering::Relaxed), first_new);
        // The open reserved the next block, synced, before any use of it.
        assert_eq!(meta(&w, "seq_reserved"), Some(first_new + SEQ_BLOCK));
        assert_eq!(meta(&w, "clean_stop"), None);
    }

    #[test]
    fn a_kill_in_the_same_boot_or_a_clean_stop_keeps_the_seqs_dense() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer_in_boot(dir.path(), "b1");
        put(&mut w, rows(Level::Info, 3));
        // Killed: nothing committed is lost while the kernel runs on.
        drop(w);
        let mut w = writer_in_boot(dir.path(), "b1");
        put(&mut w, rows(Level::Info, 3));
        assert_eq!(seqs(&w), (1..=6).collect::<Vec<_>>());
        // Stopped on its own, then a reboot: the mark says nothing was lost.
        w.mark_clean_stop();
        drop(w);
        let mut w = writer_in_boot(dir.path(), "b2");
        put(&mut w, rows(Level::Info, 3));
        assert_eq!(seqs(&w), (1..=9).collect::<Vec<_>>());
        // Killed, then a reboot: the counter jumps to the end of the
        // reservation the last open made (it cannot know what was lost).
        drop(w);
        let mut w = writer_in_boot(dir.path(), "b3");
        put(&mut w, rows(Level::Info, 1));
        assert_eq!(seqs(&w).last(), Some(&(7 + SEQ_BLOCK)));
    }

    #[test]
    fn a_synced_reservation_every_block_of_seqs_and_synchronous_back_to_normal() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        assert_eq!(w.stats.seq_reservations.load(Ordering::Relaxed), 1);
        let block = SEQ_BLOCK as usize;
        for _ in 0..3 {
            put(&mut w, rows(Level::Info, block / 2 - 1));
        }
        // 3 * (block/2 - 1) + 1 passes the first block once.
        assert_eq!(w.stats.seq_reservations.load(Ordering::Relaxed), 2);
        let reserved = meta(&w, "seq_reserved").unwrap();
        assert!(reserved >= w.next_seq, "{reserved} < {}", w.next_seq);
        assert_eq!(reserved, w.seq_reserved);
        let sync: i64 = w
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 1, "NORMAL again after the synced commit");
    }

    #[test]
    fn a_quarantined_file_gets_a_reservation_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 3));
        w.quarantine();
        put(&mut w, rows(Level::Info, 2));
        assert_eq!(seqs(&w), vec![4, 5]);
        assert_eq!(meta(&w, "seq_reserved"), Some(4 + 2 + SEQ_BLOCK));
    }
}
