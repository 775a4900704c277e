//! The hub's storage: one SQLite database (WAL) holding tokens, devices,
//! sessions, logs (with an FTS5 index of messages), gaps, artifacts and
//! uploads in progress. Every method is blocking; callers run them on
//! `spawn_blocking`.
//!
//! Invariant: this is the only module of `hub` that runs SQL, and its
//! methods are the whole storage interface (a PostgreSQL store would
//! implement the same methods). One batch is one transaction: it is stored
//! whole or not at all.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Transaction};

use crate::wire::{Batch, BatchAck, Level, SessionState, SessionStatus};

/// Numbered migrations; `PRAGMA user_version` is how many have run.
const MIGRATIONS: &[&str] = &[include_str!("001_initial.sql")];

/// Reader connections kept open between requests.
const MAX_IDLE_READERS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this logbook-hub understands ({known}); upgrade logbook-hub"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    /// The request contradicts what is stored (e.g. a session id owned by
    /// another device).
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Reads and manages everything of one organization.
    Operator,
    /// Ingests for one device of one project.
    Device,
}

impl TokenKind {
    fn as_str(self) -> &'static str {
        match self {
            TokenKind::Operator => "operator",
            TokenKind::Device => "device",
        }
    }
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: TokenKind,
    pub org: String,
    pub project: String,
    /// Set for device tokens only.
    pub device_id: Option<String>,
}

/// The device a batch or upload comes from, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScope {
    pub org: String,
    pub project: String,
    pub device_id: String,
}

/// One stored log record, joined with its session and device ids.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    /// The hub's row id: the order records were committed in here (not the
    /// device's `seq` order: errors and set-asides arrive out of it). Live
    /// streams resume after it.
    pub id: i64,
    pub device_pk: i64,
    pub session_pk: Option<i64>,
    pub session_id: Option<String>,
    pub device_id: String,
    pub seq: u64,
    pub timestamp_ns: i64,
    pub level: Level,
    pub module: String,
    pub message: String,
    /// JSON object text, or empty.
    pub metadata: String,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub process: Option<String>,
}

/// Result of storing one batch.
#[derive(Debug)]
pub struct Ingested {
    pub ack: BatchAck,
    /// Records newly stored (for live streams); empty unless asked for.
    pub live: Vec<LogRow>,
    /// Sessions whose state changed (pk, new status).
    pub changed_sessions: Vec<(i64, SessionStatus)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GapRow {
    pub level: Level,
    pub reason: String,
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub pk: i64,
    pub id: String,
    pub device_id: String,
    pub device_name: String,
    pub status: String,
    pub started_at_ns: i64,
    pub ended_at_ns: Option<i64>,
    pub duration_ns: Option<i64>,
    pub tags: Vec<String>,
    pub package_name: Option<String>,
    pub package_version: Option<String>,
    /// JSON object text.
    pub metadata: String,
    pub error: Option<String>,
    /// Stored records per level, indexed by `Level::code`.
    pub level_counts: [u64; 6],
    pub artifact_count: u64,
    pub artifact_bytes: u64,
    /// Filled by `get_session` only.
    pub gaps: Vec<GapRow>,
}

/// Sort keys of the session list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionSort {
    #[default]
    StartedAt,
    EndedAt,
    Duration,
}

impl SessionSort {
    fn expr(self) -> &'static str {
        match self {
            SessionSort::StartedAt => "s.started_at_ns",
            // Active sessions have not ended: they sort as the latest.
            SessionSort::EndedAt => "COALESCE(s.ended_at_ns, 9223372036854775807)",
            SessionSort::Duration => "COALESCE(s.duration_ns, 0)",
        }
    }
}

/// A keyset position in the session list: the sort value and the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCursor {
    pub value: i64,
    pub pk: i64,
}

#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    pub device_id: Option<String>,
    pub status: Option<String>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    /// Every tag must be present.
    pub tags: Vec<String>,
    pub package_name: Option<String>,
    pub package_version: Option<String>,
    pub has_errors: Option<bool>,
    /// `metadata` key equals the JSON value.
    pub metadata: Vec<(String, serde_json::Value)>,
    pub sort: SessionSort,
    pub descending: bool,
    pub limit: u64,
    /// Rows to skip (page-number pagination); ignored with a cursor.
    pub offset: u64,
    pub cursor: Option<SessionCursor>,
}

#[derive(Debug)]
pub struct SessionPage {
    pub items: Vec<SessionRow>,
    pub total: u64,
    pub next_cursor: Option<SessionCursor>,
}

/// Whose logs to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogScope {
    Session(i64),
    /// Records a device sent outside any session.
    Device(i64),
}

#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// At or above this level.
    pub min_level: Option<Level>,
    /// Exact module, or a prefix when it ends with `*`.
    pub module: Option<String>,
    pub search: Option<String>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub limit: u64,
    /// Ascending seq order (default: newest first).
    pub ascending: bool,
    /// Exclusive seq bound in the direction of travel.
    pub cursor: Option<u64>,
    /// Also count every match (costs a second query).
    pub want_total: bool,
}

