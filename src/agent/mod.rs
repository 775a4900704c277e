//! The on-robot daemon `logbookd`: ingest, ring buffer, sessions, local API.
//!
//! [`run`] wires the parts together, each started by its own function: the
//! writer thread ([`store::writer`]), the batch uploader ([`sync`]), the
//! ingest listeners ([`ingest`]), the artifact tasks, the SIGHUP reload
//! task, the local API ([`api`]) and the systemd heartbeat ([`systemd`]).
//! On shutdown `Running::stop` joins them in order, so it returns with
//! every received record committed and no task left running. On SIGHUP it
//! re-reads the configuration through the caller's [`Reloader`] and hands
//! a new `sync.hub` and `sync.token` to both uploaders; other changed keys
//! are logged as needing a restart.

pub mod api;
pub mod config;
pub mod console;
pub mod crash;
pub mod formats;
pub mod ingest;
pub mod marks;
pub mod memory;
pub mod record;
pub mod store;
pub mod sync;
pub mod systemd;
pub mod types;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::config::AgentConfig;
use self::ingest::Pipeline;
use self::store::read::{Reader, ViewCtx};
use self::store::writer::{Writer, WriterConfig};
use self::store::{Stats, StoreError};
use self::systemd::Notifier;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("api.socket_group: no group {0:?} in /etc/group")]
    NoGroup(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> AgentError {
    let what = what.into();
    move |source| AgentError::Io { what, source }
}

/// The kernel's boot id (or the test's stand-in).
pub fn boot_id(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| {
            tracing::warn!("cannot read boot id from {}: {e}", path.display());
            String::from("unknown")
        })
}

/// Loads the configuration again the way it was loaded at start (file,
/// flags, environment), for SIGHUP.
pub type Reloader =
    Arc<dyn Fn() -> Result<AgentConfig, crate::config::ConfigError> + Send + Sync + 'static>;

/// Runs the agent until `shutdown` fires. `passed` are listening sockets
/// from systemd socket activation, by name (`ingest`, `api`, `syslog`,
/// `forward`). SIGHUP is left alone (see [`run_with_reload`]).
pub async fn run(
    cfg: AgentConfig,
    passed: HashMap<String, std::os::unix::net::UnixListener>,
    shutdown: CancellationToken,
    notifier: Notifier,
) -> Result<(), AgentError> {
    run_with_reload(cfg, passed, shutdown, notifier, None).await
}

/// [`run`], and with a `reload` function, SIGHUP re-reads the
/// configuration: a new `sync.hub` or `sync.token` is used by the next
/// request of both uploaders (a link stopped as auth-failed resumes at
/// once); a bad
/// configuration is logged on one line and the running one stays.
///
/// Everything that can fail (the database, the SIGHUP handler, the
/// sockets, the writer thread) happens before any task starts, so an error
/// leaves nothing running. Each part is started by its own function; on
/// shutdown [`Running::stop`] joins them in the order ARCHITECTURE.md's
/// "Shutdown order" gives.
pub async fn run_with_reload(
    cfg: AgentConfig,
    mut passed: HashMap<String, std::os::unix::net::UnixListener>,
    shutdown: CancellationToken,
    notifier: Notifier,
    reload: Option<Reloader>,
) -> Result<(), AgentError> {
    let started = Instant::now();
    let view = prepare(&cfg)?;
    let stats = Arc::new(Stats::default());
    let writer = open_writer(&cfg, &view, &stats).await?;
    let hup = reload.map(install_sighup).transpose()?;
    let sockets = Sockets::bind(&cfg, &mut passed)?;
    let (writer, pipeline) = start_writer(writer, &stats)?;

    let sync = SyncParts::new(&cfg);
    let uploader = start_uploader(&cfg, &view, &pipeline, &sync, &shutdown);
    let tasks = TaskTracker::new();
    let crashes = start_crashes(&cfg, &view, &pipeline, &shutdown, &tasks);
    start_listeners(
        &cfg,
        sockets.listeners,
        &pipeline,
        &crashes,
        &shutdown,
        &tasks,
    );
    let artifacts = start_artifacts(&cfg, &view, &pipeline, &sync, &shutdown, &tasks);
    let reloader = hup.map(|hup| start_reload(hup, &cfg, &sync, &shutdown));
    let state = api_state(&cfg, view, &pipeline, &sync, artifacts, started, &shutdown);
    let console = sockets
        .console
        .map(|l| start_console(state.clone(), l, &shutdown));
    let api = start_api(state, sockets.api, &shutdown);
    let notifier = announce_ready(&cfg, notifier, &stats);
    let heartbeat = tokio::spawn(heartbeat(notifier.clone(), stats, shutdown.clone()));
    // Ends by itself (once done, or at shutdown): nothing to join.
    tokio::spawn(memory::release_after_start(shutdown.clone()));

    shutdown.cancelled().await;
    Running {
        notifier,
        tasks,
        api,
        console,
        reloader,
        heartbeat,
        uploader,
        pipeline,
        writer,
        created: sockets.created,
    }
    .stop()
    .await;
    Ok(())
}

