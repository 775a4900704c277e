//! Reading logs: pages of a session's or a device's records by seq with
//! filters and full-text search (the `logs_search` GIN index), the tail a
//! live stream starts from, and the records committed after a hub row id
//! (what a stream catches up on).

use deadpool_postgres::GenericClient;

use super::rows::{log_row, Where, LOG_COLUMNS};
use crate::hub::store::{
    Histogram, LogPage, LogQuery, LogRow, LogScope, StoreError, SESSION_COUNTERS_SQL,
};

/// The text-search vector of a message: the expression `logs_search`
/// indexes, so it must stay the same as in the migration.
const SEARCH_VECTOR: &str =
    "to_tsvector('simple', regexp_replace(l.message, '[^[:alnum:]]+', ' ', 'g'))";

/// Turns a user's search text into a `to_tsquery` text: every word must
/// occur as a whole word (case-insensitive), as on SQLite. Words are split
/// at every character that is not a letter or digit, so no tsquery syntax
/// reaches the server. `None` when the text has no word characters.
pub(super) fn ts_query(search: &str) -> Option<String> {
    let words: Vec<&str> = search
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        None
    } else {
        Some(words.join(" & "))
    }
}

/// The WHERE clause of `q`'s filters in `scope`.
fn log_where(scope: LogScope, q: &LogQuery) -> Where {
    let mut w = Where::default();
    match scope {
        LogScope::Session(pk) => w.and("l.session_pk = ?", [Box::new(pk)]),
        LogScope::Device(pk) => w.and("l.device_pk = ? AND l.session_pk IS NULL", [Box::new(pk)]),
    }
    w.and_some("l.level >= ?", q.min_level.map(|l| i64::from(l.code())));
    if let Some(m) = &q.module {
        match m.strip_suffix('*') {
            Some(prefix) => w.and("starts_with(l.module, ?)", [Box::new(prefix.to_owned())]),
            None => w.and("l.module = ?", [Box::new(m.clone())]),
        }
    }
    w.and_some("l.ts >= ?", q.since_ns);
    w.and_some("l.ts < ?", q.until_ns);
    if let Some(search) = q.search_text() {
        if let Some(words) = ts_query(search) {
            w.and(
                &format!("{SEARCH_VECTOR} @@ to_tsquery('simple', ?)"),
                [Box::new(words)],
            );
        }
        // The index finds words; the text must also occur as typed.
        w.and(
            "strpos(lower(l.message), lower(?)) > 0",
            [Box::new(search.trim().to_owned())],
        );
    }
    w
}

pub(super) async fn page(
    c: &impl GenericClient,
    scope: LogScope,
    q: &LogQuery,
) -> Result<LogPage, StoreError> {
    let mut w = log_where(scope, q);
    let total = if !q.want_total {
        None
    } else if let Some((pk, floor)) = q.total_from_counters(scope) {
        let st = c
            .prepare_cached(&format!("{SESSION_COUNTERS_SQL}$1"))
            .await?;
        let row = c.query_opt(&st, &[&pk]).await?;
        Some(row.map_or(0, |r| {
            (floor..6).map(|i| r.get::<_, i64>(i).max(0) as u64).sum()
        }))
    } else {
        let n: i64 = c
            .query_one(
                &format!("SELECT count(*) FROM logs l WHERE {}", w.sql()),
                &w.args(),
            )
            .await?
            .get(0);
        Some(n as u64)
    };
    let (cmp, dir) = if q.ascending {
        (">", "ASC")
    } else {
        ("<", "DESC")
    };
    if let Some(cur) = q.cursor {
        w.and(
            &format!("l.seq {cmp} ?"),
            [Box::new(cur.min(i64::MAX as u64) as i64)],
        );
    }
    let sql = format!(
        "SELECT {LOG_COLUMNS} FROM logs l
         LEFT JOIN sessions s ON s.pk = l.session_pk
         JOIN devices d ON d.pk = l.device_pk
         WHERE {} ORDER BY l.seq {dir} LIMIT {}",
        w.sql(),
        q.limit + 1
    );
    let rows = c.query(&sql, &w.args()).await?;
    let more = rows.len() as u64 > q.limit;
    let items: Vec<LogRow> = rows.iter().take(q.limit as usize).map(log_row).collect();
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

/// An id no record of `scope` is above: the session's last one, or, for a
/// device's records outside sessions, the hub's last.
async fn last_log_id(c: &impl GenericClient, scope: LogScope) -> Result<Option<i64>, StoreError> {
    let row = match scope {
        LogScope::Session(pk) => {
            let st = c
                .prepare_cached("SELECT last_log_id FROM sessions WHERE pk = $1")
                .await?;
            c.query_opt(&st, &[&pk]).await?
        }
        LogScope::Device(_) => {
            let st = c.prepare_cached("SELECT max(id) FROM logs").await?;
            c.query_opt(&st, &[]).await?
        }
    };
    Ok(row.and_then(|r| r.get(0)))
}

/// A read-only transaction on one snapshot.
async fn snapshot(
    client: &mut deadpool_postgres::Client,
) -> Result<deadpool_postgres::Transaction<'_>, StoreError> {
    Ok(client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?)
}