#[derive(Debug)]
pub struct LogPage {
    pub items: Vec<LogRow>,
    pub total: Option<u64>,
    pub next_cursor: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRow {
    pub path: String,
    pub size: u64,
    pub content_type: String,
    pub sha256: String,
    pub blob: String,
    pub created_at_ns: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UploadRow {
    pub id: String,
    pub device_pk: i64,
    pub session_pk: i64,
    pub path: String,
    pub content_type: String,
    pub sha256: String,
    pub length: u64,
    /// The `Upload-Metadata` header as received, echoed on HEAD.
    pub metadata: String,
    pub created_at_ns: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub pk: i64,
    pub device_id: String,
    pub name: String,
    pub last_seen_ns: i64,
    pub skew_ns: i64,
}

/// Files to remove after a session was deleted.
#[derive(Debug, Default)]
pub struct Deleted {
    pub blobs: Vec<String>,
    pub uploads: Vec<String>,
}

pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

fn pragmas(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Runs the migrations `user_version` has not seen, in one transaction;
/// refuses a database newer than this binary.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for sql in &MIGRATIONS[found as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

fn now_ns() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

fn level_of(code: i64) -> Level {
    Level::from_code(code.clamp(0, 5) as u8).unwrap_or(Level::Info)
}

/// `SELECT` columns for a [`LogRow`], in the order `log_row` reads them.
const LOG_COLUMNS: &str = "l.session_pk, s.id, d.device_id, l.seq, l.ts, l.level, l.module, \
     l.message, l.metadata, l.pid, l.uid, l.gid, l.process, l.id, l.device_pk";

fn log_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow {
        session_pk: r.get(0)?,
        session_id: r.get(1)?,
        device_id: r.get(2)?,
        seq: r.get::<_, i64>(3)? as u64,
        timestamp_ns: r.get(4)?,
        level: level_of(r.get(5)?),
        module: r.get(6)?,
        message: r.get(7)?,
        metadata: r.get(8)?,
        pid: r.get(9)?,
        uid: r.get(10)?,
        gid: r.get(11)?,
        process: r.get(12)?,
        id: r.get(13)?,
        device_pk: r.get(14)?,
    })
}

const SESSION_COLUMNS: &str = "s.pk, s.id, d.device_id, d.name, s.status, s.started_at_ns, \
     s.ended_at_ns, s.duration_ns, s.package_name, s.package_version, s.metadata, s.error, \
     s.n_trace, s.n_debug, s.n_info, s.n_warn, s.n_error, s.n_fatal, s.artifact_count, \
     s.artifact_bytes";

fn session_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    let mut level_counts = [0u64; 6];
    for (i, c) in level_counts.iter_mut().enumerate() {
        *c = r.get::<_, i64>(12 + i)? as u64;
    }
    Ok(SessionRow {
        pk: r.get(0)?,
        id: r.get(1)?,
        device_id: r.get(2)?,
        device_name: r.get(3)?,
        status: r.get(4)?,
        started_at_ns: r.get(5)?,
        ended_at_ns: r.get(6)?,
        duration_ns: r.get(7)?,
        tags: Vec::new(),
        package_name: r.get(8)?,
        package_version: r.get(9)?,
        metadata: r.get(10)?,
        error: r.get(11)?,
        level_counts,
        artifact_count: r.get::<_, i64>(18)? as u64,
        artifact_bytes: r.get::<_, i64>(19)? as u64,
        gaps: Vec::new(),
    })
}

