//! The PostgreSQL backend of the hub's store ([`PgStore`]), for a fleet: a
//! deadpool of tokio-postgres connections, its own numbered migrations
//! (`001_initial.sql`, ...) applied under an advisory lock and recorded in
//! `logbook_schema`, logs partitioned by month of record time. The
//! [`Store`] methods are split by domain as SQLite's are: `tokens`,
//! `ingest`, `sessions`, `logs`, `artifacts` (and uploads); `rows` maps
//! result rows to the domain types, `partitions` makes log partitions.
//!
//! Invariant: a schema newer than this binary is refused untouched;
//! `MIGRATIONS` only grows at the end; every write that creates sessions
//! or log rows holds `INGEST_LOCK` until it commits, so hub row ids are
//! committed in order on every replica.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::{
    ArtifactRow, Deleted, DeviceRow, DeviceScope, FinishedUpload, Histogram, Ingested, LogPage,
    LogQuery, LogRow, LogScope, Principal, SessionPage, SessionQuery, SessionRow, SignInRow, Store,
    StoreError, UploadRow,
};
use crate::wire::Batch;

mod artifacts;
mod ingest;
mod logs;
mod marks;
mod notify;
mod partitions;
mod rows;
mod sessions;
mod tokens;

#[cfg(test)]
pub(crate) mod testdb;
#[cfg(test)]
mod tests;

/// Numbered migrations; `logbook_schema` holds one row per migration run.
const MIGRATIONS: &[&str] = &[
    include_str!("001_initial.sql"),
    include_str!("002_marks.sql"),
    include_str!("003_signins.sql"),
    include_str!("004_leases.sql"),
    include_str!("005_agent_reports.sql"),
    include_str!("006_first_errors.sql"),
    include_str!("007_scoped_keys.sql"),
    include_str!("008_finished_uploads.sql"),
    include_str!("009_search_by_session.sql"),
];

/// Advisory lock keys (`pg_advisory_xact_lock`), arbitrary but fixed: every
/// replica must use the same ones.
const MIGRATE_LOCK: i64 = 0x6c6f_6762_6f6f_6b01;
pub(super) const INGEST_LOCK: i64 = 0x6c6f_6762_6f6f_6b02;
pub(super) const PARTITION_LOCK: i64 = 0x6c6f_6762_6f6f_6b03;

/// Connections a hub keeps to the database at most.
const POOL_SIZE: usize = 16;
/// Of those, how many may be in transactions that take `INGEST_LOCK` at
/// once: one holding it, one waiting to take it next. The rest wait in
/// [`PgStore::lock_takers`] as tasks, first come first served, so a
/// thousand devices posting at once leave the pool's other connections to
/// operators' queries and token lookups instead of holding all of them
/// while they wait on the lock.
const LOCK_TAKERS: usize = 2;

impl From<tokio_postgres::Error> for StoreError {
    /// The server's own words on one line: a `tokio_postgres::Error` says
    /// only "db error", and the message, detail and hint it wraps span
    /// lines.
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Backend(cause(&e).replace('\n', "; ").into())
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> StoreError {
        StoreError::Backend(Box::new(e))
    }
}

/// `url` without its password (`user:***@`).
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.split_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url.to_owned(),
    }
}

/// The one-line cause of a failed connection: the server's own message
/// (wrong password, unknown database) or the socket's (refused, timed out).
fn cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = s.source();
    }
    parts.join(": ")
}

/// [`cause`] of a pool's failure to connect, without the pool's own
/// wrapping ("Error occurred while creating a new object").
fn pool_cause(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => cause(e),
        other => cause(other),
    }
}

pub(super) fn now_ns() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

/// The PostgreSQL [`Store`].
pub struct PgStore {
    pool: Pool,
    /// Month partitions of `logs` known to exist (by their first ns).
    partitions: Mutex<HashSet<i64>>,
    /// What the live fan-out's own connection connects with.
    config: tokio_postgres::Config,
    /// The database in messages (no password).
    what: String,
    /// This process among the replicas: its notifications carry it, so it
    /// does not wake its streams twice for its own commits.
    origin: String,
    /// Permits for the transactions that take `INGEST_LOCK` (see
    /// [`LOCK_TAKERS`]).
    lock_takers: Semaphore,
}

impl PgStore {
    /// Connects to the database at `url` and migrates it (waiting for any
    /// other hub migrating it at the same time).
    pub async fn open(url: &str) -> Result<PgStore, StoreError> {
        let store = PgStore::connect(url)?;
        store.migrate(url).await?;
        Ok(store)
    }

