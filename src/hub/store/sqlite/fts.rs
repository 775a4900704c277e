//! The full-text index, in a file of its own beside the database
//! (`hub-search.db` beside `hub.db`), written by a thread of its own (the
//! indexer) after ingest commits rather than inside them: a batch is
//! acknowledged without waiting for its words, and the index's writes run
//! on another core than the acknowledging transaction (issue 18).
//!
//! The index holds every record up to its watermark (`state.indexed`, a
//! `logs` id); a search reads the index below it and the records above it
//! one by one (the tail), so a record is found from the moment its batch
//! is acknowledged, the tail being what the indexer has not reached yet
//! (about one batch while ingest runs).
//!
//! Documents: one per block of at most [`BLOCK_RECORDS`] consecutive
//! records of one device and session, under the block's first id;
//! `fts_blocks` holds each block's first and last id and its session. Log messages repeat
//! their words, and FTS5 writes a word once per document, so a block costs
//! about half of what its records cost one by one (BENCHMARKS.md, issue
//! 18). A block matches when its records together hold the words; a
//! search then keeps the records that hold them themselves
//! ([`words_match`], registered as `logbook_words`), so results are the
//! same as with one document per record.
//!
//! Invariants:
//! - the index file is derived data: at open, an index that is not this
//!   database's (its epoch differs: a session was deleted since, or the
//!   database was restored from a backup) or that reaches past the
//!   records is rebuilt from `logs`, never trusted;
//! - a session's delete takes the index's writer before the database's
//!   (the indexer never takes the database's writer), forgets the
//!   session's blocks and lowers the watermark below any id SQLite may
//!   hand out again, so a reused id is never taken for indexed.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::functions::FunctionFlags;
use rusqlite::{params, CachedStatement, Connection, OptionalExtension, Transaction};

use crate::hub::store::StoreError;

/// Records per document at most.
pub(super) const BLOCK_RECORDS: usize = 64;
/// Text per document at most (bytes): past it, a block ends early.
const BLOCK_BYTES: usize = 16 * 1024;
/// Records the indexer reads and indexes in one transaction at most.
const PASS_RECORDS: i64 = 16_384;
/// Catch-ups at least this long are told when they end.
const TELL_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);
/// Least time between two warnings of a failing indexer.
const TELL_EVERY: std::time::Duration = std::time::Duration::from_secs(60);
/// The index file's layout (`user_version`); any other is rebuilt.
const INDEX_VERSION: i64 = 1;

/// Messages only: no copy of the text (contentless; a document is
/// forgotten by its id), no per-row sizes (no ranking), no positions
/// (whole-word AND queries); merges 16 segments at a time.
const INDEX_SCHEMA: &str = "
DROP TABLE IF EXISTS logs_fts;
DROP TABLE IF EXISTS fts_blocks;
DROP TABLE IF EXISTS state;
CREATE VIRTUAL TABLE logs_fts USING fts5 (
    message,
    content = '',
    contentless_delete = 1,
    detail = none
);
INSERT INTO logs_fts (logs_fts, rank) VALUES ('automerge', 16);
CREATE TABLE fts_blocks (
    first INTEGER PRIMARY KEY,
    last INTEGER NOT NULL,
    session INTEGER
);
CREATE TABLE state (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    indexed INTEGER NOT NULL,
    epoch INTEGER NOT NULL
);
";

/// The index file of the database at `db`: `hub-search.db` for `hub.db`.
pub(super) fn index_path(db: &Path) -> PathBuf {
    let mut name = db.file_stem().unwrap_or_default().to_owned();
    name.push("-search.db");
    db.with_file_name(name)
}

