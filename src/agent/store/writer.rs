//! The writer: one dedicated thread owns the write connection, drains the
//! bounded channel, commits rows in transactions bounded by count, bytes and
//! time, applies session commands, and keeps the on-disk size bound by
//! evicting in the design's order and counting what it evicts as gaps.
//!
//! A second thread, [`checkpointer`], copies committed WAL pages into the
//! database file, so the writer never waits for a checkpoint's fsyncs.
//!
//! Invariant: the only writer of `agent.db`'s content (the checkpointer
//! only copies committed pages). Every reply (flush, session command) is
//! sent after the transaction holding its effect has committed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::read::{session_by_sid, ViewCtx};
use super::{boottime_ns, now_ns, schema, Row, Stats, StoreError};
use crate::agent::types::{OpenSession, SessionError, SessionView, Target};
use crate::wire::{gap_reason, Level};

/// What the writer is asked to do.
pub enum Msg {
    Rows(Vec<Row>),
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
    pub commit_interval: Duration,
    pub commit_records: usize,
    pub view: ViewCtx,
}

const ADD_GAP: &str = "INSERT INTO gaps(session, level, reason, dropped) VALUES (?1, ?2, ?3, ?4) \
                       ON CONFLICT(session, level, reason) DO UPDATE SET dropped = dropped + excluded.dropped";

pub struct Writer {
    conn: Connection,
    cfg: WriterConfig,
    stats: Arc<Stats>,
    /// The active session: (sid, id).
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
    /// A [`Msg::Stop`] arrived.
    stopping: bool,
    /// Replies to sync acknowledgements, sent once their commit is done (so
    /// the uploader never reads its own acknowledged work as pending).
    sync_replies: Vec<(SyncReply, u64)>,
    /// Wakes the checkpointer thread (see [`checkpointer`]); `None` until
    /// [`Writer::spawn`], and in tests.
    checkpoints: Option<std::sync::mpsc::SyncSender<()>>,
    /// Record bytes committed since the checkpointer was last woken.
    since_checkpoint: usize,
    /// Held while a checkpoint runs, by this thread or the checkpointer.
    checkpointing: Arc<std::sync::Mutex<()>>,
}

impl Writer {
    /// Opens the database (moving a corrupt one aside, refusing a newer
    /// one) and applies the boot-id rule to sessions left active.
    pub fn open(cfg: WriterConfig, stats: Arc<Stats>) -> Result<Writer, StoreError> {
        let conn = schema::open_writer(&cfg.db_path, cfg.synchronous_full)?;
        super::sync::create_tables(&conn)?;
        let wal_limit = (cfg.max_bytes / 16).clamp(32 << 10, 16 << 20);
        conn.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
        // Checkpoints run on their own thread (see `checkpointer`); the
        // writer only truncates a WAL that outgrew its limit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        let mut w = Writer {
            conn,
            tx_bytes: (wal_limit / 4) as usize,
            wal_limit,
            cfg,
            stats,
            current: None,
            log_counts: HashMap::new(),
            next_seq: 1,
            stopping: false,
            sync_replies: Vec::new(),
            checkpoints: None,
            since_checkpoint: 0,
            checkpointing: Arc::default(),
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
        w.stats.last_seq.store(w.next_seq - 1, Ordering::Relaxed);
        w.close_sessions_of_earlier_boots()?;
        w.enforce_bound()?;
        Ok(w)
    }

    /// The active session, if any (after the boot-id rule).
    pub fn current(&self) -> Option<Uuid> {
        self.current.map(|(_, id)| id)
    }

