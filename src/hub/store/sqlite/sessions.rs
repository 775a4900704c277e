//! Sessions and devices as operators see them: one session with its tags
//! and gaps, filtered and sorted lists with keyset cursors, tags, deletion
//! (remembered, so a late batch does not bring a session back).

use rusqlite::{params, OptionalExtension};

use super::rows::{
    device_row, session_pk, session_row, tags_of, Where, DEVICE_COLUMNS, SESSION_COLUMNS,
};
use super::{level_of, Db};
use crate::hub::store::{
    like_pattern, Deleted, DeviceRow, GapRow, SessionCursor, SessionPage, SessionQuery, SessionRow,
    SessionSort, StoreError,
};

impl Db {
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
                "json_extract(s.metadata, ?) = json_extract(?, '$')",
                [format!("$.\"{key}\"").into(), value.to_string().into()],
            );
        }
        if let Some(text) = &q.search {
            let p: rusqlite::types::Value = like_pattern(text).into();
            w.and(
                "(s.id LIKE ? ESCAPE '\\' OR d.device_id LIKE ? ESCAPE '\\'
                  OR d.name LIKE ? ESCAPE '\\' OR s.package_name LIKE ? ESCAPE '\\'
                  OR s.metadata LIKE ? ESCAPE '\\' OR s.error LIKE ? ESCAPE '\\'
                  OR EXISTS (SELECT 1 FROM session_tags t
                             WHERE t.session_pk = s.pk AND t.tag LIKE ? ESCAPE '\\'))",
                std::array::from_fn::<_, 7, _>(|_| p.clone()),
            );
        }
        let (where_, args) = w.finish();
        let key = sort_expr(q.sort);
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
        // The index's writer first (`fts`): no pass of the indexer runs
        // between the delete here and the index forgetting it.
        let mut index = self.index.lock();
        let done = self.write(|tx| {
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
            let ids: Option<(i64, i64)> = tx.query_row(
                "SELECT first_log_id, last_log_id FROM sessions WHERE pk = ?1",
                [pk],
                |r| Ok(Option::zip(r.get(0)?, r.get(1)?)),
            )?;
            tx.execute("DELETE FROM logs WHERE session_pk = ?1", [pk])?;
            for table in ["session_tags", "gaps", "artifacts", "uploads", "marks"] {
                tx.execute(&format!("DELETE FROM {table} WHERE session_pk = ?1"), [pk])?;
            }
            tx.execute("DELETE FROM sessions WHERE pk = ?1", [pk])?;
            tx.execute(
                "INSERT OR IGNORE INTO deleted_sessions (org, project, id) VALUES (?1, ?2, ?3)",
                [org, project, id],
            )?;
            let epoch: i64 = tx.query_row(
                "UPDATE search_epoch SET epoch = epoch + 1 RETURNING epoch",
                [],
                |r| r.get(0),
            )?;
            let max_left: i64 =
                tx.query_row("SELECT coalesce(max(id), 0) FROM logs", [], |r| r.get(0))?;
            Ok(Some((deleted, pk, ids, epoch, max_left)))
        })?;
        let Some((deleted, pk, ids, epoch, max_left)) = done else {
            return Ok(None);
        };
        // Should this fail, the index is emptied to be built again; should
        // that fail too, its epoch is behind the database's and it is
        // rebuilt at the next start.
        if let Err(e) = super::fts::forget(&mut index, pk, ids, epoch, max_left) {
            tracing::error!(
                "the full-text index did not forget a deleted session ({e}): rebuilding it"
            );
            if let Err(e) = super::fts::rebuild(&mut index, epoch) {
                tracing::error!(
                    "the full-text index cannot be rebuilt now ({e}): it will be at the next start"
                );
            }
        }
        Ok(Some(deleted))
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
            let mut st = c.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices
                 WHERE org = ?1 AND project = ?2 ORDER BY device_id"
            ))?;
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
            Ok(c.prepare_cached(&format!(
                "SELECT {DEVICE_COLUMNS} FROM devices
                 WHERE org = ?1 AND project = ?2 AND device_id = ?3"
            ))?
            .query_row([org, project, device_id], device_row)
            .optional()?)
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
}

/// The SQL value a session list sorts by.
fn sort_expr(sort: SessionSort) -> &'static str {
    match sort {
        SessionSort::StartedAt => "s.started_at_ns",
        // Active sessions have not ended: they sort as the latest.
        SessionSort::EndedAt => "COALESCE(s.ended_at_ns, 9223372036854775807)",
        SessionSort::Duration => "COALESCE(s.duration_ns, 0)",
    }
}