/// Turns a user's search text into an FTS5 query: every word must occur as
/// a whole word (case-insensitive). Quotes keep FTS5 syntax out of user
/// hands. Whole words, not prefixes: a prefix query merges the doclists of
/// every matching term across the whole hub before the session's rowid
/// range can narrow it (18 ms instead of 1.5 ms at 500k records).
/// `None` when the text has no word characters at all.
pub fn fts_query(search: &str) -> Option<String> {
    let words: Vec<String> = search
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| format!("\"{w}\""))
        .collect();
    if words.is_empty() {
        None
    } else {
        Some(words.join(" AND "))
    }
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        pragmas(&conn).map_err(open_err)?;
        // The writer keeps the hot index pages of every device and session
        // in memory (64 MiB), and checkpoints less often, so a page written
        // by many batches reaches the database file once per checkpoint.
        conn.pragma_update(None, "cache_size", -65536)
            .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", 8192))
            .and_then(|()| conn.pragma_update(None, "temp_store", "MEMORY"))
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        Ok(Store {
            path: path.to_owned(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
        })
    }

    fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.path)?;
                pragmas(&c)?;
                c
            }
        };
        let out = f(&conn);
        let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        out
    }

    // ----- tokens -----

    /// Stores the hash of a new token.
    pub fn create_token(&self, hash: &str, principal: &Principal) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO tokens (hash, kind, org, project, device_id, created_at_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    hash,
                    principal.kind.as_str(),
                    principal.org,
                    principal.project,
                    principal.device_id,
                    now_ns()
                ],
            )?;
            Ok(())
        })
    }

    pub fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT kind, org, project, device_id FROM tokens WHERE hash = ?1",
            )?
            .query_row([hash], |r| {
                let kind: String = r.get(0)?;
                Ok(Principal {
                    kind: if kind == "operator" {
                        TokenKind::Operator
                    } else {
                        TokenKind::Device
                    },
                    org: r.get(1)?,
                    project: r.get(2)?,
                    device_id: r.get(3)?,
                })
            })
            .optional()?)
        })
    }

    // ----- ingest -----

    /// Stores one batch in one transaction. `want_live` asks for copies of
    /// the newly stored records (only worth it when someone streams).
    pub fn ingest(
        &self,
        scope: &DeviceScope,
        batch: &Batch,
        want_live: bool,
    ) -> Result<Ingested, StoreError> {
        let hub_time = now_ns();
        self.write(|tx| {
            let device_pk: i64 = tx.query_row(
                "INSERT INTO devices (org, project, device_id, name, last_seen_ns, skew_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (org, project, device_id) DO UPDATE SET
                   name = excluded.name, last_seen_ns = excluded.last_seen_ns,
                   skew_ns = excluded.skew_ns
                 RETURNING pk",
                params![
                    scope.org,
                    scope.project,
                    scope.device_id,
                    batch.device.name,
                    hub_time,
                    hub_time.saturating_sub(batch.sent_at_ns)
                ],
                |r| r.get(0),
            )?;
            let mut ing = Ingest {
                tx,
                scope,
                device_pk,
                sessions: HashMap::new(),
            };
            let mut changed_sessions = Vec::new();
            for state in &batch.sessions {
                if let Some(pk) = ing.apply_state(state)? {
                    changed_sessions.push((pk, state.status));
                }
            }

            let mut stored = 0u64;
            let mut duplicates = 0u64;
            let mut live = Vec::new();
            // Per session: level counts and the range of new row ids.
            let mut touched: HashMap<i64, ([i64; 6], i64, i64)> = HashMap::new();
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO logs (device_pk, seq, session_pk, ts, level, module, message,
                                       metadata, pid, uid, gid, process)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (device_pk, seq) DO NOTHING",
                )?;
                let mut fts =
                    tx.prepare_cached("INSERT INTO logs_fts (rowid, message) VALUES (?1, ?2)")?;
                for rec in &batch.records {
                    let session_pk = match rec.session_id {
                        Some(id) => match ing.session_for_record(id, rec.timestamp_ns)? {
                            Some(pk) => Some(pk),
                            // The operator deleted this session: acknowledge
                            // its records without storing them.
                            None => {
                                duplicates += 1;
                                continue;
                            }
                        },
                        None => None,
                    };
                    let n = insert.execute(params![
                        device_pk,
                        rec.seq as i64,
                        session_pk,
                        rec.timestamp_ns,
                        rec.level.code(),
                        rec.module,
                        rec.message,
                        rec.metadata,
                        rec.pid,
                        rec.uid,
                        rec.gid,
                        rec.process
                    ])?;
                    if n == 0 {
                        duplicates += 1;
                        continue;
                    }
                    stored += 1;
                    let id = tx.last_insert_rowid();
                    fts.execute(params![id, rec.message])?;
                    if let Some(pk) = session_pk {
                        let t = touched.entry(pk).or_insert(([0; 6], id, id));
                        t.0[rec.level.code() as usize] += 1;
                        t.1 = t.1.min(id);
                        t.2 = t.2.max(id);
                    }
                    if want_live {
                        live.push(LogRow {
                            id,
                            device_pk,
                            session_pk,
                            session_id: rec.session_id.map(|u| u.to_string()),
                            device_id: scope.device_id.clone(),
                            seq: rec.seq,
                            timestamp_ns: rec.timestamp_ns,
                            level: rec.level,
                            module: rec.module.clone(),
                            message: rec.message.clone(),
                            metadata: rec.metadata.clone(),
                            pid: rec.pid,
                            uid: rec.uid,
                            gid: rec.gid,
                            process: rec.process.clone(),
                        });
                    }
                }
            }
            {
                let mut bump = tx.prepare_cached(
                    "UPDATE sessions SET n_trace = n_trace + ?2, n_debug = n_debug + ?3,
                       n_info = n_info + ?4, n_warn = n_warn + ?5, n_error = n_error + ?6,
                       n_fatal = n_fatal + ?7,
                       first_log_id = min(COALESCE(first_log_id, ?8), ?8),
                       last_log_id = max(COALESCE(last_log_id, ?9), ?9)
                     WHERE pk = ?1",
                )?;
                for (pk, (c, lo, hi)) in &touched {
                    bump.execute(params![pk, c[0], c[1], c[2], c[3], c[4], c[5], lo, hi])?;
                }
            }
            let mut gaps = 0u64;
            for gap in &batch.gaps {
                let session_pk = match gap.session_id {
                    Some(id) => match ing.session_for_record(id, batch.sent_at_ns)? {
                        Some(pk) => pk,
                        None => continue,
                    },
                    None => 0,
                };
                tx.prepare_cached(
                    "INSERT INTO gaps (device_pk, session_pk, level, reason, dropped)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT DO UPDATE SET dropped = max(dropped, excluded.dropped)",
                )?
                .execute(params![
                    device_pk,
                    session_pk,
                    gap.level.code(),
                    gap.reason,
                    gap.dropped.min(i64::MAX as u64) as i64
                ])?;
                gaps += 1;
            }
            Ok(Ingested {
                ack: BatchAck {
                    stored,
                    duplicates,
                    acked: crate::wire::seq_ranges(batch.records.iter().map(|r| r.seq)),
                    sessions: changed_sessions.len() as u64,
                    gaps,
                    hub_time_ns: hub_time,
                },
                live,
                changed_sessions,
            })
        })
    }

    // ----- sessions -----

    /// The session's row id, if it exists in this org and project.
    pub fn find_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<i64>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT pk FROM sessions WHERE org = ?1 AND project = ?2 AND id = ?3",
            )?
            .query_row([org, project, id], |r| r.get(0))
            .optional()?)
        })
    }

    /// The session of a device, made as a placeholder if the device's state
    /// has not arrived yet (uploads may race the batch that opens it).
    /// `None` when the session was deleted.
    pub fn session_for_device(
        &self,
        scope: &DeviceScope,
        id: uuid::Uuid,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let now = now_ns();
        self.write(|tx| {
            let device_pk: i64 = tx.query_row(
                "INSERT INTO devices (org, project, device_id, name, last_seen_ns, skew_ns)
                 VALUES (?1, ?2, ?3, ?3, ?4, 0)
                 ON CONFLICT (org, project, device_id) DO UPDATE SET last_seen_ns = excluded.last_seen_ns
                 RETURNING pk",
                params![scope.org, scope.project, scope.device_id, now],
                |r| r.get(0),
            )?;
            let mut ing = Ingest {
                tx,
                scope,
                device_pk,
                sessions: HashMap::new(),
            };
            Ok(ing
                .session_for_record(id, now)?
                .map(|pk| (pk, device_pk)))
        })
    }

    pub fn get_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<SessionRow>, StoreError> {
        self.read(|c| {
            let sql = format!(
                "SELECT {SESSION_COLUMNS} FROM sessions s JOIN devices d ON d.pk = s.device_pk
                 WHERE s.org = ?1 AND s.project = ?2 AND s.id = ?3"
            );
            let Some(mut row) = c
                .prepare_cached(&sql)?
                .query_row([org, project, id], session_row)
                .optional()?
            else {
                return Ok(None);
            };
            row.tags = tags_of(c, row.pk)?;
            let mut st = c.prepare_cached(
                "SELECT level, reason, sum(dropped) FROM gaps WHERE session_pk = ?1
                 GROUP BY level, reason ORDER BY level, reason",
            )?;
            row.gaps = st
                .query_map([row.pk], |r| {
                    Ok(GapRow {
                        level: level_of(r.get(0)?),
                        reason: r.get(1)?,
                        dropped: r.get::<_, i64>(2)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(Some(row))
        })
    }

    pub fn list_sessions(
        &self,
        org: &str,
        project: &str,
        q: &SessionQuery,
    ) -> Result<SessionPage, StoreError> {
        let mut w = Where::default();
        w.and("s.org = ?", [org.to_owned().into()]);
        w.and("s.project = ?", [project.to_owned().into()]);
        w.and_some("d.device_id = ?", q.device_id.clone());
        w.and_some("s.status = ?", q.status.clone());
        w.and_some("s.started_at_ns >= ?", q.since_ns);
        w.and_some("s.started_at_ns < ?", q.until_ns);
        for tag in &q.tags {
            w.and(
                "EXISTS (SELECT 1 FROM session_tags t WHERE t.session_pk = s.pk AND t.tag = ?)",
                [tag.clone().into()],
            );
        }
        w.and_some("s.package_name = ?", q.package_name.clone());
        w.and_some("s.package_version = ?", q.package_version.clone());
        match q.has_errors {
            Some(true) => w.and("(s.n_error + s.n_fatal) > 0", []),
            Some(false) => w.and("(s.n_error + s.n_fatal) = 0", []),
            None => {}
        }
        for (key, value) in &q.metadata {
            w.and(
                "json_extract(s.metadata, ?) = json_extract(?, '$')",
                [format!("$.\"{key}\"").into(), value.to_string().into()],
            );
        }
        let (where_, args) = w.finish();
        let key = q.sort.expr();
        let (cmp, dir) = if q.descending {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        self.read(|c| {
            let total: i64 = c.query_row(
                &format!(
                    "SELECT count(*) FROM sessions s JOIN devices d ON d.pk = s.device_pk
                     WHERE {where_}"
                ),
                rusqlite::params_from_iter(args.iter()),
                |r| r.get(0),
            )?;
            let mut page_args = args.clone();
            let mut page_where = where_.clone();
            if let Some(cur) = q.cursor {
                page_where.push_str(&format!(
                    " AND ({key} {cmp} ? OR ({key} = ? AND s.pk {cmp} ?))"
                ));
                page_args.extend([cur.value.into(), cur.value.into(), cur.pk.into()]);
            }
            let offset = if q.cursor.is_some() { 0 } else { q.offset };
            let sql = format!(
                "SELECT {SESSION_COLUMNS}, {key} FROM sessions s JOIN devices d ON d.pk = s.device_pk
                 WHERE {page_where} ORDER BY {key} {dir}, s.pk {dir} LIMIT {} OFFSET {offset}",
                // One more than asked: whether it exists says if there is a next page.
                q.limit + 1
            );
            let mut st = c.prepare_cached(&sql)?;
            let mut keys = Vec::new();
            let mut items: Vec<SessionRow> = st
                .query_map(rusqlite::params_from_iter(page_args.iter()), |r| {
                    let row = session_row(r)?;
                    Ok((row, r.get::<_, i64>(20)?))
                })?
                .map(|r| {
                    r.map(|(row, k)| {
                        keys.push((k, row.pk));
                        row
                    })
                })
                .collect::<Result<_, _>>()?;
            let more = items.len() as u64 > q.limit;
            items.truncate(q.limit as usize);
            keys.truncate(q.limit as usize);
            for row in &mut items {
                row.tags = tags_of(c, row.pk)?;
            }
            let next_cursor = if more {
                keys.last().map(|&(value, pk)| SessionCursor { value, pk })
            } else {
                None
            };
            Ok(SessionPage {
                items,
                total: total as u64,
                next_cursor,
            })
        })
    }

    /// Deletes a session with its logs, tags, gaps, artifacts and uploads;
    /// returns the files to remove, or `None` if there was no such session.
    pub fn delete_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<Deleted>, StoreError> {
        self.write(|tx| {
            let Some(pk): Option<i64> = tx
                .query_row(
                    "SELECT pk FROM sessions WHERE org = ?1 AND project = ?2 AND id = ?3",
                    [org, project, id],
                    |r| r.get(0),
                )
                .optional()?
            else {
                return Ok(None);
            };
            let mut deleted = Deleted::default();
            {
                let mut st = tx.prepare("SELECT blob FROM artifacts WHERE session_pk = ?1")?;
                deleted.blobs = st
                    .query_map([pk], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                let mut st = tx.prepare("SELECT id FROM uploads WHERE session_pk = ?1")?;
                deleted.uploads = st
                    .query_map([pk], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
            }
            tx.execute(
                "INSERT INTO logs_fts (logs_fts, rowid, message)
                 SELECT 'delete', id, message FROM logs WHERE session_pk = ?1",
                [pk],
            )?;
            tx.execute("DELETE FROM logs WHERE session_pk = ?1", [pk])?;
            for table in ["session_tags", "gaps", "artifacts", "uploads"] {
                tx.execute(&format!("DELETE FROM {table} WHERE session_pk = ?1"), [pk])?;
            }
            tx.execute("DELETE FROM sessions WHERE pk = ?1", [pk])?;
            tx.execute(
                "INSERT OR IGNORE INTO deleted_sessions (org, project, id) VALUES (?1, ?2, ?3)",
                [org, project, id],
            )?;
            Ok(Some(deleted))
        })
    }

    /// Adds an operator tag; false if the session does not exist.
    pub fn add_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let Some(pk) = session_pk(tx, org, project, id)? else {
                return Ok(false);
            };
            tx.execute(
                "INSERT OR IGNORE INTO session_tags (session_pk, tag, source) VALUES (?1, ?2, 'operator')",
                params![pk, tag],
            )?;
            Ok(true)
        })
    }

    /// Removes a tag whoever set it; `None` if the session does not exist,
    /// else whether the tag was there.
    pub fn remove_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<Option<bool>, StoreError> {
        self.write(|tx| {
            let Some(pk) = session_pk(tx, org, project, id)? else {
                return Ok(None);
            };
            let n = tx.execute(
                "DELETE FROM session_tags WHERE session_pk = ?1 AND tag = ?2",
                params![pk, tag],
            )?;
            Ok(Some(n > 0))
        })
    }

    pub fn list_devices(&self, org: &str, project: &str) -> Result<Vec<DeviceRow>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT pk, device_id, name, last_seen_ns, skew_ns FROM devices
                 WHERE org = ?1 AND project = ?2 ORDER BY device_id",
            )?;
            let rows = st
                .query_map([org, project], device_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    pub fn find_device(
        &self,
        org: &str,
        project: &str,
        device_id: &str,
    ) -> Result<Option<DeviceRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT pk, device_id, name, last_seen_ns, skew_ns FROM devices
                 WHERE org = ?1 AND project = ?2 AND device_id = ?3",
            )?
            .query_row([org, project, device_id], device_row)
            .optional()?)
        })
    }

    // ----- logs -----

    pub fn logs(&self, scope: LogScope, q: &LogQuery) -> Result<LogPage, StoreError> {
        self.read(|c| logs_page(c, scope, q))
    }

    /// The newest `q.limit` records of `scope` as [`Store::logs`] gives
    /// them, and an id every record of that same snapshot is at or below
    /// (`None` when there is none): a live stream's starting point.
    pub fn logs_tail(
        &self,
        scope: LogScope,
        q: &LogQuery,
    ) -> Result<(LogPage, Option<i64>), StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let page = logs_page(&tx, scope, q)?;
            let last = last_log_id(&tx, scope)?;
            tx.finish()?;
            Ok((page, last))
        })
    }

    /// Up to `limit` records of `scope` committed after hub row id `after`
    /// (see [`LogRow::id`]) and matching `q` (its limit, order and cursor
    /// aside), in commit order, and the id the next call should start
    /// after: the last one read, or, when fewer than `limit` came back, the
    /// last id of the same snapshot (so records that did not match are not
    /// read again).
    pub fn logs_after(
        &self,
        scope: LogScope,
        after: i64,
        q: &LogQuery,
        limit: u64,
    ) -> Result<(Vec<LogRow>, i64), StoreError> {
        self.read(|c| {
            let tx = c.unchecked_transaction()?;
            let last = last_log_id(&tx, scope)?.unwrap_or(after);
            // A range of the primary key, bounded by the last id: the rows
            // the hub committed since `after` are read (all devices'),
            // never a scope's whole index and a sort of it.
            let (mut where_, mut args) = log_where(&tx, scope, q, false)?;
            where_.push_str(" AND l.id > ? AND l.id <= ?");
            args.push(after.into());
            args.push(last.into());
            let sql = format!(
                "SELECT {LOG_COLUMNS} FROM logs l
                 LEFT JOIN sessions s ON s.pk = l.session_pk
                 JOIN devices d ON d.pk = l.device_pk
                 WHERE {where_} ORDER BY l.id LIMIT {limit}"
            );
            let rows: Vec<LogRow> = tx
                .prepare_cached(&sql)?
                .query_map(rusqlite::params_from_iter(args.iter()), log_row)?
                .collect::<Result<_, _>>()?;
            tx.finish()?;
            let next = match rows.last() {
                Some(r) if rows.len() as u64 >= limit => r.id,
                _ => last.max(after),
            };
            Ok((rows, next))
        })
    }

    /// Whether a session's state says it is still active.
    pub fn session_status(&self, pk: i64) -> Result<Option<String>, StoreError> {
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT status FROM sessions WHERE pk = ?1")?
                    .query_row([pk], |r| r.get(0))
                    .optional()?,
            )
        })
    }

    // ----- artifacts and uploads -----

    pub fn list_artifacts(&self, session_pk: i64) -> Result<Vec<ArtifactRow>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT path, size, content_type, sha256, blob, created_at_ns FROM artifacts
                 WHERE session_pk = ?1 ORDER BY path",
            )?;
            let rows = st
                .query_map([session_pk], artifact_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    pub fn get_artifact(
        &self,
        session_pk: i64,
        path: &str,
    ) -> Result<Option<ArtifactRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT path, size, content_type, sha256, blob, created_at_ns FROM artifacts
                 WHERE session_pk = ?1 AND path = ?2",
            )?
            .query_row(params![session_pk, path], artifact_row)
            .optional()?)
        })
    }

    /// Records a completed upload as the session's artifact at its path,
    /// replacing (and returning the blob of) any earlier one, and forgets
    /// the upload.
    pub fn complete_upload(
        &self,
        upload: &UploadRow,
        blob: &str,
    ) -> Result<Option<String>, StoreError> {
        self.write(|tx| {
            let old: Option<String> = tx
                .query_row(
                    "SELECT blob FROM artifacts WHERE session_pk = ?1 AND path = ?2",
                    params![upload.session_pk, upload.path],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute(
                "INSERT INTO artifacts (session_pk, path, size, content_type, sha256, blob, created_at_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (session_pk, path) DO UPDATE SET size = excluded.size,
                   content_type = excluded.content_type, sha256 = excluded.sha256,
                   blob = excluded.blob, created_at_ns = excluded.created_at_ns",
                params![
                    upload.session_pk,
                    upload.path,
                    upload.length as i64,
                    upload.content_type,
                    upload.sha256,
                    blob,
                    now_ns()
                ],
            )?;
            tx.execute(
                "UPDATE sessions SET
                   artifact_count = (SELECT count(*) FROM artifacts WHERE session_pk = ?1),
                   artifact_bytes = (SELECT COALESCE(sum(size), 0) FROM artifacts WHERE session_pk = ?1)
                 WHERE pk = ?1",
                [upload.session_pk],
            )?;
            tx.execute("DELETE FROM uploads WHERE id = ?1", [&upload.id])?;
            Ok(old)
        })
    }

    pub fn create_upload(&self, upload: &UploadRow) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO uploads (id, device_pk, session_pk, path, content_type, sha256, length,
                                      metadata, created_at_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    upload.id,
                    upload.device_pk,
                    upload.session_pk,
                    upload.path,
                    upload.content_type,
                    upload.sha256,
                    upload.length as i64,
                    upload.metadata,
                    upload.created_at_ns
                ],
            )?;
            Ok(())
        })
    }

    pub fn get_upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1"
            ))?
            .query_row([id], upload_row)
            .optional()?)
        })
    }

    /// An unfinished upload of this device for the same file version, so
    /// a retried creation (its answer lost on the way) resumes that upload
    /// instead of leaving an orphan behind.
    pub fn find_unfinished_upload(
        &self,
        device_pk: i64,
        session_pk: i64,
        path: &str,
        sha256: &str,
        length: u64,
    ) -> Result<Option<UploadRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE device_pk = ?1 AND session_pk = ?2
                 AND path = ?3 AND sha256 = ?4 AND length = ?5 ORDER BY created_at_ns DESC LIMIT 1"
            ))?
            .query_row(
                params![device_pk, session_pk, path, sha256, length as i64],
                upload_row,
            )
            .optional()?)
        })
    }

    /// Uploads a device has started and not finished.
    pub fn unfinished_uploads(&self, device_pk: i64) -> Result<u64, StoreError> {
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT count(*) FROM uploads WHERE device_pk = ?1")?
                    .query_row([device_pk], |r| r.get::<_, i64>(0))? as u64,
            )
        })
    }

    /// Up to `limit` unfinished uploads created before `before_ns`, oldest
    /// first and after `(created_at_ns, id)` cursor `after` when given: the
    /// candidates for expiry, a page at a time.
    pub fn uploads_created_before(
        &self,
        before_ns: i64,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError> {
        let (at, id) = after.unwrap_or((i64::MIN, ""));
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads
                 WHERE created_at_ns < ?1 AND (created_at_ns, id) > (?2, ?3)
                 ORDER BY created_at_ns, id LIMIT ?4"
            ))?;
            let rows = st
                .query_map(params![before_ns, at, id, limit], upload_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    pub fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| Ok(tx.execute("DELETE FROM uploads WHERE id = ?1", [id])? > 0))
    }
}