    fn close_sessions_of_earlier_boots(&mut self) -> Result<(), StoreError> {
        let active: Vec<(i64, String, String, i64)> = {
            let mut stmt = self.conn.prepare(
                "SELECT sid, id, boot_id, started_at_ns FROM sessions WHERE status = 'active' ORDER BY sid DESC",
            )?;
            let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (sid, id, boot, started) in active {
            if boot == self.cfg.view.boot_id && self.current.is_none() {
                self.current = Some((sid, Uuid::parse_str(&id).unwrap_or_default()));
                tracing::info!("session {id} is still active (same boot)");
                continue;
            }
            // The session's last record is the best guess of when it ended.
            let last: Option<i64> = self.conn.query_row(
                "SELECT max(ts_ns) FROM records WHERE session = ?1",
                [sid],
                |r| r.get(0),
            )?;
            let ended = last.unwrap_or(started).max(started);
            self.conn.execute(
                "UPDATE sessions SET status = 'failed', error = 'device rebooted', ended_at_ns = ?2, \
                 duration_ns = ?3, revision = revision + 1 WHERE sid = ?1",
                params![sid, ended, ended - started],
            )?;
            tracing::warn!("session {id} was active during an earlier boot: closed as failed");
        }
        Ok(())
    }

    /// Spawns the writer thread. It runs until every sender is dropped,
    /// then commits what it holds and returns.
    pub fn spawn(
        mut self,
        rx: mpsc::Receiver<Msg>,
        rt: tokio::runtime::Handle,
    ) -> std::io::Result<std::thread::JoinHandle<()>> {
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let (path, one) = (self.cfg.db_path.clone(), self.checkpointing.clone());
        std::thread::Builder::new()
            .name("logbook-checkpoint".into())
            .spawn(move || checkpointer(&path, &woken, &one))?;
        self.checkpoints = Some(wake);
        std::thread::Builder::new()
            .name("logbook-writer".into())
            .spawn(move || self.run(rx, rt))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>, rt: tokio::runtime::Handle) {
        let mut flushes: Vec<oneshot::Sender<u64>> = Vec::new();
        let mut closed = false;
        while !closed && !self.stopping {
            self.stats.writer_heartbeat.fetch_add(1, Ordering::Relaxed);
            let first = match rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(1), rx.recv()).await })
            {
                Err(_) => {
                    // Idle: nobody else will free what is left.
                    self.stats.spent.free();
                    // Keep the bound (free space can shrink under us).
                    if let Err(e) = self.enforce_bound() {
                        tracing::error!("keeping the buffer bound failed: {e}");
                    }
                    continue;
                }
                Ok(None) => break,
                Ok(Some(m)) => m,
            };
            if let Err(e) = self.conn.execute_batch("BEGIN") {
                tracing::error!("cannot begin a transaction: {e}");
            }
            let deadline = Instant::now() + self.cfg.commit_interval;
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
                        match rt.block_on(async { tokio::time::timeout(left, rx.recv()).await }) {
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
                if let Some(wake) = &self.checkpoints {
                    // Full means it is still busy with the last one.
                    let _ = wake.try_send(());
                }
                self.since_checkpoint = 0;
            }
            // The bound first, so whoever waits on a flush sees it held.
            if let Err(e) = self.enforce_bound() {
                tracing::error!("keeping the buffer bound failed: {e}");
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
                if let Err(e) = self.insert(&rows) {
                    self.stats
                        .write_failed
                        .fetch_add(rows.len() as u64, Ordering::Relaxed);
                    tracing::error!("storing {} records failed: {e}", rows.len());
                }
                self.stats.spent.put(rows);
                false
            }
            Msg::Flush(reply) => {
                flushes.push(reply);
                true
            }
            Msg::Session(cmd, reply) => {
                // Session changes commit alone: a failed command must not
                // roll back the records around it.
                self.commit();
                let out = self.session(cmd);
                if out.is_ok() {
                    self.commit();
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
                self.sync_change(reply, "recording the hub's acknowledgement", |c| {
                    super::sync::apply_acked(c, &acked)
                });
                true
            }
            Msg::SetAside(aside, reply) => {
                self.sync_change(reply, "setting a refused batch aside", |c| {
                    super::sync::apply_set_aside(c, &aside)
                });
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
                let _ = self
                    .conn
                    .execute_batch("ROLLBACK TO sync_change; RELEASE sync_change");
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }

    fn insert(&mut self, rows: &[Row]) -> rusqlite::Result<()> {
        let session = self.current.map(|(sid, _)| sid);
        let mut insert = super::insert::Insert::new(&self.conn)?;
        let mut dropped: u64 = 0;
        for r in rows {
            insert.row(self.next_seq, session, r)?;
            self.next_seq += 1;
            dropped += r.client_dropped;
        }
        drop(insert);
        if dropped > 0 {
            self.conn.prepare_cached(ADD_GAP)?.execute(params![
                session.unwrap_or(0),
                Level::Info.code(),
                gap_reason::CLIENT_DROPPED,
                dropped as i64
            ])?;
        }
        if let Some(sid) = session {
            *self.log_counts.entry(sid).or_default() += rows.len() as u64;
        }
        self.stats
            .last_seq
            .store(self.next_seq - 1, Ordering::Relaxed);
        self.stats
            .records_stored
            .fetch_add(rows.len() as i64, Ordering::Relaxed);
        self.stats
            .committed
            .fetch_add(rows.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Commits the open transaction, if any.
    fn commit(&mut self) {
        if self.conn.is_autocommit() {
            return;
        }
        for (sid, n) in self.log_counts.drain() {
            if let Err(e) = self.conn.execute(
                "UPDATE sessions SET log_count = log_count + ?2 WHERE sid = ?1",
                params![sid, n as i64],
            ) {
                tracing::error!("updating a session's log count failed: {e}");
            }
        }
        if let Err(e) = self.conn.execute(
            "INSERT INTO meta(key, value) VALUES ('next_seq', ?1) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [self.next_seq],
        ) {
            tracing::error!("persisting the seq counter failed: {e}");
        }
        match self.conn.execute_batch("COMMIT") {
            Ok(()) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::error!("commit failed: {e}");
                let _ = self.conn.execute_batch("ROLLBACK");
                // The acknowledgements in it are lost: say so now.
                for (reply, _) in self.sync_replies.drain(..) {
                    let _ = reply.send(Err(format!("commit failed: {e}")));
                }
            }
        }
    }

    fn resolve(&self, target: Target) -> Result<i64, SessionError> {
        match target {
            Target::Current => self
                .current
                .map(|(sid, _)| sid)
                .ok_or(SessionError::NoActive),
            Target::Id(id) => self
                .conn
                .query_row(
                    "SELECT sid FROM sessions WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| SessionError::Store(e.to_string()))?
                .ok_or(SessionError::NotFound(id)),
        }
    }

    fn view(&self, sid: i64) -> Result<SessionView, SessionError> {
        session_by_sid(&self.conn, &self.cfg.view, sid)
            .map_err(|e| SessionError::Store(e.to_string()))?
            .ok_or_else(|| SessionError::Store("session vanished".into()))
    }

    fn session(&mut self, cmd: SessionCmd) -> Result<SessionView, SessionError> {
        let store = |e: rusqlite::Error| SessionError::Store(e.to_string());
        self.conn.execute_batch("BEGIN").map_err(store)?;
        match cmd {
            SessionCmd::Open(req) => {
                if let Some((_, id)) = self.current {
                    return Err(SessionError::Active(id));
                }
                if req.tags.len() > MAX_TAGS {
                    return Err(SessionError::Invalid(format!(
                        "a session has at most {MAX_TAGS} tags"
                    )));
                }
                let mut tags = Vec::new();
                for t in req.tags {
                    let t = check_tag(&t)?;
                    if !tags.contains(&t) {
                        tags.push(t);
                    }
                }
                if let Some(p) = &req.package {
                    if p.name.trim().is_empty() || p.name.len() > 256 {
                        return Err(SessionError::Invalid(
                            "package name must be 1 to 256 characters".into(),
                        ));
                    }
                }
                let metadata = serde_json::to_string(&req.metadata)
                    .map_err(|e| SessionError::Invalid(e.to_string()))?;
                if metadata.len() > 64 << 10 {
                    return Err(SessionError::Invalid(
                        "session metadata is over 64KiB".into(),
                    ));
                }
                let id = Uuid::now_v7();
                let dir = self.cfg.view.artifact_dir(&id);
                std::fs::create_dir_all(&dir).map_err(|e| {
                    SessionError::Store(format!(
                        "cannot create artifact directory {}: {e}",
                        dir.display()
                    ))
                })?;
                self.conn
                    .execute(
                        "INSERT INTO sessions(id, status, started_at_ns, boot_id, started_boottime_ns, tags, \
                         package_name, package_version, metadata) VALUES (?1, 'active', ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![
                            id.to_string(),
                            now_ns(),
                            self.cfg.view.boot_id,
                            boottime_ns(),
                            serde_json::to_string(&tags).expect("strings serialize"),
                            req.package.as_ref().map(|p| p.name.clone()),
                            req.package.as_ref().and_then(|p| p.version.clone()),
                            metadata,
                        ],
                    )
                    .map_err(store)?;
                let sid = self.conn.last_insert_rowid();
                self.current = Some((sid, id));
                tracing::info!("session {id} opened");
                self.view(sid)
            }
            SessionCmd::Stop {
                target,
                failed,
                error,
            } => {
                let sid = self.resolve(target)?;
                if self.current.map(|(s, _)| s) != Some(sid) {
                    let v = self.view(sid)?;
                    return Err(SessionError::NotActive(v.id));
                }
                let (started, boot, started_boot): (i64, String, i64) = self
                    .conn
                    .query_row(
                        "SELECT started_at_ns, boot_id, started_boottime_ns FROM sessions WHERE sid = ?1",
                        [sid],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .map_err(store)?;
                let now = now_ns();
                // The monotonic clock where this boot saw both ends; the
                // wall clock otherwise.
                let duration = if boot == self.cfg.view.boot_id {
                    boottime_ns() - started_boot
                } else {
                    now - started
                };
                let error = if failed {
                    Some(error.unwrap_or_else(|| "failed".into()))
                } else {
                    error
                };
                self.conn
                    .execute(
                        "UPDATE sessions SET status = ?2, ended_at_ns = ?3, duration_ns = ?4, error = ?5, \
                         revision = revision + 1 WHERE sid = ?1",
                        params![
                            sid,
                            if failed { "failed" } else { "completed" },
                            now,
                            duration.max(0),
                            error
                        ],
                    )
                    .map_err(store)?;
                self.current = None;
                let v = self.view(sid)?;
                tracing::info!("session {} {}", v.id, v.status.as_str());
                Ok(v)
            }
            SessionCmd::Tag { target, tag } => {
                let sid = self.resolve(target)?;
                let tag = check_tag(&tag)?;
                let mut v = self.view(sid)?;
                if !v.tags.contains(&tag) {
                    if v.tags.len() >= MAX_TAGS {
                        return Err(SessionError::Invalid(format!(
                            "a session has at most {MAX_TAGS} tags"
                        )));
                    }
                    v.tags.push(tag);
                    self.set_tags(sid, &v.tags)?;
                }
                self.view(sid)
            }
            SessionCmd::Untag { target, tag } => {
                let sid = self.resolve(target)?;
                let mut v = self.view(sid)?;
                let before = v.tags.len();
                v.tags.retain(|t| *t != tag);
                if v.tags.len() != before {
                    self.set_tags(sid, &v.tags)?;
                }
                self.view(sid)
            }
        }
    }

    fn set_tags(&self, sid: i64, tags: &[String]) -> Result<(), SessionError> {
        self.conn
            .execute(
                "UPDATE sessions SET tags = ?2, revision = revision + 1 WHERE sid = ?1",
                params![sid, serde_json::to_string(tags).expect("strings serialize")],
            )
            .map_err(|e| SessionError::Store(e.to_string()))?;
        Ok(())
    }

    fn file_len(&self, suffix: &str) -> u64 {
        let mut p = self.cfg.db_path.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(PathBuf::from(p)).map_or(0, |m| m.len())
    }

    /// Keeps `agent.db` + WAL under `buffer.max_bytes` and the filesystem's
    /// free space above `buffer.min_free_bytes`. Called outside any
    /// transaction, after each commit.
    fn enforce_bound(&mut self) -> Result<(), StoreError> {
        if !self.conn.is_autocommit() {
            return Ok(());
        }
        if self.file_len("-wal") > self.wal_limit {
            self.checkpoint();
        }
        let on_disk = self.file_len("") + self.file_len("-wal");
        self.stats.disk_bytes.store(on_disk, Ordering::Relaxed);
        let free = rustix::fs::statvfs(&self.cfg.state_dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX);
        // What the buffer may occupy: its own bound, and no more than leaves
        // min_free_bytes free on the filesystem.
        let limit = self
            .cfg
            .max_bytes
            .min((on_disk + free).saturating_sub(self.cfg.min_free_bytes));
        // Room for a full WAL and one more transaction on top of the pages.
        let budget = limit.saturating_sub(self.wal_limit + self.tx_bytes as u64 * 2);
        let page_size: u64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))?;
        let pages: u64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        let free_pages: u64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let used = (pages - free_pages) * page_size;
        let file = pages * page_size;
        if used <= budget && file <= budget {
            return Ok(());
        }
        if used > budget {
            // Evict down to 90% of the budget, so eviction runs in chunks
            // rather than on every commit.
            let target = budget / 10 * 9;
            let stored = self.stats.records_stored.load(Ordering::Relaxed).max(1) as u64;
            let per_record = (used / stored).max(1);
            let n = (used - target).div_ceil(per_record).min(stored);
            self.evict(n)?;
        }
        self.conn.execute_batch("PRAGMA incremental_vacuum")?;
        self.checkpoint();
        let on_disk = self.file_len("") + self.file_len("-wal");
        self.stats.disk_bytes.store(on_disk, Ordering::Relaxed);
        Ok(())
    }

    /// Copies the whole WAL into `agent.db` and truncates it. Waits for a
    /// checkpoint the checkpointer thread is running: SQLite refuses a
    /// second one at once (busy, without asking the busy handler), which
    /// would leave the WAL over its bound.
    fn checkpoint(&self) {
        let _one = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
            Ok(0) => {}
            Ok(_) => {
                tracing::debug!("WAL checkpoint left frames behind (a reader is still on them)")
            }
            Err(e) => tracing::warn!("WAL checkpoint failed: {e}"),
        }
    }

