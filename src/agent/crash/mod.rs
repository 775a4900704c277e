//! Crash capture (README "Crashes"): a process on the robot that dumps core
//! becomes, in the active session, a crash report (JSON) and, with
//! `artifacts.cores = true`, the core itself (gzipped, at most
//! `artifacts.core_max_bytes`) as artifacts, plus an error record carrying
//! a `crash` mark (priority high), so the hub's timeline, error counts and
//! mark lists show it. The files go up as any artifact does: they are
//! written into the session's artifact directory (as `*.part`, renamed when
//! complete), where the artifact watcher finds them.
//!
//! Two sources: the directory `artifacts.core_dir` (where
//! `kernel.core_pattern` writes), watched with `notify`, a core counting
//! as complete when it was closed after writing and has not changed since,
//! or has not changed for `artifacts.settle_secs`; what it says comes from
//! its ELF notes ([`elf`]), else its file name. And systemd-coredump's
//! journal entries, through the journal reader ([`coredump`]), which keeps
//! the journal's record (with the mark added) and hands the crash here for
//! the report and its `COREDUMP_FILENAME`.
//!
//! Invariant: bounded everywhere: the event queue ([`EVENT_QUEUE`], beyond
//! it a rescan of the directory), the cores waiting to settle
//! ([`MAX_PENDING`]), the crashes queued by the journal reader
//! ([`CRASH_QUEUE`]), the bytes read to parse a core ([`elf::PREFIX`]).
//! Nothing is followed (the core is opened with `O_NOFOLLOW`, a regular
//! file only); cores already in the directory when the agent starts are
//! not reported again. No timer runs while no core is settling.

pub mod coredump;
pub mod elf;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::config::AgentConfig;
use crate::agent::ingest::Pipeline;
use crate::agent::record::{Incoming, Trusted};
use crate::agent::store::read::{Reader, ViewCtx};
use crate::agent::store::writer::Msg;
use crate::agent::store::{now_ns, rfc3339};
use crate::wire::Level;

/// File events queued from the watcher; beyond it the directory is
/// rescanned.
pub const EVENT_QUEUE: usize = 256;
/// Cores waiting to settle at once; more wait for the next rescan.
pub const MAX_PENDING: usize = 256;
/// Crashes the journal reader may queue before the crash task takes them.
pub const CRASH_QUEUE: usize = 64;
/// Versions of core files remembered as reported (then the directory is
/// taken as seen again).
const MAX_KNOWN: usize = 10_000;
/// How often a settling core is looked at.
const POLL: Duration = Duration::from_millis(250);
/// The mark name (README "Crashes").
pub const MARK: &str = "crash";

/// Where a crash was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A core file in `artifacts.core_dir`.
    CoreDir,
    /// systemd-coredump's journal entry.
    Coredump,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::CoreDir => "core_dir",
            Source::Coredump => "systemd-coredump",
        }
    }
}

/// One crash, from either source.
#[derive(Debug, Clone, PartialEq)]
pub struct Crash {
    pub source: Source,
    /// The executable's path, when the source knows it.
    pub executable: Option<String>,
    /// The command name (`comm`, 15 bytes).
    pub command: Option<String>,
    /// The command line (the core's notes keep its first 80 bytes).
    pub args: Option<String>,
    pub pid: Option<u32>,
    pub signal: Option<i32>,
    /// Unix nanoseconds.
    pub time_ns: i64,
    /// The core file, where it is.
    pub core: Option<PathBuf>,
    /// What else the source says (systemd-coredump's unit, uid, …).
    pub extra: Map<String, Value>,
}

