//! The uploader's view of the ring buffer: what the hub has not acknowledged
//! yet (session revisions, records, gap counters), read on the uploader's own
//! read-only connection, plus the writer-side statements that record an
//! acknowledgement or a batch set aside.
//!
//! Invariant: reads here never change anything; the writer applies
//! [`Acked`] and [`SetAside`] in its own transaction, and only for what the
//! hub acknowledged (or refused for good).

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::{boottime_ns, now_ns, schema, StoreError};
use crate::wire::{gap_reason, Gap, Level, Package, Record, SessionState, SessionStatus};

/// A session state to send, with the row it came from.
#[derive(Debug, Clone)]
pub struct PendingSession {
    pub sid: i64,
    pub state: SessionState,
}

/// A gap counter to send, with its key in the `gaps` table.
#[derive(Debug, Clone)]
pub struct PendingGap {
    /// `gaps.session` (0 for device logs).
    pub session: i64,
    pub gap: Gap,
}

/// What the hub acknowledged for one batch.
#[derive(Debug, Clone, Default)]
pub struct Acked {
    /// Inclusive seq ranges (from `BatchAck.acked`).
    pub records: Vec<(u64, u64)>,
    /// (sid, revision sent).
    pub sessions: Vec<(i64, u64)>,
    /// (session, level, reason, dropped sent).
    pub gaps: Vec<(i64, Level, String, u64)>,
}

/// A batch the hub refused as invalid: its records become a `rejected` gap
/// (and are marked synced, so they are never sent again and evict first);
/// its session revisions and gap counters count as sent.
#[derive(Debug, Clone, Default)]
pub struct SetAside {
    pub acked: Acked,
    /// (seq, sid or 0, level) of every record in the refused batch.
    pub records: Vec<(u64, i64, Level)>,
    pub reason: String,
}

/// Reads pending sync work. Opened by the uploader; one connection, reopened
/// by a restarted uploader.
pub struct SyncReader {
    conn: Connection,
    boot_id: String,
}

const RECORD_COLUMNS: &str = "r.seq, s.id, r.ts_ns, r.level, r.module, r.message, r.metadata, \
                              r.pid, r.uid, r.gid, r.process, coalesce(r.session, 0)";

/// A record to send, with the row facts the writer needs if it is set aside.
#[derive(Debug, Clone)]
pub struct PendingRecord {
    pub sid: i64,
    pub record: Record,
    /// Rough encoded size, for closing batches by bytes.
    pub approx_bytes: usize,
}

impl SyncReader {
    pub fn open(path: &Path, boot_id: &str) -> Result<SyncReader, StoreError> {
        Ok(SyncReader {
            conn: schema::open_reader(path)?,
            boot_id: boot_id.to_owned(),
        })
    }

