//! What the writer does when SQLite fails under it. A full disk: release the
//! reserve file (room to evict in, since a delete needs WAL space too),
//! evict, give the pages back to the filesystem, and write the held rows
//! again. A database that went bad while running (a statement answered
//! `SQLITE_CORRUPT` or `SQLITE_NOTADB`, or the file's header changed): move
//! it aside with its WAL, as a bad file found at start-up is, and carry on
//! in a fresh one that keeps the seq counter and the active session, with
//! its unsynced records counted as a `corrupt` gap.
//!
//! Invariant: every record handed to the writer is committed or counted in
//! a gap (`evicted`, `disk_full`, `write_failed`, `corrupt`); once a
//! statement reported the file bad, nothing more is written to it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use rusqlite::{params, ErrorCode, OptionalExtension};

use super::{bound, Writer};
use crate::agent::store::{schema, StoreError};
use crate::wire::{gap_reason, Level};

/// How often a failed commit is tried again (after making room or moving a
/// bad file aside) before its rows are counted as lost.
pub(super) const RETRIES: usize = 2;

/// Why SQLite failed, as far as the writer acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    /// No space left on the state directory's filesystem.
    Full,
    /// The file is not a (sound) database any more.
    Corrupt,
    Other,
}

pub(super) fn classify(e: &rusqlite::Error) -> Fault {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => Fault::Full,
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Fault::Corrupt,
        _ => Fault::Other,
    }
}

/// A file of zeros beside `agent.db` that the writer deletes when the disk
/// is full, to have the room that evicting takes (every delete writes WAL
/// frames before it frees anything), and makes again once space is back.
pub(super) struct Reserve {
    path: PathBuf,
    bytes: u64,
    present: bool,
}

impl Reserve {
    /// The reserve of `db_path` (its WAL limit, 1 to 8 MiB).
    pub(super) fn new(db_path: &Path, wal_limit: u64) -> Reserve {
        let mut p = db_path.as_os_str().to_owned();
        p.push(".reserve");
        let path = PathBuf::from(p);
        let bytes = wal_limit.clamp(1 << 20, 8 << 20);
        let present = std::fs::metadata(&path).is_ok_and(|m| m.len() >= bytes);
        Reserve {
            path,
            bytes,
            present,
        }
    }

    /// Makes the file when `free` bytes leave room for it twice over.
    pub(super) fn ensure(&mut self, free: u64) {
        if self.present || free < self.bytes.saturating_mul(2) {
            return;
        }
        let made = (|| {
            let mut f = std::fs::File::create(&self.path)?;
            let zeros = vec![0u8; 64 << 10];
            let mut left = self.bytes;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            f.sync_all()
        })();
        match made {
            Ok(()) => self.present = true,
            Err(e) => {
                tracing::debug!("no room for the reserve file yet: {e}");
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }

    /// Deletes the file; true when there was one.
    fn release(&mut self) -> bool {
        let had = self.present || self.path.exists();
        self.present = false;
        had && std::fs::remove_file(&self.path).is_ok()
    }
}

/// What a session's row carries into a fresh database: status, started
/// (ns), boot id, started (boottime ns), tags, package name and version,
/// metadata, log count, revision.
type SessionRow = (
    String,
    i64,
    String,
    i64,
    String,
    Option<String>,
    Option<String>,
    String,
    i64,
    i64,
);

impl Writer {
    /// The disk is full: free the reserve, evict at least the held rows'
    /// worth (and half the reserve's), and give the pages back.
    pub(super) fn make_room(&mut self) {
        if !self.stats.disk_full.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the disk of {} is full: evicting to make room",
                self.cfg.state_dir.display()
            );
        }
        let released = self.reserve.release();
        self.checkpoint();
        let stored = self.stats.records_stored.load(Ordering::Relaxed).max(1) as u64;
        let used = super::bound::page_bytes(&self.conn).map_or(0, |(used, _)| used);
        let per_record = (used / stored).max(64);
        let held: u64 = self.held.iter().map(|(_, r)| r.len() as u64).sum();
        let n = held + self.reserve.bytes / 2 / per_record;
        if let Err(e) = self.evict(n) {
            tracing::warn!("evicting on a full disk failed: {e}");
        }
        if let Err(e) = super::bound::give_back_free_pages(&self.conn) {
            tracing::warn!("giving pages back on a full disk failed: {e}");
        }
        self.checkpoint();
        tracing::debug!("made room: reserve released {released}, asked to evict {n}");
    }