impl Crash {
    /// The name the crash goes by: the command, else the executable's file
    /// name, else `unknown`.
    pub fn name(&self) -> String {
        self.command
            .clone()
            .or_else(|| {
                self.executable
                    .as_deref()
                    .and_then(|e| Path::new(e).file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "unknown".into())
    }

    fn signal_name(&self) -> Option<String> {
        self.signal.map(elf::signal_name)
    }

    /// The record's `event` field: the `crash` mark, priority high, with
    /// what crashed as its metadata.
    pub fn event(&self) -> Value {
        let mut meta = Map::new();
        meta.insert("command".into(), self.name().into());
        if let Some(p) = self.pid {
            meta.insert("pid".into(), p.into());
        }
        if let Some(s) = self.signal_name() {
            meta.insert("signal".into(), s.into());
        }
        meta.insert("source".into(), self.source.as_str().into());
        json!({"name": MARK, "priority": "high", "metadata": meta})
    }

    /// The record's message: `crash: planner (pid 4242) dumped core on SIGSEGV`.
    pub fn message(&self) -> String {
        let pid = self.pid.map(|p| format!(" (pid {p})")).unwrap_or_default();
        let signal = self
            .signal_name()
            .map(|s| format!(" on {s}"))
            .unwrap_or_default();
        format!("crash: {}{pid} dumped core{signal}", self.name())
    }

    /// The base name of the report and core artifacts:
    /// `crash-20261205T074512Z-planner-4242`.
    fn stem(&self) -> String {
        let when = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.time_ns))
            .ok()
            .and_then(|t| {
                t.format(time::macros::format_description!(
                    "[year][month][day]T[hour][minute][second]Z"
                ))
                .ok()
            })
            .unwrap_or_else(|| "unknown".into());
        let name: String = self
            .name()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(32)
            .collect();
        match self.pid {
            Some(p) => format!("crash-{when}-{name}-{p}"),
            None => format!("crash-{when}-{name}"),
        }
    }

    /// What crashed, as the record's `crash` metadata and the report's
    /// fields.
    fn fields(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("source".into(), self.source.as_str().into());
        m.insert("command".into(), self.name().into());
        let opt = |v: &Option<String>| v.clone().map_or(Value::Null, Value::from);
        m.insert("executable".into(), opt(&self.executable));
        m.insert("args".into(), opt(&self.args));
        m.insert("pid".into(), self.pid.map_or(Value::Null, Value::from));
        m.insert(
            "signal".into(),
            self.signal.map_or(Value::Null, Value::from),
        );
        m.insert("signal_name".into(), opt(&self.signal_name()));
        m.insert("time".into(), rfc3339(self.time_ns).into());
        m.insert(
            "core_path".into(),
            opt(&self.core.as_ref().map(|p| p.display().to_string())),
        );
        for (k, v) in &self.extra {
            m.entry(k.clone()).or_insert(v.clone());
        }
        m
    }
}

/// What the crash task needs from the configuration.
#[derive(Debug, Clone)]
pub struct CrashConfig {
    /// `artifacts.core_dir` (relative to the state directory); `None`: off.
    pub core_dir: Option<PathBuf>,
    /// `artifacts.cores`: attach the core itself.
    pub cores: bool,
    /// `artifacts.core_max_bytes`: larger cores are reported, not attached.
    pub core_max_bytes: u64,
    /// `artifacts.settle_secs`.
    pub settle: Duration,
    pub db_path: PathBuf,
    pub view: ViewCtx,
}

impl CrashConfig {
    pub fn from_agent(cfg: &AgentConfig, view: ViewCtx) -> CrashConfig {
        let a = &cfg.raw.artifacts;
        CrashConfig {
            core_dir: Some(a.core_dir.trim())
                .filter(|d| !d.is_empty())
                .map(|d| cfg.state_dir.join(d)),
            cores: a.cores,
            core_max_bytes: a.core_max_bytes,
            settle: Duration::from_secs_f64(a.settle_secs),
            db_path: cfg.db_path(),
            view,
        }
    }
}

/// Where the journal reader hands systemd-coredump's crashes. Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct Reporter(mpsc::Sender<Crash>);

impl Reporter {
    /// Queues a crash without waiting; a full queue drops the report (the
    /// journal's record and its mark are kept) and says so.
    pub fn report(&self, crash: Crash) {
        if let Err(e) = self.0.try_send(crash) {
            let c = match e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => c,
            };
            tracing::warn!(
                "too many crashes at once: no report for {} (its journal record and mark are kept)",
                c.message()
            );
        }
    }
}