/// Every running part of the agent, in the order [`Running::stop`] joins
/// them.
struct Running {
    notifier: Arc<Notifier>,
    /// The listeners, their connections and the artifact tasks.
    tasks: TaskTracker,
    api: JoinHandle<std::io::Result<()>>,
    console: Option<JoinHandle<std::io::Result<()>>>,
    reloader: Option<JoinHandle<()>>,
    heartbeat: JoinHandle<()>,
    /// The uploader may wait on a writer reply: it stops before the writer.
    uploader: Option<JoinHandle<()>>,
    pipeline: Pipeline,
    writer: std::thread::JoinHandle<()>,
    /// Socket files this process created, removed last.
    created: Vec<PathBuf>,
}

impl Running {
    /// Called once the shutdown token fired: every part has been told.
    async fn stop(self) {
        self.notifier.stopping();
        tracing::info!("stopping: committing everything received");
        self.tasks.close();
        if tokio::time::timeout(STOP_WITHIN, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("some ingest connections did not stop in time");
        }
        if let Some(Err(e)) = join("local API", self.api).await {
            tracing::warn!("local API stopped with an error: {e}");
        }
        if let Some(task) = self.console {
            if let Some(Err(e)) = join("the console", task).await {
                tracing::warn!("the console stopped with an error: {e}");
            }
        }
        if let Some(task) = self.reloader {
            join("the reload task", task).await;
        }
        join("the systemd heartbeat", self.heartbeat).await;
        if let Some(task) = self.uploader {
            join("the uploader", task).await;
        }
        stop_writer(self.pipeline, self.writer).await;
        for path in self.created {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("stopped");
    }
}

/// How long shutdown waits for each part that is not the writer.
const STOP_WITHIN: Duration = Duration::from_secs(5);

/// Waits up to [`STOP_WITHIN`] for a task that was told to stop; a task
/// that panicked or does not stop is logged, and `None`.
async fn join<T>(what: &str, task: JoinHandle<T>) -> Option<T> {
    match tokio::time::timeout(STOP_WITHIN, task).await {
        Ok(Ok(out)) => Some(out),
        Ok(Err(e)) => {
            tracing::error!("{what} failed: {e}");
            None
        }
        Err(_) => {
            tracing::warn!("{what} did not stop in time");
            None
        }
    }
}

/// Asks the writer to commit everything queued and stop, and waits for
/// its thread (up to 10 s).
async fn stop_writer(pipeline: Pipeline, writer: std::thread::JoinHandle<()>) {
    // Everything the connections handed over is queued ahead of this.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        pipeline.writer().send(store::writer::Msg::Stop),
    )
    .await;
    drop(pipeline);
    let joined = tokio::task::spawn_blocking(move || writer.join());
    match tokio::time::timeout(Duration::from_secs(10), joined).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(_))) => tracing::error!("the writer thread panicked"),
        Ok(Err(e)) => tracing::error!("waiting for the writer failed: {e}"),
        Err(_) => tracing::error!("the writer did not finish in time"),
    }
}

