//! Read-only queries for the local API: sessions, log records with filters
//! and seq cursors, and gap totals. Runs on a small pool of read-only
//! connections so a slow query never holds up the writer.
//!
//! Invariant: nothing here writes; every query is bounded by a `limit`.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params_from_iter, types::Value as Sql, Connection, OptionalExtension};
use uuid::Uuid;

use super::duration::{duration_ns, Now, Span};
use super::{rfc3339, schema, StoreError};
use crate::agent::types::{LogItem, Page, SessionView};
use crate::wire::{Gap, Level, Package, SessionStatus};

/// What a session view needs besides its row.
#[derive(Debug, Clone)]
pub struct ViewCtx {
    pub device_id: String,
    pub device_name: String,
    pub sessions_dir: PathBuf,
    pub boot_id: String,
}

impl ViewCtx {
    pub fn artifact_dir(&self, id: &Uuid) -> PathBuf {
        self.sessions_dir.join(id.to_string()).join("artifacts")
    }
}

pub const SESSION_COLUMNS: &str =
    "pk, id, status, started_at_ns, ended_at_ns, duration_ns, boot_id, \
     started_boottime_ns, tags, package_name, package_version, metadata, error, log_count";

/// Builds the view of the session row selected with [`SESSION_COLUMNS`].
pub fn session_from_row(ctx: &ViewCtx, r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionView> {
    let id: String = r.get(1)?;
    let id = Uuid::parse_str(&id).unwrap_or_default();
    let status: String = r.get(2)?;
    let status = SessionStatus::parse(&status).unwrap_or(SessionStatus::Failed);
    let started: i64 = r.get(3)?;
    let ended: Option<i64> = r.get(4)?;
    let duration: Option<i64> = r.get(5)?;
    let boot_id: String = r.get(6)?;
    let started_boot: i64 = r.get(7)?;
    let span = Span {
        started_ns: started,
        started_boottime_ns: started_boot,
        boot_id: &boot_id,
        ended_ns: ended,
        duration_ns: duration,
    };
    let duration_ns = duration_ns(&span, &ctx.boot_id, Now::read());
    let tags: String = r.get(8)?;
    let package_name: Option<String> = r.get(9)?;
    let package_version: Option<String> = r.get(10)?;
    let metadata: String = r.get(11)?;
    Ok(SessionView {
        id,
        device_id: ctx.device_id.clone(),
        device_name: ctx.device_name.clone(),
        status,
        started_at: rfc3339(started),
        ended_at: ended.map(rfc3339),
        duration_seconds: duration_ns as f64 / 1e9,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        package: package_name.map(|name| Package {
            name,
            version: package_version,
        }),
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        error: r.get(12)?,
        artifact_dir: ctx.artifact_dir(&id).display().to_string(),
        log_count: r.get::<_, i64>(13)? as u64,
    })
}

pub fn session_by_sid(
    conn: &Connection,
    ctx: &ViewCtx,
    pk: i64,
) -> rusqlite::Result<Option<SessionView>> {
    conn.prepare_cached(&format!(
        "SELECT {SESSION_COLUMNS} FROM sessions WHERE pk = ?1"
    ))?
    .query_row([pk], |r| session_from_row(ctx, r))
    .optional()
}

/// Filters of `GET /v1/logs`.
#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    pub session: Option<Uuid>,
    pub level: Option<Level>,
    pub module: Option<String>,
    pub search: Option<String>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub limit: usize,
    /// Newest first, below this seq.
    pub before: Option<u64>,
    /// Oldest first, above this seq (for `--follow`).
    pub after: Option<u64>,
    pub ascending: bool,
}

/// A pool of read-only connections, opened on demand.
pub struct Reader {
    path: PathBuf,
    /// Connections with the file each opened (see [`schema::file_id`]).
    pool: Mutex<Vec<(Connection, Option<schema::FileId>)>>,
    pub ctx: ViewCtx,
}

