//! The uploader's view of the ring buffer: what the hub has not acknowledged
//! yet (session revisions, records, gap counters), read on the uploader's own
//! read-only connection, plus the writer-side statements that record an
//! acknowledgement or a batch set aside.
//!
//! What is synced is a watermark, not a flag per record: `meta.synced_through`
//! (W) says every record with seq <= W is synced, and `synced_ahead` lists
//! the records above W that are synced too (errors sent first while behind,
//! records of a set-aside batch). An in-order acknowledgement moves W; W then
//! advances over evicted seqs (holes) and absorbs the ahead entries it
//! reaches, so `synced_ahead` stays as small as what was sent out of order.
//!
//! Invariant: reads here never change anything; the writer applies
//! [`Acked`] and [`SetAside`] in its own transaction, and only for what the
//! hub acknowledged (or refused for good). A record is synced if and only if
//! its seq is <= W or in `synced_ahead`; every `synced_ahead` entry is above
//! W and names a stored record.

use std::path::Path;

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::duration::{duration_ns, Now, Span};
use super::{now_ns, schema, StoreError};
use crate::wire::{gap_reason, Gap, Level, Package, Record, SessionState, SessionStatus};

/// A session state to send, with the row it came from.
#[derive(Debug, Clone)]
pub struct PendingSession {
    pub pk: i64,
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
    /// (pk, revision sent).
    pub sessions: Vec<(i64, u64)>,
    /// (session, level, reason, dropped sent).
    pub gaps: Vec<(i64, Level, String, u64)>,
    /// (mark id, revision sent).
    pub marks: Vec<(i64, u64)>,
    /// `Stats::deletions` read before the batch's records were read
    /// (`None`: not known). `records` are then runs of seqs that were all
    /// stored, so while the counter has not moved they all still are.
    pub read_at: Option<u64>,
}

/// A batch the hub refused as invalid: its records become a `rejected` gap
/// (and are marked synced, so they are never sent again and evict first);
/// its session revisions and gap counters count as sent.
#[derive(Debug, Clone, Default)]
pub struct SetAside {
    pub acked: Acked,
    /// (seq, pk or 0, level) of every record in the refused batch.
    pub records: Vec<(u64, i64, Level)>,
    pub reason: String,
}

/// Reads pending sync work. Opened by the uploader; one connection, reopened
/// by a restarted uploader.
pub struct SyncReader {
    pub(super) conn: Connection,
    boot_id: String,
    /// The file it opened (see [`schema::file_id`]).
    file: Option<schema::FileId>,
}

/// The unsynced records (`?3` is the watermark): above W and not synced
/// ahead.
const UNSYNCED: &str =
    "r.seq > ?3 AND NOT EXISTS (SELECT 1 FROM synced_ahead a WHERE a.seq = r.seq)";
/// Not synced ahead of the watermark (point lookups on its primary key).
pub(super) const NOT_AHEAD: &str = "NOT EXISTS (SELECT 1 FROM synced_ahead a WHERE a.seq = r.seq)";

const RECORD_COLUMNS: &str = "r.seq, s.id, r.ts_ns, r.level, r.module, r.message, r.metadata, \
                              r.pid, r.uid, r.gid, r.process, coalesce(r.session, 0)";

/// A record to send, with the row facts the writer needs if it is set aside.
#[derive(Debug, Clone)]
pub struct PendingRecord {
    pub pk: i64,
    pub record: Record,
    /// Rough encoded size, for closing batches by bytes.
    pub approx_bytes: usize,
}

impl SyncReader {
    pub fn open(path: &Path, boot_id: &str) -> Result<SyncReader, StoreError> {
        let file = schema::file_id(path);
        Ok(SyncReader {
            conn: schema::open_reader(path)?,
            boot_id: boot_id.to_owned(),
            file,
        })
    }

    /// Whether it still reads the database at `path` (the writer moves a
    /// bad one aside and starts another).
    pub fn is_current(&self, path: &Path) -> bool {
        self.file.is_some() && self.file == schema::file_id(path)
    }