/// Creates the state, runtime and sessions directories; the view every
/// session is shown with.
fn prepare(cfg: &AgentConfig) -> Result<ViewCtx, AgentError> {
    for dir in [&cfg.state_dir, &cfg.runtime_dir, &cfg.sessions_dir()] {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    Ok(ViewCtx {
        device_id: cfg.device_id.clone(),
        device_name: cfg.device_name.clone(),
        sessions_dir: cfg.sessions_dir(),
        boot_id: boot_id(&cfg.boot_id_file),
    })
}

/// Opens the database on the blocking pool (applying the boot-id rule and
/// the size bound); the writer does not run yet.
async fn open_writer(
    cfg: &AgentConfig,
    view: &ViewCtx,
    stats: &Arc<Stats>,
) -> Result<Writer, AgentError> {
    let wcfg = WriterConfig {
        db_path: cfg.db_path(),
        state_dir: cfg.state_dir.clone(),
        synchronous_full: cfg.synchronous_full,
        max_bytes: cfg.max_bytes,
        min_free_bytes: cfg.min_free_bytes,
        pinned_max: cfg.pinned_max,
        commit_interval: cfg.commit_interval,
        commit_records: cfg.commit_records,
        idle_turn: idle_turn(systemd::watchdog_interval()),
        view: view.clone(),
    };
    let stats = stats.clone();
    Ok(
        tokio::task::spawn_blocking(move || Writer::open(wcfg, stats))
            .await
            .expect("opening the database panicked")?,
    )
}

/// Starts the writer thread, and the pipeline every listener submits to.
fn start_writer(
    writer: Writer,
    stats: &Arc<Stats>,
) -> Result<(std::thread::JoinHandle<()>, Pipeline), AgentError> {
    let (tx, rx) = tokio::sync::mpsc::channel(ingest::PIPELINE_CAPACITY);
    let thread = writer
        .spawn(rx, tokio::runtime::Handle::current())
        .map_err(io("starting the writer thread"))?;
    Ok((thread, Pipeline::new(tx, stats.clone())))
}

/// A SIGHUP handler and what to do on it.
type Hup = (Reloader, tokio::signal::unix::Signal);

/// Installed before READY=1: SIGHUP's default action ends the process.
fn install_sighup(reload: Reloader) -> Result<Hup, AgentError> {
    let signal = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(io("installing the SIGHUP handler"))?;
    Ok((reload, signal))
}

/// Spawns [`reload_on_hup`].
fn start_reload(
    (reload, signal): Hup,
    cfg: &AgentConfig,
    sync: &SyncParts,
    shutdown: &CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(reload_on_hup(
        reload,
        signal,
        cfg.clone(),
        sync.shared.clone(),
        shutdown.clone(),
    ))
}

/// What the batch and artifact uploaders share.
struct SyncParts {
    /// Link state, counters and the device token.
    shared: Arc<sync::status::SyncShared>,
    /// One bandwidth cap for logs and artifacts together.
    throttle: Arc<sync::throttle::Throttle>,
}

impl SyncParts {
    fn new(cfg: &AgentConfig) -> SyncParts {
        let shared = Arc::new(sync::status::SyncShared::new(cfg.sync.is_some()));
        if let Some(sc) = &cfg.sync {
            shared.set_tls(&sc.tls);
            shared.set_remote(&sc.hub, &sc.token);
        }
        SyncParts {
            shared,
            throttle: Arc::new(sync::throttle::Throttle::new(
                cfg.sync.as_ref().and_then(|s| s.max_bytes_per_sec),
            )),
        }
    }
}

/// Spawns the batch uploader under its supervisor when a hub is configured.
fn start_uploader(
    cfg: &AgentConfig,
    view: &ViewCtx,
    pipeline: &Pipeline,
    sync: &SyncParts,
    shutdown: &CancellationToken,
) -> Option<JoinHandle<()>> {
    let sync_cfg = cfg.sync.clone()?;
    tracing::info!("syncing to {}", sync_cfg.hub);
    let ctx = Arc::new(sync::uploader::UploaderCtx {
        cfg: sync_cfg,
        device: crate::wire::Device {
            id: cfg.device_id.clone(),
            name: cfg.device_name.clone(),
        },
        db_path: cfg.db_path(),
        boot_id: view.boot_id.clone(),
        writer: pipeline.writer().clone(),
        stats: pipeline.stats.clone(),
        shared: sync.shared.clone(),
        throttle: sync.throttle.clone(),
        buffer_max_bytes: cfg.max_bytes,
        commit_interval: cfg.commit_interval,
    });
    Some(tokio::spawn(sync::uploader::run(ctx, shutdown.clone())))
}

/// Spawns the JSON-lines listener and, when enabled, the syslog and
/// Forward listeners on `tasks` (which their connections join).
fn start_listeners(
    cfg: &AgentConfig,
    listeners: Listeners,
    pipeline: &Pipeline,
    crashes: &crash::Reporter,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) {
    tasks.spawn(ingest::serve_json(
        listeners.ingest,
        pipeline.clone(),
        cfg.max_record_bytes,
        cfg.max_connections,
        shutdown.clone(),
        tasks.clone(),
    ));
    if let Some(socket) = listeners.syslog {
        tasks.spawn(ingest::syslog::serve(
            socket,
            pipeline.clone(),
            cfg.max_record_bytes,
            shutdown.clone(),
        ));
    }
    if let Some(jcfg) = ingest::journal::JournalConfig::from_agent(cfg) {
        tasks.spawn(ingest::journal::serve(
            jcfg,
            pipeline.clone(),
            Some(crashes.clone()),
            shutdown.clone(),
        ));
    }
    if let Some(listener) = listeners.forward {
        tasks.spawn(ingest::forward::serve(
            listener,
            pipeline.clone(),
            cfg.max_record_bytes,
            cfg.max_connections,
            shutdown.clone(),
            tasks.clone(),
        ));
    }
}

/// Starts crash capture (README "Crashes"): the `artifacts.core_dir`
/// watcher, and the reports of the crashes the journal reader hands over
/// (on `tasks`, so shutdown waits for it before stopping the writer).
fn start_crashes(
    cfg: &AgentConfig,
    view: &ViewCtx,
    pipeline: &Pipeline,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> crash::Reporter {
    let ccfg = crash::CrashConfig::from_agent(cfg, view.clone());
    crash::spawn(ccfg, pipeline.clone(), shutdown.clone(), tasks)
}

/// Starts the artifact watcher and uploader when a hub is configured (on
/// `tasks`, so shutdown waits for them before stopping the writer).
fn start_artifacts(
    cfg: &AgentConfig,
    view: &ViewCtx,
    pipeline: &Pipeline,
    sync: &SyncParts,
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> Arc<sync::artifacts::ArtifactStats> {
    let stats = Arc::new(sync::artifacts::ArtifactStats::default());
    let remote = sync.shared.remote_updates();
    match sync::artifacts::ArtifactsConfig::from_agent(
        cfg,
        view.clone(),
        remote,
        sync.throttle.clone(),
    ) {
        Some(acfg) => {
            tracing::info!("artifacts of sessions go to {}", sync.shared.hub());
            sync::artifacts::spawn(
                acfg,
                pipeline.writer().clone(),
                pipeline.stats.clone(),
                stats.clone(),
                shutdown.clone(),
                tasks,
            );
        }
        None => tracing::info!("sync.hub is not set: artifacts stay on this device"),
    }
    stats
}

/// What the local API's handlers share.
fn api_state(
    cfg: &AgentConfig,
    view: ViewCtx,
    pipeline: &Pipeline,
    sync: &SyncParts,
    artifacts: Arc<sync::artifacts::ArtifactStats>,
    started: Instant,
    shutdown: &CancellationToken,
) -> Arc<api::ApiState> {
    Arc::new(api::ApiState {
        reader: Reader::new(&cfg.db_path(), view),
        pipeline: pipeline.clone(),
        started,
        max_bytes: cfg.max_bytes,
        device_id: cfg.device_id.clone(),
        device_name: cfg.device_name.clone(),
        sync: sync.shared.clone(),
        artifacts,
        shutdown: shutdown.clone(),
    })
}

/// Serves the local API on `api.sock` until shutdown, letting requests in
/// flight finish.
fn start_api(
    state: Arc<api::ApiState>,
    listener: UnixListener,
    shutdown: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    serve(Served::Unix(listener), api::router(state), shutdown)
}

/// Serves the read-only console (`api.console`) until shutdown.
fn start_console(
    state: Arc<api::ApiState>,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    serve(Served::Tcp(listener), console::router(state), shutdown)
}

fn serve(
    listener: Served,
    router: axum::Router,
    shutdown: &CancellationToken,
) -> JoinHandle<std::io::Result<()>> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    })
}