    /// Evicts `n` records: synced ones oldest first, then unsynced ones from
    /// the lowest level up, oldest first, counting those as gaps per
    /// session and level.
    fn evict(&mut self, n: u64) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        let mut left = n as i64;
        let synced_gone = super::sync::evict_synced(&tx, left)?;
        left -= synced_gone;
        let mut unsynced_gone = 0i64;
        for level in Level::ALL {
            if left <= 0 {
                break;
            }
            let (per_session, gone) = super::sync::evict_unsynced(&tx, level, left)?;
            let mut gap = tx.prepare_cached(ADD_GAP)?;
            for (session, count) in per_session {
                gap.execute(params![session, level.code(), gap_reason::EVICTED, count])?;
            }
            unsynced_gone += gone;
            left -= gone;
        }
        tx.commit()?;
        self.stats
            .records_stored
            .fetch_sub(synced_gone + unsynced_gone, Ordering::Relaxed);
        self.stats
            .records_synced
            .fetch_sub(synced_gone, Ordering::Relaxed);
        self.stats
            .evicted_synced
            .fetch_add(synced_gone as u64, Ordering::Relaxed);
        self.stats
            .evicted_unsynced
            .fetch_add(unsynced_gone as u64, Ordering::Relaxed);
        if unsynced_gone > 0 {
            tracing::warn!(
                "buffer full: evicted {synced_gone} synced and {unsynced_gone} unsynced records (counted as gaps)"
            );
        }
        Ok(())
    }
}

