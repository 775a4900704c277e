//! The fleet server `logbook-hub`: batch ingest, tus artifact uploads, the
//! Sessions API (seed 000 plus cursors, sorting and filters), live log
//! streams, exports and ZIP downloads, and the operator console at `/`.
//!
//! Invariant: `hub` never imports `agent`; it shares only `wire` and
//! `config` with it. Handlers never run SQL themselves: they `.await`
//! the [`store::Store`] and [`blobs::Blobs`] traits, not knowing which
//! backends serve them.

mod api;
mod auth;
pub mod blobs;
pub mod config;
mod console;
mod error;
mod export;
mod ingest;
mod listen;
mod marks;
mod metrics;
pub mod paths;
pub mod store;
mod stream;
mod timeline;
mod tus;
pub mod zip;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::routing::{any, get, post};
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The fuzz entry points of the request decoders (the `fuzz/` crate's
/// targets `query` and `tus`).
pub use api::fuzz_one as fuzz_query;
pub use config::HubConfig;
use store::{LogRow, PgStore, SqliteStore, Store, StoreError};
pub use store::{Principal, TokenKind};
pub use tus::fuzz_one as fuzz_tus;

/// Name of the file in the data directory that holds the bound address
/// (`127.0.0.1:PORT`) while the hub runs, for scripts and tests using port 0.
pub const ADDR_FILE: &str = "hub.addr";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Blobs(#[from] blobs::S3Error),
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Tls(#[from] listen::TlsError),
    #[error("{0}")]
    Token(String),
}

/// What live streams hear of commits (see `stream`).
#[derive(Debug)]
pub(crate) enum LiveEvent {
    /// One ingest transaction of this process, on a store only it writes:
    /// its records, sent on as they are.
    Stored {
        records: Vec<LogRow>,
        /// Sessions that just left `active` (streams of them end).
        ended: Vec<i64>,
    },
    /// A commit on a shared store, by this replica or another: the streams
    /// it names read the store after the id they covered.
    Changed(store::Changed),
    /// The replicas' feed was (re)established: anything may have been
    /// committed unheard, so every stream reads the store.
    Resync,
}

/// Shared state of a running hub.
pub(crate) struct Hub {
    pub store: Arc<dyn Store>,
    pub config: HubConfig,
    pub blobs: Arc<dyn blobs::Blobs>,
    pub live: broadcast::Sender<Arc<LiveEvent>>,
    /// Whether other replicas write the store too (`Store::shared`): live
    /// streams then read records from the store when woken.
    pub shared: bool,
    pub metrics: metrics::Metrics,
    pub streams: Arc<Semaphore>,
    /// Batches being gunzipped and decoded at once: one per core, so a
    /// thousand devices posting together hold a core's worth of decoded
    /// batches each, not a blocking thread (and up to
    /// `ingest.max_decompressed_bytes`) per request.
    pub decoders: Arc<Semaphore>,
    /// Bytes of batches held by requests at once (`ingest.max_inflight_bytes`):
    /// a body is charged before it is read, then its decoded size until
    /// the answer (`ingest::InFlight`).
    pub inflight: Arc<Semaphore>,
    /// Per-device ingest limits (`[devices]`).
    pub devices: auth::DeviceGate,
    pub shutdown: CancellationToken,
    /// Tasks that outlive a request (the upload sweeper, an upload
    /// finishing after its client went away): [`serve`] waits for them.
    pub tasks: TaskTracker,
}

impl Hub {
    /// The shared state of a hub serving `config` from `store` and `blobs`.
    fn new(config: HubConfig, store: Arc<dyn Store>, blobs: Arc<dyn blobs::Blobs>) -> Arc<Hub> {
        let (live, _) = broadcast::channel(1024);
        Arc::new(Hub {
            shared: store.shared(),
            store,
            streams: Arc::new(Semaphore::new(config.max_streams)),
            decoders: Arc::new(Semaphore::new(
                std::thread::available_parallelism().map_or(2, |n| n.get().max(2)),
            )),
            inflight: Arc::new(Semaphore::new(config.limits.inflight_permits())),
            devices: auth::DeviceGate::new(config.devices.clone()),
            config,
            blobs,
            live,
            metrics: metrics::Metrics::default(),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }
}

fn data_dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::DataDir {
        path: path.to_owned(),
        source,
    }
}

/// Opens (creating) the store of a data directory. Blocking.
pub fn open_store(data_dir: &Path) -> Result<Arc<dyn Store>, HubError> {
    std::fs::create_dir_all(data_dir).map_err(data_dir_err(data_dir))?;
    Ok(Arc::new(SqliteStore::open(&data_dir.join("hub.db"))?))
}

/// Opens (creating or migrating) the store `database` names: SQLite in
/// `data_dir`, or PostgreSQL (waiting for another hub migrating it).
pub async fn open_database(
    database: &config::Database,
    data_dir: &Path,
) -> Result<Arc<dyn Store>, HubError> {
    match database {
        config::Database::SqliteInDataDir => {
            let data_dir = data_dir.to_owned();
            tokio::task::spawn_blocking(move || open_store(&data_dir))
                .await
                .map_err(|e| HubError::Serve(std::io::Error::other(e)))?
        }
        config::Database::Postgres(url) => Ok(Arc::new(PgStore::open(url.secret()).await?)),
    }
}

/// `logbook-hub migrate`: brings the configured database's schema up to
/// this binary's and says which version it is at, and where.
pub async fn migrate(config: &HubConfig) -> Result<String, HubError> {
    match &config.database {
        config::Database::SqliteInDataDir => {
            let path = config.data_dir.join("hub.db");
            open_database(&config.database, &config.data_dir).await?;
            Ok(format!(
                "schema version {} ({})",
                SqliteStore::schema_version(),
                path.display()
            ))
        }
        config::Database::Postgres(url) => {
            let version = PgStore::migrate_url(url.secret()).await?;
            Ok(format!("schema version {version} ({})", url.redacted()))
        }
    }
}

/// `logbook-hub token create`: a new token, stored hashed, returned once.
/// A device token (`device_id`) ingests into `project`; an operator key
/// reads `project` only, or, with `project` `None`, every project of
/// `org`. Blocking (it runs the store on a runtime of its own): call it
/// from `main` or a blocking thread, never from async code.
pub fn create_token(
    data_dir: &Path,
    org: &str,
    project: Option<&str>,
    device_id: Option<&str>,
) -> Result<String, HubError> {
    create_token_in(
        &config::Database::SqliteInDataDir,
        data_dir,
        org,
        project,
        device_id,
    )
}

/// [`create_token`] in the store `database` names (`token create
/// --config`, for a hub on PostgreSQL). Blocking, as [`create_token`].
pub fn create_token_in(
    database: &config::Database,
    data_dir: &Path,
    org: &str,
    project: Option<&str>,
    device_id: Option<&str>,
) -> Result<String, HubError> {
    let (kind, project) = match (device_id, project) {
        (Some(_), Some(p)) => (TokenKind::Device, p),
        (Some(_), None) => {
            return Err(HubError::Token(
                "a device token needs the project it ingests into (--project)".into(),
            ))
        }
        (None, p) => (TokenKind::Operator, p.unwrap_or("")),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HubError::Serve)?;
    let store = rt.block_on(open_database(database, data_dir))?;
    let token = auth::new_token(kind);
    let principal = Principal {
        kind,
        org: org.to_owned(),
        project: project.to_owned(),
        device_id: device_id.map(str::to_owned),
        all_projects: kind == TokenKind::Operator && project.is_empty(),
    };
    rt.block_on(store.create_token(&auth::hash_token(&token), &principal))?;
    Ok(token)
}

/// `logbook-hub token revoke`: deletes `token` from the store `database`
/// names; whom it belonged to, `None` for a token the hub does not know.
/// Blocking, as [`create_token`].
pub fn revoke_token_in(
    database: &config::Database,
    data_dir: &Path,
    token: &str,
) -> Result<Option<Principal>, HubError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(HubError::Serve)?;
    let store = rt.block_on(open_database(database, data_dir))?;
    Ok(rt.block_on(store.revoke_token(&auth::hash_token(token.trim())))?)
}

/// Serves the hub on a bound listener until `shutdown` resolves, then lets
/// in-flight requests finish and ends live streams. [`open`] and
/// [`Opened::serve`] in one step.
pub async fn serve(
    listener: TcpListener,
    config: HubConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    open(config).await?.serve(listener, shutdown).await
}

/// A hub whose TLS files are read and storage opened (and migrated):
/// what is left can only fail at serving. `logbook-hub serve` says it is
/// listening only once it holds one.
pub struct Opened {
    acceptor: listen::Acceptor,
    hub: Arc<Hub>,
}

/// Reads the TLS files, then opens the blobs and the database: each
/// mistake in them is the error at start, before anything is served.
pub async fn open(config: HubConfig) -> Result<Opened, HubError> {
    let acceptor = listen::Acceptor::load(&config)?;
    let data_dir = config.data_dir.clone();
    let blobs: Arc<dyn blobs::Blobs> = match &config.blobs {
        config::BlobStorage::DirInDataDir => {
            Arc::new(blobs::DirBlobs::open(&data_dir).map_err(data_dir_err(&data_dir))?)
        }
        config::BlobStorage::S3(s3) => Arc::new(blobs::S3Blobs::open(s3).await?),
    };
    let store = open_database(&config.database, &data_dir).await?;
    Ok(Opened {
        acceptor,
        hub: Hub::new(config, store, blobs),
    })
}

impl Opened {
    /// `https` or `http`, for messages.
    pub fn scheme(&self) -> &'static str {
        self.acceptor.scheme()
    }

    /// Serves on `listener` until `shutdown` resolves ([`serve`]).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), HubError> {
        let addr = listener.local_addr().map_err(HubError::Serve)?;
        tracing::info!(%addr, scheme = self.acceptor.scheme(), mtls = self.acceptor.mtls, data_dir = %self.hub.config.data_dir.display(), "logbook-hub serving");
        serve_hub(listener, self.acceptor, self.hub, shutdown).await
    }
}

