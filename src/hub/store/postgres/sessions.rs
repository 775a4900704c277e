//! Sessions and devices as operators see them: one session with its tags
//! and gaps, filtered and sorted lists with keyset cursors (each sort key
//! has an index ending in `pk`), tags, deletion (remembered, so a late
//! batch does not bring a session back).

use deadpool_postgres::GenericClient;

use super::rows::{
    device_row, level_of, session_pk, session_row, tags_of, Where, DEVICE_COLUMNS, SESSION_COLUMNS,
};
use super::INGEST_LOCK;
use crate::hub::store::{
    like_pattern, Deleted, DeviceRow, GapRow, SessionCursor, SessionPage, SessionQuery, SessionRow,
    SessionSort, StoreError,
};

pub(super) async fn get(
    c: &impl GenericClient,
    org: &str,
    project: &str,
    id: &str,
) -> Result<Option<SessionRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions s JOIN devices d ON d.pk = s.device_pk
             WHERE s.org = $1 AND s.project = $2 AND s.id = $3"
        ))
        .await?;
    let Some(mut row) = c
        .query_opt(&st, &[&org, &project, &id])
        .await?
        .as_ref()
        .map(session_row)
    else {
        return Ok(None);
    };
    row.tags = tags_of(c, row.pk).await?;
    let st = c
        .prepare_cached(
            "SELECT level, reason COLLATE \"C\", sum(dropped)::bigint FROM gaps
             WHERE session_pk = $1 GROUP BY 1, 2 ORDER BY 1, 2",
        )
        .await?;
    row.gaps = c
        .query(&st, &[&row.pk])
        .await?
        .iter()
        .map(|r| GapRow {
            level: level_of(r.get(0)),
            reason: r.get(1),
            dropped: r.get::<_, i64>(2) as u64,
        })
        .collect();
    Ok(Some(row))
}

/// The SQL value a session list sorts by (the same expressions as the
/// `sessions_*` indexes).
fn sort_expr(sort: SessionSort) -> &'static str {
    match sort {
        SessionSort::StartedAt => "s.started_at_ns",
        // Active sessions have not ended: they sort as the latest.
        SessionSort::EndedAt => "COALESCE(s.ended_at_ns, 9223372036854775807)",
        SessionSort::Duration => "COALESCE(s.duration_ns, 0)",
    }
}

pub(super) async fn list(
    client: &mut deadpool_postgres::Client,
    org: &str,
    project: &str,
    q: &SessionQuery,
) -> Result<SessionPage, StoreError> {
    let mut w = Where::default();
    w.and("s.org = ?", [Box::new(org.to_owned())]);
    w.and("s.project = ?", [Box::new(project.to_owned())]);
    w.and_some("d.device_id = ?", q.device_id.clone());
    w.and_some("s.status = ?", q.status.clone());
    w.and_some("s.started_at_ns >= ?", q.since_ns);
    w.and_some("s.started_at_ns < ?", q.until_ns);
    for tag in &q.tags {
        w.and(
            "EXISTS (SELECT 1 FROM session_tags t WHERE t.session_pk = s.pk AND t.tag = ?)",
            [Box::new(tag.clone())],
        );
    }
    w.and_some(
        "EXISTS (SELECT 1 FROM marks m WHERE m.session_pk = s.pk AND m.name = ?)",
        q.mark.clone(),
    );
    w.and_some("s.package_name = ?", q.package_name.clone());
    w.and_some("s.package_version = ?", q.package_version.clone());
    match q.has_errors {
        Some(true) => w.and("(s.n_error + s.n_fatal) > 0", []),
        Some(false) => w.and("(s.n_error + s.n_fatal) = 0", []),
        None => {}
    }
    for (key, value) in &q.metadata {
        w.and(
            "(s.metadata::jsonb -> ?::text) = (?::text)::jsonb",
            [Box::new(key.clone()), Box::new(value.to_string())],
        );
    }
    if let Some(text) = &q.search {
        let p = like_pattern(text);
        w.and(
            "(s.id ILIKE ? ESCAPE '\\' OR d.device_id ILIKE ? ESCAPE '\\'
              OR d.name ILIKE ? ESCAPE '\\' OR s.package_name ILIKE ? ESCAPE '\\'
              OR s.metadata ILIKE ? ESCAPE '\\' OR s.error ILIKE ? ESCAPE '\\'
              OR EXISTS (SELECT 1 FROM session_tags t
                         WHERE t.session_pk = s.pk AND t.tag ILIKE ? ESCAPE '\\'))",
            std::array::from_fn::<_, 7, _>(|_| Box::new(p.clone()) as _),
        );
    }
    // One snapshot for the count and the page.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await?;
    let total: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM sessions s JOIN devices d ON d.pk = s.device_pk
                 WHERE {}",
                w.sql()
            ),
            &w.args(),
        )
        .await?
        .get(0);
    let key = sort_expr(q.sort);
    let (cmp, dir) = if q.descending {
        ("<", "DESC")
    } else {
        (">", "ASC")
    };
    if let Some(cur) = q.cursor {
        w.and(
            &format!("({key}, s.pk) {cmp} (?::bigint, ?::bigint)"),
            [Box::new(cur.value), Box::new(cur.pk)],
        );
    }
    let offset = if q.cursor.is_some() { 0 } else { q.offset };
    let sql = format!(
        "SELECT {SESSION_COLUMNS}, {key} FROM sessions s JOIN devices d ON d.pk = s.device_pk
         WHERE {} ORDER BY {key} {dir}, s.pk {dir} LIMIT {} OFFSET {offset}",
        w.sql(),
        // One more than asked: whether it exists says if there is a next page.
        q.limit + 1
    );
    let rows = tx.query(&sql, &w.args()).await?;
    let more = rows.len() as u64 > q.limit;
    let mut items = Vec::new();
    let mut last = None;
    for r in rows.iter().take(q.limit as usize) {
        let mut row = session_row(r);
        last = Some(SessionCursor {
            value: r.get(20),
            pk: row.pk,
        });
        row.tags = tags_of(&tx, row.pk).await?;
        items.push(row);
    }
    tx.commit().await?;
    Ok(SessionPage {
        items,
        total: total as u64,
        next_cursor: if more { last } else { None },
    })
}