/// `SELECT` columns for an [`UploadRow`], in the order `upload_row` reads
/// them.
const UPLOAD_COLUMNS: &str =
    "id, device_pk, session_pk, path, content_type, sha256, length, metadata, created_at_ns";

fn upload_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UploadRow> {
    Ok(UploadRow {
        id: r.get(0)?,
        device_pk: r.get(1)?,
        session_pk: r.get(2)?,
        path: r.get(3)?,
        content_type: r.get(4)?,
        sha256: r.get(5)?,
        length: r.get::<_, i64>(6)? as u64,
        metadata: r.get(7)?,
        created_at_ns: r.get(8)?,
    })
}

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeviceRow> {
    Ok(DeviceRow {
        pk: r.get(0)?,
        device_id: r.get(1)?,
        name: r.get(2)?,
        last_seen_ns: r.get(3)?,
        skew_ns: r.get(4)?,
    })
}

fn artifact_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ArtifactRow> {
    Ok(ArtifactRow {
        path: r.get(0)?,
        size: r.get::<_, i64>(1)? as u64,
        content_type: r.get(2)?,
        sha256: r.get(3)?,
        blob: r.get(4)?,
        created_at_ns: r.get(5)?,
    })
}

fn session_pk(c: &Connection, org: &str, project: &str, id: &str) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT pk FROM sessions WHERE org = ?1 AND project = ?2 AND id = ?3")?
        .query_row([org, project, id], |r| r.get(0))
        .optional()
}