/// Serves `hub` with its upload sweeper until `shutdown` resolves; returns
/// once in-flight requests and every task on `hub.tasks` have ended.
async fn serve_hub(
    listener: TcpListener,
    acceptor: listen::Acceptor,
    hub: Arc<Hub>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    let sweeper = hub.tasks.spawn(tus::expire_periodically(hub.clone()));
    if hub.shared {
        hub.tasks.spawn(follow_replicas(hub.clone()));
    }
    let cancel = hub.shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = shutdown => {
                tracing::info!("shutting down: finishing in-flight requests");
                cancel.cancel();
            }
            // Serving failed: nothing left to stop.
            _ = cancel.cancelled() => {}
        }
    });
    // Connections, TLS and their time bounds: `listen` (README, "Running
    // the hub").
    let served = listen::serve(
        listener,
        acceptor,
        router(hub.clone()),
        hub.shutdown.clone(),
    )
    .await;
    // Also when serving failed: the sweeper and live streams stop.
    hub.shutdown.cancel();
    if let Err(e) = sweeper.await {
        tracing::error!("the upload sweeper failed: {e}");
    }
    hub.tasks.close();
    hub.tasks.wait().await;
    served.map_err(HubError::Serve)?;
    tracing::info!("logbook-hub stopped");
    Ok(())
}

