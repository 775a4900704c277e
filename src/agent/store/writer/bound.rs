//! The writer's size bound: `agent.db` plus its WAL stay under
//! `buffer.max_bytes` and leave `buffer.min_free_bytes` free; when full,
//! eviction takes synced records oldest first, then unsynced ones from the
//! lowest level up, oldest first, and counts those as gaps per session and
//! level. Eviction's SQL is here ([`evict_synced`], [`evict_unsynced`]).
//!
//! Invariant: an unsynced record never leaves without a gap counter
//! growing in the same transaction.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use rusqlite::{params, Connection, OptionalExtension};

use super::Writer;
use crate::agent::store::sync::{watermark, NOT_AHEAD};
use crate::agent::store::StoreError;
use crate::wire::{gap_reason, Level};

const ADD_GAP: &str = "INSERT INTO gaps(session, level, reason, dropped) VALUES (?1, ?2, ?3, ?4) \
                       ON CONFLICT(session, level, reason) DO UPDATE SET dropped = dropped + excluded.dropped";

/// Counts `dropped` more records of `session` (0: device logs) and `level`
/// lost for `reason`, in the open transaction.
pub(super) fn add_gap(
    conn: &Connection,
    session: i64,
    level: Level,
    reason: &str,
    dropped: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(ADD_GAP)?
        .execute(params![session, level.code(), reason, dropped])?;
    Ok(())
}

impl Writer {
    pub(super) fn file_len(&self, suffix: &str) -> u64 {
        let mut p = self.cfg.db_path.as_os_str().to_owned();
        p.push(suffix);
        std::fs::metadata(PathBuf::from(p)).map_or(0, |m| m.len())
    }

    /// Keeps `agent.db` + WAL under `buffer.max_bytes` and the filesystem's
    /// free space above `buffer.min_free_bytes`. Called outside any
    /// transaction, after each commit.
    pub(super) fn enforce_bound(&mut self) -> Result<(), StoreError> {
        if !self.conn.is_autocommit() {
            return Ok(());
        }
        if self.file_len("-wal") > self.wal_limit {
            self.checkpoint();
        }
        let on_disk = self.file_len("") + self.file_len("-wal");
        self.stats.disk_bytes.store(on_disk, Ordering::Relaxed);
        let free = rustix::fs::statvfs(&self.cfg.state_dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
            .unwrap_or(u64::MAX);
        self.reserve
            .ensure(free.saturating_sub(self.cfg.min_free_bytes));
        // What the buffer may occupy: its own bound, and no more than leaves
        // min_free_bytes free on the filesystem.
        let limit = self
            .cfg
            .max_bytes
            .min((on_disk + free).saturating_sub(self.cfg.min_free_bytes));
        // Room for a full WAL and one more transaction on top of the pages.
        let budget = limit.saturating_sub(self.wal_limit + self.tx_bytes as u64 * 2);
        let page_size: u64 = self
            .conn
            .pragma_query_value(None, "page_size", |r| r.get(0))?;
        let pages: u64 = self
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))?;
        let free_pages: u64 = self
            .conn
            .pragma_query_value(None, "freelist_count", |r| r.get(0))?;
        let used = (pages - free_pages) * page_size;
        let file = pages * page_size;
        if used <= budget && file <= budget {
            return Ok(());
        }
        if used > budget {
            // Evict down to 90% of the budget, so eviction runs in chunks
            // rather than on every commit.
            let target = budget / 10 * 9;
            let stored = self.stats.records_stored.load(Ordering::Relaxed).max(1) as u64;
            let per_record = (used / stored).max(1);
            let n = (used - target).div_ceil(per_record).min(stored);
            self.evict(n)?;
        }
        self.conn.execute_batch("PRAGMA incremental_vacuum")?;
        self.checkpoint();
        let on_disk = self.file_len("") + self.file_len("-wal");
        self.stats.disk_bytes.store(on_disk, Ordering::Relaxed);
        Ok(())
    }

    /// Evicts `n` records: synced ones oldest first, then unsynced ones from
    /// the lowest level up, oldest first, counting those as gaps per
    /// session and level.
    pub(super) fn evict(&mut self, n: u64) -> Result<(), StoreError> {
        if n == 0 {
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        let mut left = n as i64;
        let synced_gone = evict_synced(&tx, left)?;
        left -= synced_gone;
        let mut unsynced_gone = 0i64;
        for level in Level::ALL {
            if left <= 0 {
                break;
            }
            let (per_session, gone) = evict_unsynced(&tx, level, left)?;
            for (session, count) in per_session {
                add_gap(&tx, session, level, gap_reason::EVICTED, count)?;
            }
            unsynced_gone += gone;
            left -= gone;
        }
        tx.commit()?;
        self.stats
            .records_stored
            .fetch_sub(synced_gone + unsynced_gone, Ordering::Relaxed);
        self.stats
            .records_synced
            .fetch_sub(synced_gone, Ordering::Relaxed);
        self.stats
            .evicted_synced
            .fetch_add(synced_gone as u64, Ordering::Relaxed);
        self.stats
            .evicted_unsynced
            .fetch_add(unsynced_gone as u64, Ordering::Relaxed);
        if unsynced_gone > 0 {
            tracing::warn!(
                "buffer full: evicted {synced_gone} synced and {unsynced_gone} unsynced records (counted as gaps)"
            );
        }
        Ok(())
    }
}