/// Starts the crash task on `tracker`; it stops when `shutdown` fires.
pub fn spawn(
    cfg: CrashConfig,
    pipeline: Pipeline,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> Reporter {
    let (tx, rx) = mpsc::channel(CRASH_QUEUE);
    tracker.spawn(run(cfg, pipeline, rx, shutdown));
    Reporter(tx)
}

/// A core file seen in the directory, until it settles.
struct Pending {
    size: u64,
    mtime_ns: i64,
    since: Instant,
    /// Closed after writing (or renamed in): complete if still unchanged.
    hinted: bool,
}

/// A file's version: (size, mtime).
type Version = (u64, i64);

struct Task {
    cfg: Arc<CrashConfig>,
    pipeline: Pipeline,
    reader: Arc<Reader>,
    shutdown: CancellationToken,
    pending: HashMap<PathBuf, Pending>,
    known: HashMap<PathBuf, Version>,
}

async fn run(
    cfg: CrashConfig,
    pipeline: Pipeline,
    mut crashes: mpsc::Receiver<Crash>,
    shutdown: CancellationToken,
) {
    let cfg = Arc::new(cfg);
    let reader = Arc::new(Reader::new(&cfg.db_path, cfg.view.clone()));
    let mut t = Task {
        cfg: cfg.clone(),
        pipeline,
        reader,
        shutdown: shutdown.clone(),
        pending: HashMap::new(),
        known: HashMap::new(),
    };
    let (mut events, overflow, _watcher) = match &cfg.core_dir {
        Some(dir) => match t.watch(dir) {
            Some((rx, flag, w)) => (Some(rx), flag, Some(w)),
            None => (None, Arc::new(AtomicBool::new(false)), None),
        },
        None => (None, Arc::new(AtomicBool::new(false)), None),
    };
    loop {
        let settling = !t.pending.is_empty();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            c = crashes.recv() => match c {
                Some(c) => t.capture(c).await,
                None => return,
            },
            ev = recv(&mut events) => {
                let Some((path, hinted)) = ev else {
                    events = None;
                    continue;
                };
                t.seen(path, hinted);
            }
            _ = tokio::time::sleep(POLL), if settling => {}
        }
        if overflow.swap(false, Ordering::Relaxed) {
            if let Some(dir) = cfg.core_dir.clone() {
                tracing::info!("core directory events were lost; rescanning");
                t.rescan(&dir);
            }
        }
        for c in t.settled() {
            t.capture(c).await;
        }
    }
}

/// The next event, or never when there is no watcher.
async fn recv(events: &mut Option<mpsc::Receiver<(PathBuf, bool)>>) -> Option<(PathBuf, bool)> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// A file's version from `lstat`, when it is a regular file.
fn version(path: &Path) -> Option<Version> {
    let m = std::fs::symlink_metadata(path).ok()?;
    if !m.file_type().is_file() {
        return None;
    }
    Some((m.len(), m.mtime() * 1_000_000_000 + m.mtime_nsec()))
}

/// Whether a directory entry may be a core (not hidden, not a temporary).
fn candidate(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !(name.starts_with('.') || name.ends_with(".tmp") || name.ends_with(".part"))
}

type Watched = (
    mpsc::Receiver<(PathBuf, bool)>,
    Arc<AtomicBool>,
    notify::RecommendedWatcher,
);

