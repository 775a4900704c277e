//! The device's write path: one batch in one transaction (device row,
//! session states, records with their (device, seq) keys, per-session
//! counters, gaps), and the session an upload names.
//!
//! Every such transaction first takes `INGEST_LOCK` (held until it
//! commits): hub row ids are then committed in the order they were taken,
//! which `logs_after` relies on, and a batch retried on another replica
//! while the first is still committing waits, finds every key stored, and
//! is acknowledged as duplicates. It is the one-writer discipline of the
//! SQLite backend, kept across replicas.

use std::collections::HashMap;

use deadpool_postgres::{GenericClient, Transaction};

use super::{notify, now_ns, INGEST_LOCK};
use crate::hub::store::{dropped_text, DeviceScope, Ingested, LogRow, StoreError};
use crate::wire::{Batch, SessionState};

async fn upsert_device(
    tx: &Transaction<'_>,
    scope: &DeviceScope,
    name: &str,
    now: i64,
    skew_ns: Option<i64>,
) -> Result<i64, StoreError> {
    let row = match skew_ns {
        Some(skew) => {
            tx.query_one(
                "INSERT INTO devices (org, project, device_id, name, last_seen_ns, skew_ns)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (org, project, device_id) DO UPDATE SET
                   name = excluded.name, last_seen_ns = excluded.last_seen_ns,
                   skew_ns = excluded.skew_ns
                 RETURNING pk",
                &[
                    &scope.org,
                    &scope.project,
                    &scope.device_id,
                    &name,
                    &now,
                    &skew,
                ],
            )
            .await?
        }
        None => {
            tx.query_one(
                "INSERT INTO devices (org, project, device_id, name, last_seen_ns, skew_ns)
                 VALUES ($1, $2, $3, $3, $4, 0)
                 ON CONFLICT (org, project, device_id) DO UPDATE SET
                   last_seen_ns = excluded.last_seen_ns
                 RETURNING pk",
                &[&scope.org, &scope.project, &scope.device_id, &now],
            )
            .await?
        }
    };
    Ok(row.get(0))
}