/// Evicts up to `n` synced records, oldest first (those up to
/// W, then the ahead set). Returns how many went.
pub(in crate::agent::store) fn evict_synced(conn: &Connection, n: i64) -> rusqlite::Result<i64> {
    if n <= 0 {
        return Ok(0);
    }
    let w = watermark(conn)?;
    let cutoff: Option<i64> = conn
        .query_row(
            "SELECT seq FROM records WHERE seq <= ?1 ORDER BY seq LIMIT 1 OFFSET ?2",
            [w, n - 1],
            |r| r.get(0),
        )
        .optional()?;
    let mut gone =
        conn.execute("DELETE FROM records WHERE seq <= ?1", [cutoff.unwrap_or(w)])? as i64;
    if gone < n {
        // Everything up to W went; the ahead set is next, oldest first.
        let mut stmt = conn.prepare_cached("SELECT seq FROM synced_ahead ORDER BY seq LIMIT ?1")?;
        let seqs: Vec<i64> = stmt
            .query_map([n - gone], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        let mut del = conn.prepare_cached("DELETE FROM records WHERE seq = ?1")?;
        let mut unahead = conn.prepare_cached("DELETE FROM synced_ahead WHERE seq = ?1")?;
        for s in seqs {
            gone += del.execute([s])? as i64;
            unahead.execute([s])?;
        }
    }
    Ok(gone)
}

/// The unsynced records of `level` that eviction takes next:
/// per session, how many of the oldest `n` there are, and the seq up to
/// which they go (`None` when there are none).
pub(in crate::agent::store) fn evict_unsynced(
    conn: &Connection,
    level: Level,
    n: i64,
) -> rusqlite::Result<(Vec<(i64, i64)>, i64)> {
    let w = watermark(conn)?;
    let code = level.code() as i64;
    let cutoff: i64 = conn
        .query_row(
            &format!(
                "SELECT r.seq FROM records r WHERE r.level = ?1 AND r.seq > ?3 AND {NOT_AHEAD} \
                 ORDER BY r.seq LIMIT 1 OFFSET ?2"
            ),
            params![code, n - 1, w],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(i64::MAX);
    let counts: Vec<(i64, i64)> = {
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT coalesce(r.session, 0), count(*) FROM records r \
             WHERE r.level = ?1 AND r.seq > ?3 AND r.seq <= ?2 AND {NOT_AHEAD} GROUP BY r.session"
        ))?;
        let rows = stmt.query_map(params![code, cutoff, w], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let gone = conn.execute(
        &format!(
            "DELETE FROM records AS r WHERE r.level = ?1 AND r.seq > ?3 AND r.seq <= ?2 AND {NOT_AHEAD}"
        ),
        params![code, cutoff, w],
    )? as i64;
    Ok((counts, gone))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::tests::{gaps, put, rows, seqs, writer};
    use crate::wire::Level;

    #[test]
    fn eviction_takes_synced_first_then_lowest_level_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 5)); // seq 1-5
        put(&mut w, rows(Level::Debug, 5)); // seq 6-10
        put(&mut w, rows(Level::Error, 2)); // seq 11-12
        put(&mut w, rows(Level::Trace, 1)); // seq 13
        assert_eq!(
            crate::agent::store::sync::mark_records(&w.conn, &[(2, 3), (12, 12)]).unwrap(),
            3
        );
        w.evict(6).unwrap();
        // Synced 2, 3, 12 first; then the trace record; then the two oldest
        // debug records (6, 7). Info 1 is older but outranks them.
        assert_eq!(seqs(&w), vec![1, 4, 5, 8, 9, 10, 11]);
        assert_eq!(
            gaps(&w),
            vec![
                (0, Level::Trace.code() as i64, "evicted".into(), 1),
                (0, Level::Debug.code() as i64, "evicted".into(), 2)
            ]
        );
        assert_eq!(w.stats.evicted_synced.load(Ordering::Relaxed), 3);
        assert_eq!(w.stats.evicted_unsynced.load(Ordering::Relaxed), 3);
    }
}