impl Task {
    /// Watches the core directory (made if missing); the cores already in
    /// it are taken as seen. `None` (logged) when it cannot be watched.
    fn watch(&mut self, dir: &Path) -> Option<Watched> {
        if let Err(e) = std::fs::create_dir_all(dir) {
            tracing::error!(
                "artifacts.core_dir {}: {e}; crashes there are not captured",
                dir.display()
            );
            return None;
        }
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let flag = overflow.clone();
        // On notify's thread: never blocks; a full queue raises the flag.
        let handler = move |res: notify::Result<notify::Event>| {
            let ev = match res {
                Ok(ev) if !ev.need_rescan() => ev,
                _ => {
                    flag.store(true, Ordering::Relaxed);
                    return;
                }
            };
            if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write))
            {
                return;
            }
            let hinted = matches!(
                ev.kind,
                EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
            );
            for p in ev.paths {
                if tx.try_send((p, hinted)).is_err() {
                    flag.store(true, Ordering::Relaxed);
                }
            }
        };
        let config = notify::Config::default().with_follow_symlinks(false);
        let mut w = match notify::RecommendedWatcher::new(handler, config) {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(
                    "cannot watch artifacts.core_dir ({e}); crashes there are not captured"
                );
                return None;
            }
        };
        if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
            tracing::error!(
                "cannot watch artifacts.core_dir {} ({e}); crashes there are not captured",
                dir.display()
            );
            return None;
        }
        // After the watch: a core written from here on is an event.
        let mut old = 0;
        for path in entries(dir) {
            if let Some(v) = version(&path) {
                self.known.insert(path, v);
                old += 1;
            }
        }
        tracing::info!(
            "capturing crashes from {} ({old} core files already there are left alone)",
            dir.display()
        );
        Some((rx, overflow, w))
    }

    /// A path an event named: it waits to settle unless already reported.
    fn seen(&mut self, path: PathBuf, hinted: bool) {
        if !candidate(&path) {
            return;
        }
        let Some((size, mtime_ns)) = version(&path) else {
            self.pending.remove(&path);
            return;
        };
        if self.known.get(&path) == Some(&(size, mtime_ns)) {
            return;
        }
        let room = self.pending.len() < MAX_PENDING;
        match self.pending.get_mut(&path) {
            Some(p) => {
                if (p.size, p.mtime_ns) != (size, mtime_ns) {
                    p.since = Instant::now();
                    (p.size, p.mtime_ns) = (size, mtime_ns);
                }
                p.hinted |= hinted;
            }
            None if room => {
                let _ = self.pending.insert(
                    path,
                    Pending {
                        size,
                        mtime_ns,
                        since: Instant::now(),
                        hinted,
                    },
                );
            }
            None => tracing::warn!(
                "{} cores are settling; {} waits for the next one to finish",
                MAX_PENDING,
                path.display()
            ),
        }
    }

    fn rescan(&mut self, dir: &Path) {
        for path in entries(dir) {
            self.seen(path, false);
        }
    }

    /// The cores that are complete now, taken out of `pending`.
    fn settled(&mut self) -> Vec<Crash> {
        let mut done = Vec::new();
        let settle = self.cfg.settle;
        self.pending.retain(|path, p| match version(path) {
            None => false,
            Some(v) if v != (p.size, p.mtime_ns) => {
                (p.size, p.mtime_ns) = v;
                p.since = Instant::now();
                p.hinted = false;
                true
            }
            Some(v) => {
                if (p.hinted && p.since.elapsed() >= POLL) || p.since.elapsed() >= settle {
                    done.push((path.clone(), v));
                    false
                } else {
                    true
                }
            }
        });
        if self.known.len() + done.len() > MAX_KNOWN {
            self.known.clear();
        }
        done.into_iter()
            .map(|(path, v)| {
                self.known.insert(path.clone(), v);
                from_core_file(&path, v)
            })
            .collect()
    }

    /// Writes the crash's report (and core) into the active session's
    /// artifact directory and, for a core from the directory, stores its
    /// record and mark (systemd-coredump's record is the journal's).
    async fn capture(&mut self, crash: Crash) {
        let reader = self.reader.clone();
        let session = tokio::task::spawn_blocking(move || reader.current_session())
            .await
            .ok()
            .and_then(|r| {
                r.map_err(|e| tracing::error!("crash capture: reading the active session: {e}"))
                    .ok()
            })
            .flatten();
        let mut fields = crash.fields();
        match session {
            Some(s) => {
                let dir = self.cfg.view.artifact_dir(&s.id);
                let cfg = self.cfg.clone();
                let c = crash.clone();
                let stop = self.shutdown.clone();
                let attach =
                    tokio::task::spawn_blocking(move || attach(&cfg, &c, s.id, &dir, &stop));
                match attach.await {
                    Ok(Ok(files)) => {
                        tracing::warn!(
                            "{}: report {} attached to session {}",
                            crash.message(),
                            files.report,
                            s.id
                        );
                        fields.insert("report".into(), files.report.into());
                        fields.insert("core".into(), files.core);
                    }
                    Ok(Err(e)) => tracing::error!(
                        "{}: writing its report into session {} failed: {e}",
                        crash.message(),
                        s.id
                    ),
                    Err(e) => tracing::error!("{}: crash capture failed: {e}", crash.message()),
                }
            }
            None => tracing::warn!(
                "{}: no session is active, so no report is attached (the record and mark are kept)",
                crash.message()
            ),
        }
        if crash.source == Source::CoreDir {
            self.record(&crash, fields).await;
        }
    }

    /// The error record with the `crash` mark, from the agent itself.
    async fn record(&self, crash: &Crash, fields: Map<String, Value>) {
        let mut metadata = Map::new();
        metadata.insert("event".into(), crash.event());
        metadata.insert("crash".into(), Value::Object(fields));
        let record = Incoming {
            timestamp_ns: Some(crash.time_ns),
            level: Level::Error,
            module: Some("crash".into()),
            message: crash.message(),
            metadata,
            rendered: None,
            truncated: false,
        };
        let trusted = Trusted {
            pid: Some(std::process::id()),
            uid: Some(rustix::process::getuid().as_raw()),
            gid: Some(rustix::process::getgid().as_raw()),
            process: Some("logbookd".into()),
        };
        let row = self.pipeline.row(record, Arc::new(trusted), now_ns());
        if self
            .pipeline
            .writer()
            .send(Msg::Rows(vec![row]))
            .await
            .is_err()
        {
            tracing::error!("{}: the writer has stopped; not recorded", crash.message());
        }
    }
}