/// The index: its writer connection and the indexer thread.
pub(super) struct Index {
    path: PathBuf,
    /// The index's writer, held by each pass of the indexer and by a
    /// session's delete.
    writer: Arc<Mutex<Connection>>,
    /// Wakes the indexer (a wake-up waiting already is enough).
    wake: Option<SyncSender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Index {
    /// Opens the index of the database at `db`, whose writer is `main`
    /// (migrated), rebuilding it when it is not this database's; starts
    /// the indexer, which first catches up with what is stored.
    pub(super) fn open(db: &Path, main: &Connection) -> Result<Index, StoreError> {
        let path = index_path(db);
        let open_err = |source: rusqlite::Error| StoreError::Open {
            what: path.display().to_string(),
            reason: Box::new(source),
        };
        let (epoch, max_id): (i64, i64) = main.query_row(
            "SELECT (SELECT epoch FROM search_epoch), (SELECT coalesce(max(id), 0) FROM logs)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        let conn = match open_index(&path, epoch, max_id) {
            // Derived data: a damaged file is replaced, never a reason to
            // keep the hub from starting.
            Err(e) if damaged(&e) => {
                tracing::warn!(
                    "the full-text index {} is damaged ({e}): rebuilding it from the records",
                    path.display()
                );
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    match std::fs::remove_file(&file) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(StoreError::Open {
                                what: PathBuf::from(file).display().to_string(),
                                reason: format!("cannot remove the damaged index: {e}").into(),
                            });
                        }
                        _ => {}
                    }
                }
                open_index(&path, epoch, max_id)
            }
            r => r,
        }
        .map_err(open_err)?;
        let writer = Arc::new(Mutex::new(conn));
        let (wake, woken) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let (db, writer) = (db.to_owned(), writer.clone());
            std::thread::Builder::new()
                .name("lb-indexer".into())
                .spawn(move || indexer(&db, &writer, &woken))
                .map_err(|e| tracing::error!("cannot start the full-text indexer: {e}"))
                .ok()
        };
        let index = Index {
            path,
            writer,
            wake: thread.is_some().then_some(wake),
            thread,
        };
        index.committed();
        Ok(index)
    }

    /// After each commit of the database: wakes the indexer.
    pub(super) fn committed(&self) {
        if let Some(wake) = &self.wake {
            let _ = wake.try_send(());
        }
    }

    /// Attaches the index to a reader of the database as `search`.
    pub(super) fn attach(&self, reader: &Connection) -> rusqlite::Result<()> {
        reader.execute(
            "ATTACH DATABASE ?1 AS search",
            [self.path.to_string_lossy()],
        )?;
        Ok(())
    }

    /// The index's writer: no pass runs while it is held.
    pub(super) fn lock(&self) -> MutexGuard<'_, Connection> {
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Indexes everything stored in the database at `db` now, here.
    #[cfg(test)]
    pub(super) fn catch_up(&self, db: &Path) {
        let main = Connection::open(db).unwrap();
        while matches!(
            step(&main, &mut self.lock(), &mut None),
            Step::More | Step::Rebuilt
        ) {}
    }
}

impl Drop for Index {
    fn drop(&mut self) {
        // Its sender gone, it ends after the pass it may be in.
        self.wake = None;
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("the full-text indexer panicked");
            }
        }
    }
}

/// Empties the index (of the database of `epoch`), to be built again from
/// the first record.
pub(super) fn rebuild(index: &mut Connection, epoch: i64) -> rusqlite::Result<()> {
    prepare(index, epoch, None)
}

/// Opens the index file at `path` and readies its tables ([`prepare`]).
fn open_index(path: &Path, epoch: i64, max_id: i64) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open(path)?;
    super::pragmas(&conn)?;
    prepare(&mut conn, epoch, Some(max_id))?;
    Ok(conn)
}

/// Whether `e` says the file is not a sound SQLite database.
fn damaged(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
    )
}

/// Creates the index's tables, or recreates them (empty, to be rebuilt
/// from the records) when the file's layout, epoch or watermark does not
/// fit the database of `epoch` whose highest record id is `max_id` (none:
/// recreates them whatever they hold).
fn prepare(conn: &mut Connection, epoch: i64, max_id: Option<i64>) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let state: Option<(i64, i64)> = if version == INDEX_VERSION && max_id.is_some() {
        tx.query_row("SELECT indexed, epoch FROM state", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?
    } else {
        None
    };
    match state {
        Some((indexed, e)) if e == epoch && Some(indexed) <= max_id => return Ok(()),
        Some(_) => tracing::warn!(
            "the full-text index is not this database's (restored from a backup, or a \
             session's delete did not reach it): rebuilding it; searches read the records \
             not indexed yet one by one meanwhile"
        ),
        None if version != 0 && max_id.is_some() => {
            tracing::warn!("the full-text index has another layout: rebuilding it")
        }
        None => {}
    }
    tx.execute_batch(INDEX_SCHEMA)?;
    tx.execute("INSERT INTO state VALUES (1, 0, ?1)", [epoch])?;
    tx.pragma_update(None, "user_version", INDEX_VERSION)?;
    tx.commit()
}