    /// The held rows could not be stored: count them as gaps (written by
    /// the next commit that goes through) and let them go.
    pub(super) fn give_up(&mut self, why: Fault) {
        let reason = match why {
            Fault::Full => gap_reason::DISK_FULL,
            Fault::Corrupt | Fault::Other => gap_reason::WRITE_FAILED,
        };
        let mut lost = 0u64;
        for (session, rows) in self.held.drain(..) {
            for r in &rows {
                *self
                    .pending_gaps
                    .entry((session.unwrap_or(0), r.level, reason))
                    .or_default() += 1;
                if r.client_dropped > 0 {
                    *self
                        .pending_gaps
                        .entry((
                            session.unwrap_or(0),
                            Level::Info,
                            gap_reason::CLIENT_DROPPED,
                        ))
                        .or_default() += r.client_dropped as i64;
                }
            }
            lost += rows.len() as u64;
            self.stats.spent.put(rows);
        }
        if lost > 0 {
            self.stats.write_failed.fetch_add(lost, Ordering::Relaxed);
            tracing::error!("{lost} records could not be stored ({reason}): counted as a gap");
        }
    }

    /// `enforce_bound` failed: a bad file is moved aside, anything else
    /// waits for the next try.
    pub(super) fn bound_failed(&mut self, e: StoreError) {
        tracing::error!("keeping the buffer bound failed: {e}");
        if let StoreError::Sql(e) = &e {
            if classify(e) == Fault::Corrupt {
                self.quarantine();
            }
        }
    }

    /// Reads the file's header: a file overwritten under a running agent
    /// (the case a page cache would hide longest) is moved aside at once.
    pub(super) fn check_header(&mut self) {
        let mut head = [0u8; 16];
        let read = std::fs::File::open(&self.cfg.db_path).and_then(|mut f| f.read_exact(&mut head));
        if read.is_ok() && &head != b"SQLite format 3\0" {
            tracing::error!(
                "the header of {} is not SQLite's any more",
                self.cfg.db_path.display()
            );
            self.quarantine();
        }
    }

