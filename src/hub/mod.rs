//! The fleet server `logbook-hub`: batch ingest, tus artifact uploads, the
//! Sessions API (seed 000 plus cursors, sorting and filters), live log
//! streams, exports and ZIP downloads, and the operator console at `/`.
//!
//! Invariant: `hub` never imports `agent`; it shares only `wire` and
//! `config` with it. Handlers never run SQL themselves: they call
//! [`store::Store`] on the blocking pool.

mod api;
mod auth;
pub mod blobs;
pub mod config;
mod console;
mod error;
mod export;
mod ingest;
mod metrics;
pub mod paths;
pub mod store;
mod stream;
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

pub use config::HubConfig;
use store::{LogRow, Principal, Store, StoreError, TokenKind};

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
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// What one ingest transaction made visible, for live streams.
#[derive(Debug)]
pub(crate) struct LiveEvent {
    pub records: Vec<LogRow>,
    /// Sessions that just left `active` (streams of them end).
    pub ended: Vec<i64>,
}

/// Shared state of a running hub.
pub(crate) struct Hub {
    pub store: Arc<Store>,
    pub config: HubConfig,
    pub blobs: blobs::Blobs,
    pub live: broadcast::Sender<Arc<LiveEvent>>,
    pub metrics: metrics::Metrics,
    pub streams: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    /// Upload ids with a PATCH in progress (one writer per upload).
    pub busy_uploads: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Hub {
    /// The shared state of a hub serving `config` from `store` and `blobs`.
    fn new(config: HubConfig, store: Store, blobs: blobs::Blobs) -> Arc<Hub> {
        let (live, _) = broadcast::channel(1024);
        Arc::new(Hub {
            store: Arc::new(store),
            streams: Arc::new(Semaphore::new(config.max_streams)),
            config,
            blobs,
            live,
            metrics: metrics::Metrics::default(),
            shutdown: CancellationToken::new(),
            busy_uploads: Default::default(),
        })
    }

    /// Runs a store call on the blocking pool.
    pub async fn db<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, error::ApiError> {
        let store = self.store.clone();
        Ok(tokio::task::spawn_blocking(move || f(&store)).await??)
    }
}

fn data_dir_err(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::DataDir {
        path: path.to_owned(),
        source,
    }
}

/// Opens (creating) the store of a data directory.
pub fn open_store(data_dir: &Path) -> Result<Store, HubError> {
    std::fs::create_dir_all(data_dir).map_err(data_dir_err(data_dir))?;
    Ok(Store::open(&data_dir.join("hub.db"))?)
}

/// `logbook-hub token create`: a new token, stored hashed, returned once.
pub fn create_token(
    data_dir: &Path,
    org: &str,
    project: &str,
    device_id: Option<&str>,
) -> Result<String, HubError> {
    let store = open_store(data_dir)?;
    let kind = if device_id.is_some() {
        TokenKind::Device
    } else {
        TokenKind::Operator
    };
    let token = auth::new_token(kind);
    store.create_token(
        &auth::hash_token(&token),
        &Principal {
            kind,
            org: org.to_owned(),
            project: project.to_owned(),
            device_id: device_id.map(str::to_owned),
        },
    )?;
    Ok(token)
}

/// Serves the hub on a bound listener until `shutdown` resolves, then lets
/// in-flight requests finish and ends live streams.
pub async fn serve(
    listener: TcpListener,
    config: HubConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HubError> {
    let data_dir = config.data_dir.clone();
    let blobs = blobs::Blobs::open(&data_dir).map_err(data_dir_err(&data_dir))?;
    let store = {
        let data_dir = data_dir.clone();
        tokio::task::spawn_blocking(move || open_store(&data_dir))
            .await
            .map_err(|e| HubError::Serve(std::io::Error::other(e)))??
    };
    let hub = Hub::new(config, store, blobs);
    let cancel = hub.shutdown.clone();
    let addr = listener.local_addr().map_err(HubError::Serve)?;
    tokio::spawn(tus::expire_periodically(hub.clone()));
    tracing::info!(%addr, data_dir = %data_dir.display(), "logbook-hub serving");
    axum::serve(listener, router(hub))
        .with_graceful_shutdown(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            cancel.cancel();
        })
        .await
        .map_err(HubError::Serve)?;
    tracing::info!("logbook-hub stopped");
    Ok(())
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
        .with_state(hub)
}
