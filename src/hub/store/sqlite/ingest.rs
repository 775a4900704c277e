//! The device's write path: one batch in one transaction (device row,
//! session states, records with their full-text entries, per-session
//! counters, gaps), and the session an upload names.

use std::collections::HashMap;

use rusqlite::{params, OptionalExtension, Transaction};

use super::{now_ns, Db};
use crate::hub::store::{dropped_text, DeviceScope, Ingested, LogRow, StoreError};
use crate::wire::{Batch, SessionState};

impl Db {
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
            if let Some(a) = &batch.agent {
                tx.prepare_cached(
                    "UPDATE devices SET agent_version = ?1, buffer_bytes = ?2,
                       buffer_max_bytes = ?3, dropped = ?4, reported_at_ns = ?5
                     WHERE pk = ?6",
                )?
                .execute(params![
                    a.version,
                    a.buffer_bytes as i64,
                    a.buffer_max_bytes as i64,
                    dropped_text(&a.dropped),
                    hub_time,
                    device_pk
                ])?;
            }
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
            let mut device_records = false;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO logs (device_pk, seq, session_pk, ts, level, module, message,
                                       metadata, pid, uid, gid, process)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (device_pk, seq) DO NOTHING",
                )?;
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
                    device_records |= session_pk.is_none();
                    if let Some(pk) = session_pk {
                        let t = touched.entry(pk).or_insert(([0; 6], id, id));
                        t.0[rec.level.code() as usize] += 1;
                        t.1 = t.1.min(id);
                        t.2 = t.2.max(id);
                    }
                    if want_live {
                        live.push(LogRow::stored(
                            id,
                            device_pk,
                            session_pk,
                            &scope.device_id,
                            rec,
                        ));
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
            for m in &batch.marks {
                let session_pk = match m.session_id {
                    Some(id) => match ing.session_for_record(id, batch.sent_at_ns)? {
                        Some(pk) => pk,
                        None => continue,
                    },
                    None => 0,
                };
                tx.prepare_cached(
                    "INSERT INTO marks (device_pk, mark_id, revision, session_pk, ts, before_ns,
                       after_ns, name, priority, metadata, released)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT (device_pk, mark_id) DO UPDATE SET
                       revision = excluded.revision, released = excluded.released
                     WHERE excluded.revision > marks.revision",
                )?
                .execute(params![
                    device_pk,
                    m.id as i64,
                    m.revision as i64,
                    session_pk,
                    m.timestamp_ns,
                    m.before_ns,
                    m.after_ns,
                    m.name,
                    m.priority,
                    m.metadata,
                    m.released
                ])?;
            }
            let mut ingested = Ingested::committed(
                batch,
                stored,
                duplicates,
                gaps,
                hub_time,
                live,
                changed_sessions,
            );
            ingested.changed.sessions = touched.keys().copied().collect();
            if device_records {
                ingested.changed.devices.push(device_pk);
            }
            Ok(ingested)
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