/// The checkpointer thread: copies committed WAL pages into `agent.db`
/// (a passive checkpoint, which never blocks the writer or readers) each
/// time the writer has committed another [`Writer::tx_bytes`], so the
/// writer never waits for the two fsyncs a checkpoint costs, which on a
/// robot's flash can take longer than the records they follow. Ends when
/// the writer drops its sender. `one` is held during each checkpoint (see
/// [`Writer::checkpoint`]).
fn checkpointer(
    path: &std::path::Path,
    woken: &std::sync::mpsc::Receiver<()>,
    one: &std::sync::Mutex<()>,
) {
    let conn = match Connection::open(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("the checkpointer cannot open {}: {e}", path.display());
            return;
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    while woken.recv().is_ok() {
        let _one = one.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!("WAL checkpoint failed: {e}");
        }
    }
}

/// Tags per session: enough for any labelling scheme, small enough that a
/// session row stays small.
const MAX_TAGS: usize = 64;

fn check_tag(tag: &str) -> Result<String, SessionError> {
    let t = tag.trim();
    if t.is_empty() || t.len() > 128 || t.chars().any(char::is_control) {
        return Err(SessionError::Invalid(format!(
            "tag {tag:?} must be 1 to 128 characters without control characters"
        )));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::record::Trusted;

    fn writer(dir: &std::path::Path) -> Writer {
        let cfg = WriterConfig {
            db_path: dir.join("agent.db"),
            state_dir: dir.to_owned(),
            synchronous_full: false,
            max_bytes: 1 << 30,
            min_free_bytes: 0,
            commit_interval: Duration::from_millis(10),
            commit_records: 1000,
            view: ViewCtx {
                device_id: "d".into(),
                device_name: "n".into(),
                sessions_dir: dir.join("sessions"),
                boot_id: "b".into(),
            },
        };
        Writer::open(cfg, Arc::new(Stats::default())).unwrap()
    }

    fn rows(level: Level, n: usize) -> Vec<Row> {
        (0..n)
            .map(|i| Row {
                ts_ns: i as i64,
                level,
                module: "m".into(),
                message: format!("{level} {i}"),
                metadata: String::new(),
                trusted: Arc::new(Trusted::default()),
                client_dropped: 0,
            })
            .collect()
    }

    /// Inserts in a committed transaction, as the writer loop does.
    fn put(w: &mut Writer, rows: Vec<Row>) {
        w.conn.execute_batch("BEGIN").unwrap();
        w.insert(&rows).unwrap();
        w.commit();
    }

    fn seqs(w: &Writer) -> Vec<i64> {
        let mut stmt = w
            .conn
            .prepare("SELECT seq FROM records ORDER BY seq")
            .unwrap();
        let out = stmt.query_map([], |r| r.get(0)).unwrap();
        out.collect::<rusqlite::Result<_>>().unwrap()
    }

    fn gaps(w: &Writer) -> Vec<(i64, i64, String, i64)> {
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
    fn a_running_writer_checkpoints_on_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let (stats, tx_bytes, wal_limit) = (w.stats.clone(), w.tx_bytes, w.wal_limit);
        let db_len = || {
            std::fs::metadata(dir.path().join("agent.db"))
                .unwrap()
                .len()
        };
        let before = db_len();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let thread = w.spawn(rx, rt.handle().clone()).unwrap();
        // More than one checkpoint's worth of records, less than the WAL
        // limit at which the writer would truncate the WAL itself.
        let big = |i: usize| {
            let mut r = rows(Level::Info, 100);
            for row in &mut r {
                row.message = format!("{i} {}", "x".repeat(1000));
            }
            r
        };
        let n = (tx_bytes * 3 / 2) / (100 * 1000) + 1;
        assert!(n * 100 * 1100 < wal_limit as usize);
        for i in 0..n {
            tx.blocking_send(Msg::Rows(big(i))).unwrap();
        }
        let (done, flushed) = oneshot::channel();
        tx.blocking_send(Msg::Flush(done)).unwrap();
        rt.block_on(flushed).unwrap();
        assert_eq!(stats.committed.load(Ordering::Relaxed), n as u64 * 100);
        // Only a checkpoint moves pages from the WAL into agent.db.
        let deadline = Instant::now() + Duration::from_secs(20);
        while db_len() < before + tx_bytes as u64 {
            assert!(
                Instant::now() < deadline,
                "no checkpoint: agent.db is {} bytes",
                db_len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(tx);
        thread.join().unwrap();
    }

    #[test]
    fn eviction_takes_synced_first_then_lowest_level_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 5)); // seq 1-5
        put(&mut w, rows(Level::Debug, 5)); // seq 6-10
        put(&mut w, rows(Level::Error, 2)); // seq 11-12
        put(&mut w, rows(Level::Trace, 1)); // seq 13
        assert_eq!(
            super::super::sync::mark_records(&w.conn, &[(2, 3), (12, 12)]).unwrap(),
            3
        );
        w.evict(6).unwrap();
        // Synced 2, 3, 12 first; then the trace record; then the two oldest
        // debug records (6, 7). Info 1 is older but outranks them.
        assert_eq!(seqs(&w), vec![1, 4, 5, 8, 9, 10, 11]);
        assert_eq!(
            gaps(&w),
            vec![
                (0, Level::Trace.code() as i64, "evicted".into(), 1),
                (0, Level::Debug.code() as i64, "evicted".into(), 2)
            ]
        );
        assert_eq!(w.stats.evicted_synced.load(Ordering::Relaxed), 3);
        assert_eq!(w.stats.evicted_unsynced.load(Ordering::Relaxed), 3);
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
        let sid: i64 = w
            .conn
            .query_row(
                "SELECT sid FROM sessions WHERE id = ?1",
                [open.id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            gaps(&w),
            vec![(sid, Level::Info.code() as i64, "client_dropped".into(), 18)]
        );
    }

    #[test]
    fn an_acknowledgement_sqlite_refuses_is_answered_and_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 5));
        let acked = || super::super::sync::Acked {
            records: vec![(1, 5)],
            sessions: Vec::new(),
            gaps: vec![(0, Level::Info, "evicted".into(), 3)],
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
}