fn tags_of(c: &Connection, pk: i64) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare_cached(
        "SELECT DISTINCT tag FROM session_tags WHERE session_pk = ?1 ORDER BY tag",
    )?;
    let tags = st.query_map([pk], |r| r.get(0))?.collect();
    tags
}

/// A `WHERE` clause built from optional filters: each condition with its
/// `?` parameters, joined with `AND`, parameters in the same order.
#[derive(Default)]
struct Where {
    conditions: Vec<&'static str>,
    args: Vec<Value>,
}

impl Where {
    fn and<const N: usize>(&mut self, condition: &'static str, args: [Value; N]) {
        self.conditions.push(condition);
        self.args.extend(args);
    }

    /// Adds `condition` with `value` as its one parameter, when there is one.
    fn and_some(&mut self, condition: &'static str, value: Option<impl Into<Value>>) {
        if let Some(v) = value {
            self.and(condition, [v.into()]);
        }
    }

    fn finish(self) -> (String, Vec<Value>) {
        (self.conditions.join(" AND "), self.args)
    }
}

/// An id no record of `scope` is above: the session's last one, or, for a
/// device's records outside sessions, the hub's last (finding the device's
/// own would read all of them).
fn last_log_id(c: &Connection, scope: LogScope) -> Result<Option<i64>, StoreError> {
    match scope {
        LogScope::Session(pk) => Ok(session_log_ids(c, pk)?.1),
        LogScope::Device(_) => Ok(c
            .prepare_cached("SELECT max(id) FROM logs")?
            .query_row([], |r| r.get(0))?),
    }
}