/// The live fan-out across replicas (README "Running the hub for a
/// fleet"): until shutdown, what other replicas commit wakes this
/// process's live streams, through the one broadcast they listen on.
async fn follow_replicas(hub: Arc<Hub>) {
    let live = hub.live.clone();
    let weak = Arc::downgrade(&hub);
    let heard = move |h: store::Heard| {
        let event = match h {
            store::Heard::Changed(c) => LiveEvent::Changed(c),
            store::Heard::Resync => LiveEvent::Resync,
        };
        if let Some(hub) = weak.upgrade() {
            let m = &hub.metrics;
            match event {
                LiveEvent::Resync => metrics::Metrics::add(&m.live_resyncs, 1),
                _ => metrics::Metrics::add(&m.live_heard, 1),
            }
        }
        // Never waits: a stream that falls behind the broadcast reads
        // what it missed from the store. Nobody listening is fine too.
        if live.receiver_count() > 0 {
            let _ = live.send(Arc::new(event));
        }
    };
    hub.store
        .follow_commits(Box::new(heard), hub.shutdown.clone())
        .await;
}

/// Every route of the hub. ARCHITECTURE.md's route table mirrors this.
fn router(hub: Arc<Hub>) -> Router {
    let project = Router::new()
        .route("/sessions", get(api::list_sessions))
        .route(
            "/sessions/{id}",
            get(api::get_session).delete(api::delete_session),
        )
        .route("/sessions/{id}/tags", post(api::add_tag))
        .route(
            "/sessions/{id}/tags/{tag}",
            axum::routing::delete(api::remove_tag),
        )
        .route("/sessions/{id}/logs", get(api::session_logs))
        .route("/sessions/{id}/logs/export", get(export::export_logs))
        .route("/sessions/{id}/marks", get(marks::session_marks))
        .route("/sessions/{id}/marks/export", get(marks::export_marks))
        .route("/marks", get(marks::project_marks))
        .route("/sessions/{id}/timeline", get(timeline::session_timeline))
        .route("/sessions/{id}/files", get(api::list_files))
        .route("/sessions/{id}/files/download", get(export::download_zip))
        .route("/sessions/{id}/files/{*path}", get(api::download_file))
        .route("/devices", get(api::list_devices))
        .route("/devices/{device_id}/logs", get(api::device_logs));
    let ws = "/organizations/{org}/projects/{project}/sessions/{id}/logs";
    let ws_device = "/organizations/{org}/projects/{project}/devices/{device_id}/logs";
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(api::metrics))
        .route(crate::wire::BATCHES_PATH, post(ingest::post_batch))
        .route(crate::wire::UPLOADS_PATH, any(tus::collection))
        .route(
            &format!("{}/{{id}}", crate::wire::UPLOADS_PATH),
            any(tus::resource),
        )
        .route(
            "/api/v1/organizations/{org}/projects",
            get(api::list_projects),
        )
        .nest("/api/v1/organizations/{org}/projects/{project}", project)
        .route(&format!("/ws{ws}"), get(stream::ws_logs))
        .route(&format!("/api/v1/ws{ws}"), get(stream::ws_logs))
        .route(&format!("/ws{ws_device}"), get(stream::ws_device_logs))
        .route(
            &format!("/api/v1/ws{ws_device}"),
            get(stream::ws_device_logs),
        )
        .merge(console::router(hub.clone()))
        .fallback(api::not_found)
        .layer(axum::middleware::from_fn(refuse_nul))
        .with_state(hub)
}