impl Reader {
    pub fn new(path: &Path, ctx: ViewCtx) -> Reader {
        Reader {
            path: path.to_owned(),
            pool: Mutex::new(Vec::new()),
            ctx,
        }
    }

    pub(super) fn with<R>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<R>,
    ) -> Result<R, StoreError> {
        let file = schema::file_id(&self.path);
        let conn = self.pool.lock().expect("reader pool").pop();
        let conn = match conn {
            // One on a file the writer moved aside is dropped.
            Some((c, id)) if id.is_some() && id == file => (c, id),
            _ => (schema::open_reader(&self.path)?, file),
        };
        let out = f(&conn.0).map_err(StoreError::Sql);
        let mut pool = self.pool.lock().expect("reader pool");
        if pool.len() < 4 {
            pool.push(conn);
        }
        out
    }

    pub fn session(&self, id: Uuid) -> Result<Option<SessionView>, StoreError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?1"
            ))?
            .query_row([id.to_string()], |r| session_from_row(&self.ctx, r))
            .optional()
        })
    }

    pub fn current_session(&self) -> Result<Option<SessionView>, StoreError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {SESSION_COLUMNS} FROM sessions WHERE status = 'active' ORDER BY pk DESC LIMIT 1"
            ))?
            .query_row([], |r| session_from_row(&self.ctx, r))
            .optional()
        })
    }

    /// Newest first; `before` is a session id from an earlier page.
    pub fn sessions(
        &self,
        status: Option<SessionStatus>,
        limit: usize,
        before: Option<Uuid>,
    ) -> Result<Page<SessionView>, StoreError> {
        let mut sql = format!("SELECT {SESSION_COLUMNS} FROM sessions WHERE 1=1");
        let mut args: Vec<Sql> = Vec::new();
        if let Some(s) = status {
            sql.push_str(" AND status = ?");
            args.push(Sql::Text(s.as_str().into()));
        }
        if let Some(b) = before {
            sql.push_str(" AND pk < coalesce((SELECT pk FROM sessions WHERE id = ?), 0)");
            args.push(Sql::Text(b.to_string()));
        }
        sql.push_str(" ORDER BY pk DESC LIMIT ?");
        args.push(Sql::Integer(limit as i64));
        let items = self.with(|c| {
            let mut stmt = c.prepare(&sql)?;
            let rows =
                stmt.query_map(params_from_iter(args), |r| session_from_row(&self.ctx, r))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let next_cursor = (items.len() == limit)
            .then(|| items.last().map(|s| s.id.to_string()))
            .flatten();
        Ok(Page { items, next_cursor })
    }

    pub fn logs(&self, q: &LogQuery) -> Result<Page<LogItem>, StoreError> {
        let items = self.with(|c| logs_on(c, q))?;
        let next_cursor = (items.len() == q.limit)
            .then(|| items.last().map(|r| r.seq.to_string()))
            .flatten();
        Ok(Page { items, next_cursor })
    }

    /// Where a live follow starts: the newest `q.limit` records matching
    /// `q` (oldest first; none when the limit is 0), and the highest seq
    /// committed, read in one snapshot, so that following above the larger
    /// of the two misses nothing and repeats nothing.
    pub fn tail(&self, q: &LogQuery) -> Result<(Vec<LogItem>, u64), StoreError> {
        let q = LogQuery {
            before: None,
            after: None,
            ascending: false,
            ..q.clone()
        };
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let last: i64 = tx.query_row("SELECT coalesce(max(seq), 0) FROM records", [], |r| {
                r.get(0)
            })?;
            let mut items = if q.limit > 0 {
                logs_on(&tx, &q)?
            } else {
                Vec::new()
            };
            items.reverse();
            let cursor = items.last().map_or(0, |r| r.seq).max(last.max(0) as u64);
            Ok((items, cursor))
        })
    }
}

