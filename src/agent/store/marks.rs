//! Marks in `agent.db` (README "Marks"): the `marks` rows, the `pins`
//! table of their merged windows that eviction consults, releasing pins
//! over `buffer.pinned_max`, and the reader's mark queries.
//!
//! Invariant: `pins` is always the union of the windows of the marks not
//! released, per session, as disjoint intervals: every change to marks
//! rebuilds it in the same transaction ([`rebuild_pins`]).

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::read::Reader;
use super::{rfc3339, StoreError};
use crate::agent::marks::{MarkSpec, Priority, MAX_PER_SESSION, MAX_WINDOW_NS};
use crate::agent::types::MarkView;
use crate::wire::{Level, Mark};

/// Why a pin was released: pins exceeded `buffer.pinned_max`. Also the
/// reason of the gap that reports it.
pub const PIN_RELEASED: &str = "pin_released";

/// True when record `r` lies in a pinned window: the pin starting last at
/// or before it (pins are disjoint) reaches it.
pub const PINNED: &str = "coalesce((SELECT p.end_ns FROM pins p \
     WHERE p.session = coalesce(r.session, 0) AND p.start_ns <= r.ts_ns \
     ORDER BY p.start_ns DESC LIMIT 1), -9223372036854775808) >= r.ts_ns";

/// The bytes a record counts for against `pinned_max` (as
/// `Row::approx_bytes`).
const RECORD_BYTES: &str = "(length(r.module) + length(r.message) + length(r.metadata) + 48)";

const MARK_COLUMNS: &str = "m.id, s.id, m.name, m.ts_ns, m.before_ns, m.after_ns, m.priority, \
                            m.metadata, m.released";

/// Why a mark was not stored.
#[derive(Debug, thiserror::Error)]
pub enum MarkError {
    #[error("this session already holds {MAX_PER_SESSION} marks, the most it may")]
    TooMany,
    #[error("storage failed: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// Stores a mark of `session` (0: the device logs outside sessions) and
/// rebuilds the pins; returns its id.
pub fn insert(
    conn: &Connection,
    session: i64,
    spec: &MarkSpec,
    now_ns: i64,
) -> Result<i64, MarkError> {
    let count: i64 = conn
        .prepare_cached("SELECT count(*) FROM marks WHERE session = ?1")?
        .query_row([session], |r| r.get(0))?;
    if count >= MAX_PER_SESSION {
        return Err(MarkError::TooMany);
    }
    conn.prepare_cached(
        "INSERT INTO marks(session, ts_ns, before_ns, after_ns, name, metadata, priority) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        session,
        spec.timestamp_ns.unwrap_or(now_ns),
        spec.before_ns,
        spec.after_ns,
        spec.name,
        spec.metadata,
        spec.priority.code()
    ])?;
    let id = conn.last_insert_rowid();
    rebuild_pins(conn)?;
    Ok(id)
}

/// Rebuilds `pins` from the marks not released: their windows, merged per
/// session where they overlap or touch.
pub fn rebuild_pins(conn: &Connection) -> rusqlite::Result<()> {
    let windows: Vec<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT session, ts_ns - before_ns, ts_ns + after_ns FROM marks \
             WHERE released IS NULL ORDER BY session, ts_ns - before_ns",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    conn.execute("DELETE FROM pins", [])?;
    let mut put =
        conn.prepare_cached("INSERT INTO pins(session, start_ns, end_ns) VALUES (?1, ?2, ?3)")?;
    for (session, start, end) in merge(windows) {
        put.execute(params![session, start, end])?;
    }
    Ok(())
}

/// Merges (session, start, end) windows sorted by session and start into
/// disjoint ones.
pub fn merge(windows: Vec<(i64, i64, i64)>) -> Vec<(i64, i64, i64)> {
    let mut out: Vec<(i64, i64, i64)> = Vec::new();
    for (s, a, b) in windows {
        match out.last_mut() {
            Some((ls, _, lb)) if *ls == s && a <= lb.saturating_add(1) => *lb = (*lb).max(b),
            _ => out.push((s, a, b)),
        }
    }
    out
}