pub(super) async fn tail(
    client: &mut deadpool_postgres::Client,
    scope: LogScope,
    q: &LogQuery,
) -> Result<(LogPage, Option<i64>), StoreError> {
    let tx = snapshot(client).await?;
    let page = page(&tx, scope, q).await?;
    let last = last_log_id(&tx, scope).await?;
    tx.commit().await?;
    Ok((page, last))
}

/// A session's records per level and slice, in one pass over its rows
/// (see [`Histogram`]).
pub(super) async fn level_histogram(
    client: &impl GenericClient,
    session_pk: i64,
    slices: Histogram,
) -> Result<Vec<[u64; 6]>, StoreError> {
    let sql = format!(
        "SELECT {} AS slice, level, count(*) FROM logs
         WHERE session_pk = $1 AND ts >= $2 AND ts < $3 GROUP BY slice, level",
        slices.slice_sql("least", "ts")
    );
    let rows = client
        .query(&sql, &[&session_pk, &slices.from_ns, &slices.to_ns])
        .await?;
    Ok(slices.fold(
        rows.iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2))),
    ))
}

/// See [`crate::hub::store::Store::first_errors`].
pub(super) async fn first_errors(
    client: &impl GenericClient,
    session_pk: i64,
    limit: u64,
) -> Result<Vec<LogRow>, StoreError> {
    let sql = crate::hub::store::first_errors_sql("$1", "$2");
    let rows = client
        .query(&sql, &[&session_pk, &(limit.min(i64::MAX as u64) as i64)])
        .await?;
    Ok(rows.iter().map(log_row).collect())
}

pub(super) async fn after(
    client: &mut deadpool_postgres::Client,
    scope: LogScope,
    after: i64,
    q: &LogQuery,
    limit: u64,
) -> Result<(Vec<LogRow>, i64), StoreError> {
    let tx = snapshot(client).await?;
    let last = last_log_id(&tx, scope).await?.unwrap_or(after);
    // A range of hub row ids, bounded by the last one of this snapshot
    // (ids are committed in order: see `ingest.rs`).
    let mut w = log_where(scope, q);
    w.and("l.id > ? AND l.id <= ?", [Box::new(after), Box::new(last)]);
    let sql = format!(
        "SELECT {LOG_COLUMNS} FROM logs l
         LEFT JOIN sessions s ON s.pk = l.session_pk
         JOIN devices d ON d.pk = l.device_pk
         WHERE {} ORDER BY l.id LIMIT {limit}",
        w.sql()
    );
    let rows: Vec<LogRow> = tx
        .query(&sql, &w.args())
        .await?
        .iter()
        .map(log_row)
        .collect();
    tx.commit().await?;
    let next = match rows.last() {
        Some(r) if rows.len() as u64 >= limit => r.id,
        _ => last.max(after),
    };
    Ok((rows, next))
}
