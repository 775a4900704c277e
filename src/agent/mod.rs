//! The on-robot daemon `logbookd`: ingest, ring buffer, sessions, local API.
//!
//! [`run`] wires the parts together: the writer thread ([`store::writer`]),
//! the ingest listeners ([`ingest`]), the local API ([`api`]) and systemd
//! notifications ([`systemd`]); it returns after a clean shutdown with every
//! received record committed. On SIGHUP it re-reads the configuration
//! through the caller's [`Reloader`] and hands a new `sync.token` to both
//! uploaders; other changed keys are logged as needing a restart.

pub mod api;
pub mod config;
pub mod formats;
pub mod ingest;
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
/// configuration: a new `sync.token` is used by the next request of both
/// uploaders (a link stopped as auth-failed resumes at once); a bad
/// configuration is logged on one line and the running one stays.
pub async fn run_with_reload(
    cfg: AgentConfig,
    mut passed: HashMap<String, std::os::unix::net::UnixListener>,
    shutdown: CancellationToken,
    notifier: Notifier,
    reload: Option<Reloader>,
) -> Result<(), AgentError> {
    let started = Instant::now();
    for dir in [&cfg.state_dir, &cfg.runtime_dir, &cfg.sessions_dir()] {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    }
    let boot_id = boot_id(&cfg.boot_id_file);
    let view = ViewCtx {
        device_id: cfg.device_id.clone(),
        device_name: cfg.device_name.clone(),
        sessions_dir: cfg.sessions_dir(),
        boot_id,
    };
    let wcfg = WriterConfig {
        db_path: cfg.db_path(),
        state_dir: cfg.state_dir.clone(),
        synchronous_full: cfg.synchronous_full,
        max_bytes: cfg.max_bytes,
        min_free_bytes: cfg.min_free_bytes,
        commit_interval: cfg.commit_interval,
        commit_records: cfg.commit_records,
        view: view.clone(),
    };
    let stats = Arc::new(Stats::default());
    let stats2 = stats.clone();
    let writer = tokio::task::spawn_blocking(move || Writer::open(wcfg, stats2))
        .await
        .expect("opening the database panicked")?;
    let (tx, rx) = tokio::sync::mpsc::channel(ingest::PIPELINE_CAPACITY);
    let writer_thread = writer
        .spawn(rx, tokio::runtime::Handle::current())
        .map_err(io("starting the writer thread"))?;
    let pipeline = Pipeline::new(tx, stats.clone());

    // Sync to the hub (issue 4): the batch uploader under its supervisor.
    let sync_shared = Arc::new(sync::status::SyncShared::new(cfg.sync.is_some()));
    if let Some(sc) = &cfg.sync {
        sync_shared.set_token(&sc.token);
    }
    // Installed before READY=1: SIGHUP's default action ends the process.
    let hup = match reload {
        Some(r) => Some((
            r,
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                .map_err(io("installing the SIGHUP handler"))?,
        )),
        None => None,
    };
    // One bandwidth cap for logs and artifacts together.
    let throttle = Arc::new(sync::throttle::Throttle::new(
        cfg.sync.as_ref().and_then(|s| s.max_bytes_per_sec),
    ));
    let sync_task = start_uploader(
        &cfg,
        &view,
        pipeline.writer().clone(),
        stats.clone(),
        sync_shared.clone(),
        throttle.clone(),
        shutdown.clone(),
    );

    let gid = match &cfg.socket_group {
        Some(g) => Some(group_id(g)?),
        None => None,
    };
    let mut created = Vec::new();
    let ingest_listener = listener(
        &mut passed,
        "ingest",
        &cfg.ingest_socket(),
        gid,
        &mut created,
    )?;
    let api_listener = listener(&mut passed, "api", &cfg.api_socket(), gid, &mut created)?;
    // A disabled listener's socket is not created, and one left by an
    // earlier run is removed, so senders fail at once instead of filling a
    // socket nobody reads.
    let syslog_socket = if cfg.syslog {
        Some(datagram(
            &mut passed,
            &cfg.syslog_socket(),
            gid,
            &mut created,
        )?)
    } else {
        disabled(&mut passed, "syslog", &cfg.syslog_socket())?;
        None
    };
    let forward_listener = if cfg.forward {
        Some(listener(
            &mut passed,
            "forward",
            &cfg.forward_socket(),
            gid,
            &mut created,
        )?)
    } else {
        disabled(&mut passed, "forward", &cfg.forward_socket())?;
        None
    };

    let tracker = TaskTracker::new();
    tracker.spawn(ingest::serve_json(
        ingest_listener,
        pipeline.clone(),
        cfg.max_record_bytes,
        cfg.max_connections,
        shutdown.clone(),
        tracker.clone(),
    ));
    if let Some(socket) = syslog_socket {
        tracker.spawn(ingest::syslog::serve(
            socket,
            pipeline.clone(),
            cfg.max_record_bytes,
            shutdown.clone(),
        ));
    }
    if let Some(listener) = forward_listener {
        tracker.spawn(ingest::forward::serve(
            listener,
            pipeline.clone(),
            cfg.max_record_bytes,
            cfg.max_connections,
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    let artifact_stats = spawn_artifacts(
        &cfg,
        &view,
        &pipeline,
        &sync_shared,
        throttle,
        &shutdown,
        &tracker,
    );
    if let Some((reload, signal)) = hup {
        tokio::spawn(reload_on_hup(
            reload,
            signal,
            cfg.clone(),
            sync_shared.clone(),
            shutdown.clone(),
        ));
    }
    let state = Arc::new(api::ApiState {
        reader: Reader::new(&cfg.db_path(), view),
        pipeline: pipeline.clone(),
        started,
        max_bytes: cfg.max_bytes,
        device_id: cfg.device_id.clone(),
        device_name: cfg.device_name.clone(),
        sync: sync_shared.clone(),
        artifacts: artifact_stats,
        shutdown: shutdown.clone(),
    });
    let app = api::router(state);
    let api_shutdown = shutdown.clone();
    let api_task = tokio::spawn(async move {
        axum::serve(api_listener, app)
            .with_graceful_shutdown(async move { api_shutdown.cancelled().await })
            .await
    });

    let notifier = Arc::new(notifier);
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
    let heart = tokio::spawn(heartbeat(notifier.clone(), stats.clone(), shutdown.clone()));

    shutdown.cancelled().await;
    notifier.stopping();
    tracing::info!("stopping: committing everything received");
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some ingest connections did not stop in time");
    }
    match tokio::time::timeout(Duration::from_secs(5), api_task).await {
        Ok(Ok(Err(e))) => tracing::warn!("local API stopped with an error: {e}"),
        Err(_) => tracing::warn!("local API did not stop in time"),
        _ => {}
    }
    heart.abort();
    // The uploader may wait on a writer reply: it stops before the writer.
    if let Some(task) = sync_task {
        if tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
        {
            tracing::warn!("the uploader did not stop in time");
        }
    }
    // Everything the connections handed over is queued ahead of this.
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        pipeline.writer().send(store::writer::Msg::Stop),
    )
    .await;
    drop(pipeline);
    let joined = tokio::task::spawn_blocking(move || writer_thread.join());
    if tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .is_err()
    {
        tracing::error!("the writer did not finish in time");
    }
    for path in created {
        let _ = std::fs::remove_file(path);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Spawns the batch uploader when a hub is configured.
fn start_uploader(
    cfg: &AgentConfig,
    view: &ViewCtx,
    writer: tokio::sync::mpsc::Sender<store::writer::Msg>,
    stats: Arc<Stats>,
    shared: Arc<sync::status::SyncShared>,
    throttle: Arc<sync::throttle::Throttle>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
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
        writer,
        stats,
        shared,
        throttle,
    });
    Some(tokio::spawn(sync::uploader::run(ctx, shutdown)))
}

/// Starts the artifact watcher and uploader when a hub is configured (on
/// `tracker`, so shutdown waits for them before stopping the writer).
fn spawn_artifacts(
    cfg: &AgentConfig,
    view: &ViewCtx,
    pipeline: &Pipeline,
    sync_shared: &sync::status::SyncShared,
    throttle: Arc<sync::throttle::Throttle>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) -> Arc<sync::artifacts::ArtifactStats> {
    let stats = Arc::new(sync::artifacts::ArtifactStats::default());
    let token = sync_shared.token_updates();
    match sync::artifacts::ArtifactsConfig::from_agent(cfg, view.clone(), token, throttle) {
        Some(acfg) => {
            tracing::info!("artifacts of sessions go to {}", acfg.hub);
            sync::artifacts::spawn(
                acfg,
                pipeline.writer().clone(),
                pipeline.stats.clone(),
                stats.clone(),
                shutdown.clone(),
                tracker,
            );
        }
        None => tracing::info!("sync.hub is not set: artifacts stay on this device"),
    }
    stats
}

/// On each SIGHUP: load the configuration again, apply a new `sync.token`,
/// and name every other changed key as needing a restart (names only: values
/// may be secrets). A configuration that does not load changes nothing.
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
        restart.retain(|k| k != "sync.token");
        match (&running.sync, &new.sync) {
            // A token for another hub is no use to the running uploaders.
            (Some(old), Some(sc)) if old.hub != sc.hub => {
                if old.token != sc.token {
                    restart.push("sync.token".into());
                }
            }
            (Some(_), Some(sc)) => {
                if shared.set_token(&sc.token) {
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

/// Sends WATCHDOG=1 while the writer proves progress (its loop turns at
/// least once a second even when idle), and a STATUS= line now and then. A
/// writer stuck for a whole watchdog period gets no more pings, so systemd
/// restarts the agent.
async fn heartbeat(notifier: Arc<Notifier>, stats: Arc<Stats>, shutdown: CancellationToken) {
    let period = systemd::watchdog_interval().map_or(Duration::from_secs(20), |half| half * 2);
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
        if stuck < period.max(Duration::from_secs(3)) {
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