/// Whether any window is pinned.
pub fn has_pins(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM pins LIMIT 1")?
        .query_row([], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Bytes of the records inside pinned windows (one scan of the records).
pub fn pinned_bytes(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        &format!("SELECT coalesce(sum({RECORD_BYTES}), 0) FROM records r WHERE {PINNED}"),
        [],
        |r| r.get(0),
    )
}

/// A released mark's window: (session, level, records) to report as
/// `pin_released` gaps.
pub type Released = Vec<(i64, Level, i64)>;

/// Releases pins, oldest normal-priority marks first, then oldest high
/// ones, until the pinned records take at most `max` bytes. Returns the
/// number of marks released and the records of each released window per
/// session and level.
pub fn release_over(conn: &Connection, max: i64) -> rusqlite::Result<(u64, Released)> {
    let mut released = 0u64;
    let mut gaps: Released = Vec::new();
    let mut total = pinned_bytes(conn)?;
    while total > max {
        // Each live mark's window: bytes and records per level. Records
        // outer, each looking marks up by session and time (windows are
        // at most MAX_WINDOW_NS on either side).
        let per_mark: Vec<(i64, i64, i64, i64, i64)> = conn
            .prepare_cached(&format!(
                "SELECT m.id, m.session, r.level, count(*), sum({RECORD_BYTES}) \
                 FROM records r CROSS JOIN marks m \
                 WHERE m.session = coalesce(r.session, 0) \
                   AND m.ts_ns BETWEEN r.ts_ns - {w} AND r.ts_ns + {w} \
                   AND r.ts_ns BETWEEN m.ts_ns - m.before_ns AND m.ts_ns + m.after_ns \
                   AND m.released IS NULL \
                 GROUP BY m.id, r.level",
                w = MAX_WINDOW_NS
            ))?
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let order: Vec<i64> = conn
            .prepare_cached(
                "SELECT id FROM marks WHERE released IS NULL ORDER BY priority, ts_ns, id",
            )?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        if order.is_empty() {
            break;
        }
        let mut estimate = total;
        let mut release = conn.prepare_cached(
            "UPDATE marks SET released = ?2, revision = revision + 1 WHERE id = ?1",
        )?;
        for id in order {
            if estimate <= max {
                break;
            }
            release.execute(params![id, PIN_RELEASED])?;
            released += 1;
            for &(m, session, level, n, bytes) in &per_mark {
                if m == id {
                    estimate -= bytes;
                    let level = Level::from_code(level as u8).unwrap_or(Level::Info);
                    gaps.push((session, level, n));
                }
            }
        }
        rebuild_pins(conn)?;
        total = pinned_bytes(conn)?;
    }
    Ok((released, gaps))
}

/// Writer side: the hub has these (mark id, revision)s.
pub fn apply_acked(conn: &Connection, marks: &[(i64, u64)]) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(
        "UPDATE marks SET synced_revision = max(synced_revision, ?2) WHERE id = ?1",
    )?;
    for (id, rev) in marks {
        stmt.execute(params![id, *rev as i64])?;
    }
    Ok(())
}

/// Most marks one batch carries.
const BATCH_MARKS: i64 = 1000;

/// A marked window of one session (0: the device logs outside sessions),
/// times inclusive: what goes up first while the uploader is behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Window {
    pub session: i64,
    pub start_ns: i64,
    pub end_ns: i64,
}