/// The regular files in `dir` that may be cores.
fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| candidate(p))
            .take(MAX_KNOWN)
            .collect(),
        Err(e) => {
            tracing::warn!("reading artifacts.core_dir {}: {e}", dir.display());
            Vec::new()
        }
    }
}

/// Opens a file for reading without following a link.
fn open_nofollow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// What a core file in the directory says: its notes, else its name
/// (`core.planner.4242`, `core.4242`).
fn from_core_file(path: &Path, (size, mtime_ns): Version) -> Crash {
    let notes = open_nofollow(path)
        .and_then(|f| {
            let mut prefix = Vec::new();
            f.take(elf::PREFIX as u64).read_to_end(&mut prefix)?;
            Ok(prefix)
        })
        .map_err(|e| tracing::warn!("reading core {}: {e}", path.display()))
        .ok()
        .and_then(|b| elf::parse(&b))
        .unwrap_or_default();
    let (mut command, mut pid) = (None, None);
    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
        for part in name.split('.').skip(1) {
            match part.parse::<u32>() {
                Ok(p) => pid = pid.or(Some(p)),
                Err(_) if !part.is_empty() => command = command.or(Some(part.to_owned())),
                Err(_) => {}
            }
        }
    }
    let mut extra = Map::new();
    extra.insert("core_size".into(), size.into());
    Crash {
        source: Source::CoreDir,
        executable: notes
            .args
            .as_deref()
            .and_then(|a| a.split(' ').next())
            .filter(|e| e.starts_with('/'))
            .map(str::to_owned),
        command: notes.command.or(command),
        args: notes.args,
        pid: notes.pid.or(pid),
        signal: notes.signal,
        time_ns: mtime_ns,
        core: Some(path.to_owned()),
        extra,
    }
}

/// The artifacts written for one crash: the report's name, and what
/// became of the core (the report's `core` field).
struct Attached {
    report: String,
    core: Value,
}

/// Writes the core (when asked for, and small enough) and the report into
/// `dir`, each as `*.part` renamed when complete.
fn attach(
    cfg: &CrashConfig,
    crash: &Crash,
    session: uuid::Uuid,
    dir: &Path,
    stop: &CancellationToken,
) -> std::io::Result<Attached> {
    std::fs::create_dir_all(dir)?;
    let stem = crash.stem();
    let core = match (&crash.core, cfg.cores) {
        (None, _) => json!({"attached": false, "reason": "no core file"}),
        (Some(_), false) => json!({"attached": false, "reason": "artifacts.cores is off"}),
        (Some(path), true) => match copy_core(cfg, path, dir, &stem, stop) {
            Ok(name) => json!({"attached": true, "file": name}),
            Err(why) => {
                tracing::warn!("core {} not attached: {why}", path.display());
                json!({"attached": false, "reason": why})
            }
        },
    };
    let mut report = crash.fields();
    report.insert("session_id".into(), session.to_string().into());
    report.insert("device_id".into(), cfg.view.device_id.clone().into());
    report.insert("core".into(), core.clone());
    let name = format!("{stem}.json");
    let text = serde_json::to_vec_pretty(&Value::Object(report)).unwrap_or_default();
    write_then_rename(dir, &name, |f| f.write_all(&text))?;
    Ok(Attached { report: name, core })
}

