//! The SQLite backend of the hub's store ([`SqliteStore`]): one database
//! file in WAL mode, one writer connection behind a mutex and a small pool
//! of readers, and the full-text index in a file of its own with its own
//! writer (`fts`); the numbered migrations (`001_initial.sql`, ...) under
//! `PRAGMA user_version`. The blocking methods of [`Db`] are split by
//! domain: `tokens`, `ingest`, `sessions`, `logs`, `artifacts`, `uploads`;
//! `rows` maps result rows to the domain types. [`SqliteStore`] runs each
//! on the blocking pool behind the [`Store`] trait.
//!
//! Invariant: a database newer than this binary is refused untouched;
//! `MIGRATIONS` only grows at the end; no SQLite call runs on an async
//! thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, Transaction};
use tokio::sync::Semaphore;

use super::{
    ArtifactRow, Deleted, DeviceRow, DeviceScope, FinishedUpload, Histogram, Ingested, LogPage,
    LogQuery, LogRow, LogScope, Principal, SessionPage, SessionQuery, SessionRow, SignInRow, Store,
    StoreError, UploadRow,
};
use crate::wire::{Batch, Level};

mod artifacts;
mod checkpoint;
mod fts;
mod ingest;
mod logs;
mod marks;
mod rows;
mod sessions;
mod tokens;
mod uploads;

/// Numbered migrations; `PRAGMA user_version` is how many have run.
const MIGRATIONS: &[&str] = &[
    include_str!("001_initial.sql"),
    include_str!("002_marks.sql"),
    include_str!("003_signins.sql"),
    include_str!("004_leases.sql"),
    include_str!("005_agent_reports.sql"),
    include_str!("006_first_errors.sql"),
    include_str!("007_fts_automerge.sql"),
    include_str!("008_fts_blocks.sql"),
    include_str!("009_scoped_keys.sql"),
    include_str!("010_finished_uploads.sql"),
    include_str!("011_search_file.sql"),
];

/// Reader connections kept open between requests.
const MAX_IDLE_READERS: usize = 8;

/// Store calls that write, on blocking threads at once: one in the writer,
/// one ready to take it next. The rest wait in [`SqliteStore::writes`],
/// first come first served, as tasks rather than blocked threads (a
/// thousand devices at once would otherwise hold the blocking pool's 512
/// threads, each waiting on the writer's mutex, which hands it over in no
/// order).
const WRITE_THREADS: usize = 2;
/// Store calls that only read, on blocking threads at once.
const READ_THREADS: usize = 16;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Backend(Box::new(e))
    }
}

/// The blocking core: the connections, and (in the domain files) one
/// method per store operation.
pub(super) struct Db {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
    checkpoints: checkpoint::Checkpoints,
    /// The full-text index, its own file and writer (`fts`).
    index: fts::Index,
}

/// How long a statement waits for another connection's lock.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn pragmas(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Switching a fresh file to WAL takes an exclusive lock, and SQLite
    // answers busy at once rather than wait for it (no busy handler): a
    // second process opening the file at that instant retries, for as
    // long as the busy timeout.
    let since = std::time::Instant::now();
    loop {
        match conn.pragma_update(None, "journal_mode", "WAL") {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && since.elapsed() < BUSY_TIMEOUT =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => break r?,
        }
    }
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.set_prepared_statement_cache_capacity(64);
    fts::register(conn)?;
    Ok(())
}

/// Runs the migrations `user_version` has not seen, in one transaction;
/// refuses a database newer than this binary. The transaction takes the
/// write lock before it reads the version, so two processes migrating one
/// file at once (`migrate` beside `serve`) run each migration once: the
/// second waits (busy timeout), then finds nothing left to do.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let found: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::NewerSchema {
            what: path.display().to_string(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(());
    }
    for sql in &MIGRATIONS[found as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

pub(super) fn now_ns() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

pub(super) fn level_of(code: i64) -> Level {
    Level::from_code(code.clamp(0, 5) as u8).unwrap_or(Level::Info)
}

impl Db {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Db, StoreError> {
        Db::open_with(path, checkpoint::WAL_LIMIT)
    }

    /// [`Db::open`], the writer checkpointing itself past `wal_limit`
    /// bytes of WAL.
    fn open_with(path: &Path, wal_limit: u64) -> Result<Db, StoreError> {
        let open_err = |source: rusqlite::Error| StoreError::Open {
            what: path.display().to_string(),
            reason: Box::new(source),
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        pragmas(&conn).map_err(open_err)?;
        // The writer keeps the hot index pages of every device and session
        // in memory (64 MiB). It does not checkpoint in its commits: the
        // checkpointer thread does (`checkpoint`).
        conn.pragma_update(None, "cache_size", -65536)
            .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", 0))
            .and_then(|()| {
                conn.pragma_update(
                    None,
                    "journal_size_limit",
                    wal_limit.min(i64::MAX as u64) as i64,
                )
            })
            .and_then(|()| conn.pragma_update(None, "temp_store", "MEMORY"))
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        let index = fts::Index::open(path, &conn)?;
        Ok(Db {
            path: path.to_owned(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
            checkpoints: checkpoint::Checkpoints::start(path, wal_limit),
            index,
        })
    }

    pub(super) fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        self.checkpoints.committed(&conn);
        self.index.committed();
        Ok(out)
    }

    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.path)?;
                pragmas(&c)?;
                self.index.attach(&c)?;
                c
            }
        };
        let out = f(&conn);
        let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        out
    }
}

