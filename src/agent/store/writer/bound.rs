//! The writer's size bound: `agent.db` plus its WAL stay under
//! `buffer.max_bytes` and leave `buffer.min_free_bytes` free; when full,
//! eviction takes synced records oldest first, then unsynced ones from the
//! lowest level up, oldest first, and counts those as gaps per session and
//! level. Eviction's SQL is here ([`evict_synced`], [`evict_unsynced`]).
//! Records inside a mark's window (`store::marks::PINNED`) go last, after
//! every other record, in the same order among themselves; pins over
//! `buffer.pinned_max` are released first (`pins::release_over`).
//!
//! Invariant: an unsynced record never leaves without a gap counter
//! growing in the same transaction.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use rusqlite::{params, Connection, OptionalExtension};

use super::Writer;
use crate::agent::store::marks::{has_pins, PINNED};
use crate::agent::store::sync::{watermark, NOT_AHEAD};
use crate::agent::store::StoreError;
use crate::wire::{gap_reason, Level};

const ADD_GAP: &str = "INSERT INTO gaps(session, level, reason, dropped) VALUES (?1, ?2, ?3, ?4) \
                       ON CONFLICT(session, level, reason) DO UPDATE SET dropped = dropped + excluded.dropped";

/// Gives every free page back to the filesystem (`auto_vacuum` is
/// incremental). The pragma frees one page per step, answering a row for
/// each, so it is stepped to its end: run once (as `execute_batch` does) it
/// freed one page, and the file kept its high-water size. Returns the
/// pages freed.
pub(super) fn give_back_free_pages(conn: &Connection) -> rusqlite::Result<u64> {
    let mut stmt = conn.prepare_cached("PRAGMA incremental_vacuum")?;
    let mut rows = stmt.query([])?;
    let mut freed = 0;
    while rows.next()?.is_some() {
        freed += 1;
    }
    Ok(freed)
}

/// The bytes of the pages in use and of all pages, the WAL's included
/// (most may not be in the file yet). Asked after every commit, so each
/// pragma is prepared once (a pragma compiles like any other statement).
pub(super) fn page_bytes(conn: &Connection) -> rusqlite::Result<(u64, u64)> {
    let pragma = |name: &str| -> rusqlite::Result<u64> {
        conn.prepare_cached(name)?.query_row([], |r| r.get(0))
    };
    let page_size = pragma("PRAGMA page_size")?;
    let pages = pragma("PRAGMA page_count")?;
    let free_pages = pragma("PRAGMA freelist_count")?;
    Ok((
        pages.saturating_sub(free_pages) * page_size,
        pages * page_size,
    ))
}

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
        let (used, file) = page_bytes(&self.conn)?;
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
        give_back_free_pages(&self.conn)?;
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
        let tx = self.conn.unchecked_transaction()?;
        super::pins::release_over(&tx, self.cfg.pinned_max)?;
        // Unpinned records first, then (only if still needed) pinned ones.
        let unpinned = format!(" AND NOT ({PINNED})");
        let pinned = format!(" AND ({PINNED})");
        let passes: Vec<&str> = if has_pins(&tx)? {
            vec![&unpinned, &pinned]
        } else {
            vec![""]
        };
        let mut left = n as i64;
        let (mut synced_gone, mut unsynced_gone) = (0i64, 0i64);
        for pins in passes {
            let gone = evict_synced_where(&tx, left, pins)?;
            synced_gone += gone;
            left -= gone;
            for level in Level::ALL {
                if left <= 0 {
                    break;
                }
                let (per_session, gone) = evict_unsynced_where(&tx, level, left, pins)?;
                for (session, count) in per_session {
                    add_gap(&tx, session, level, gap_reason::EVICTED, count)?;
                }
                unsynced_gone += gone;
                left -= gone;
            }
        }
        tx.commit()?;
        // After the commit: an uploader that read the counter before this
        // may have read these records, and sees it moved.
        if synced_gone + unsynced_gone > 0 {
            self.stats.deletions.fetch_add(1, Ordering::SeqCst);
        }
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
#[cfg(test)]
pub(in crate::agent::store) fn evict_synced(conn: &Connection, n: i64) -> rusqlite::Result<i64> {
    evict_synced_where(conn, n, "")
}