/// The local API's and the console's listeners as one type, so the HTTP
/// server is compiled once for both (a second `axum::serve` of its own
/// listener type would add its whole connection stack to the binary).
enum Served {
    Unix(UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl axum::serve::Listener for Served {
    type Io = tokio_util::either::Either<tokio::net::UnixStream, tokio::net::TcpStream>;
    type Addr = ();

    async fn accept(&mut self) -> (Self::Io, ()) {
        use tokio_util::either::Either;
        // axum's own accept loops: a failed accept is logged and retried.
        match self {
            Served::Unix(l) => (Either::Left(axum::serve::Listener::accept(l).await.0), ()),
            Served::Tcp(l) => (Either::Right(axum::serve::Listener::accept(l).await.0), ()),
        }
    }

    fn local_addr(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Tells systemd (READY=1) and the log that the agent is ready.
fn announce_ready(cfg: &AgentConfig, notifier: Notifier, stats: &Stats) -> Arc<Notifier> {
    notifier.ready(&format!(
        "accepting logs on {}; {} records buffered",
        cfg.ingest_socket().display(),
        stats.records_stored.load(Ordering::Relaxed)
    ));
    tracing::info!(
        "logbookd {} ready: ingest {}, syslog {}, forward {}, api {}, database {}",
        env!("CARGO_PKG_VERSION"),
        cfg.ingest_socket().display(),
        listening(cfg.syslog, &cfg.syslog_socket()),
        listening(cfg.forward, &cfg.forward_socket()),
        cfg.api_socket().display(),
        cfg.db_path().display()
    );
    Arc::new(notifier)
}

/// On each SIGHUP: load the configuration again, apply a new `sync.hub` and
/// `sync.token` (together, so neither uploader sends one hub the other's
/// token), and name every other changed key as needing a restart (names
/// only: values may be secrets). A configuration that does not load
/// changes nothing.
async fn reload_on_hup(
    reload: Reloader,
    mut signal: tokio::signal::unix::Signal,
    running: AgentConfig,
    shared: Arc<sync::status::SyncShared>,
    shutdown: CancellationToken,
) {
    let mut running = running;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            got = signal.recv() => if got.is_none() { return },
        }
        let r = reload.clone();
        let new = match tokio::task::spawn_blocking(move || r()).await {
            Ok(Ok(new)) => new,
            Ok(Err(e)) => {
                tracing::error!("reload refused, the running configuration stays: {e}");
                continue;
            }
            Err(e) => {
                tracing::error!("reload failed, the running configuration stays: {e}");
                continue;
            }
        };
        let mut restart = changed_keys(&running.raw, &new.raw);
        // The link reads these per request (README, "Reloading").
        restart.retain(|k| {
            ![
                "sync.token",
                "sync.hub",
                "sync.ca_file",
                "sync.client_cert",
                "sync.client_key",
            ]
            .contains(&k.as_str())
        });
        match (&running.sync, &new.sync) {
            (Some(_), Some(sc)) => {
                if let Err(e) = reqwest::Url::parse(&sc.hub) {
                    tracing::error!(
                        "reload refused, the running configuration stays: sync.hub: {e}"
                    );
                    continue;
                }
                // TLS first: a new hub or token is tried with the files
                // that go with it.
                if shared.set_tls(&sc.tls) {
                    tracing::info!(
                        "reloaded: the uploaders use the new sync TLS files from now on"
                    );
                }
                running.raw.sync.ca_file = new.raw.sync.ca_file.clone();
                running.raw.sync.client_cert = new.raw.sync.client_cert.clone();
                running.raw.sync.client_key = new.raw.sync.client_key.clone();
                let changed = shared.set_remote(&sc.hub, &sc.token);
                if changed.hub {
                    // Uploads begun at the old hub start over at this one.
                    tracing::info!("reloaded: the uploaders send to {} from now on", sc.hub);
                    running.raw.sync.hub = new.raw.sync.hub.clone();
                }
                if changed.token {
                    tracing::info!("reloaded: the uploaders use the new sync.token from now on");
                    running.raw.sync.token = new.raw.sync.token.clone();
                }
            }
            (None, Some(_)) | (Some(_), None) => {
                // Turning sync on or off rebuilds the uploaders: a restart.
                if !restart.iter().any(|k| k == "sync.hub") {
                    restart.push("sync.hub".into());
                }
            }
            (None, None) => {}
        }
        if restart.is_empty() {
            tracing::info!("reloaded: nothing else changed");
        } else {
            tracing::warn!(
                "reloaded: {} changed and needs a restart of logbookd to apply",
                restart.join(", ")
            );
        }
    }
}

/// Dotted names (`sync.hub`) of the keys whose values differ.
fn changed_keys(a: &config::RawConfig, b: &config::RawConfig) -> Vec<String> {
    let (Ok(serde_json::Value::Object(a)), Ok(serde_json::Value::Object(b))) =
        (serde_json::to_value(a), serde_json::to_value(b))
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (section, av) in &a {
        let empty = serde_json::Map::new();
        let am = av.as_object().unwrap_or(&empty);
        let bm = b.get(section).and_then(|v| v.as_object()).unwrap_or(&empty);
        for (key, v) in am {
            if bm.get(key) != Some(v) {
                out.push(format!("{section}.{key}"));
            }
        }
    }
    out
}

/// The watchdog period (`WatchdogSec`; 20 s without one). `half` is
/// [`systemd::watchdog_interval`].
fn watchdog_period(half: Option<Duration>) -> Duration {
    half.map_or(Duration::from_secs(20), |half| half * 2)
}

/// How long the writer may show no progress before [`heartbeat`] calls it
/// stuck: the watchdog period, at least 3 s.
fn stall_period(half: Option<Duration>) -> Duration {
    watchdog_period(half).max(Duration::from_secs(3))
}

/// How often the idle writer turns: often enough that [`heartbeat`] sees
/// progress at every one of its ticks (a quarter of the stall period),
/// between 1 and 5 s, so an idle agent wakes as little as its watchdog
/// allows (BENCHMARKS.md, "Idle").
fn idle_turn(half: Option<Duration>) -> Duration {
    (stall_period(half) / 4).clamp(Duration::from_secs(1), Duration::from_secs(5))
}

/// Sends WATCHDOG=1 while the writer proves progress (its loop turns at
/// least every [`idle_turn`] even when idle), and a STATUS= line now and
/// then. A writer stuck for a whole watchdog period gets no more pings, so
/// systemd restarts the agent.
async fn heartbeat(notifier: Arc<Notifier>, stats: Arc<Stats>, shutdown: CancellationToken) {
    let half = systemd::watchdog_interval();
    let period = watchdog_period(half);
    let stall = stall_period(half);
    let mut tick = tokio::time::interval((period / 2).min(Duration::from_secs(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_beat = stats.writer_heartbeat.load(Ordering::Relaxed);
    let mut last_change = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let beat = stats.writer_heartbeat.load(Ordering::Relaxed);
        if beat != last_beat {
            last_beat = beat;
            last_change = Instant::now();
        }
        let stuck = last_change.elapsed();
        if stuck < stall {
            notifier.watchdog();
        } else {
            tracing::error!(
                "the writer made no progress for {:.0?}; withholding the watchdog ping",
                stuck
            );
        }
        notifier.status(&format!(
            "{} records buffered, {} committed since start, {} bytes on disk",
            stats.records_stored.load(Ordering::Relaxed),
            Stats::get(&stats.committed),
            Stats::get(&stats.disk_bytes)
        ));
    }
}

/// The ingest listeners.
struct Listeners {
    ingest: UnixListener,
    syslog: Option<tokio::net::UnixDatagram>,
    forward: Option<UnixListener>,
}

/// Every socket the agent serves, bound (or adopted from systemd) before
/// any part starts.
struct Sockets {
    listeners: Listeners,
    api: UnixListener,
    /// The read-only console's, when `api.console` is set.
    console: Option<tokio::net::TcpListener>,
    /// Socket files this process created, removed at shutdown.
    created: Vec<PathBuf>,
}

impl Sockets {
    fn bind(
        cfg: &AgentConfig,
        passed: &mut HashMap<String, std::os::unix::net::UnixListener>,
    ) -> Result<Sockets, AgentError> {
        let gid = match &cfg.socket_group {
            Some(g) => Some(group_id(g)?),
            None => None,
        };
        let mut created = Vec::new();
        let ingest = listener(passed, "ingest", &cfg.ingest_socket(), gid, &mut created)?;
        let api = listener(passed, "api", &cfg.api_socket(), gid, &mut created)?;
        // A disabled listener's socket is not created, and one left by an
        // earlier run is removed, so senders fail at once instead of filling a
        // socket nobody reads.
        let syslog = if cfg.syslog {
            Some(datagram(passed, &cfg.syslog_socket(), gid, &mut created)?)
        } else {
            disabled(passed, "syslog", &cfg.syslog_socket())?;
            None
        };
        let forward = if cfg.forward {
            Some(listener(
                passed,
                "forward",
                &cfg.forward_socket(),
                gid,
                &mut created,
            )?)
        } else {
            disabled(passed, "forward", &cfg.forward_socket())?;
            None
        };
        Ok(Sockets {
            listeners: Listeners {
                ingest,
                syslog,
                forward,
            },
            api,
            console: cfg.console.and_then(console_listener),
            created,
        })
    }
}

/// The console's TCP listener on its loopback address, or `None` (logged)
/// when it cannot be bound: the console is for triage, and a port taken
/// by something else must not stop the agent from taking logs.
fn console_listener(addr: std::net::SocketAddr) -> Option<tokio::net::TcpListener> {
    let bound = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .and_then(tokio::net::TcpListener::from_std);
    match bound {
        Ok(l) => {
            if let Ok(at) = l.local_addr() {
                tracing::info!("read-only console on http://{at}/");
            }
            Some(l)
        }
        Err(e) => {
            tracing::error!(
                "the read-only console (api.console) cannot listen on {addr}: {e}; \
                 running without it"
            );
            None
        }
    }
}

/// The socket systemd passed under `name`, or a fresh one bound at `path`
/// (a stale file from an earlier run is replaced) with mode 0660.
fn listener(
    passed: &mut HashMap<String, std::os::unix::net::UnixListener>,
    name: &str,
    path: &Path,
    gid: Option<u32>,
    created: &mut Vec<PathBuf>,
) -> Result<UnixListener, AgentError> {
    if let Some(l) = passed.remove(name) {
        tracing::info!("using the {name} socket passed by systemd");
        return UnixListener::from_std(l).map_err(io(format!("adopting the {name} socket")));
    }
    remove_stale(path)?;
    let l = UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    created.push(path.to_owned());
    secure(path, gid)?;
    Ok(l)
}

/// The syslog datagram socket: passed by systemd as `syslog`, or bound
/// fresh at `path` like [`listener`] does.
fn datagram(
    passed: &mut HashMap<String, std::os::unix::net::UnixListener>,
    path: &Path,
    gid: Option<u32>,
    created: &mut Vec<PathBuf>,
) -> Result<tokio::net::UnixDatagram, AgentError> {
    let adopt = io("adopting the syslog socket");
    if let Some(l) = passed.remove("syslog") {
        tracing::info!("using the syslog socket passed by systemd");
        let fd = std::os::fd::OwnedFd::from(l);
        let d = ingest::syslog::datagram_from_passed(fd).ok_or_else(|| {
            adopt(std::io::Error::other(
                "it is not a datagram socket (use ListenDatagram=)",
            ))
        })?;
        d.set_nonblocking(true)
            .map_err(io("adopting the syslog socket"))?;
        return tokio::net::UnixDatagram::from_std(d).map_err(io("adopting the syslog socket"));
    }
    remove_stale(path)?;
    let d =
        tokio::net::UnixDatagram::bind(path).map_err(io(format!("binding {}", path.display())))?;
    created.push(path.to_owned());
    secure(path, gid)?;
    Ok(d)
}

/// A listener switched off in the config (`ingest.syslog = false`, …): a
/// socket systemd passed for it is closed, a file left by an earlier run
/// removed.
fn disabled(
    passed: &mut HashMap<String, std::os::unix::net::UnixListener>,
    name: &str,
    path: &Path,
) -> Result<(), AgentError> {
    if passed.remove(name).is_some() {
        tracing::warn!("ingest.{name} is false: closing the {name} socket systemd passed");
    }
    remove_stale(path)?;
    tracing::info!(
        "ingest.{name} is false: not listening on {}",
        path.display()
    );
    Ok(())
}

/// A socket path for the ready line, or `off`.
fn listening(on: bool, path: &Path) -> String {
    if on {
        path.display().to_string()
    } else {
        "off".into()
    }
}

/// A socket file left by an earlier run is replaced.
fn remove_stale(path: &Path) -> Result<(), AgentError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing stale socket {}", path.display()))(e)),
    }
}

/// Mode 0660, and the socket group when one is configured.
fn secure(path: &Path, gid: Option<u32>) -> Result<(), AgentError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io(format!("setting the mode of {}", path.display())))?;
    if let Some(gid) = gid {
        rustix::fs::chown(path, None, Some(rustix::fs::Gid::from_raw(gid)))
            .map_err(|e| io(format!("giving {} to group {gid}", path.display()))(e.into()))?;
    }
    Ok(())
}