/// The SQLite [`Store`]: every call runs on the blocking pool, at most
/// [`WRITE_THREADS`] writing and [`READ_THREADS`] reading at once.
pub struct SqliteStore {
    db: Arc<Db>,
    writes: Arc<Semaphore>,
    reads: Arc<Semaphore>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    /// Blocking.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        Ok(SqliteStore {
            db: Arc::new(Db::open(path)?),
            writes: Arc::new(Semaphore::new(WRITE_THREADS)),
            reads: Arc::new(Semaphore::new(READ_THREADS)),
        })
    }

    /// Indexes every stored record now (tests: the indexer's work, done
    /// here rather than waited for).
    #[cfg(test)]
    fn catch_up(&self) {
        self.db.index.catch_up(&self.db.path);
    }

    /// The schema version (`user_version`) this binary migrates to.
    pub fn schema_version() -> i64 {
        MIGRATIONS.len() as i64
    }

    /// Runs `f`, which only reads, on the blocking pool.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on_thread(&self.reads, f).await
    }

    /// Runs `f`, which writes, on the blocking pool.
    async fn run_write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.on_thread(&self.writes, f).await
    }

    /// Runs `f` on a blocking thread once `threads` has a permit for it;
    /// the thread holds the permit until `f` returns, even if the caller
    /// has gone.
    async fn on_thread<T: Send + 'static>(
        &self,
        threads: &Arc<Semaphore>,
        f: impl FnOnce(&Db) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let permit = threads
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f(&db)
        })
        .await
        .map_err(|e| StoreError::Backend(Box::new(e)))?
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create_token(&self, hash: &str, principal: &Principal) -> Result<(), StoreError> {
        let (hash, principal) = (hash.to_owned(), principal.clone());
        self.run_write(move |db| db.create_token(&hash, &principal))
            .await
    }

    async fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        let hash = hash.to_owned();
        self.run(move |db| db.find_token(&hash)).await
    }

    async fn revoke_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        let hash = hash.to_owned();
        self.run_write(move |db| db.revoke_token(&hash)).await
    }

    async fn create_signin(&self, signin: &SignInRow, max: u32) -> Result<(), StoreError> {
        let signin = signin.clone();
        self.run_write(move |db| db.create_signin(&signin, max))
            .await
    }

    async fn find_signin(
        &self,
        hash: &str,
        now_ns: i64,
    ) -> Result<Option<(Principal, String)>, StoreError> {
        let hash = hash.to_owned();
        self.run(move |db| db.find_signin(&hash, now_ns)).await
    }

    async fn delete_signin(&self, hash: &str) -> Result<(), StoreError> {
        let hash = hash.to_owned();
        self.run_write(move |db| db.delete_signin(&hash)).await
    }

    async fn ingest(
        &self,
        scope: &DeviceScope,
        batch: Arc<Batch>,
        want_live: bool,
    ) -> Result<Ingested, StoreError> {
        let scope = scope.clone();
        self.run_write(move |db| db.ingest(&scope, &batch, want_live))
            .await
    }

    async fn session_for_device(
        &self,
        scope: &DeviceScope,
        id: uuid::Uuid,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let scope = scope.clone();
        self.run_write(move |db| db.session_for_device(&scope, id))
            .await
    }

    async fn find_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<i64>, StoreError> {
        let (o, p, i) = (org.to_owned(), project.to_owned(), id.to_owned());
        self.run(move |db| db.find_session(&o, &p, &i)).await
    }

    async fn get_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<SessionRow>, StoreError> {
        let (o, p, i) = (org.to_owned(), project.to_owned(), id.to_owned());
        self.run(move |db| db.get_session(&o, &p, &i)).await
    }

    async fn list_sessions(
        &self,
        org: &str,
        project: &str,
        q: &SessionQuery,
    ) -> Result<SessionPage, StoreError> {
        let (o, p, q) = (org.to_owned(), project.to_owned(), q.clone());
        self.run(move |db| db.list_sessions(&o, &p, &q)).await
    }

    async fn delete_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<Deleted>, StoreError> {
        let (o, p, i) = (org.to_owned(), project.to_owned(), id.to_owned());
        self.run_write(move |db| db.delete_session(&o, &p, &i))
            .await
    }

    async fn add_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<bool, StoreError> {
        let (o, p, i, t) = (
            org.to_owned(),
            project.to_owned(),
            id.to_owned(),
            tag.to_owned(),
        );
        self.run_write(move |db| db.add_tag(&o, &p, &i, &t)).await
    }

    async fn remove_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<Option<bool>, StoreError> {
        let (o, p, i, t) = (
            org.to_owned(),
            project.to_owned(),
            id.to_owned(),
            tag.to_owned(),
        );
        self.run_write(move |db| db.remove_tag(&o, &p, &i, &t))
            .await
    }

    async fn session_status(&self, pk: i64) -> Result<Option<String>, StoreError> {
        self.run(move |db| db.session_status(pk)).await
    }

    async fn list_devices(&self, org: &str, project: &str) -> Result<Vec<DeviceRow>, StoreError> {
        let (o, p) = (org.to_owned(), project.to_owned());
        self.run(move |db| db.list_devices(&o, &p)).await
    }

    async fn list_projects(&self, org: &str) -> Result<Vec<String>, StoreError> {
        let org = org.to_owned();
        self.run(move |db| db.list_projects(&org)).await
    }

    async fn find_device(
        &self,
        org: &str,
        project: &str,
        device_id: &str,
    ) -> Result<Option<DeviceRow>, StoreError> {
        let (o, p, d) = (org.to_owned(), project.to_owned(), device_id.to_owned());
        self.run(move |db| db.find_device(&o, &p, &d)).await
    }

    async fn logs(&self, scope: LogScope, q: &LogQuery) -> Result<LogPage, StoreError> {
        let q = q.clone();
        self.run(move |db| db.logs(scope, &q)).await
    }

    async fn logs_tail(
        &self,
        scope: LogScope,
        q: &LogQuery,
    ) -> Result<(LogPage, Option<i64>), StoreError> {
        let q = q.clone();
        self.run(move |db| db.logs_tail(scope, &q)).await
    }

    async fn logs_after(
        &self,
        scope: LogScope,
        after: i64,
        q: &LogQuery,
        limit: u64,
    ) -> Result<(Vec<LogRow>, i64), StoreError> {
        let q = q.clone();
        self.run(move |db| db.logs_after(scope, after, &q, limit))
            .await
    }

    async fn level_histogram(
        &self,
        session_pk: i64,
        slices: Histogram,
    ) -> Result<Vec<[u64; 6]>, StoreError> {
        self.run(move |db| db.level_histogram(session_pk, slices))
            .await
    }

    async fn first_errors(&self, session_pk: i64, limit: u64) -> Result<Vec<LogRow>, StoreError> {
        self.run(move |db| db.first_errors(session_pk, limit)).await
    }

    async fn list_artifacts(&self, session_pk: i64) -> Result<Vec<ArtifactRow>, StoreError> {
        self.run(move |db| db.list_artifacts(session_pk)).await
    }

    async fn get_artifact(
        &self,
        session_pk: i64,
        path: &str,
    ) -> Result<Option<ArtifactRow>, StoreError> {
        let path = path.to_owned();
        self.run(move |db| db.get_artifact(session_pk, &path)).await
    }

    async fn complete_upload(
        &self,
        upload: &UploadRow,
        blob: &str,
    ) -> Result<Option<String>, StoreError> {
        let (upload, blob) = (upload.clone(), blob.to_owned());
        self.run_write(move |db| db.complete_upload(&upload, &blob))
            .await
    }

    async fn create_upload(&self, upload: &UploadRow) -> Result<(), StoreError> {
        let upload = upload.clone();
        self.run_write(move |db| db.create_upload(&upload)).await
    }

    async fn get_upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        let id = id.to_owned();
        self.run(move |db| db.get_upload(&id)).await
    }

    async fn finished_upload(&self, id: &str) -> Result<Option<FinishedUpload>, StoreError> {
        let id = id.to_owned();
        self.run(move |db| db.finished_upload(&id)).await
    }

    async fn find_unfinished_upload(
        &self,
        device_pk: i64,
        session_pk: i64,
        path: &str,
        sha256: &str,
        length: u64,
    ) -> Result<Option<UploadRow>, StoreError> {
        let (path, sha256) = (path.to_owned(), sha256.to_owned());
        self.run(move |db| db.find_unfinished_upload(device_pk, session_pk, &path, &sha256, length))
            .await
    }

    async fn unfinished_uploads(&self, device_pk: i64) -> Result<u64, StoreError> {
        self.run(move |db| db.unfinished_uploads(device_pk)).await
    }

    async fn session_uploads(
        &self,
        session_pk: i64,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError> {
        self.run(move |db| db.session_uploads(session_pk, limit))
            .await
    }

    async fn uploads_created_before(
        &self,
        before_ns: i64,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError> {
        let after = after.map(|(at, id)| (at, id.to_owned()));
        self.run(move |db| {
            let after = after.as_ref().map(|(at, id)| (*at, id.as_str()));
            db.uploads_created_before(before_ns, after, limit)
        })
        .await
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run_write(move |db| db.delete_upload(&id)).await
    }

    async fn list_marks(
        &self,
        org: &str,
        project: &str,
        q: &super::MarkQuery,
    ) -> Result<Vec<super::MarkRow>, StoreError> {
        let (org, project, q) = (org.to_owned(), project.to_owned(), q.clone());
        self.run(move |db| db.list_marks(&org, &project, &q)).await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ns: i64,
        until_ns: i64,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.run_write(move |db| db.take_lease(&name, &holder, now_ns, until_ns))
            .await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        self.run_write(move |db| db.release_lease(&name, &holder))
            .await
    }
}

#[cfg(test)]
mod tests;