/// Stores one batch in one transaction. `want_live` asks for copies of
/// the newly stored records.
pub(super) async fn ingest(
    client: &mut deadpool_postgres::Client,
    scope: &DeviceScope,
    batch: &Batch,
    want_live: bool,
    origin: &str,
) -> Result<Ingested, StoreError> {
    let hub_time = now_ns();
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INGEST_LOCK])
        .await?;
    let device_pk = upsert_device(
        &tx,
        scope,
        &batch.device.name,
        hub_time,
        Some(hub_time.saturating_sub(batch.sent_at_ns)),
    )
    .await?;
    if let Some(a) = &batch.agent {
        tx.execute(
            "UPDATE devices SET agent_version = $1, buffer_bytes = $2, buffer_max_bytes = $3,
               dropped = $4, reported_at_ns = $5
             WHERE pk = $6",
            &[
                &a.version,
                &(a.buffer_bytes as i64),
                &(a.buffer_max_bytes as i64),
                &dropped_text(&a.dropped),
                &hub_time,
                &device_pk,
            ],
        )
        .await?;
    }
    let mut ing = Ingest {
        tx: &tx,
        scope,
        device_pk,
        sessions: HashMap::new(),
    };
    let mut changed_sessions = Vec::new();
    for state in &batch.sessions {
        if let Some(pk) = ing.apply_state(state).await? {
            changed_sessions.push((pk, state.status));
        }
    }

    // Each record's session first (lookups in order), then the inserts:
    // one statement for the batch's rows.
    let mut duplicates = 0u64;
    let mut wanted = Vec::with_capacity(batch.records.len());
    for rec in &batch.records {
        let session_pk = match rec.session_id {
            Some(id) => match ing.session_for_record(id, rec.timestamp_ns).await? {
                Some(pk) => Some(pk),
                // The operator deleted this session: acknowledge its
                // records without storing them.
                None => {
                    duplicates += 1;
                    continue;
                }
            },
            None => None,
        };
        wanted.push((rec, session_pk));
    }
    // Every key and row of the batch in one statement (the rows as arrays,
    // unnested in record order): a row is written only if its (device,
    // seq) key was new, the first of a seq repeated in the batch wins, and
    // row ids are taken in record order.
    let insert = tx
        .prepare_cached(
            "WITH input AS (
               SELECT DISTINCT ON (seq) *
               FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                           $6::text[], $7::text[], $8::text[], $9::bigint[], $10::bigint[],
                           $11::bigint[], $12::text[])
                    WITH ORDINALITY
                    AS t(seq, session_pk, ts, level, module, message, metadata, pid, uid,
                         gid, process, ord)
               ORDER BY seq, ord
             ), k AS (
               INSERT INTO log_keys (device_pk, seq) SELECT $1, seq FROM input
               ON CONFLICT DO NOTHING RETURNING seq
             )
             INSERT INTO logs (device_pk, seq, session_pk, ts, level, module, message,
                               metadata, pid, uid, gid, process)
             SELECT $1, i.seq, i.session_pk, i.ts, i.level, i.module, i.message, i.metadata,
                    i.pid, i.uid, i.gid, i.process
             FROM input i JOIN k ON k.seq = i.seq
             ORDER BY i.ord
             RETURNING id, seq",
        )
        .await?;
    let seqs: Vec<i64> = wanted.iter().map(|(r, _)| r.seq as i64).collect();
    let session_pks: Vec<Option<i64>> = wanted.iter().map(|(_, s)| *s).collect();
    let tss: Vec<i64> = wanted.iter().map(|(r, _)| r.timestamp_ns).collect();
    let levels: Vec<i64> = wanted
        .iter()
        .map(|(r, _)| i64::from(r.level.code()))
        .collect();
    let modules: Vec<&str> = wanted.iter().map(|(r, _)| r.module.as_str()).collect();
    let messages: Vec<&str> = wanted.iter().map(|(r, _)| r.message.as_str()).collect();
    let metadata: Vec<&str> = wanted.iter().map(|(r, _)| r.metadata.as_str()).collect();
    let pids: Vec<Option<i64>> = wanted.iter().map(|(r, _)| r.pid.map(i64::from)).collect();
    let uids: Vec<Option<i64>> = wanted.iter().map(|(r, _)| r.uid.map(i64::from)).collect();
    let gids: Vec<Option<i64>> = wanted.iter().map(|(r, _)| r.gid.map(i64::from)).collect();
    let processes: Vec<Option<&str>> = wanted.iter().map(|(r, _)| r.process.as_deref()).collect();
    let rows = if wanted.is_empty() {
        Vec::new()
    } else {
        tx.query(
            &insert,
            &[
                &device_pk,
                &seqs,
                &session_pks,
                &tss,
                &levels,
                &modules,
                &messages,
                &metadata,
                &pids,
                &uids,
                &gids,
                &processes,
            ],
        )
        .await?
    };
    // Each stored seq's row id; the first record of a seq gets it.
    let mut new_ids: HashMap<i64, i64> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(1), r.get::<_, i64>(0)))
        .collect();
    let ids: Vec<Option<i64>> = wanted
        .iter()
        .map(|(rec, _)| new_ids.remove(&(rec.seq as i64)))
        .collect();

    let mut stored = 0u64;
    let mut live = Vec::new();
    // Per session: level counts and the last new row id.
    let mut touched: HashMap<i64, ([i64; 6], i64)> = HashMap::new();
    let mut device_records = false;
    for ((rec, session_pk), id) in wanted.iter().zip(ids) {
        let Some(id) = id else {
            duplicates += 1;
            continue;
        };
        stored += 1;
        device_records |= session_pk.is_none();
        if let Some(pk) = *session_pk {
            let t = touched.entry(pk).or_insert(([0; 6], id));
            t.0[rec.level.code() as usize] += 1;
            t.1 = t.1.max(id);
        }
        if want_live {
            live.push(LogRow::stored(
                id,
                device_pk,
                *session_pk,
                &scope.device_id,
                rec,
            ));
        }
    }
    let bump = tx
        .prepare_cached(
            "UPDATE sessions SET n_trace = n_trace + $2, n_debug = n_debug + $3,
               n_info = n_info + $4, n_warn = n_warn + $5, n_error = n_error + $6,
               n_fatal = n_fatal + $7,
               last_log_id = GREATEST(COALESCE(last_log_id, $8), $8)
             WHERE pk = $1",
        )
        .await?;
    for (pk, (c, hi)) in &touched {
        tx.execute(&bump, &[pk, &c[0], &c[1], &c[2], &c[3], &c[4], &c[5], hi])
            .await?;
    }
    let mut gaps = 0u64;
    for gap in &batch.gaps {
        let session_pk = match gap.session_id {
            Some(id) => match ing.session_for_record(id, batch.sent_at_ns).await? {
                Some(pk) => pk,
                None => continue,
            },
            None => 0,
        };
        tx.execute(
            "INSERT INTO gaps (device_pk, session_pk, level, reason, dropped)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (device_pk, session_pk, level, reason)
             DO UPDATE SET dropped = GREATEST(gaps.dropped, excluded.dropped)",
            &[
                &device_pk,
                &session_pk,
                &i64::from(gap.level.code()),
                &gap.reason,
                &(gap.dropped.min(i64::MAX as u64) as i64),
            ],
        )
        .await?;
        gaps += 1;
    }
    for m in &batch.marks {
        let session_pk = match m.session_id {
            Some(id) => match ing.session_for_record(id, batch.sent_at_ns).await? {
                Some(pk) => pk,
                None => continue,
            },
            None => 0,
        };
        tx.execute(
            "INSERT INTO marks (device_pk, mark_id, revision, session_pk, ts, before_ns,
               after_ns, name, priority, metadata, released)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             ON CONFLICT (device_pk, mark_id) DO UPDATE SET
               revision = excluded.revision, released = excluded.released
             WHERE excluded.revision > marks.revision",
            &[
                &device_pk,
                &(m.id as i64),
                &(m.revision as i64),
                &session_pk,
                &m.timestamp_ns,
                &m.before_ns,
                &m.after_ns,
                &m.name,
                &m.priority,
                &m.metadata,
                &m.released,
            ],
        )
        .await?;
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
    // Every replica's live streams hear of the commit: PostgreSQL delivers
    // a notification at commit and only then, in commit order.
    if !ingested.changed.is_empty() {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&notify::CHANNEL, &notify::encode(origin, &ingested.changed)],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(ingested)
}