/// Deletes a session with its logs (and their keys), tags, gaps,
/// artifacts and uploads; returns the files to remove, or `None` if there
/// was no such session.
pub(super) async fn delete(
    client: &mut deadpool_postgres::Client,
    org: &str,
    project: &str,
    id: &str,
) -> Result<Option<Deleted>, StoreError> {
    let tx = client.transaction().await?;
    // A batch naming this session either commits before the delete or
    // finds it in deleted_sessions.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INGEST_LOCK])
        .await?;
    let Some(pk) = session_pk(&tx, org, project, id).await? else {
        return Ok(None);
    };
    let strings = |rows: Vec<tokio_postgres::Row>| rows.iter().map(|r| r.get(0)).collect();
    let deleted = Deleted {
        blobs: strings(
            tx.query("SELECT blob FROM artifacts WHERE session_pk = $1", &[&pk])
                .await?,
        ),
        uploads: strings(
            tx.query("SELECT id FROM uploads WHERE session_pk = $1", &[&pk])
                .await?,
        ),
    };
    tx.execute(
        "DELETE FROM log_keys k USING logs l
         WHERE l.session_pk = $1 AND k.device_pk = l.device_pk AND k.seq = l.seq",
        &[&pk],
    )
    .await?;
    tx.execute("DELETE FROM logs WHERE session_pk = $1", &[&pk])
        .await?;
    for table in ["session_tags", "gaps", "artifacts", "uploads", "marks"] {
        tx.execute(
            &format!("DELETE FROM {table} WHERE session_pk = $1"),
            &[&pk],
        )
        .await?;
    }
    tx.execute("DELETE FROM sessions WHERE pk = $1", &[&pk])
        .await?;
    tx.execute(
        "INSERT INTO deleted_sessions (org, project, id) VALUES ($1, $2, $3)
         ON CONFLICT DO NOTHING",
        &[&org, &project, &id],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(deleted))
}

pub(super) async fn add_tag(
    c: &impl GenericClient,
    org: &str,
    project: &str,
    id: &str,
    tag: &str,
) -> Result<bool, StoreError> {
    let Some(pk) = session_pk(c, org, project, id).await? else {
        return Ok(false);
    };
    c.execute(
        "INSERT INTO session_tags (session_pk, tag, source) VALUES ($1, $2, 'operator')
         ON CONFLICT DO NOTHING",
        &[&pk, &tag],
    )
    .await?;
    Ok(true)
}

pub(super) async fn remove_tag(
    c: &impl GenericClient,
    org: &str,
    project: &str,
    id: &str,
    tag: &str,
) -> Result<Option<bool>, StoreError> {
    let Some(pk) = session_pk(c, org, project, id).await? else {
        return Ok(None);
    };
    let n = c
        .execute(
            "DELETE FROM session_tags WHERE session_pk = $1 AND tag = $2",
            &[&pk, &tag],
        )
        .await?;
    Ok(Some(n > 0))
}

pub(super) async fn status(c: &impl GenericClient, pk: i64) -> Result<Option<String>, StoreError> {
    let st = c
        .prepare_cached("SELECT status FROM sessions WHERE pk = $1")
        .await?;
    Ok(c.query_opt(&st, &[&pk]).await?.map(|r| r.get(0)))
}

pub(super) async fn list_devices(
    c: &impl GenericClient,
    org: &str,
    project: &str,
) -> Result<Vec<DeviceRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE org = $1 AND project = $2
             ORDER BY device_id COLLATE \"C\""
        ))
        .await?;
    Ok(c.query(&st, &[&org, &project])
        .await?
        .iter()
        .map(device_row)
        .collect())
}

pub(super) async fn find_device(
    c: &impl GenericClient,
    org: &str,
    project: &str,
    device_id: &str,
) -> Result<Option<DeviceRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices
             WHERE org = $1 AND project = $2 AND device_id = $3"
        ))
        .await?;
    Ok(c.query_opt(&st, &[&org, &project, &device_id])
        .await?
        .as_ref()
        .map(device_row))
}
