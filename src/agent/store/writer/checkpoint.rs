//! WAL checkpoints: the checkpointer thread copies committed pages into
//! `agent.db` off the writer's thread, and the writer truncates a WAL that
//! outgrew its limit itself.
//!
//! Invariant: one checkpoint at a time (`Writer::checkpointing`); the
//! checkpointer never writes content, only copies committed pages.

use std::time::Duration;

use rusqlite::Connection;

use super::Writer;

impl Writer {
    /// Copies the whole WAL into `agent.db` and truncates it. Waits for a
    /// checkpoint the checkpointer thread is running: SQLite refuses a
    /// second one at once (busy, without asking the busy handler), which
    /// would leave the WAL over its bound.
    pub(super) fn checkpoint(&self) {
        let _one = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        match self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            }) {
            Ok(0) => {}
            Ok(_) => {
                tracing::debug!("WAL checkpoint left frames behind (a reader is still on them)")
            }
            Err(e) => tracing::warn!("WAL checkpoint failed: {e}"),
        }
    }
}

/// The checkpointer thread: copies committed WAL pages into `agent.db`
/// (a passive checkpoint, which never blocks the writer or readers) each
/// time the writer has committed another [`Writer::tx_bytes`], so the
/// writer never waits for the two fsyncs a checkpoint costs, which on a
/// robot's flash can take longer than the records they follow. Ends when
/// the writer drops its sender. `one` is held during each checkpoint (see
/// [`Writer::checkpoint`]).
pub(super) fn checkpointer(
    path: &std::path::Path,
    woken: &std::sync::mpsc::Receiver<()>,
    one: &std::sync::Mutex<()>,
) {
    let open = || {
        let id = crate::agent::store::schema::file_id(path);
        match Connection::open(path) {
            Ok(c) => {
                let _ = c.busy_timeout(Duration::from_secs(5));
                Some((c, id))
            }
            Err(e) => {
                tracing::error!("the checkpointer cannot open {}: {e}", path.display());
                None
            }
        }
    };
    let mut conn = open();
    while woken.recv().is_ok() {
        let _one = one.lock().unwrap_or_else(|p| p.into_inner());
        // The writer moved a bad file aside: follow it to the fresh one.
        if conn.as_ref().map(|(_, id)| *id) != Some(crate::agent::store::schema::file_id(path)) {
            conn = open();
        }
        let Some((c, _)) = &conn else { continue };
        if let Err(e) = c.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!("WAL checkpoint failed: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use tokio::sync::{mpsc, oneshot};

    use super::super::tests::{rows, writer};
    use super::super::Msg;
    use crate::wire::Level;

    #[test]
    fn a_running_writer_checkpoints_on_another_thread() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let (stats, tx_bytes, wal_limit) = (w.stats.clone(), w.tx_bytes, w.wal_limit);
        let db_len = || {
            std::fs::metadata(dir.path().join("agent.db"))
                .unwrap()
                .len()
        };
        let before = db_len();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        let thread = w.spawn(rx, rt.handle().clone()).unwrap();
        // More than one checkpoint's worth of records, less than the WAL
        // limit at which the writer would truncate the WAL itself.
        let big = |i: usize| {
            let mut r = rows(Level::Info, 100);
            for row in &mut r {
                row.message = format!("{i} {}", "x".repeat(1000));
            }
            r
        };
        let n = (tx_bytes * 3 / 2) / (100 * 1000) + 1;
        assert!(n * 100 * 1100 < wal_limit as usize);
        for i in 0..n {
            tx.blocking_send(Msg::Rows(big(i))).unwrap();
        }
        let (done, flushed) = oneshot::channel();
        tx.blocking_send(Msg::Flush(done)).unwrap();
        rt.block_on(flushed).unwrap();
        assert_eq!(stats.committed.load(Ordering::Relaxed), n as u64 * 100);
        // Only a checkpoint moves pages from the WAL into agent.db.
        let deadline = Instant::now() + Duration::from_secs(20);
        while db_len() < before + tx_bytes as u64 {
            assert!(
                Instant::now() < deadline,
                "no checkpoint: agent.db is {} bytes",
                db_len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(tx);
        thread.join().unwrap();
    }
}