    /// Sessions whose newest revision the hub has not acknowledged, oldest
    /// first.
    pub fn pending_sessions(&self, limit: usize) -> Result<Vec<PendingSession>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT sid, id, revision, status, started_at_ns, ended_at_ns, duration_ns, boot_id, \
             started_boottime_ns, tags, package_name, package_version, metadata, error \
             FROM sessions WHERE revision > synced_revision ORDER BY sid LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            let id: String = r.get(1)?;
            let status: String = r.get(3)?;
            let started: i64 = r.get(4)?;
            let duration: Option<i64> = r.get(6)?;
            let boot: String = r.get(7)?;
            let started_boot: i64 = r.get(8)?;
            // An active session's duration so far, from the monotonic clock
            // when this boot saw its start.
            let duration = duration.or_else(|| {
                Some(if boot == self.boot_id {
                    boottime_ns() - started_boot
                } else {
                    now_ns() - started
                })
            });
            let tags: String = r.get(9)?;
            let package_name: Option<String> = r.get(10)?;
            let metadata: String = r.get(12)?;
            Ok(PendingSession {
                sid: r.get(0)?,
                state: SessionState {
                    id: Uuid::parse_str(&id).unwrap_or_default(),
                    revision: r.get::<_, i64>(2)? as u64,
                    status: SessionStatus::parse(&status).unwrap_or(SessionStatus::Failed),
                    started_at_ns: started,
                    ended_at_ns: r.get(5)?,
                    duration_ns: duration.map(|d| d.max(0)),
                    tags: serde_json::from_str(&tags).unwrap_or_default(),
                    package: package_name.map(|name| Package {
                        name,
                        version: r.get(11).ok().flatten(),
                    }),
                    metadata: serde_json::from_str(&metadata).unwrap_or_default(),
                    error: r.get(13)?,
                },
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The lowest unsynced seq, where an in-order scan starts.
    pub fn first_unsynced(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT min(seq) FROM records WHERE synced = 0")?
            .query_row([], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten()
            .map(|s| s as u64))
    }

    /// Up to `limit` unsynced records at or above `from` in seq order,
    /// stopping once `max_bytes` is reached.
    pub fn records_from(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<PendingRecord>, StoreError> {
        self.records(
            &format!(
                // NOT INDEXED: a walk along the primary key from the cursor;
                // the planner would otherwise pick records_evict and sort
                // the whole backlog for every batch.
                "SELECT {RECORD_COLUMNS} FROM records r NOT INDEXED LEFT JOIN sessions s ON s.sid = r.session \
                 WHERE r.seq >= ?1 AND r.synced = 0 ORDER BY r.seq LIMIT ?2"
            ),
            params![from as i64, limit as i64],
            max_bytes,
        )
    }

    /// Up to `limit` unsynced error and fatal records, oldest first: what
    /// goes first when the uploader is behind.
    pub fn urgent_records(
        &self,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<PendingRecord>, StoreError> {
        self.records(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM records r LEFT JOIN sessions s ON s.sid = r.session \
                 WHERE r.synced = 0 AND r.level >= ?1 ORDER BY r.level, r.seq LIMIT ?2"
            ),
            params![Level::Error.code() as i64, limit as i64],
            max_bytes,
        )
        .map(|mut v| {
            v.sort_by_key(|r| r.record.seq);
            v
        })
    }

    fn records(
        &self,
        sql: &str,
        args: impl rusqlite::Params,
        max_bytes: usize,
    ) -> Result<Vec<PendingRecord>, StoreError> {
        let mut stmt = self.conn.prepare_cached(sql)?;
        let mut rows = stmt.query(args)?;
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while let Some(r) = rows.next()? {
            let sid: Option<String> = r.get(1)?;
            let level: i64 = r.get(3)?;
            let record = Record {
                seq: r.get::<_, i64>(0)? as u64,
                session_id: sid.and_then(|s| Uuid::parse_str(&s).ok()),
                timestamp_ns: r.get(2)?,
                level: Level::from_code(level as u8).unwrap_or(Level::Info),
                module: r.get(4)?,
                message: r.get(5)?,
                metadata: r.get(6)?,
                pid: r.get(7)?,
                uid: r.get(8)?,
                gid: r.get(9)?,
                process: r.get(10)?,
            };
            let approx = record.module.len()
                + record.message.len()
                + record.metadata.len()
                + record.process.as_ref().map_or(0, String::len)
                + 48;
            bytes += approx;
            out.push(PendingRecord {
                sid: r.get(11)?,
                record,
                approx_bytes: approx,
            });
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// Gap counters that grew since the hub last acknowledged them.
    pub fn pending_gaps(&self) -> Result<Vec<PendingGap>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT g.session, s.id, g.level, g.reason, g.dropped FROM gaps g \
             LEFT JOIN sessions s ON s.sid = g.session \
             WHERE g.dropped > g.synced_dropped ORDER BY g.session, g.level, g.reason LIMIT 1000",
        )?;
        let rows = stmt.query_map([], |r| {
            let id: Option<String> = r.get(1)?;
            let level: i64 = r.get(2)?;
            Ok(PendingGap {
                session: r.get(0)?,
                gap: Gap {
                    session_id: id.and_then(|s| Uuid::parse_str(&s).ok()),
                    level: Level::from_code(level as u8).unwrap_or(Level::Info),
                    reason: r.get(3)?,
                    dropped: r.get::<_, i64>(4)? as u64,
                },
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Batches set aside so far: (count, records in them, newest reason).
    pub fn set_aside_summary(&self) -> Result<(u64, u64, Option<String>), StoreError> {
        ensure_tables_readonly(&self.conn)?;
        let (n, records): (i64, i64) = self.conn.query_row(
            "SELECT count(*), coalesce(sum(records), 0) FROM sync_set_aside",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let reason: Option<String> = self
            .conn
            .query_row(
                "SELECT reason FROM sync_set_aside ORDER BY id DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        Ok((n as u64, records as u64, reason))
    }
}

/// Is the `sync_set_aside` table there yet? (The writer creates it at open;
/// a reader racing a fresh database must not fail on it.)
fn ensure_tables_readonly(conn: &Connection) -> Result<(), StoreError> {
    let n: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = 'sync_set_aside'",
        [],
        |r| r.get(0),
    )?;
    if n == 0 {
        return Err(StoreError::Io {
            what: "reading set-aside batches".into(),
            source: std::io::Error::other("the writer has not created sync_set_aside yet"),
        });
    }
    Ok(())
}

/// Creates the uploader's own bookkeeping table. Not a migration: the
/// numbered migrations belong to the schema's history, and this table holds
/// only a report (batches the hub refused), so it is created where it is
/// first needed and harmless to lose.
pub fn create_tables(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS sync_set_aside(
            id INTEGER PRIMARY KEY,
            at_ns INTEGER NOT NULL,
            first_seq INTEGER,
            last_seq INTEGER,
            records INTEGER NOT NULL,
            reason TEXT NOT NULL
        );",
    )?;
    Ok(())
}

/// Writer side: applies an acknowledgement. Returns records newly marked.
pub fn apply_acked(conn: &Connection, acked: &Acked) -> rusqlite::Result<u64> {
    let mut n = 0;
    {
        // `+synced`: walk the seq range on the primary key; with a plain
        // `synced = 0` the planner scans the whole backlog in records_evict
        // for every range.
        let mut stmt = conn.prepare_cached(
            "UPDATE records SET synced = 1 WHERE seq BETWEEN ?1 AND ?2 AND +synced = 0",
        )?;
        for (lo, hi) in &acked.records {
            n += stmt.execute(params![*lo as i64, *hi as i64])? as u64;
        }
    }
    let mut stmt = conn.prepare_cached(
        "UPDATE sessions SET synced_revision = max(synced_revision, ?2) WHERE sid = ?1",
    )?;
    for (sid, rev) in &acked.sessions {
        stmt.execute(params![sid, *rev as i64])?;
    }
    let mut stmt = conn.prepare_cached(
        "UPDATE gaps SET synced_dropped = max(synced_dropped, ?4) \
         WHERE session = ?1 AND level = ?2 AND reason = ?3",
    )?;
    for (session, level, reason, dropped) in &acked.gaps {
        stmt.execute(params![session, level.code(), reason, *dropped as i64])?;
    }
    Ok(n)
}

/// Writer side: sets a refused batch aside. Returns records newly marked.
pub fn apply_set_aside(conn: &Connection, s: &SetAside) -> rusqlite::Result<u64> {
    let mut n = apply_acked(conn, &s.acked)?;
    {
        let mut mark =
            conn.prepare_cached("UPDATE records SET synced = 1 WHERE seq = ?1 AND synced = 0")?;
        let mut gap = conn.prepare_cached(
            "INSERT INTO gaps(session, level, reason, dropped) VALUES (?1, ?2, ?3, 1) \
             ON CONFLICT(session, level, reason) DO UPDATE SET dropped = dropped + 1",
        )?;
        for (seq, sid, level) in &s.records {
            let changed = mark.execute([*seq as i64])?;
            if changed > 0 {
                n += 1;
                gap.execute(params![sid, level.code(), gap_reason::REJECTED])?;
            }
        }
    }
    conn.execute(
        "INSERT INTO sync_set_aside(at_ns, first_seq, last_seq, records, reason) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            now_ns(),
            s.records.iter().map(|r| r.0 as i64).min(),
            s.records.iter().map(|r| r.0 as i64).max(),
            s.records.len() as i64,
            s.reason.chars().take(500).collect::<String>()
        ],
    )?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with `levels.len()` records (seq 1..) and one session
    /// holding the first two.
    fn db(levels: &[Level]) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = schema::open_writer(&path, false).unwrap();
        create_tables(&conn).unwrap();
        conn.execute(
            "INSERT INTO sessions(sid, id, status, started_at_ns, boot_id, started_boottime_ns) \
             VALUES (1, '01930000-0000-7000-8000-000000000001', 'active', 5, 'b', 0)",
            [],
        )
        .unwrap();
        for (i, l) in levels.iter().enumerate() {
            conn.execute(
                "INSERT INTO records(seq, session, ts_ns, level, module, message, metadata) \
                 VALUES (?1, ?2, ?1, ?3, 'm', 'msg', '')",
                params![i as i64 + 1, (i < 2).then_some(1), l.code()],
            )
            .unwrap();
        }
        (dir, conn)
    }

    fn seqs(v: &[PendingRecord]) -> Vec<u64> {
        v.iter().map(|r| r.record.seq).collect()
    }

    #[test]
    fn pending_work_in_the_designed_order() {
        use Level::*;
        let (dir, conn) = db(&[Info, Error, Debug, Fatal, Info, Error, Info]);
        let r = SyncReader::open(&dir.path().join("agent.db"), "b").unwrap();
        let s = r.pending_sessions(10).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].state.revision, 1);
        assert_eq!(s[0].state.status, SessionStatus::Active);
        assert_eq!(r.first_unsynced().unwrap(), Some(1));
        // In seq order from a cursor, bounded by count and by bytes.
        assert_eq!(seqs(&r.records_from(3, 3, 1 << 20).unwrap()), vec![3, 4, 5]);
        assert_eq!(seqs(&r.records_from(1, 100, 1).unwrap()), vec![1]);
        // Errors and fatals first, oldest first.
        assert_eq!(seqs(&r.urgent_records(10, 1 << 20).unwrap()), vec![2, 4, 6]);
        let rec = &r.records_from(1, 1, 1 << 20).unwrap()[0];
        assert_eq!(rec.sid, 1);
        assert!(rec.record.session_id.is_some());

        // Acked: only those ranges, the session's revision, the gap counter.
        conn.execute(
            "INSERT INTO gaps(session, level, reason, dropped) VALUES (0, 1, 'evicted', 4)",
            [],
        )
        .unwrap();
        assert_eq!(r.pending_gaps().unwrap().len(), 1);
        let acked = Acked {
            records: vec![(1, 2), (4, 4)],
            sessions: vec![(1, 1)],
            gaps: vec![(0, Level::Debug, "evicted".into(), 4)],
        };
        assert_eq!(apply_acked(&conn, &acked).unwrap(), 3);
        assert_eq!(apply_acked(&conn, &acked).unwrap(), 0, "idempotent");
        assert!(r.pending_sessions(10).unwrap().is_empty());
        assert!(r.pending_gaps().unwrap().is_empty());
        assert_eq!(
            seqs(&r.records_from(1, 100, 1 << 20).unwrap()),
            vec![3, 5, 6, 7]
        );

        // Set aside: never sent again, counted as a rejected gap, reported.
        let aside = SetAside {
            acked: Acked::default(),
            records: vec![(6, 0, Level::Error)],
            reason: "hub answered 400".into(),
        };
        assert_eq!(apply_set_aside(&conn, &aside).unwrap(), 1);
        assert_eq!(
            seqs(&r.records_from(1, 100, 1 << 20).unwrap()),
            vec![3, 5, 7]
        );
        let gaps = r.pending_gaps().unwrap();
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].gap.reason, "rejected");
        assert_eq!(gaps[0].gap.level, Level::Error);
        assert_eq!(
            r.set_aside_summary().unwrap(),
            (1, 1, Some("hub answered 400".into()))
        );
    }
}