/// The indexer: after each wake-up, passes until it has caught up.
fn indexer(db: &Path, writer: &Mutex<Connection>, woken: &Receiver<()>) {
    let main = match Connection::open(db).and_then(|c| {
        c.busy_timeout(super::BUSY_TIMEOUT)?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("the full-text indexer cannot open {}: {e}", db.display());
            return;
        }
    };
    let mut told = None;
    while woken.recv().is_ok() {
        // One rebuild per wake-up at most: a second would loop.
        let mut rebuilt = false;
        let (since, mut passes) = (std::time::Instant::now(), 1u64);
        loop {
            let mut index = writer.lock().unwrap_or_else(|p| p.into_inner());
            match step(&main, &mut index, &mut told) {
                Step::More => passes += 1,
                Step::Rebuilt if !rebuilt => rebuilt = true,
                Step::Done => {
                    // A long catch-up (a rebuild, an upgrade) is told
                    // when it ends; a drain's passes take moments.
                    if since.elapsed() >= TELL_CATCH_UP {
                        tracing::info!(
                            "the full-text index holds every record again, after {:.0} s \
                             ({passes} passes of up to {PASS_RECORDS} records)",
                            since.elapsed().as_secs_f64()
                        );
                    }
                    break;
                }
                Step::Rebuilt | Step::Failed => break,
            }
            drop(index);
            if let Err(TryRecvError::Disconnected) = woken.try_recv() {
                return;
            }
        }
    }
}

/// What a [`step`] left.
enum Step {
    /// More records wait past the watermark.
    More,
    /// Caught up.
    Done,
    /// Failed; tried again at the next commit.
    Failed,
    /// The index was emptied, to be built again from the first record.
    Rebuilt,
}

/// One pass, and what its failure calls for: searches read the tail
/// meanwhile, so a failure is told (at most every [`TELL_EVERY`], as one
/// repeats at every commit while, say, the disk is full, `told` keeping
/// when it last was) and tried again later. A damaged index, or one that
/// holds a block where the records say there is none (its first id
/// taken), starts again empty.
fn step(main: &Connection, index: &mut Connection, told: &mut Option<std::time::Instant>) -> Step {
    let e = match pass(main, index) {
        Ok(n) if n as i64 == PASS_RECORDS => return Step::More,
        Ok(_) => return Step::Done,
        Err(e) => e,
    };
    let disagrees = e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation);
    if !damaged(&e) && !disagrees {
        if told.is_none_or(|t| t.elapsed() >= TELL_EVERY) {
            tracing::warn!("the full-text indexer failed: {e}");
            *told = Some(std::time::Instant::now());
        }
        return Step::Failed;
    }
    tracing::error!("the full-text index is damaged ({e}): rebuilding it");
    match main
        .query_row("SELECT epoch FROM search_epoch", [], |r| r.get(0))
        .and_then(|epoch| rebuild(index, epoch))
    {
        Ok(()) => Step::Rebuilt,
        Err(e) => {
            tracing::error!("the full-text index cannot be rebuilt: {e}");
            Step::Failed
        }
    }
}