impl super::sync::SyncReader {
    /// The windows of the marks not released that end at or after
    /// `since_ns`, merged per priority and session where they overlap or
    /// touch: high priority first, and within a priority the newest first.
    pub fn marked_windows(&self, since_ns: i64) -> Result<Vec<Window>, StoreError> {
        let rows: Vec<(i64, i64, i64, i64)> = self
            .conn
            .prepare_cached(
                "SELECT priority, session, ts_ns - before_ns, ts_ns + after_ns FROM marks \
                 WHERE released IS NULL AND ts_ns + after_ns >= ?1 \
                 ORDER BY priority DESC, session, ts_ns - before_ns",
            )?
            .query_map([since_ns], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let mut out = Vec::new();
        for high in [true, false] {
            let level = Priority::High.code();
            let windows = rows
                .iter()
                .filter(|w| (w.0 == level) == high)
                .map(|&(_, session, a, b)| (session, a, b))
                .collect();
            let mut merged: Vec<Window> = merge(windows)
                .into_iter()
                .map(|(session, start_ns, end_ns)| Window {
                    session,
                    start_ns,
                    end_ns,
                })
                .collect();
            merged.sort_by_key(|w| std::cmp::Reverse((w.start_ns, w.session)));
            out.extend(merged);
        }
        Ok(out)
    }

    /// Marks whose newest revision the hub has not acknowledged, oldest
    /// first.
    pub fn pending_marks(&self) -> Result<Vec<Mark>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.id, m.revision, s.id, m.ts_ns, m.before_ns, m.after_ns, m.name, \
                    m.priority, m.metadata, m.released \
             FROM marks m LEFT JOIN sessions s ON s.pk = m.session \
             WHERE m.revision > m.synced_revision ORDER BY m.id LIMIT ?1",
        )?;
        let rows = stmt.query_map([BATCH_MARKS], |r| {
            let session: Option<String> = r.get(2)?;
            Ok(Mark {
                id: r.get::<_, i64>(0)? as u64,
                revision: r.get::<_, i64>(1)? as u64,
                session_id: session.and_then(|s| Uuid::parse_str(&s).ok()),
                timestamp_ns: r.get(3)?,
                before_ns: r.get(4)?,
                after_ns: r.get(5)?,
                name: r.get(6)?,
                priority: Priority::from_code(r.get(7)?).as_str().into(),
                metadata: r.get(8)?,
                released: r.get(9)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// What `GET /v1/marks` filters on.
#[derive(Debug, Clone, Default)]
pub struct MarkQuery {
    pub session: Option<Uuid>,
    pub name: Option<String>,
    pub limit: usize,
    /// Newest first, below this id.
    pub before: Option<i64>,
}

fn view(r: &rusqlite::Row<'_>) -> rusqlite::Result<MarkView> {
    let session: Option<String> = r.get(1)?;
    let ts: i64 = r.get(3)?;
    let before: i64 = r.get(4)?;
    let after: i64 = r.get(5)?;
    let metadata: String = r.get(7)?;
    Ok(MarkView {
        id: r.get(0)?,
        session_id: session.and_then(|s| Uuid::parse_str(&s).ok()),
        name: r.get(2)?,
        timestamp: rfc3339(ts),
        start: rfc3339(ts - before),
        end: rfc3339(ts + after),
        before_seconds: before as f64 / 1e9,
        after_seconds: after as f64 / 1e9,
        priority: Priority::from_code(r.get(6)?).as_str().into(),
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        released: r.get(8)?,
    })
}

impl Reader {
    /// Marks, newest first.
    pub fn marks(&self, q: &MarkQuery) -> Result<Vec<MarkView>, StoreError> {
        let session = q.session.map(|s| s.to_string());
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {MARK_COLUMNS} FROM marks m LEFT JOIN sessions s ON s.pk = m.session \
                 WHERE (?1 IS NULL OR s.id = ?1) AND (?2 IS NULL OR m.name = ?2) \
                   AND (?3 IS NULL OR m.id < ?3) \
                 ORDER BY m.id DESC LIMIT ?4"
            ))?;
            let rows = stmt.query_map(params![session, q.name, q.before, q.limit as i64], view)?;
            rows.collect()
        })
    }

    /// One mark by id.
    pub fn mark(&self, id: i64) -> Result<Option<MarkView>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!(
                    "SELECT {MARK_COLUMNS} FROM marks m LEFT JOIN sessions s ON s.pk = m.session \
                     WHERE m.id = ?1"
                ),
                [id],
                view,
            )
            .optional()
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn windows_merge_per_session_where_they_overlap_or_touch() {
        let check = |w: Vec<(i64, i64, i64)>, want: Vec<(i64, i64, i64)>| {
            assert_eq!(super::merge(w.clone()), want, "{w:?}");
        };
        check(vec![], vec![]);
        check(vec![(1, 0, 10), (1, 5, 20)], vec![(1, 0, 20)]);
        check(vec![(1, 0, 10), (1, 11, 20)], vec![(1, 0, 20)]);
        check(vec![(1, 0, 10), (1, 12, 20)], vec![(1, 0, 10), (1, 12, 20)]);
        check(vec![(1, 0, 30), (1, 5, 20)], vec![(1, 0, 30)]);
        check(vec![(1, 0, 10), (2, 5, 20)], vec![(1, 0, 10), (2, 5, 20)]);
    }
}