/// A group name (or number) to its gid, from `/etc/group`.
fn group_id(group: &str) -> Result<u32, AgentError> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    let text = std::fs::read_to_string("/etc/group").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| AgentError::NoGroup(group.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::config::RawConfig;
    use super::*;

    /// The idle writer turns often enough that the heartbeat sees progress
    /// at each of its ticks (half the watchdog period, at most 10 s) and
    /// never calls an idle writer stuck, whatever `WatchdogSec` is; and
    /// no more than once a second.
    #[test]
    fn the_idle_writer_turns_within_every_heartbeat_tick() {
        let s = Duration::from_secs;
        for half in [
            None,
            Some(Duration::from_millis(500)),
            Some(s(1)),
            Some(s(2)),
            Some(s(15)),
            Some(s(300)),
        ] {
            let turn = idle_turn(half);
            let tick = (watchdog_period(half) / 2).min(s(10));
            assert!(turn >= s(1), "{half:?}: {turn:?}");
            assert!(turn <= s(5), "{half:?}: {turn:?}");
            // A tick that just missed a turn still sees the next one
            // before the stall period runs out.
            assert!(
                turn + tick < stall_period(half),
                "{half:?}: {turn:?} + {tick:?}"
            );
        }
        assert_eq!(idle_turn(None), s(5));
        assert_eq!(idle_turn(Some(s(2))), s(1));
    }

    /// A reload in progress when shutdown comes is waited for: the reload
    /// task is joined, not left running after `run` returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_joins_a_reload_in_progress() {
        use std::sync::atomic::AtomicBool;
        use std::sync::Mutex;

        let dir = tempfile::tempdir().unwrap();
        let (file, boot) = (dir.path().join("agent.toml"), dir.path().join("boot_id"));
        std::fs::write(&file, "[device]\nid = \"robot-1\"\n").unwrap();
        std::fs::write(&boot, "boot-1\n").unwrap();
        let overrides = config::Overrides {
            state_dir: Some(dir.path().join("state")),
            runtime_dir: Some(dir.path().join("run")),
        };
        let env = [(
            "LOGBOOK_BOOT_ID_FILE".to_owned(),
            boot.display().to_string(),
        )];
        let load = move || config::load(Some(&file), &overrides, env.clone());
        let cfg = load().unwrap();
        let api_socket = cfg.api_socket();

        let (entered_tx, entered) = std::sync::mpsc::channel();
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let finished = Arc::new(AtomicBool::new(false));
        let done = finished.clone();
        let reload: Reloader = Arc::new(move || {
            let _ = entered_tx.send(());
            let _ = released.lock().unwrap().recv();
            done.store(true, Ordering::SeqCst);
            load()
        });
        let shutdown = CancellationToken::new();
        let agent = tokio::spawn(run_with_reload(
            cfg,
            HashMap::new(),
            shutdown.clone(),
            Notifier::new(None),
            Some(reload),
        ));
        // The SIGHUP handler is installed before the sockets are bound.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !api_socket.exists() {
            assert!(Instant::now() < deadline, "the agent did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::HUP)
            .unwrap();
        tokio::task::spawn_blocking(move || entered.recv_timeout(Duration::from_secs(20)))
            .await
            .unwrap()
            .expect("SIGHUP did not start a reload");
        shutdown.cancel();
        // Let the rest of shutdown run ahead before the reload may finish.
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let _ = release.send(());
        });
        tokio::time::timeout(Duration::from_secs(30), agent)
            .await
            .expect("the agent did not stop")
            .unwrap()
            .unwrap();
        assert!(
            finished.load(Ordering::SeqCst),
            "run returned while a reload was still running"
        );
    }

    #[test]
    fn changed_keys_are_named() {
        let check = |change: fn(&mut RawConfig), want: &[&str]| {
            let a = RawConfig::default();
            let mut b = a.clone();
            change(&mut b);
            assert_eq!(changed_keys(&a, &b), want);
        };
        check(|_| {}, &[]);
        check(|c| c.sync.token = "new".into(), &["sync.token"]);
        check(
            |c| {
                c.sync.hub = "http://h".into();
                c.buffer.max_bytes += 1;
            },
            &["buffer.max_bytes", "sync.hub"],
        );
    }
}
