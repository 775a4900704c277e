//! Reading logs: pages of a session's or a device's records by seq with
//! filters and full-text search, the tail a live stream starts from, and
//! the records committed after a hub row id (what a stream catches up on).

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension};

use super::rows::{log_row, Where, LOG_COLUMNS};
use super::Db;
use crate::hub::store::{
    Histogram, LogPage, LogQuery, LogRow, LogScope, StoreError, SESSION_COUNTERS_SQL,
};

/// Turns a user's search text into an FTS5 query: every word must occur as
/// a whole word (case-insensitive). Quotes keep FTS5 syntax out of user
/// hands. Whole words, not prefixes: a prefix query merges the doclists of
/// every matching term across the whole hub before the session's rowid
/// range can narrow it (18 ms instead of 1.5 ms at 500k records).
/// `None` when the text has no word characters at all.
pub(super) fn fts_query(search: &str) -> Option<String> {
    let words: Vec<String> = super::fts::words(search)
        .map(|w| format!("\"{w}\""))
        .collect();
    if words.is_empty() {
        None
    } else {
        Some(words.join(" AND "))
    }
}

impl Db {
    /// A session's records per level and slice, in one pass over its
    /// rows (see [`Histogram`]).
    pub fn level_histogram(
        &self,
        session_pk: i64,
        slices: Histogram,
    ) -> Result<Vec<[u64; 6]>, StoreError> {
        let sql = format!(
            "SELECT {} AS slice, level, count(*) FROM logs
             WHERE session_pk = ?1 AND ts >= ?2 AND ts < ?3 GROUP BY slice, level",
            slices.slice_sql("min", "ts")
        );
        self.read(|c| {
            let mut st = c.prepare(&sql)?;
            let rows = st
                .query_map((session_pk, slices.from_ns, slices.to_ns), |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(slices.fold(rows))
        })
    }

    /// See [`crate::hub::store::Store::first_errors`].
    pub fn first_errors(&self, session_pk: i64, limit: u64) -> Result<Vec<LogRow>, StoreError> {
        let sql = crate::hub::store::first_errors_sql("?1", "?2");
        self.read(|c| {
            let rows = c
                .prepare_cached(&sql)?
                .query_map((session_pk, limit.min(i64::MAX as u64) as i64), log_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    pub fn logs(&self, scope: LogScope, q: &LogQuery) -> Result<LogPage, StoreError> {
        self.read(|c| logs_page(c, scope, q))
    }

    /// The newest `q.limit` records of `scope` as [`Db::logs`] gives
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
    if let Some(search) = q.search_text() {
        if let Some(fts) = fts_query(search) {
            // Narrow the index scan to the session's id range: FTS5 applies
            // rowid bounds inside the index, so a common word costs the
            // session's share of matches, not the whole hub's.
            let range: (Option<i64>, Option<i64>) = match scope {
                LogScope::Session(pk) => session_log_ids(c, pk)?,
                LogScope::Device(_) => (None, None),
            };
            let (lo, hi) = (range.0.unwrap_or(i64::MIN), range.1.unwrap_or(i64::MAX));
            // A document is a block of records (`fts`): the ids of the
            // matching blocks' records, and of the records past the
            // index's watermark that hold the words; then only the
            // records that hold the words themselves.
            w.and(
                "l.id IN (SELECT x.id FROM search.logs_fts f
                   JOIN search.fts_blocks b ON b.first = f.rowid
                   JOIN logs x ON x.id BETWEEN b.first AND b.last
                   WHERE logs_fts MATCH ? AND f.rowid >= ? AND f.rowid <= ?
                   UNION ALL
                   SELECT t.id FROM logs t
                   WHERE t.id > (SELECT indexed FROM search.state) AND t.id >= ? AND t.id <= ?
                     AND logbook_words(t.message, ?))
                 AND logbook_words(l.message, ?)",
                [
                    fts.into(),
                    lo.into(),
                    hi.into(),
                    lo.into(),
                    hi.into(),
                    search.to_owned().into(),
                    search.to_owned().into(),
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
    let total = if !q.want_total {
        None
    } else if let Some((pk, floor)) = q.total_from_counters(scope) {
        let n = c
            .prepare_cached(&format!("{SESSION_COUNTERS_SQL}?1"))?
            .query_row([pk], |r| {
                (floor..6).try_fold(0u64, |sum, i| Ok(sum + r.get::<_, i64>(i)?.max(0) as u64))
            })
            .optional()?;
        Some(n.unwrap_or(0))
    } else {
        let n: i64 = c
            .prepare_cached(&format!("SELECT count(*) FROM logs l WHERE {where_}"))?
            .query_row(rusqlite::params_from_iter(args.iter()), |r| r.get(0))?;
        Some(n as u64)
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