    /// A pool for `url`; no connection is made yet.
    fn connect(url: &str) -> Result<PgStore, StoreError> {
        let open_err = |reason: String| StoreError::Open {
            what: redact(url),
            reason: reason.into(),
        };
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| open_err(cause(&e)))?;
        config.connect_timeout(Duration::from_secs(10));
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name("logbook-hub");
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| open_err(e.to_string()))?;
        Ok(PgStore {
            pool,
            partitions: Mutex::new(HashSet::new()),
            config,
            what: redact(url),
            origin: format!("{:016x}", rand::random::<u64>()),
            lock_takers: Semaphore::new(LOCK_TAKERS),
        })
    }

    /// Runs the migrations `logbook_schema` has not seen, in one
    /// transaction under an advisory lock (a second hub starting at the
    /// same time waits, then finds nothing to do); refuses a schema newer
    /// than this binary. Returns the schema version.
    async fn migrate(&self, url: &str) -> Result<i64, StoreError> {
        let mut client = self.pool.get().await.map_err(|e| StoreError::Open {
            what: redact(url),
            reason: pool_cause(&e).into(),
        })?;
        let tx = client.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATE_LOCK])
            .await?;
        tx.batch_execute(
            "CREATE TABLE IF NOT EXISTS logbook_schema (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await?;
        let found: i64 = tx
            .query_one(
                "SELECT COALESCE(max(version), 0)::bigint FROM logbook_schema",
                &[],
            )
            .await?
            .get(0);
        let known = MIGRATIONS.len() as i64;
        if found > known {
            return Err(StoreError::NewerSchema {
                what: redact(url),
                found,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO logbook_schema (version) VALUES ($1)",
                &[&(i as i32 + 1)],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(known)
    }

    /// Connects, migrates, and returns the schema version now in place
    /// (`logbook-hub migrate`).
    pub async fn migrate_url(url: &str) -> Result<i64, StoreError> {
        PgStore::connect(url)?.migrate(url).await
    }

    /// `url` without its password, to name the database in messages.
    pub fn redact(url: &str) -> String {
        redact(url)
    }

    /// The schema version this binary writes.
    pub fn schema_version() -> i64 {
        MIGRATIONS.len() as i64
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        Ok(self.pool.get().await?)
    }

    /// A connection for a transaction that takes `INGEST_LOCK`, once this
    /// process has fewer than [`LOCK_TAKERS`] of them; the permit goes
    /// with the connection.
    async fn lock_taker(
        &self,
    ) -> Result<(SemaphorePermit<'_>, deadpool_postgres::Object), StoreError> {
        let permit = self
            .lock_takers
            .acquire()
            .await
            .expect("the semaphore is never closed");
        Ok((permit, self.client().await?))
    }
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn create_token(&self, hash: &str, principal: &Principal) -> Result<(), StoreError> {
        tokens::create(&self.client().await?, hash, principal).await
    }

    async fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        tokens::find(&self.client().await?, hash).await
    }

    async fn revoke_token(&self, hash: &str) -> Result<Option<Principal>, StoreError> {
        tokens::revoke(&mut self.client().await?, hash).await
    }

    async fn create_signin(&self, signin: &SignInRow, max: u32) -> Result<(), StoreError> {
        tokens::create_signin(&mut self.client().await?, signin, max).await
    }

    async fn find_signin(
        &self,
        hash: &str,
        now_ns: i64,
    ) -> Result<Option<(Principal, String)>, StoreError> {
        tokens::find_signin(&self.client().await?, hash, now_ns).await
    }

    async fn delete_signin(&self, hash: &str) -> Result<(), StoreError> {
        tokens::delete_signin(&self.client().await?, hash).await
    }

    async fn ingest(
        &self,
        scope: &DeviceScope,
        batch: Arc<Batch>,
        want_live: bool,
    ) -> Result<Ingested, StoreError> {
        let (_permit, mut client) = self.lock_taker().await?;
        partitions::ensure(
            &mut client,
            &self.partitions,
            batch.records.iter().map(|r| r.timestamp_ns),
        )
        .await?;
        ingest::ingest(&mut client, scope, &batch, want_live, &self.origin).await
    }

    async fn session_for_device(
        &self,
        scope: &DeviceScope,
        id: uuid::Uuid,
    ) -> Result<Option<(i64, i64)>, StoreError> {
        let (_permit, mut client) = self.lock_taker().await?;
        ingest::session_for_device(&mut client, scope, id).await
    }

    async fn find_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<i64>, StoreError> {
        rows::session_pk(&self.client().await?, org, project, id).await
    }

    async fn get_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<SessionRow>, StoreError> {
        sessions::get(&self.client().await?, org, project, id).await
    }

    async fn list_sessions(
        &self,
        org: &str,
        project: &str,
        q: &SessionQuery,
    ) -> Result<SessionPage, StoreError> {
        sessions::list(&mut self.client().await?, org, project, q).await
    }

    async fn delete_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<Deleted>, StoreError> {
        let (_permit, mut client) = self.lock_taker().await?;
        sessions::delete(&mut client, org, project, id).await
    }

    async fn add_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<bool, StoreError> {
        sessions::add_tag(&self.client().await?, org, project, id, tag).await
    }

    async fn remove_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<Option<bool>, StoreError> {
        sessions::remove_tag(&self.client().await?, org, project, id, tag).await
    }

    async fn session_status(&self, pk: i64) -> Result<Option<String>, StoreError> {
        sessions::status(&self.client().await?, pk).await
    }

    async fn list_devices(&self, org: &str, project: &str) -> Result<Vec<DeviceRow>, StoreError> {
        sessions::list_devices(&self.client().await?, org, project).await
    }

    async fn list_projects(&self, org: &str) -> Result<Vec<String>, StoreError> {
        tokens::list_projects(&self.client().await?, org).await
    }

    async fn find_device(
        &self,
        org: &str,
        project: &str,
        device_id: &str,
    ) -> Result<Option<DeviceRow>, StoreError> {
        sessions::find_device(&self.client().await?, org, project, device_id).await
    }

    async fn logs(&self, scope: LogScope, q: &LogQuery) -> Result<LogPage, StoreError> {
        logs::page(&self.client().await?, scope, q).await
    }

    async fn logs_tail(
        &self,
        scope: LogScope,
        q: &LogQuery,
    ) -> Result<(LogPage, Option<i64>), StoreError> {
        logs::tail(&mut self.client().await?, scope, q).await
    }

    async fn logs_after(
        &self,
        scope: LogScope,
        after: i64,
        q: &LogQuery,
        limit: u64,
    ) -> Result<(Vec<LogRow>, i64), StoreError> {
        logs::after(&mut self.client().await?, scope, after, q, limit).await
    }

    async fn level_histogram(
        &self,
        session_pk: i64,
        slices: Histogram,
    ) -> Result<Vec<[u64; 6]>, StoreError> {
        logs::level_histogram(&self.client().await?, session_pk, slices).await
    }

    async fn first_errors(&self, session_pk: i64, limit: u64) -> Result<Vec<LogRow>, StoreError> {
        logs::first_errors(&self.client().await?, session_pk, limit).await
    }

    async fn list_artifacts(&self, session_pk: i64) -> Result<Vec<ArtifactRow>, StoreError> {
        artifacts::list(&self.client().await?, session_pk).await
    }

    async fn get_artifact(
        &self,
        session_pk: i64,
        path: &str,
    ) -> Result<Option<ArtifactRow>, StoreError> {
        artifacts::get(&self.client().await?, session_pk, path).await
    }

    async fn complete_upload(
        &self,
        upload: &UploadRow,
        blob: &str,
    ) -> Result<Option<String>, StoreError> {
        artifacts::complete_upload(&mut self.client().await?, upload, blob).await
    }

    async fn create_upload(&self, upload: &UploadRow) -> Result<(), StoreError> {
        artifacts::create_upload(&self.client().await?, upload).await
    }

    async fn get_upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        artifacts::get_upload(&self.client().await?, id).await
    }

    async fn finished_upload(&self, id: &str) -> Result<Option<FinishedUpload>, StoreError> {
        artifacts::finished_upload(&self.client().await?, id).await
    }

    async fn find_unfinished_upload(
        &self,
        device_pk: i64,
        session_pk: i64,
        path: &str,
        sha256: &str,
        length: u64,
    ) -> Result<Option<UploadRow>, StoreError> {
        artifacts::find_unfinished_upload(
            &self.client().await?,
            device_pk,
            session_pk,
            path,
            sha256,
            length,
        )
        .await
    }

    async fn unfinished_uploads(&self, device_pk: i64) -> Result<u64, StoreError> {
        artifacts::unfinished_uploads(&self.client().await?, device_pk).await
    }

    async fn session_uploads(
        &self,
        session_pk: i64,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError> {
        artifacts::session_uploads(&self.client().await?, session_pk, limit).await
    }

    async fn uploads_created_before(
        &self,
        before_ns: i64,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError> {
        artifacts::uploads_created_before(&self.client().await?, before_ns, after, limit).await
    }

    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        artifacts::delete_upload(&self.client().await?, id).await
    }

    async fn list_marks(
        &self,
        org: &str,
        project: &str,
        q: &super::MarkQuery,
    ) -> Result<Vec<super::MarkRow>, StoreError> {
        marks::list(&self.client().await?, org, project, q).await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ns: i64,
        until_ns: i64,
    ) -> Result<bool, StoreError> {
        artifacts::take_lease(&self.client().await?, name, holder, now_ns, until_ns).await
    }

    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        artifacts::release_lease(&self.client().await?, name, holder).await
    }

    fn shared(&self) -> bool {
        true
    }

    async fn follow_commits(
        &self,
        heard: Box<dyn Fn(super::Heard) + Send + Sync>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        notify::follow(
            self.config.clone(),
            self.what.clone(),
            self.origin.clone(),
            heard,
            stop,
        )
        .await
    }
}
