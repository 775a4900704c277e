//! Artifact sync: a watcher that finds complete files in session artifact
//! directories (inotify through `notify`, backed by a periodic rescan) and
//! an uploader that sends them to the hub over tus, smallest first, after
//! the logs. Upload state lives in `agent.db` ([`crate::agent::store::artifacts`]).
//!
//! Invariant: the watcher only reports file versions (size, mtime) and
//! refusals; the uploader only uploads rows it reads back from the store;
//! both change state solely through writer messages, and the acknowledged
//! offset is committed after every chunk.

pub mod scan;
mod upload;
mod watch;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::SyncError;
use crate::agent::config::AgentConfig;
use crate::agent::store::artifacts::ArtifactCmd;
use crate::agent::store::read::{Reader, ViewCtx};
use crate::agent::store::writer::Msg;
use crate::agent::store::{rfc3339, Stats};
use crate::agent::sync::status::Remote;
use crate::agent::sync::throttle::Throttle;
use crate::agent::types::ArtifactStatus;

/// What the artifact tasks need from the configuration.
#[derive(Debug, Clone)]
pub struct ArtifactsConfig {
    /// The hub URL and device token, replaced on SIGHUP (see
    /// `SyncShared::set_remote`).
    pub remote: tokio::sync::watch::Receiver<Remote>,
    pub db_path: PathBuf,
    pub view: ViewCtx,
    /// A file unchanged this long is complete (`artifacts.settle_secs`).
    pub settle: Duration,
    /// Full rescan period (`artifacts.rescan_secs`).
    pub rescan: Duration,
    /// Bytes per PATCH (`artifacts.chunk_bytes`).
    pub chunk_bytes: u64,
    /// File events queued for the watcher (`artifacts.event_queue`).
    pub event_queue: usize,
    /// First retry wait's bound (`sync.retry_min`, as for batches).
    pub retry_min: Duration,
    /// Longest retry wait (`artifacts.retry_max_secs`).
    pub retry_max: Duration,
    /// The `sync.max_bytes_per_sec` bucket, shared with the batch uploader.
    pub throttle: Arc<Throttle>,
}

impl ArtifactsConfig {
    /// `None` when no hub is configured: artifacts stay on the robot.
    pub fn from_agent(
        cfg: &AgentConfig,
        view: ViewCtx,
        remote: tokio::sync::watch::Receiver<Remote>,
        throttle: Arc<Throttle>,
    ) -> Option<ArtifactsConfig> {
        let sync = cfg.sync.as_ref()?;
        let a = &cfg.raw.artifacts;
        Some(ArtifactsConfig {
            remote,
            db_path: cfg.db_path(),
            view,
            settle: Duration::from_secs_f64(a.settle_secs),
            rescan: Duration::from_secs_f64(a.rescan_secs),
            chunk_bytes: a.chunk_bytes,
            event_queue: a.event_queue as usize,
            retry_min: sync.retry_min,
            retry_max: Duration::from_secs_f64(a.retry_max_secs),
            throttle,
        })
    }
}

/// Live counters of the artifact tasks, for `/v1/status` and `/metrics`
/// (the per-state counts come from the store).
#[derive(Debug, Default)]
pub struct ArtifactStats {
    pub enabled: AtomicBool,
    pub bytes_sent: AtomicU64,
    pub auth_failed: AtomicBool,
    /// Current retry wait in milliseconds; 0 when not backing off.
    pub backoff_ms: AtomicU64,
    pub last_success_ns: AtomicI64,
    /// Files the watcher refused since start (also counted in the store).
    pub refused_seen: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl ArtifactStats {
    pub fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }

    /// `counts` (from the store) completed with the live fields.
    pub fn report(&self, mut counts: ArtifactStatus) -> ArtifactStatus {
        counts.enabled = self.enabled.load(Ordering::Relaxed);
        counts.bytes_sent = self.bytes_sent.load(Ordering::Relaxed);
        counts.auth_failed = self.auth_failed.load(Ordering::Relaxed);
        let b = self.backoff_ms.load(Ordering::Relaxed);
        counts.backoff_seconds = (b > 0).then(|| b as f64 / 1000.0);
        counts.last_error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let t = self.last_success_ns.load(Ordering::Relaxed);
        counts.last_success = (t > 0).then(|| rfc3339(t));
        counts
    }
}

/// Sends one state change to the writer and waits for its commit.
async fn store(writer: &mpsc::Sender<Msg>, cmd: ArtifactCmd) -> Result<(), SyncError> {
    let (tx, rx) = oneshot::channel();
    let gone = || SyncError::Local("the agent is stopping (writer closed)".into());
    writer
        .send(Msg::Artifact(cmd, tx))
        .await
        .map_err(|_| gone())?;
    rx.await
        .map_err(|_| gone())?
        .map_err(|e| SyncError::Local(format!("storing artifact state: {e}")))
}

/// Starts the watcher and the uploader on `tracker`; both stop when
/// `shutdown` fires.
pub fn spawn(
    cfg: ArtifactsConfig,
    writer: mpsc::Sender<Msg>,
    store_stats: Arc<Stats>,
    stats: Arc<ArtifactStats>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    stats.enabled.store(true, Ordering::Relaxed);
    let cfg = Arc::new(cfg);
    let reader = Arc::new(Reader::new(&cfg.db_path, cfg.view.clone()));
    let wake = Arc::new(Notify::new());
    tracker.spawn(watch::run(
        cfg.clone(),
        reader.clone(),
        writer.clone(),
        store_stats.clone(),
        stats.clone(),
        wake.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(upload::run(
        cfg,
        reader,
        writer,
        store_stats,
        stats,
        wake,
        shutdown,
    ));
}