/// The session of a device, made as a placeholder if the device's state
/// has not arrived yet (uploads may race the batch that opens it).
/// `None` when the session was deleted.
pub(super) async fn session_for_device(
    client: &mut deadpool_postgres::Client,
    scope: &DeviceScope,
    id: uuid::Uuid,
) -> Result<Option<(i64, i64)>, StoreError> {
    let now = now_ns();
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&INGEST_LOCK])
        .await?;
    let device_pk = upsert_device(&tx, scope, &scope.device_id, now, None).await?;
    let mut ing = Ingest {
        tx: &tx,
        scope,
        device_pk,
        sessions: HashMap::new(),
    };
    let out = ing
        .session_for_record(id, now)
        .await?
        .map(|pk| (pk, device_pk));
    tx.commit().await?;
    Ok(out)
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
    async fn lookup(&self, id: &str) -> Result<Option<(i64, i64)>, StoreError> {
        let st = self
            .tx
            .prepare_cached(
                "SELECT pk, device_pk, revision FROM sessions
                 WHERE org = $1 AND project = $2 AND id = $3",
            )
            .await?;
        let row = self
            .tx
            .query_opt(&st, &[&self.scope.org, &self.scope.project, &id])
            .await?
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1), r.get::<_, i64>(2)));
        match row {
            Some((_, device_pk, _)) if device_pk != self.device_pk => Err(StoreError::Conflict(
                format!("session {id} belongs to another device"),
            )),
            Some((pk, _, revision)) => Ok(Some((pk, revision))),
            None => Ok(None),
        }
    }

    async fn is_deleted(&self, id: &str) -> Result<bool, StoreError> {
        let st = self
            .tx
            .prepare_cached(
                "SELECT 1 FROM deleted_sessions WHERE org = $1 AND project = $2 AND id = $3",
            )
            .await?;
        Ok(self
            .tx
            .query_opt(&st, &[&self.scope.org, &self.scope.project, &id])
            .await?
            .is_some())
    }

    /// Applies a session state if it is newer than the stored one; returns
    /// the session's row id when something changed.
    async fn apply_state(&mut self, s: &SessionState) -> Result<Option<i64>, StoreError> {
        let id = s.id.to_string();
        let metadata = serde_json::Value::Object(s.metadata.clone()).to_string();
        let (pkg_name, pkg_version) = match &s.package {
            Some(p) => (Some(p.name.as_str()), p.version.as_deref()),
            None => (None, None),
        };
        let revision = s.revision.min(i64::MAX as u64) as i64;
        let pk = match self.lookup(&id).await? {
            Some((pk, stored)) => {
                self.sessions.insert(s.id, Some(pk));
                if (stored as u64) >= s.revision && stored > 0 {
                    return Ok(None);
                }
                self.tx
                    .execute(
                        "UPDATE sessions SET revision = $2, status = $3, started_at_ns = $4,
                           ended_at_ns = $5, duration_ns = $6, package_name = $7,
                           package_version = $8, metadata = $9, error = $10
                         WHERE pk = $1",
                        &[
                            &pk,
                            &revision,
                            &s.status.as_str(),
                            &s.started_at_ns,
                            &s.ended_at_ns,
                            &s.duration_ns,
                            &pkg_name,
                            &pkg_version,
                            &metadata,
                            &s.error,
                        ],
                    )
                    .await?;
                pk
            }
            None => {
                if self.is_deleted(&id).await? {
                    self.sessions.insert(s.id, None);
                    return Ok(None);
                }
                let pk: i64 = self
                    .tx
                    .query_one(
                        "INSERT INTO sessions (org, project, id, device_pk, revision, status,
                           started_at_ns, ended_at_ns, duration_ns, package_name,
                           package_version, metadata, error)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
                         RETURNING pk",
                        &[
                            &self.scope.org,
                            &self.scope.project,
                            &id,
                            &self.device_pk,
                            &revision,
                            &s.status.as_str(),
                            &s.started_at_ns,
                            &s.ended_at_ns,
                            &s.duration_ns,
                            &pkg_name,
                            &pkg_version,
                            &metadata,
                            &s.error,
                        ],
                    )
                    .await?
                    .get(0);
                self.sessions.insert(s.id, Some(pk));
                pk
            }
        };
        self.tx
            .execute(
                "DELETE FROM session_tags WHERE session_pk = $1 AND source = 'device'",
                &[&pk],
            )
            .await?;
        for tag in &s.tags {
            self.tx
                .execute(
                    "INSERT INTO session_tags (session_pk, tag, source) VALUES ($1, $2, 'device')
                     ON CONFLICT DO NOTHING",
                    &[&pk, tag],
                )
                .await?;
        }
        Ok(Some(pk))
    }

    /// The row id of a session records refer to, made as an active
    /// placeholder (revision 0) when its state has not arrived yet.
    async fn session_for_record(
        &mut self,
        id: uuid::Uuid,
        first_seen_ns: i64,
    ) -> Result<Option<i64>, StoreError> {
        if let Some(pk) = self.sessions.get(&id) {
            return Ok(*pk);
        }
        let text = id.to_string();
        let pk = match self.lookup(&text).await? {
            Some((pk, _)) => Some(pk),
            None if self.is_deleted(&text).await? => None,
            None => Some(
                self.tx
                    .query_one(
                        "INSERT INTO sessions (org, project, id, device_pk, revision, status,
                           started_at_ns)
                         VALUES ($1, $2, $3, $4, 0, 'active', $5) RETURNING pk",
                        &[
                            &self.scope.org,
                            &self.scope.project,
                            &text,
                            &self.device_pk,
                            &first_seen_ns,
                        ],
                    )
                    .await?
                    .get(0),
            ),
        };
        self.sessions.insert(id, pk);
        Ok(pk)
    }
}