/// Indexes up to [`PASS_RECORDS`] records past the watermark in one
/// transaction of the index; how many it read.
fn pass(main: &Connection, index: &mut Connection) -> rusqlite::Result<usize> {
    let tx = index.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let from: i64 = tx.query_row("SELECT indexed FROM state", [], |r| r.get(0))?;
    let mut read = main.prepare_cached(
        "SELECT id, device_pk, session_pk, message FROM logs WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut rows = read.query(params![from, PASS_RECORDS])?;
    let mut blocks = Blocks::new(&tx)?;
    let (mut n, mut last) = (0, from);
    while let Some(r) = rows.next()? {
        let id: i64 = r.get(0)?;
        let message = r.get_ref(3)?.as_str().unwrap_or("");
        blocks.add((r.get(1)?, r.get(2)?), id, message)?;
        (n, last) = (n + 1, id);
    }
    drop(rows);
    blocks.flush()?;
    drop(blocks);
    if n > 0 {
        tx.execute("UPDATE state SET indexed = ?1", [last])?;
        tx.commit()?;
    }
    Ok(n)
}

/// After a session's delete committed in the database (`index` held since
/// before it began): forgets the blocks of `session`, whose records had
/// the ids `ids` (none: it had none), takes the database's new `epoch`,
/// and lowers the watermark to `max_left`, the highest record id left, so
/// the ids SQLite hands out again above it are read as the tail until
/// indexed.
pub(super) fn forget(
    index: &mut Connection,
    session: i64,
    ids: Option<(i64, i64)>,
    epoch: i64,
    max_left: i64,
) -> rusqlite::Result<()> {
    let tx = index.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if let Some((lo, hi)) = ids {
        let firsts: Vec<i64> = tx
            .prepare(
                "DELETE FROM fts_blocks WHERE first BETWEEN ?1 AND ?2 AND session = ?3
                 RETURNING first",
            )?
            .query_map(params![lo, hi, session], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut doc = tx.prepare("DELETE FROM logs_fts WHERE rowid = ?1")?;
        for first in firsts {
            doc.execute([first])?;
        }
    }
    tx.execute(
        "UPDATE state SET epoch = ?1, indexed = min(indexed, ?2)",
        params![epoch, max_left],
    )?;
    tx.commit()
}

/// The words of a text: the query's (`super::logs::fts_query`) and the
/// per-record check's ([`words_match`]), which must agree.
pub(super) fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
}

/// Does `message` hold every word of `search` as a whole word (case
/// folded)? What one document per record answered.
pub(super) fn words_match(message: &str, search: &str) -> bool {
    let message = message.to_lowercase();
    let have: Vec<&str> = words(&message).collect();
    words(search).all(|w| {
        let w = w.to_lowercase();
        have.iter().any(|h| *h == w)
    })
}

/// Registers `logbook_words(message, search)` on a connection.
pub(super) fn register(conn: &Connection) -> rusqlite::Result<()> {
    conn.create_scalar_function(
        "logbook_words",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let message = ctx.get_raw(0).as_str().unwrap_or("");
            let search = ctx.get_raw(1).as_str().unwrap_or("");
            Ok(words_match(message, search))
        },
    )
}

/// A block's owner: device, and session (none: the device's own records).
type Owner = (i64, Option<i64>);

/// Builds the blocks of a pass as its records are read.
struct Blocks<'t> {
    doc: CachedStatement<'t>,
    block: CachedStatement<'t>,
    /// The open block: owner, first id, last id, text.
    open: Option<(Owner, i64, i64, String)>,
    records: usize,
}

impl<'t> Blocks<'t> {
    fn new(tx: &'t Transaction<'_>) -> rusqlite::Result<Blocks<'t>> {
        Ok(Blocks {
            doc: tx.prepare_cached("INSERT INTO logs_fts (rowid, message) VALUES (?1, ?2)")?,
            block: tx.prepare_cached(
                "INSERT INTO fts_blocks (first, last, session) VALUES (?1, ?2, ?3)",
            )?,
            open: None,
            records: 0,
        })
    }

    /// The record `id` of `owner` holds `message`.
    fn add(&mut self, owner: Owner, id: i64, message: &str) -> rusqlite::Result<()> {
        if let Some((o, _, last, text)) = &mut self.open {
            if *o == owner
                && id == *last + 1
                && self.records < BLOCK_RECORDS
                && text.len() < BLOCK_BYTES
            {
                text.push('\n');
                text.push_str(message);
                *last = id;
                self.records += 1;
                return Ok(());
            }
        }
        self.flush()?;
        self.open = Some((owner, id, id, message.to_owned()));
        self.records = 1;
        Ok(())
    }

    /// Indexes the open block, if any.
    fn flush(&mut self) -> rusqlite::Result<()> {
        if let Some(((_, session), first, last, text)) = self.open.take() {
            self.doc.execute(params![first, text])?;
            self.block.execute(params![first, last, session])?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_words_case_folded() {
        assert!(words_match("Obstacle too close", "obstacle"));
        assert!(words_match("Detected 5 obstacles", "DETECTED 5"));
        assert!(!words_match("Detected 5 obstacles", "obstacle"));
        assert!(words_match("disk: full (sda)", "full sda"));
        assert!(!words_match("disk: fullness", "full"));
        assert!(words_match("Ärger über Öl", "öl ärger"));
        assert!(words_match("anything", ";;"), "no words: nothing to hold");
    }

    #[test]
    fn the_index_sits_beside_the_database() {
        assert_eq!(
            index_path(Path::new("/var/lib/logbook-hub/hub.db")),
            Path::new("/var/lib/logbook-hub/hub-search.db")
        );
        assert_eq!(index_path(Path::new("hub")), Path::new("hub-search.db"));
    }
}