/// No route takes a NUL byte in its path or query: no id, name or filter
/// holds one (PostgreSQL's text cannot), so `%00` is refused here, once,
/// before any route or store reads it.
async fn refuse_nul(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let uri = request.uri();
    if uri.path().contains("%00") || uri.query().is_some_and(|q| q.contains("%00")) {
        return error::ApiError::bad_request("the request's path or query holds a NUL byte (%00)")
            .into_response();
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `serve` returns only after its own tasks ended: nothing it started
    /// still holds the hub (the upload sweeper holds it while it runs).
    #[tokio::test]
    async fn shutdown_waits_for_the_upload_sweeper() {
        let dir = tempfile::tempdir().unwrap();
        let config = HubConfig {
            data_dir: dir.path().to_owned(),
            ..HubConfig::default()
        };
        let hub = Hub::new(
            config,
            open_store(dir.path()).unwrap(),
            Arc::new(blobs::DirBlobs::open(dir.path()).unwrap()),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let acceptor = listen::Acceptor::load(&hub.config).unwrap();
        let serving = tokio::spawn(serve_hub(listener, acceptor, hub.clone(), async move {
            let _ = stopped.await;
        }));
        // The sweeper has started once it holds the hub.
        while Arc::strong_count(&hub) < 3 {
            tokio::task::yield_now().await;
        }
        stop.send(()).unwrap();
        serving.await.unwrap().unwrap();
        assert_eq!(Arc::strong_count(&hub), 1, "a hub task outlived serve");
        assert!(hub.tasks.is_closed() && hub.tasks.is_empty());
    }
}