/// [`evict_synced`] among the records `pins` (an SQL condition on `r`
/// starting with AND, or empty) selects.
fn evict_synced_where(conn: &Connection, n: i64, pins: &str) -> rusqlite::Result<i64> {
    if n <= 0 {
        return Ok(0);
    }
    let w = watermark(conn)?;
    let cutoff: Option<i64> = conn
        .prepare_cached(&format!(
            "SELECT r.seq FROM records r WHERE r.seq <= ?1{pins} ORDER BY r.seq LIMIT 1 OFFSET ?2"
        ))?
        .query_row([w, n - 1], |r| r.get(0))
        .optional()?;
    let mut gone = conn
        .prepare_cached(&format!("DELETE FROM records AS r WHERE r.seq <= ?1{pins}"))?
        .execute([cutoff.unwrap_or(w)])? as i64;
    if gone < n {
        // Everything up to W went; the ahead set is next, oldest first.
        let mut stmt = conn.prepare_cached(&if pins.is_empty() {
            "SELECT seq FROM synced_ahead ORDER BY seq LIMIT ?1".to_owned()
        } else {
            format!(
                "SELECT a.seq FROM synced_ahead a JOIN records r ON r.seq = a.seq \
                 WHERE 1{pins} ORDER BY a.seq LIMIT ?1"
            )
        })?;
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
#[cfg(test)]
pub(in crate::agent::store) fn evict_unsynced(
    conn: &Connection,
    level: Level,
    n: i64,
) -> rusqlite::Result<(Vec<(i64, i64)>, i64)> {
    evict_unsynced_where(conn, level, n, "")
}

/// [`evict_unsynced`] among the records `pins` selects (see
/// [`evict_synced_where`]).
fn evict_unsynced_where(
    conn: &Connection,
    level: Level,
    n: i64,
    pins: &str,
) -> rusqlite::Result<(Vec<(i64, i64)>, i64)> {
    let w = watermark(conn)?;
    let code = level.code() as i64;
    let cutoff: i64 = conn
        .query_row(
            &format!(
                "SELECT r.seq FROM records r WHERE r.level = ?1 AND r.seq > ?3 AND {NOT_AHEAD}{pins} \
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
             WHERE r.level = ?1 AND r.seq > ?3 AND r.seq <= ?2 AND {NOT_AHEAD}{pins} GROUP BY r.session"
        ))?;
        let rows = stmt.query_map(params![code, cutoff, w], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect::<rusqlite::Result<_>>()?
    };
    let gone = conn.execute(
        &format!(
            "DELETE FROM records AS r WHERE r.level = ?1 AND r.seq > ?3 AND r.seq <= ?2 AND {NOT_AHEAD}{pins}"
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

    /// Eviction frees pages, and the bound gives every one of them back:
    /// the file is no larger than the pages in use.
    #[test]
    fn the_bound_gives_every_free_page_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let pragma = |w: &super::Writer, p: &str| -> u64 {
            w.conn.pragma_query_value(None, p, |r| r.get(0)).unwrap()
        };
        for _ in 0..10 {
            let mut big = rows(Level::Debug, 100);
            for r in &mut big {
                r.message = "x".repeat(2000);
            }
            put(&mut w, big);
        }
        let pages = pragma(&w, "page_count");
        let page_size = pragma(&w, "page_size");
        // Room for about half of them.
        w.cfg.max_bytes = w.wal_limit + 2 * w.tx_bytes as u64 + pages * page_size / 2;
        w.enforce_bound().unwrap();
        assert!(seqs(&w).len() < 1000, "the bound evicted");
        assert_eq!(pragma(&w, "freelist_count"), 0, "no free page kept");
        assert!(pragma(&w, "page_count") < pages / 2 + pages / 10);
        assert_eq!(
            w.file_len(""),
            pragma(&w, "page_count") * page_size,
            "the file is the pages in use (after the checkpoint)"
        );
    }

    #[test]
    fn eviction_takes_synced_first_then_lowest_level_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 5)); // seq 1-5
        put(&mut w, rows(Level::Debug, 5)); // seq 6-10
        put(&mut w, rows(Level::Error, 2)); // seq 11-12
        put(&mut w, rows(Level::Trace, 1)); // seq 13
        assert_eq!(
            crate::agent::store::sync::mark_records(
                &w.conn,
                &[(2, 3), (12, 12)],
                crate::agent::store::sync::Ranges::Sparse
            )
            .unwrap(),
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

#[cfg(test)]
mod pin_tests {
    use super::super::tests::{gaps, put, rows, seqs, writer};
    use super::super::Writer;
    use crate::agent::marks::{MarkSpec, Priority};
    use crate::wire::Level;

    /// A mark at `ts` pinning `[ts - before, ts + after]` (nanoseconds).
    fn mark(w: &mut Writer, ts: i64, before: i64, after: i64, priority: Priority) {
        let spec = MarkSpec {
            name: format!("m{ts}"),
            timestamp_ns: Some(ts),
            before_ns: before,
            after_ns: after,
            priority,
            metadata: String::new(),
        };
        w.mark(&spec).unwrap();
    }

    /// The timestamps left, which `rows` makes equal to their index.
    fn times(w: &Writer) -> Vec<i64> {
        let mut stmt = w
            .conn
            .prepare("SELECT ts_ns FROM records ORDER BY seq")
            .unwrap();
        let out = stmt.query_map([], |r| r.get(0)).unwrap();
        out.collect::<rusqlite::Result<_>>().unwrap()
    }

    fn dropped(w: &Writer, reason: &str) -> i64 {
        gaps(w).iter().filter(|g| g.2 == reason).map(|g| g.3).sum()
    }

    #[test]
    fn a_marks_window_is_evicted_after_everything_else_whatever_its_level() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Trace, 100)); // ts 0..99, the lowest level
        put(&mut w, rows(Level::Error, 20)); // ts 0..19, outside the window
        mark(&mut w, 50, 10, 10, Priority::Normal); // pins ts 40..=60
        w.evict(99).unwrap();
        // Every error went before the trace records of the window.
        assert_eq!(times(&w), (40..=60).collect::<Vec<_>>());
        assert_eq!(dropped(&w, "evicted"), 99);
        // Then the window itself, oldest first.
        w.evict(5).unwrap();
        assert_eq!(times(&w), (45..=60).collect::<Vec<_>>());
        assert_eq!(dropped(&w, "evicted"), 104);
        assert_eq!(dropped(&w, "pin_released"), 0);
    }

    #[test]
    fn overlapping_windows_merge_and_synced_records_outside_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 100));
        mark(&mut w, 20, 5, 5, Priority::Normal); // 15..=25
        mark(&mut w, 28, 5, 5, Priority::High); // 23..=33: one pin 15..=33
        let pins: Vec<(i64, i64)> = w
            .conn
            .prepare("SELECT start_ns, end_ns FROM pins")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(pins, vec![(15, 33)]);
        // Synced records inside the window stay too.
        crate::agent::store::sync::mark_records(
            &w.conn,
            &[(1, 30)],
            crate::agent::store::sync::Ranges::Sparse,
        )
        .unwrap();
        w.evict(100 - 19).unwrap();
        assert_eq!(times(&w), (15..=33).collect::<Vec<_>>());
        // Only the unsynced ones it evicted are gaps: 34..=99.
        assert_eq!(dropped(&w, "evicted"), 66);
        assert_eq!(seqs(&w).len(), 19);
    }

    #[test]
    fn pins_over_pinned_max_release_the_oldest_normal_ones_first_as_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, rows(Level::Info, 100));
        let per_record = super::super::super::Row::approx_bytes(&rows(Level::Info, 100)[50]) as u64;
        mark(&mut w, 10, 5, 5, Priority::High); // 5..=15, oldest but high
        mark(&mut w, 40, 5, 5, Priority::Normal); // 35..=45, oldest normal
        mark(&mut w, 70, 5, 5, Priority::Normal); // 65..=75
                                                  // Room for two windows of 11 records.
        w.cfg.pinned_max = per_record * 23;
        w.evict(100 - 22).unwrap();
        let mut want: Vec<i64> = (5..=15).collect();
        want.extend(65..=75);
        assert_eq!(times(&w), want);
        // The released window's 11 records are reported, and its records
        // were then evicted like any other.
        assert_eq!(dropped(&w, "pin_released"), 11);
        assert_eq!(dropped(&w, "evicted"), 78);
        let released: Vec<(String, Option<String>)> = w
            .conn
            .prepare("SELECT name, released FROM marks ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            released,
            vec![
                ("m10".into(), None),
                ("m40".into(), Some("pin_released".into())),
                ("m70".into(), None)
            ]
        );
    }
}