/// A session's first and last hub row ids.
fn session_log_ids(c: &Connection, pk: i64) -> Result<(Option<i64>, Option<i64>), StoreError> {
    Ok(
        c.prepare_cached("SELECT first_log_id, last_log_id FROM sessions WHERE pk = ?1")?
            .query_row([pk], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .unwrap_or((None, None)),
    )
}

/// The WHERE clause (and its arguments) of `q`'s filters in `scope`.
/// `session_index`: whether SQLite may find the scope's rows through its
/// index (when false, the caller bounds the scan some other way).
fn log_where(
    c: &Connection,
    scope: LogScope,
    q: &LogQuery,
    session_index: bool,
) -> Result<(String, Vec<Value>), StoreError> {
    let mut w = Where::default();
    match scope {
        LogScope::Session(pk) if session_index => w.and("l.session_pk = ?", [pk.into()]),
        // `+` keeps the column from being looked up in an index.
        LogScope::Session(pk) => w.and("+l.session_pk = ?", [pk.into()]),
        LogScope::Device(pk) if session_index => {
            w.and("l.device_pk = ? AND l.session_pk IS NULL", [pk.into()])
        }
        LogScope::Device(pk) => w.and("+l.device_pk = ? AND l.session_pk IS NULL", [pk.into()]),
    }
    w.and_some("l.level >= ?", q.min_level.map(|l| i64::from(l.code())));
    if let Some(m) = &q.module {
        match m.strip_suffix('*') {
            Some(prefix) => w.and(
                "substr(l.module, 1, ?) = ?",
                [(prefix.len() as i64).into(), prefix.to_owned().into()],
            ),
            None => w.and("l.module = ?", [m.clone().into()]),
        }
    }
    w.and_some("l.ts >= ?", q.since_ns);
    w.and_some("l.ts < ?", q.until_ns);
    if let Some(search) = q.search.as_deref().filter(|s| !s.trim().is_empty()) {
        if let Some(fts) = fts_query(search) {
            // Narrow the index scan to the session's id range: FTS5 applies
            // rowid bounds inside the index, so a common word costs the
            // session's share of matches, not the whole hub's.
            let range: (Option<i64>, Option<i64>) = match scope {
                LogScope::Session(pk) => session_log_ids(c, pk)?,
                LogScope::Device(_) => (None, None),
            };
            w.and(
                "l.id IN (SELECT rowid FROM logs_fts WHERE logs_fts MATCH ? AND rowid >= ? AND rowid <= ?)",
                [
                    fts.into(),
                    range.0.unwrap_or(i64::MIN).into(),
                    range.1.unwrap_or(i64::MAX).into(),
                ],
            );
        }
        // The index finds words; the text must also occur as typed.
        w.and(
            "instr(lower(l.message), lower(?)) > 0",
            [search.trim().to_owned().into()],
        );
    }
    Ok(w.finish())
}

fn logs_page(c: &Connection, scope: LogScope, q: &LogQuery) -> Result<LogPage, StoreError> {
    let (where_, mut args) = log_where(c, scope, q, true)?;
    let total = if q.want_total {
        let n: i64 = c
            .prepare_cached(&format!("SELECT count(*) FROM logs l WHERE {where_}"))?
            .query_row(rusqlite::params_from_iter(args.iter()), |r| r.get(0))?;
        Some(n as u64)
    } else {
        None
    };
    let (cmp, dir) = if q.ascending {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    let mut page_where = where_;
    if let Some(cur) = q.cursor {
        page_where.push_str(&format!(" AND l.seq {cmp} ?"));
        args.push((cur.min(i64::MAX as u64) as i64).into());
    }
    let sql = format!(
        "SELECT {LOG_COLUMNS} FROM logs l
         LEFT JOIN sessions s ON s.pk = l.session_pk
         JOIN devices d ON d.pk = l.device_pk
         WHERE {page_where} ORDER BY l.seq {dir} LIMIT {}",
        q.limit + 1
    );
    let mut items: Vec<LogRow> = c
        .prepare_cached(&sql)?
        .query_map(rusqlite::params_from_iter(args.iter()), log_row)?
        .collect::<Result<_, _>>()?;
    let more = items.len() as u64 > q.limit;
    items.truncate(q.limit as usize);
    let next_cursor = if more {
        items.last().map(|r| r.seq)
    } else {
        None
    };
    Ok(LogPage {
        items,
        total,
        next_cursor,
    })
}

/// Session bookkeeping inside one ingest transaction.
struct Ingest<'a, 't> {
    tx: &'a Transaction<'t>,
    scope: &'a DeviceScope,
    device_pk: i64,
    /// Session uuid -> row id (`None`: deleted by an operator).
    sessions: HashMap<uuid::Uuid, Option<i64>>,
}

impl Ingest<'_, '_> {
    /// Looks up a session of this org/project; a session of another device
    /// is a conflict.
    fn lookup(&self, id: &str) -> Result<Option<(i64, i64)>, StoreError> {
        let row: Option<(i64, i64, i64)> = self
            .tx
            .prepare_cached(
                "SELECT pk, device_pk, revision FROM sessions
                 WHERE org = ?1 AND project = ?2 AND id = ?3",
            )?
            .query_row([&self.scope.org, &self.scope.project, id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        match row {
            Some((_, device_pk, _)) if device_pk != self.device_pk => Err(StoreError::Conflict(
                format!("session {id} belongs to another device"),
            )),
            Some((pk, _, revision)) => Ok(Some((pk, revision))),
            None => Ok(None),
        }
    }

    fn is_deleted(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self
            .tx
            .prepare_cached(
                "SELECT 1 FROM deleted_sessions WHERE org = ?1 AND project = ?2 AND id = ?3",
            )?
            .query_row([&self.scope.org, &self.scope.project, id], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Applies a session state if it is newer than the stored one; returns
    /// the session's row id when something changed.
    fn apply_state(&mut self, s: &SessionState) -> Result<Option<i64>, StoreError> {
        let id = s.id.to_string();
        let metadata = serde_json::Value::Object(s.metadata.clone()).to_string();
        let (pkg_name, pkg_version) = match &s.package {
            Some(p) => (Some(p.name.as_str()), p.version.as_deref()),
            None => (None, None),
        };
        let pk = match self.lookup(&id)? {
            Some((pk, revision)) => {
                self.sessions.insert(s.id, Some(pk));
                if (revision as u64) >= s.revision && revision > 0 {
                    return Ok(None);
                }
                self.tx.execute(
                    "UPDATE sessions SET revision = ?2, status = ?3, started_at_ns = ?4,
                       ended_at_ns = ?5, duration_ns = ?6, package_name = ?7,
                       package_version = ?8, metadata = ?9, error = ?10
                     WHERE pk = ?1",
                    params![
                        pk,
                        s.revision as i64,
                        s.status.as_str(),
                        s.started_at_ns,
                        s.ended_at_ns,
                        s.duration_ns,
                        pkg_name,
                        pkg_version,
                        metadata,
                        s.error
                    ],
                )?;
                pk
            }
            None => {
                if self.is_deleted(&id)? {
                    self.sessions.insert(s.id, None);
                    return Ok(None);
                }
                let pk = self.tx.query_row(
                    "INSERT INTO sessions (org, project, id, device_pk, revision, status,
                       started_at_ns, ended_at_ns, duration_ns, package_name, package_version,
                       metadata, error)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13) RETURNING pk",
                    params![
                        self.scope.org,
                        self.scope.project,
                        id,
                        self.device_pk,
                        s.revision as i64,
                        s.status.as_str(),
                        s.started_at_ns,
                        s.ended_at_ns,
                        s.duration_ns,
                        pkg_name,
                        pkg_version,
                        metadata,
                        s.error
                    ],
                    |r| r.get(0),
                )?;
                self.sessions.insert(s.id, Some(pk));
                pk
            }
        };
        self.tx.execute(
            "DELETE FROM session_tags WHERE session_pk = ?1 AND source = 'device'",
            [pk],
        )?;
        for tag in &s.tags {
            self.tx.execute(
                "INSERT OR IGNORE INTO session_tags (session_pk, tag, source) VALUES (?1, ?2, 'device')",
                params![pk, tag],
            )?;
        }
        Ok(Some(pk))
    }

    /// The row id of a session records refer to, made as an active
    /// placeholder (revision 0) when its state has not arrived yet.
    fn session_for_record(
        &mut self,
        id: uuid::Uuid,
        first_seen_ns: i64,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(pk) = self.sessions.get(&id) {
            return Ok(*pk);
        }
        let text = id.to_string();
        let pk = match self.lookup(&text)? {
            Some((pk, _)) => Some(pk),
            None if self.is_deleted(&text)? => None,
            None => Some(self.tx.query_row(
                "INSERT INTO sessions (org, project, id, device_pk, revision, status, started_at_ns)
                 VALUES (?1, ?2, ?3, ?4, 0, 'active', ?5) RETURNING pk",
                params![
                    self.scope.org,
                    self.scope.project,
                    text,
                    self.device_pk,
                    first_seen_ns
                ],
                |r| r.get(0),
            )?),
        };
        self.sessions.insert(id, pk);
        Ok(pk)
    }
}

#[cfg(test)]
mod tests;