    /// Sessions whose newest revision the hub has not acknowledged, oldest
    /// first.
    pub fn pending_sessions(&self, limit: usize) -> Result<Vec<PendingSession>, StoreError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT pk, id, revision, status, started_at_ns, ended_at_ns, duration_ns, boot_id, \
             started_boottime_ns, tags, package_name, package_version, metadata, error \
             FROM sessions WHERE revision > synced_revision ORDER BY pk LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            let id: String = r.get(1)?;
            let status: String = r.get(3)?;
            let started: i64 = r.get(4)?;
            let duration: Option<i64> = r.get(6)?;
            let boot: String = r.get(7)?;
            let started_boot: i64 = r.get(8)?;
            let ended: Option<i64> = r.get(5)?;
            let span = Span {
                started_ns: started,
                started_boottime_ns: started_boot,
                boot_id: &boot,
                ended_ns: ended,
                duration_ns: duration,
            };
            let tags: String = r.get(9)?;
            let package_name: Option<String> = r.get(10)?;
            let metadata: String = r.get(12)?;
            Ok(PendingSession {
                pk: r.get(0)?,
                state: SessionState {
                    id: Uuid::parse_str(&id).unwrap_or_default(),
                    revision: r.get::<_, i64>(2)? as u64,
                    status: SessionStatus::parse(&status).unwrap_or(SessionStatus::Failed),
                    started_at_ns: started,
                    ended_at_ns: ended,
                    duration_ns: Some(duration_ns(&span, &self.boot_id, Now::read())),
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
        let w = watermark(&self.conn)?;
        Ok(first_unsynced_above(&self.conn, w)?.map(|s| s as u64))
    }

    /// Up to `limit` unsynced records with seqs in `from..=through`, in
    /// seq order, stopping once `max_bytes` is reached.
    pub fn records_from(
        &self,
        from: u64,
        through: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<PendingRecord>, StoreError> {
        self.records(
            &format!(
                // NOT INDEXED: a walk along the primary key from the cursor;
                // the planner would otherwise pick an index and sort the
                // whole backlog for every batch.
                "SELECT {RECORD_COLUMNS} FROM records r NOT INDEXED LEFT JOIN sessions s ON s.pk = r.session \
                 WHERE r.seq >= ?1 AND r.seq <= ?4 AND {UNSYNCED} ORDER BY r.seq LIMIT ?2"
            ),
            params![
                from.max(1) as i64,
                limit as i64,
                watermark(&self.conn)?,
                seq_param(through)
            ],
            max_bytes,
        )
    }

    /// Up to `limit` unsynced records of `session` (0: the device logs
    /// outside sessions) with seqs in `from..=through` and, when `span` is
    /// given, times within it (inclusive), in seq order, stopping once
    /// `max_bytes` is reached: a walk along `records_session`.
    pub fn session_records(
        &self,
        session: i64,
        (from, through): (u64, u64),
        span: Option<(i64, i64)>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<PendingRecord>, StoreError> {
        let (start, end) = span.unzip();
        self.records(
            &format!(
                "SELECT {RECORD_COLUMNS} FROM records r INDEXED BY records_session \
                 LEFT JOIN sessions s ON s.pk = r.session \
                 WHERE r.session IS ?1 AND r.seq >= ?4 AND r.seq <= ?5 \
                   AND (?6 IS NULL OR r.ts_ns BETWEEN ?6 AND ?7) AND {UNSYNCED} \
                 ORDER BY r.seq LIMIT ?2"
            ),
            params![
                (session != 0).then_some(session),
                limit as i64,
                watermark(&self.conn)?,
                from.max(1) as i64,
                seq_param(through),
                start,
                end
            ],
            max_bytes,
        )
    }

    /// The synced-seq watermark W: every record at or below it is synced.
    pub fn watermark(&self) -> Result<u64, StoreError> {
        Ok(watermark(&self.conn)?.max(0) as u64)
    }

    /// The newest stored seq (0 when the buffer is empty). Every seq up to
    /// it that is still stored was committed before this read.
    pub fn newest_seq(&self) -> Result<u64, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM records")?
            .query_row([], |r| r.get(0))?;
        Ok(n.max(0) as u64)
    }

    /// The time of the first stored record at or after seq `at`.
    pub fn time_at(&self, at: u64) -> Result<Option<i64>, StoreError> {
        Ok(self
            .conn
            .prepare_cached("SELECT ts_ns FROM records WHERE seq >= ?1 ORDER BY seq LIMIT 1")?
            .query_row([seq_param(at)], |r| r.get(0))
            .optional()?)
    }

    /// Where records from time `ts_ns` on start among seqs `lo..=hi`: the
    /// first seq from which the next stored record has a time at or after
    /// `ts_ns` (`hi + 1` when none has). A binary search over seqs, exact
    /// where times grow with seqs, as they do for records stamped when
    /// received; callers allow for records that carry their own time.
    pub fn seq_at_time(&self, ts_ns: i64, lo: u64, hi: u64) -> Result<u64, StoreError> {
        let mut probe = self.conn.prepare_cached(
            "SELECT seq, ts_ns FROM records WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq LIMIT 1",
        )?;
        let (mut a, mut b) = (lo, hi.saturating_add(1));
        while a < b {
            let mid = a + (b - a) / 2;
            let next: Option<(i64, i64)> = probe
                .query_row([seq_param(mid), seq_param(hi)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            match next {
                Some((seq, ts)) if ts < ts_ns => a = seq as u64 + 1,
                _ => b = mid,
            }
        }
        Ok(a)
    }

    /// Failed sessions (pk), newest first, with stored records above the
    /// watermark: their records go before other sessions' while behind.
    pub fn failed_sessions_behind(&self, limit: usize) -> Result<Vec<i64>, StoreError> {
        let w = watermark(&self.conn)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT pk FROM sessions s WHERE status = 'failed' \
             AND EXISTS (SELECT 1 FROM records r INDEXED BY records_session \
                         WHERE r.session = s.pk AND r.seq > ?1) \
             ORDER BY pk DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![w, limit as i64], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Up to `limit` unsynced error and fatal records above seq `from`,
    /// oldest first: what goes first when the uploader is behind. Every
    /// unsynced error or fatal between `from` and the last one returned is
    /// in the answer, so the caller may move `from` past it.
    pub fn urgent_records(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<PendingRecord>, StoreError> {
        // One walk per level along `records_level(level, seq)` from above
        // the watermark, merged by seq: never over the synced history.
        let w = watermark(&self.conn)?.max(from as i64);
        let mut all = Vec::new();
        for level in [Level::Error, Level::Fatal] {
            all.extend(self.records(
                &format!(
                    "SELECT {RECORD_COLUMNS} FROM records r LEFT JOIN sessions s ON s.pk = r.session \
                     WHERE r.level = ?1 AND r.seq > ?3 AND {NOT_AHEAD} ORDER BY r.seq LIMIT ?2"
                ),
                params![level.code() as i64, limit as i64, w],
                max_bytes,
            )?);
        }
        all.sort_by_key(|r| r.record.seq);
        let mut bytes = 0;
        let mut n = 0;
        for r in &all {
            if n >= limit || bytes >= max_bytes {
                break;
            }
            bytes += r.approx_bytes;
            n += 1;
        }
        all.truncate(n);
        Ok(all)
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
        // A run of records shares its session: its id is parsed once.
        let mut last_id: Option<(String, Option<Uuid>)> = None;
        while let Some(r) = rows.next()? {
            let text = r.get_ref(1)?.as_str_or_null();
            let text = text.map_err(|e| {
                rusqlite::Error::FromSqlConversionFailure(
                    1,
                    rusqlite::types::Type::Text,
                    Box::new(e),
                )
            })?;
            let session_id = match text {
                None => None,
                Some(text) => match &last_id {
                    Some((t, id)) if t == text => *id,
                    _ => {
                        let id = Uuid::parse_str(text).ok();
                        last_id = Some((text.to_owned(), id));
                        id
                    }
                },
            };
            let level: i64 = r.get(3)?;
            let record = Record {
                seq: r.get::<_, i64>(0)? as u64,
                session_id,
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
                pk: r.get(11)?,
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
             LEFT JOIN sessions s ON s.pk = g.session \
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

/// A seq as an SQL parameter (seqs past `i64::MAX` do not exist).
fn seq_param(seq: u64) -> i64 {
    seq.min(i64::MAX as u64) as i64
}

/// The synced-seq watermark W (0 before anything was synced).
pub fn watermark(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "SELECT coalesce((SELECT value FROM meta WHERE key = 'synced_through'), 0)",
    )?
    .query_row([], |r| r.get(0))
}

fn set_watermark(conn: &Connection, w: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES ('synced_through', ?1) \
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute([w])?;
    // Entries at or below W are implied by it.
    conn.prepare_cached("DELETE FROM synced_ahead WHERE seq <= ?1")?
        .execute([w])?;
    Ok(())
}

/// The first stored record above `w` that is not synced ahead: a walk along
/// the primary key from W that steps over ahead entries.
fn first_unsynced_above(conn: &Connection, w: i64) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT r.seq FROM records r NOT INDEXED WHERE r.seq > ?1 \
         AND NOT EXISTS (SELECT 1 FROM synced_ahead a WHERE a.seq = r.seq) ORDER BY r.seq LIMIT 1",
    )?
    .query_row([w], |r| r.get(0))
    .optional()
}

/// Moves W as far as it can go: up to just below the first unsynced record
/// (over holes left by eviction and over ahead entries), or to the newest
/// record when nothing is unsynced. Returns the new W.
fn advance(conn: &Connection, w: i64) -> rusqlite::Result<i64> {
    let to = match first_unsynced_above(conn, w)? {
        Some(f) => f - 1,
        None => conn
            .prepare_cached("SELECT coalesce(max(seq), 0) FROM records")?
            .query_row([], |r| r.get(0))?,
    };
    if to > w {
        set_watermark(conn, to)?;
        Ok(to)
    } else {
        Ok(w)
    }
}

/// Number of synced records: all stored ones up to W, and the ahead set.
pub fn count_synced(conn: &Connection) -> rusqlite::Result<i64> {
    let w = watermark(conn)?;
    // Counted on the small `records_level` index, not on the table's
    // leaves (the whole buffer, read at every start otherwise).
    conn.query_row(
        "SELECT (SELECT count(*) FROM records INDEXED BY records_level WHERE seq <= ?1) \
         + (SELECT count(*) FROM synced_ahead)",
        [w],
        |r| r.get(0),
    )
}

/// Is the stored record `seq` synced? (`None` when it is not stored.)
fn is_synced(conn: &Connection, w: i64, seq: i64) -> rusqlite::Result<Option<bool>> {
    conn.prepare_cached(
        "SELECT r.seq <= ?2 OR EXISTS (SELECT 1 FROM synced_ahead a WHERE a.seq = r.seq) \
         FROM records r WHERE r.seq = ?1",
    )?
    .query_row([seq, w], |r| r.get(0))
    .optional()
}

/// How [`mark_records`] learns which seqs of a range are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranges {
    /// Any seq may be missing (evicted, never stored): the table is read.
    Sparse,
    /// Every seq of every range is stored (runs of records read from the
    /// buffer with nothing deleted since): counted without reading the
    /// table, which was most of an acknowledgement's cost in a drain.
    Stored,
}

/// Marks the stored records in the inclusive seq ranges synced; returns how
/// many were not synced before. A range starting at or below the first
/// unsynced record moves W; any other goes into `synced_ahead` until W
/// reaches it.
pub fn mark_records(
    conn: &Connection,
    ranges: &[(u64, u64)],
    stored: Ranges,
) -> rusqlite::Result<u64> {
    let mut ranges = ranges.to_vec();
    ranges.sort_unstable();
    let mut w = advance(conn, watermark(conn)?)?;
    // W never passes the newest stored record: a range reaching beyond it
    // (a hub acking more than it got) must not mark future records.
    let newest: i64 = conn
        .prepare_cached("SELECT coalesce(max(seq), 0) FROM records")?
        .query_row([], |r| r.get(0))?;
    let mut n = 0u64;
    for (lo, hi) in ranges {
        let lo = lo.min(i64::MAX as u64) as i64;
        let hi = (hi.min(i64::MAX as u64) as i64).min(newest);
        let a = lo.max(w + 1);
        if a > hi {
            continue;
        }
        let newly: i64 = match stored {
            Ranges::Sparse => conn
                .prepare_cached(
                    "SELECT (SELECT count(*) FROM records WHERE seq BETWEEN ?1 AND ?2) \
                     - (SELECT count(*) FROM synced_ahead WHERE seq BETWEEN ?1 AND ?2)",
                )?
                .query_row([a, hi], |r| r.get(0))?,
            Ranges::Stored => {
                let ahead: i64 = conn
                    .prepare_cached(
                        "SELECT count(*) FROM synced_ahead WHERE seq BETWEEN ?1 AND ?2",
                    )?
                    .query_row([a, hi], |r| r.get(0))?;
                hi - a + 1 - ahead
            }
        };
        n += newly.max(0) as u64;
        // W is already advanced: w + 1 is unsynced or not stored yet, so a
        // range starting there continues the synced prefix.
        if a == w + 1 {
            set_watermark(conn, hi)?;
            w = advance(conn, hi)?;
        } else if newly > 0 {
            conn.prepare_cached(
                "INSERT OR IGNORE INTO synced_ahead(seq) SELECT seq FROM records WHERE seq BETWEEN ?1 AND ?2",
            )?
            .execute([a, hi])?;
        }
    }
    Ok(n)
}

/// How the ranges of a batch read when `Stats::deletions` was `read_at`
/// stand now that it is `deletions`.
fn ranges_of(read_at: Option<u64>, deletions: u64) -> Ranges {
    match read_at == Some(deletions) {
        true => Ranges::Stored,
        false => Ranges::Sparse,
    }
}

/// Writer side: applies an acknowledgement. `deletions` is
/// `Stats::deletions` now. Returns records newly marked.
pub fn apply_acked(conn: &Connection, acked: &Acked, deletions: u64) -> rusqlite::Result<u64> {
    let n = mark_records(conn, &acked.records, ranges_of(acked.read_at, deletions))?;
    let mut stmt = conn.prepare_cached(
        "UPDATE sessions SET synced_revision = max(synced_revision, ?2) WHERE pk = ?1",
    )?;
    for (pk, rev) in &acked.sessions {
        stmt.execute(params![pk, *rev as i64])?;
    }
    let mut stmt = conn.prepare_cached(
        "UPDATE gaps SET synced_dropped = max(synced_dropped, ?4) \
         WHERE session = ?1 AND level = ?2 AND reason = ?3",
    )?;
    for (session, level, reason, dropped) in &acked.gaps {
        stmt.execute(params![session, level.code(), reason, *dropped as i64])?;
    }
    super::marks::apply_acked(conn, &acked.marks)?;
    Ok(n)
}

/// Writer side: sets a refused batch aside (its `acked.read_at` tells of
/// its records too). Returns records newly marked.
pub fn apply_set_aside(conn: &Connection, s: &SetAside, deletions: u64) -> rusqlite::Result<u64> {
    let mut n = apply_acked(conn, &s.acked, deletions)?;
    {
        let w = watermark(conn)?;
        let mut gap = conn.prepare_cached(
            "INSERT INTO gaps(session, level, reason, dropped) VALUES (?1, ?2, ?3, 1) \
             ON CONFLICT(session, level, reason) DO UPDATE SET dropped = dropped + 1",
        )?;
        for (seq, pk, level) in &s.records {
            if is_synced(conn, w, *seq as i64)? == Some(false) {
                gap.execute(params![pk, level.code(), gap_reason::REJECTED])?;
            }
        }
        n += mark_records(
            conn,
            &crate::wire::seq_ranges(s.records.iter().map(|r| r.0)),
            ranges_of(s.acked.read_at, deletions),
        )?;
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
    use crate::agent::store::writer::bound::{evict_synced, evict_unsynced};

    /// A database with `levels.len()` records (seq 1..) and one session
    /// holding the first two.
    fn db(levels: &[Level]) -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = schema::open_writer(&path, false).unwrap();
        create_tables(&conn).unwrap();
        conn.execute(
            "INSERT INTO sessions(pk, id, status, started_at_ns, boot_id, started_boottime_ns) \
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
        assert_eq!(
            seqs(&r.records_from(3, u64::MAX, 3, 1 << 20).unwrap()),
            vec![3, 4, 5]
        );
        assert_eq!(seqs(&r.records_from(1, u64::MAX, 100, 1).unwrap()), vec![1]);
        // Errors and fatals first, oldest first.
        assert_eq!(
            seqs(&r.urgent_records(0, 10, 1 << 20).unwrap()),
            vec![2, 4, 6]
        );
        assert_eq!(seqs(&r.urgent_records(2, 10, 1 << 20).unwrap()), vec![4, 6]);
        assert_eq!(seqs(&r.urgent_records(0, 2, 1 << 20).unwrap()), vec![2, 4]);
        let rec = &r.records_from(1, u64::MAX, 1, 1 << 20).unwrap()[0];
        assert_eq!(rec.pk, 1);
        assert!(rec.record.session_id.is_some());

        // Acked: only those ranges, the session's revision, the gap counter.
        conn.execute(
            "INSERT INTO gaps(session, level, reason, dropped) VALUES (0, 1, 'evicted', 4)",
            [],
        )
        .unwrap();
        assert_eq!(r.pending_gaps().unwrap().len(), 1);
        let acked = Acked {
            marks: Vec::new(),
            records: vec![(1, 2), (4, 4)],
            sessions: vec![(1, 1)],
            gaps: vec![(0, Level::Debug, "evicted".into(), 4)],
            read_at: None,
        };
        assert_eq!(apply_acked(&conn, &acked, 0).unwrap(), 3);
        assert_eq!(apply_acked(&conn, &acked, 0).unwrap(), 0, "idempotent");
        assert!(r.pending_sessions(10).unwrap().is_empty());
        assert!(r.pending_gaps().unwrap().is_empty());
        assert_eq!(
            seqs(&r.records_from(1, u64::MAX, 100, 1 << 20).unwrap()),
            vec![3, 5, 6, 7]
        );

        // Set aside: never sent again, counted as a rejected gap, reported.
        let aside = SetAside {
            acked: Acked::default(),
            records: vec![(6, 0, Level::Error)],
            reason: "hub answered 400".into(),
        };
        assert_eq!(apply_set_aside(&conn, &aside, 0).unwrap(), 1);
        assert_eq!(
            seqs(&r.records_from(1, u64::MAX, 100, 1 << 20).unwrap()),
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

    /// (W, ahead set, synced count) after each step.
    fn state(conn: &Connection) -> (i64, Vec<i64>, i64) {
        let mut stmt = conn
            .prepare("SELECT seq FROM synced_ahead ORDER BY seq")
            .unwrap();
        let ahead = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        (watermark(conn).unwrap(), ahead, count_synced(conn).unwrap())
    }

    /// Once counting the table, once trusting ranges of stored records
    /// (`Ranges::Stored`) wherever they are: the same counts and states.
    #[test]
    fn the_watermark_moves_over_holes_and_absorbs_what_went_ahead() {
        for trust in [false, true] {
            the_watermark_moves_over_holes(trust);
        }
    }

    fn the_watermark_moves_over_holes(trust: bool) {
        let (_dir, conn) = db(&[Level::Info; 10]);
        let evict = |seqs: &[i64]| {
            for s in seqs {
                conn.execute("DELETE FROM records WHERE seq = ?1", [s])
                    .unwrap();
            }
        };
        let all_stored = |ranges: &[(u64, u64)]| {
            ranges.iter().all(|&(lo, hi)| {
                let n: u64 = conn
                    .query_row(
                        "SELECT count(*) FROM records WHERE seq BETWEEN ?1 AND ?2",
                        [lo as i64, hi.min(i64::MAX as u64) as i64],
                        |r| r.get(0),
                    )
                    .unwrap();
                n == hi - lo + 1
            })
        };
        let check = |ranges: &[(u64, u64)], newly: u64, w: i64, ahead: &[i64], synced: i64| {
            let how = match trust && all_stored(ranges) {
                true => Ranges::Stored,
                false => Ranges::Sparse,
            };
            let got = mark_records(&conn, ranges, how).unwrap();
            assert_eq!(got, newly, "{ranges:?} {how:?}");
            assert_eq!(
                state(&conn),
                (w, ahead.to_vec(), synced),
                "{ranges:?} {how:?}"
            );
        };
        // Ahead of the watermark: listed, W stays.
        check(&[(3, 4)], 2, 0, &[3, 4], 2);
        // The prefix arrives: W moves and absorbs 3 and 4.
        check(&[(1, 2)], 2, 4, &[], 4);
        // Idempotent.
        check(&[(1, 4)], 0, 4, &[], 4);
        // 5 and 6 evicted unsynced: W steps over the holes.
        evict(&[5, 6]);
        check(&[(7, 7)], 1, 7, &[], 5);
        // Scattered acks (errors first), then the rest in one range that
        // overlaps them: each record counted once.
        check(&[(9, 9)], 1, 7, &[9], 6);
        check(&[(1, 10)], 2, 10, &[], 8);
        // An ack beyond the newest record leaves W at the newest record, so
        // the next record is unsynced.
        check(&[(11, u64::MAX)], 0, 10, &[], 8);
        conn.execute(
            "INSERT INTO records(seq, ts_ns, level, module, message, metadata) VALUES (11, 1, 2, 'm', 'x', '')",
            [],
        )
        .unwrap();
        let r = SyncReader::open(&_dir.path().join("agent.db"), "b").unwrap();
        assert_eq!(r.first_unsynced().unwrap(), Some(11));
    }

    #[test]
    fn reads_and_eviction_follow_the_watermark() {
        use Level::*;
        let (dir, conn) = db(&[Info, Error, Debug, Fatal, Info, Error, Info, Debug]);
        let r = SyncReader::open(&dir.path().join("agent.db"), "b").unwrap();
        // Errors first went ahead (2, 4), the prefix 1 acked.
        mark_records(&conn, &[(1, 1), (2, 2), (4, 4)], Ranges::Sparse).unwrap();
        assert_eq!(state(&conn), (2, vec![4], 3));
        assert_eq!(r.first_unsynced().unwrap(), Some(3));
        assert_eq!(
            seqs(&r.records_from(1, u64::MAX, 100, 1 << 20).unwrap()),
            vec![3, 5, 6, 7, 8]
        );
        assert_eq!(seqs(&r.urgent_records(0, 100, 1 << 20).unwrap()), vec![6]);
        // Eviction: synced oldest first (1, 2 up to W, then 4 ahead), then
        // unsynced lowest level first, oldest first (3, then 8).
        assert_eq!(evict_synced(&conn, 2).unwrap(), 2);
        assert_eq!(state(&conn), (2, vec![4], 1));
        assert_eq!(evict_synced(&conn, 5).unwrap(), 1);
        assert_eq!(state(&conn), (2, vec![], 0));
        let (per_session, gone) = evict_unsynced(&conn, Debug, 1).unwrap();
        assert_eq!((per_session, gone), (vec![(0, 1)], 1));
        assert_eq!(
            seqs(&r.records_from(1, u64::MAX, 100, 1 << 20).unwrap()),
            vec![5, 6, 7, 8]
        );
        let (per_session, gone) = evict_unsynced(&conn, Debug, 5).unwrap();
        assert_eq!((per_session, gone), (vec![(0, 1)], 1));
        assert_eq!(
            seqs(&r.records_from(1, u64::MAX, 100, 1 << 20).unwrap()),
            vec![5, 6, 7]
        );
        // The next ack moves W over the evicted 3 and 4.
        assert_eq!(mark_records(&conn, &[(5, 5)], Ranges::Sparse).unwrap(), 1);
        assert_eq!(state(&conn), (5, vec![], 1));
    }

    #[test]
    fn set_aside_records_go_ahead_and_count_once_as_rejected() {
        use Level::*;
        let (dir, conn) = db(&[Info, Info, Error, Info]);
        let aside = SetAside {
            acked: Acked::default(),
            records: vec![(3, 0, Error), (4, 0, Info)],
            reason: "hub answered 400".into(),
        };
        assert_eq!(apply_set_aside(&conn, &aside, 0).unwrap(), 2);
        assert_eq!(state(&conn), (0, vec![3, 4], 2));
        assert_eq!(apply_set_aside(&conn, &aside, 0).unwrap(), 0);
        let r = SyncReader::open(&dir.path().join("agent.db"), "b").unwrap();
        let rejected: Vec<_> = r
            .pending_gaps()
            .unwrap()
            .into_iter()
            .map(|g| (g.gap.level, g.gap.dropped))
            .collect();
        assert_eq!(rejected, vec![(Info, 1), (Error, 1)]);
        // The prefix acked: W absorbs the set-aside records.
        mark_records(&conn, &[(1, 2)], Ranges::Sparse).unwrap();
        assert_eq!(state(&conn), (4, vec![], 4));
    }
}