/// The records matching `q`, on one connection.
fn logs_on(c: &Connection, q: &LogQuery) -> rusqlite::Result<Vec<LogItem>> {
    let mut sql = String::from(
        "SELECT r.seq, s.id, r.ts_ns, r.level, r.module, r.message, r.metadata, r.pid, r.uid, r.gid, r.process \
         FROM records r LEFT JOIN sessions s ON s.pk = r.session WHERE 1=1",
    );
    let mut args: Vec<Sql> = Vec::new();
    if let Some(id) = q.session {
        sql.push_str(" AND r.session = (SELECT pk FROM sessions WHERE id = ?)");
        args.push(Sql::Text(id.to_string()));
    }
    if let Some(l) = q.level {
        sql.push_str(" AND r.level >= ?");
        args.push(Sql::Integer(l.code() as i64));
    }
    if let Some(m) = &q.module {
        // A module matches itself and its children (`nav` matches
        // `nav::planner` and `nav.planner`).
        sql.push_str(
            " AND (r.module = ? OR r.module LIKE ? ESCAPE '\\' OR r.module LIKE ? ESCAPE '\\')",
        );
        args.push(Sql::Text(m.clone()));
        args.push(Sql::Text(format!("{}::%", like_escape(m))));
        args.push(Sql::Text(format!("{}.%", like_escape(m))));
    }
    if let Some(s) = &q.search {
        sql.push_str(" AND r.message LIKE ? ESCAPE '\\'");
        args.push(Sql::Text(format!("%{}%", like_escape(s))));
    }
    if let Some(t) = q.since_ns {
        sql.push_str(" AND r.ts_ns >= ?");
        args.push(Sql::Integer(t));
    }
    if let Some(t) = q.until_ns {
        sql.push_str(" AND r.ts_ns < ?");
        args.push(Sql::Integer(t));
    }
    let ascending = q.ascending || q.after.is_some();
    if let Some(a) = q.after {
        sql.push_str(" AND r.seq > ?");
        args.push(Sql::Integer(a as i64));
    }
    if let Some(b) = q.before {
        sql.push_str(" AND r.seq < ?");
        args.push(Sql::Integer(b as i64));
    }
    sql.push_str(if ascending {
        " ORDER BY r.seq ASC LIMIT ?"
    } else {
        " ORDER BY r.seq DESC LIMIT ?"
    });
    args.push(Sql::Integer(q.limit as i64));
    {
        let mut stmt = c.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            let id: Option<String> = r.get(1)?;
            let level: i64 = r.get(3)?;
            let metadata: String = r.get(6)?;
            Ok(LogItem {
                seq: r.get::<_, i64>(0)? as u64,
                session_id: id.and_then(|s| Uuid::parse_str(&s).ok()),
                timestamp: rfc3339(r.get(2)?),
                level: Level::from_code(level as u8).unwrap_or(Level::Info),
                module: r.get(4)?,
                message: r.get(5)?,
                metadata: if metadata.is_empty() {
                    serde_json::Map::new()
                } else {
                    serde_json::from_str(&metadata).unwrap_or_default()
                },
                pid: r.get(7)?,
                uid: r.get(8)?,
                gid: r.get(9)?,
                process: r.get(10)?,
            })
        })?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
    }
}

impl Reader {
    /// Cumulative gap counters, in the wire's shape.
    pub fn gaps(&self) -> Result<Vec<Gap>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT s.id, g.level, g.reason, g.dropped FROM gaps g \
                 LEFT JOIN sessions s ON s.pk = g.session ORDER BY g.session, g.level, g.reason",
            )?;
            let rows = stmt.query_map([], |r| {
                let id: Option<String> = r.get(0)?;
                let level: i64 = r.get(1)?;
                Ok(Gap {
                    session_id: id.and_then(|s| Uuid::parse_str(&s).ok()),
                    level: Level::from_code(level as u8).unwrap_or(Level::Info),
                    reason: r.get(2)?,
                    dropped: r.get::<_, i64>(3)? as u64,
                })
            })?;
            rows.collect()
        })
    }
}

fn like_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