/// Copies a core into `dir`: gzipped, unless systemd-coredump already
/// compressed it. The reason (one line) when it is not attached.
fn copy_core(
    cfg: &CrashConfig,
    path: &Path,
    dir: &Path,
    stem: &str,
    stop: &CancellationToken,
) -> Result<String, String> {
    let f = open_nofollow(path).map_err(|e| format!("cannot open it: {e}"))?;
    let meta = f.metadata().map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".into());
    }
    if meta.len() > cfg.core_max_bytes {
        return Err(format!(
            "{} bytes, over artifacts.core_max_bytes ({})",
            meta.len(),
            cfg.core_max_bytes
        ));
    }
    let compressed = ["zst", "xz", "lz4", "gz"]
        .into_iter()
        .find(|e| path.extension().is_some_and(|x| x == *e));
    let name = match compressed {
        Some(ext) => format!("{stem}.core.{ext}"),
        None => format!("{stem}.core.gz"),
    };
    // Never more than the file's size at the check above: a core still
    // growing is cut there.
    let mut input = f.take(meta.len());
    let copy = |out: &mut std::fs::File| -> std::io::Result<()> {
        let mut buf = vec![0u8; 256 << 10];
        let mut sink: Box<dyn Write + '_> = match compressed {
            Some(_) => Box::new(&mut *out),
            None => Box::new(flate2::write::GzEncoder::new(
                &mut *out,
                flate2::Compression::fast(),
            )),
        };
        loop {
            if stop.is_cancelled() {
                return Err(std::io::Error::other("the agent is stopping"));
            }
            let n = input.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sink.write_all(&buf[..n])?;
        }
        sink.flush()?;
        drop(sink);
        Ok(())
    };
    write_then_rename(dir, &name, copy).map_err(|e| format!("copying it: {e}"))?;
    Ok(name)
}

/// Writes `dir/name.part` with `fill`, syncs it and renames it to
/// `dir/name` (the artifact watcher ignores `*.part`); the part is removed
/// on failure.
fn write_then_rename(
    dir: &Path,
    name: &str,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let part = dir.join(format!("{name}.part"));
    let result = (|| {
        let mut f = std::fs::File::create(&part)?;
        fill(&mut f)?;
        f.sync_all()?;
        std::fs::rename(&part, dir.join(name))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&part);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash() -> Crash {
        Crash {
            source: Source::CoreDir,
            executable: Some("/usr/bin/planner".into()),
            command: Some("planner".into()),
            args: Some("/usr/bin/planner --map a".into()),
            pid: Some(4242),
            signal: Some(11),
            time_ns: 1_796_456_712_000_000_000,
            core: None,
            extra: Map::new(),
        }
    }

    #[test]
    fn names_and_message() {
        let c = crash();
        assert_eq!(
            c.message(),
            "crash: planner (pid 4242) dumped core on SIGSEGV"
        );
        assert_eq!(c.stem(), "crash-20261205T074512Z-planner-4242");
        let odd = Crash {
            command: Some("../a b/c".into()),
            pid: None,
            signal: None,
            ..crash()
        };
        assert_eq!(odd.stem(), "crash-20261205T074512Z-___a_b_c");
        assert_eq!(odd.message(), "crash: ../a b/c dumped core");
        let mark = crate::agent::marks::from_record(
            &Map::from_iter([("event".to_owned(), c.event())]),
            c.time_ns,
        )
        .unwrap()
        .unwrap();
        assert_eq!(mark.name, MARK);
        assert_eq!(mark.priority, crate::agent::marks::Priority::High);
    }

    #[test]
    fn a_core_file_name_says_what_its_notes_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("core.nav_stack.917");
        std::fs::write(&p, b"not an ELF file").unwrap();
        let c = from_core_file(&p, (15, 1));
        assert_eq!(c.command.as_deref(), Some("nav_stack"));
        assert_eq!(c.pid, Some(917));
        assert_eq!(c.signal, None);
        assert_eq!(c.extra["core_size"], 15);
    }

    #[test]
    fn temporaries_and_hidden_files_are_not_cores() {
        assert!(candidate(Path::new("/c/core")));
        assert!(candidate(Path::new("/c/core.1234")));
        assert!(!candidate(Path::new("/c/.core")));
        assert!(!candidate(Path::new("/c/core.part")));
        assert!(!candidate(Path::new("/c/core.tmp")));
    }
}