    /// Moves the bad database aside (with its WAL) and continues in a fresh
    /// one: same seq counter, the active session carried over, the
    /// unsynced records it held counted as a `corrupt` gap.
    pub(super) fn quarantine(&mut self) {
        if !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        let session = self.current.and_then(|(pk, _)| {
            self.conn
                .query_row(
                    "SELECT status, started_at_ns, boot_id, started_boottime_ns, tags, \
                     package_name, package_version, metadata, log_count, revision \
                     FROM sessions WHERE pk = ?1",
                    [pk],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, i64>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, Option<String>>(5)?,
                            r.get::<_, Option<String>>(6)?,
                            r.get::<_, String>(7)?,
                            r.get::<_, i64>(8)?,
                            r.get::<_, i64>(9)?,
                        ))
                    },
                )
                .optional()
                .ok()
                .flatten()
        });
        let lost = (self.stats.records_stored.load(Ordering::Relaxed)
            - self.stats.records_synced.load(Ordering::Relaxed))
        .max(0);
        let path = self.cfg.db_path.clone();
        // Renamed before the connection closes: SQLite then neither
        // checkpoints into the moved file nor deletes a WAL by its old name
        // (which would be the fresh database's).
        let aside = match schema::move_aside(&path) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!("cannot move the bad database aside: {e}");
                return;
            }
        };
        let fresh = match Writer::open_conn(&self.cfg, self.wal_limit) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(
                    "cannot start a fresh database after moving the bad one aside: {e}"
                );
                return;
            }
        };
        drop(std::mem::replace(&mut self.conn, fresh));
        // The fresh file holds no reservation: the next commit makes one.
        self.seq_reserved = 0;
        let old_pk = self.current.map(|(pk, _)| pk);
        let new_pk = match self.carry_over(session, lost) {
            Ok(pk) => pk,
            Err(e) => {
                tracing::error!("writing into the fresh database failed: {e}");
                None
            }
        };
        // Rows and losses still to write that belonged to the active session
        // follow it; any other session's are device records now.
        let remap = |s: Option<i64>| match (s, old_pk) {
            (Some(s), Some(o)) if s == o => new_pk,
            _ => None,
        };
        for (s, _) in &mut self.held {
            *s = remap(*s);
        }
        let pending: HashMap<_, _> = self.pending_gaps.drain().collect();
        for ((s, level, reason), n) in pending {
            let s = remap(Some(s).filter(|&s| s != 0)).unwrap_or(0);
            *self.pending_gaps.entry((s, level, reason)).or_default() += n;
        }
        self.log_counts.clear();
        self.current = self.current.zip(new_pk).map(|((_, id), pk)| (pk, id));
        self.stats.records_stored.store(0, Ordering::Relaxed);
        self.stats.records_synced.store(0, Ordering::Relaxed);
        self.stats.quarantined.fetch_add(1, Ordering::Relaxed);
        // Every record a batch in flight carried is gone with the old file.
        self.stats.deletions.fetch_add(1, Ordering::SeqCst);
        // Only the active session moved to the new file.
        self.stats.sessions_changed.notify_one();
        *self
            .stats
            .quarantined_to
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(aside.clone());
        tracing::error!(
            "database {} went bad while running: moved it to {}, started a fresh one; \
             {lost} unsynced records in it are counted as a gap",
            path.display(),
            aside.display()
        );
    }

    /// Writes the seq counter, the active session and the loss into the
    /// fresh database; returns the session's new pk.
    fn carry_over(
        &mut self,
        session: Option<SessionRow>,
        lost: i64,
    ) -> rusqlite::Result<Option<i64>> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "INSERT INTO meta(key, value) VALUES ('next_seq', ?1) \
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [self.next_seq],
        )?;
        let pk = match (self.current, session) {
            (
                Some((_, id)),
                Some((status, started, boot, started_boot, tags, pname, pver, meta, logs, rev)),
            ) => {
                // A revision above the hub's, so it takes this row again.
                tx.execute(
                    "INSERT INTO sessions(id, status, started_at_ns, boot_id, started_boottime_ns, \
                     tags, package_name, package_version, metadata, log_count, revision) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![id.to_string(), status, started, boot, started_boot, tags, pname, pver, meta, logs, rev + 1],
                )?;
                Some(tx.last_insert_rowid())
            }
            (Some((_, id)), None) => {
                // Its row was unreadable: what is known. The revision is
                // far above any a session reaches, so the hub's copy (if it
                // has one) is replaced by this one and its later changes.
                tracing::warn!("session {id}'s row was unreadable: carried over with its id only");
                tx.execute(
                    "INSERT INTO sessions(id, status, started_at_ns, boot_id, started_boottime_ns, revision) \
                     VALUES (?1, 'active', ?2, ?3, ?4, ?5)",
                    params![
                        id.to_string(),
                        crate::agent::store::now_ns(),
                        self.cfg.view.boot_id,
                        crate::agent::store::boottime_ns(),
                        1i64 << 20
                    ],
                )?;
                Some(tx.last_insert_rowid())
            }
            (None, _) => None,
        };
        if lost > 0 {
            bound::add_gap(&tx, pk.unwrap_or(0), Level::Info, gap_reason::CORRUPT, lost)?;
        }
        tx.commit()?;
        Ok(pk)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::super::tests::{gaps, put, rows, seqs, writer};
    use super::super::Msg;
    use crate::agent::types::OpenSession;
    use crate::wire::Level;

    fn big(level: Level, n: usize) -> Vec<crate::agent::store::Row> {
        let mut r = rows(level, n);
        for row in &mut r {
            row.message = "x".repeat(2000);
        }
        r
    }

    /// SQLite's page limit stands in for a full filesystem: writes past it
    /// fail with `SQLITE_FULL`, as on a full disk.
    fn fill_to(w: &super::Writer, extra_pages: i64) {
        let pages: i64 = w
            .conn
            .pragma_query_value(None, "page_count", |r| r.get(0))
            .unwrap();
        w.conn
            .pragma_update(None, "max_page_count", pages + extra_pages)
            .unwrap();
    }

    fn handle(w: &mut super::Writer, msg: Msg) -> bool {
        if w.conn.is_autocommit() {
            w.conn.execute_batch("BEGIN").unwrap();
        }
        w.handle(msg, &mut Vec::new(), &mut 0, &mut 0)
    }

    #[test]
    fn a_full_disk_evicts_and_the_batch_in_hand_is_stored_not_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        put(&mut w, big(Level::Debug, 400)); // seq 1-400
        fill_to(&w, 2);
        // Two messages in one transaction; the second does not fit.
        assert!(!handle(&mut w, Msg::Rows(big(Level::Info, 3))));
        assert!(handle(&mut w, Msg::Rows(big(Level::Info, 300))));
        // False: what was in the first try beyond its rows is gone (here
        // nothing), the rows themselves were written again.
        assert!(!w.commit());
        let s = seqs(&w);
        // Every row in hand was stored (with new seqs), old debug records
        // made the room and are counted as evicted.
        let stored_info = s.iter().filter(|&&q| q > 400).count();
        assert_eq!(stored_info, 303);
        let evicted = 400 - s.iter().filter(|&&q| q <= 400).count() as i64;
        assert!(evicted > 0);
        assert_eq!(
            gaps(&w),
            vec![(0, Level::Debug.code() as i64, "evicted".into(), evicted)]
        );
        assert_eq!(w.stats.write_failed.load(Ordering::Relaxed), 0);
        assert_eq!(
            w.stats.records_stored.load(Ordering::Relaxed),
            s.len() as i64
        );
        assert!(!w.stats.disk_full.load(Ordering::Relaxed));
    }

    #[test]
    fn rows_that_cannot_be_stored_even_after_evicting_are_a_disk_full_gap() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let open = w.session(super::super::SessionCmd::Open(OpenSession::default()));
        assert!(open.is_ok());
        w.commit();
        fill_to(&w, 0);
        handle(&mut w, Msg::Rows(big(Level::Warn, 50)));
        assert!(!w.commit());
        assert!(w.stats.disk_full.load(Ordering::Relaxed));
        assert_eq!(w.stats.write_failed.load(Ordering::Relaxed), 50);
        assert!(seqs(&w).is_empty());
        // Space comes back: the next commit writes the loss down first.
        w.conn
            .pragma_update(None, "max_page_count", 1i64 << 30)
            .unwrap();
        handle(&mut w, Msg::Rows(rows(Level::Info, 2)));
        assert!(w.commit());
        assert_eq!(seqs(&w).len(), 2);
        let pk = w.current.unwrap().0;
        assert_eq!(
            gaps(&w),
            vec![(pk, Level::Warn.code() as i64, "disk_full".into(), 50)]
        );
        assert!(!w.stats.disk_full.load(Ordering::Relaxed));
    }

    #[test]
    fn a_database_overwritten_under_the_writer_is_moved_aside_and_a_fresh_one_continues() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer(dir.path());
        let id = w
            .session(super::super::SessionCmd::Open(OpenSession::default()))
            .unwrap()
            .id;
        w.commit();
        put(&mut w, rows(Level::Info, 10)); // seq 1-10, unsynced
        w.checkpoint();
        let len = std::fs::metadata(dir.path().join("agent.db"))
            .unwrap()
            .len();
        std::fs::write(dir.path().join("agent.db"), vec![0x5a; len as usize]).unwrap();
        w.check_header();
        assert_eq!(w.stats.quarantined.load(Ordering::Relaxed), 1);
        let aside = w.stats.quarantined_to.lock().unwrap().clone().unwrap();
        assert!(aside.exists(), "{}", aside.display());
        // The fresh file goes on where the old one stopped: same session,
        // seqs never reused, the loss counted.
        handle(&mut w, Msg::Rows(rows(Level::Info, 3)));
        assert!(w.commit());
        assert_eq!(seqs(&w), vec![11, 12, 13]);
        assert_eq!(w.current.map(|(_, i)| i), Some(id));
        let pk = w.current.unwrap().0;
        assert_eq!(
            gaps(&w),
            vec![(pk, Level::Info.code() as i64, "corrupt".into(), 10)]
        );
        let status: String = w
            .conn
            .query_row("SELECT status FROM sessions WHERE pk = ?1", [pk], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(status, "active");
        assert_eq!(w.stats.records_stored.load(Ordering::Relaxed), 3);
    }
}
