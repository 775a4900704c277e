//! WAL checkpoints off the acknowledging path. SQLite's automatic
//! checkpoint runs inside the commit that crosses its threshold, so every
//! few batches one device waited for a copy of tens of MiB into the
//! database file and its fsyncs before its batch was acknowledged (a
//! drain's posts: 75–150 ms, and 205–260 ms every seventh batch). Here a
//! thread of its own copies committed pages (a passive checkpoint, which
//! never blocks the writer or readers) after commits, at most every
//! [`PASS_EVERY`]; the writer only checkpoints itself when the WAL outgrew
//! its limit anyway (the checkpointer could not keep up, or a reader held
//! old pages), and then finds most pages copied already.
//!
//! Invariant: one checkpoint at a time (`one`); the checkpointer never
//! writes content, only copies committed pages.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::Connection;

/// Largest WAL before the writer checkpoints (and truncates it) itself.
pub(super) const WAL_LIMIT: u64 = 64 << 20;
/// Least time between two passes of the checkpointer: each costs two
/// fsyncs, and a pass copies whatever was committed meanwhile.
const PASS_EVERY: Duration = Duration::from_millis(100);

pub(super) struct Checkpoints {
    /// Wakes the checkpointer (a wake-up waiting already is enough).
    wake: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Held during each checkpoint.
    one: Arc<Mutex<()>>,
    wal: PathBuf,
    limit: u64,
}

impl Checkpoints {
    /// Starts the checkpointer of the database at `path`; the writer
    /// checkpoints itself past `limit` bytes of WAL.
    pub(super) fn start(path: &Path, limit: u64) -> Checkpoints {
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let one = Arc::new(Mutex::new(()));
        let thread = {
            let (path, one) = (path.to_owned(), one.clone());
            std::thread::Builder::new()
                .name("lb-checkpoint".into())
                .spawn(move || checkpointer(&path, &woken, &one))
                .map_err(|e| tracing::error!("cannot start the checkpointer: {e}"))
                .ok()
        };
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Checkpoints {
            wake: thread.is_some().then_some(wake),
            thread,
            one,
            wal: wal.into(),
            limit,
        }
    }

    /// After each commit of `writer`: wakes the checkpointer, and copies
    /// and truncates the WAL here when it outgrew its limit (or when there
    /// is no checkpointer thread).
    pub(super) fn committed(&self, writer: &Connection) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
        if std::fs::metadata(&self.wal).is_ok_and(|m| m.len() <= self.limit) {
            return;
        }
        let _one = self.one.lock().unwrap_or_else(|p| p.into_inner());
        match writer.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
            r.get::<_, i64>(0)
        }) {
            Ok(0) => {}
            Ok(_) => tracing::debug!("WAL checkpoint left frames behind (a reader is on them)"),
            Err(e) => tracing::warn!("WAL checkpoint failed: {e}"),
        }
    }
}

impl Drop for Checkpoints {
    fn drop(&mut self) {
        // Its sender gone, it ends after the pass it may be in.
        self.wake = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the checkpointer thread panicked");
            }
        }
    }
}

fn checkpointer(path: &Path, woken: &Receiver<()>, one: &Mutex<()>) {
    let conn = match Connection::open(path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("the checkpointer cannot open {}: {e}", path.display());
            return;
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    while woken.recv().is_ok() {
        {
            let _one = one.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!("WAL checkpoint failed: {e}");
            }
        }
        std::thread::sleep(PASS_EVERY);
    }
}
