//! The artifact watcher: inotify (via `notify`, links never followed) on
//! the artifact directories of the active session, of sessions that ended
//! in the last day and of any with files still to upload, plus a full
//! rescan every `artifacts.rescan_secs` and after any queue overflow.
//! A file is complete when closed after writing, renamed in, or unchanged
//! for `artifacts.settle_secs` (a file found by a scan whose mtime is
//! already that old counts as unchanged).
//!
//! Invariant: events only point at paths; what a path is, and whether it is
//! complete, is always decided from a fresh `lstat`, so a lost, duplicated
//! or overflowed event can delay a file until the next rescan but never
//! lose it or report it wrongly.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::scan::{self, Entry};
use super::{store, ArtifactStats, ArtifactsConfig};
use crate::agent::store::artifacts::{state, ArtifactCmd};
use crate::agent::store::now_ns;
use crate::agent::store::read::Reader;
use crate::agent::store::writer::Msg;
use crate::agent::store::Stats;

/// Sessions that ended this recently stay watched (late copies, e.g. a
/// recorder flushing after the session closed).
const RECENT: Duration = Duration::from_secs(24 * 3600);
/// How often the set of watched sessions is refreshed while a session's
/// directory is missing (removed, and maybe made again), for the first
/// `RESYNC` after it went missing, and after a failed refresh.
const REFRESH: Duration = Duration::from_secs(1);
/// How often it is refreshed with no session changed (the writer wakes the
/// watcher on every change): sessions that age out of `RECENT`.
const RESYNC: Duration = Duration::from_secs(60);
/// How often files waiting to settle are looked at.
const SETTLE_POLL: Duration = Duration::from_millis(200);
/// Most files waiting to settle at once; more wait for a rescan.
const MAX_CANDIDATES: usize = 20_000;

type Key = (Uuid, String);

struct Candidate {
    size: u64,
    mtime_ns: i64,
    since: Instant,
    /// Closed after writing or renamed in: complete if unchanged now.
    hinted: bool,
}

/// A version already reported to the store; `None` for a refusal.
type Reported = Option<(u64, i64)>;

struct Watch {
    cfg: Arc<ArtifactsConfig>,
    reader: Arc<Reader>,
    writer: mpsc::Sender<Msg>,
    stats: Arc<ArtifactStats>,
    wake: Arc<Notify>,
    /// Session → its artifact directory, for the sessions watched now.
    dirs: HashMap<Uuid, PathBuf>,
    candidates: HashMap<Key, Candidate>,
    reported: HashMap<Key, Reported>,
    /// Since when a session to watch has had no directory (or the
    /// sessions could not be listed); `None` when every one was found.
    missing: Option<Instant>,
}

pub async fn run(
    cfg: Arc<ArtifactsConfig>,
    reader: Arc<Reader>,
    writer: mpsc::Sender<Msg>,
    store_stats: Arc<Stats>,
    stats: Arc<ArtifactStats>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let queue = cfg.event_queue.max(1);
    let Events {
        mut watcher,
        mut paths,
        overflow,
    } = watch_events(queue, cfg.rescan);
    let mut w = Watch {
        cfg,
        reader,
        writer,
        stats,
        wake,
        dirs: HashMap::new(),
        candidates: HashMap::new(),
        reported: HashMap::new(),
        missing: None,
    };
    let mut last_refresh: Option<Instant> = None;
    let mut last_rescan = Instant::now();
    loop {
        // Files settling are looked at every SETTLE_POLL, a missing session
        // directory every REFRESH; otherwise the task sleeps until the next
        // rescan, or a session changes (README "Artifacts"; BENCHMARKS.md,
        // "Idle": no wake-up with nothing to do).
        let nap = if !w.candidates.is_empty() {
            SETTLE_POLL
        } else if w.retrying() {
            REFRESH
        } else {
            w.cfg
                .rescan
                .saturating_sub(last_rescan.elapsed())
                .min(RESYNC)
        };
        let mut changed = false;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = paths.recv() => {
                let Some((path, hinted)) = ev else { return };
                w.on_path(&path, hinted, false).await;
                // Take what else is queued without waiting.
                for _ in 0..queue {
                    match paths.try_recv() {
                        Ok((p, h)) => w.on_path(&p, h, false).await,
                        Err(_) => break,
                    }
                }
            }
            _ = store_stats.sessions_changed.notified() => changed = true,
            _ = tokio::time::sleep(nap) => {}
        }
        let mut rescan_all = overflow.swap(false, Ordering::Relaxed);
        if rescan_all {
            tracing::info!("artifact watch events were lost; rescanning");
        }
        let due = match last_refresh {
            None => true,
            Some(t) => t.elapsed() >= if w.retrying() { REFRESH } else { RESYNC },
        };
        if changed || due {
            last_refresh = Some(Instant::now());
            let new = w.refresh(watcher.as_mut()).await;
            for dir in new {
                w.rescan(&dir).await;
            }
        }
        if last_rescan.elapsed() >= w.cfg.rescan {
            rescan_all = true;
        }
        if rescan_all {
            last_rescan = Instant::now();
            let dirs: Vec<PathBuf> = w.dirs.values().cloned().collect();
            for dir in dirs {
                w.rescan(&dir).await;
            }
        }
        w.settle().await;
    }
}

/// The file events of the watched directories, as paths.
struct Events {
    /// `None` when inotify is unavailable: rescans find everything.
    watcher: Option<notify::RecommendedWatcher>,
    /// Paths, and whether their event says the file is complete.
    paths: mpsc::Receiver<(PathBuf, bool)>,
    /// Raised when events were lost; a rescan replaces them.
    overflow: Arc<AtomicBool>,
}

/// Starts the notify watcher, its events queued as paths. Beyond `queue`
/// paths the queue counts as overflowed and a rescan replaces the lost
/// events.
fn watch_events(queue: usize, rescan: Duration) -> Events {
    let (ev_tx, paths) = mpsc::channel::<(PathBuf, bool)>(queue);
    let overflow = Arc::new(AtomicBool::new(false));
    let flag = overflow.clone();
    // The callback runs on notify's own thread: it must never block, so a
    // full queue only raises the overflow flag.
    let handler = move |res: notify::Result<notify::Event>| {
        let ev = match res {
            Ok(ev) if !ev.need_rescan() => ev,
            other => {
                tracing::debug!("artifact watch: {other:?}; a rescan follows");
                flag.store(true, Ordering::Relaxed);
                return;
            }
        };
        // Opens (our own scans and uploads open files and directories) say
        // nothing about content; reacting to them would feed a loop.
        if matches!(ev.kind, EventKind::Access(a) if a != AccessKind::Close(AccessMode::Write)) {
            return;
        }
        let hinted = matches!(
            ev.kind,
            EventKind::Access(AccessKind::Close(AccessMode::Write))
                | EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both))
        );
        for p in ev.paths {
            if ev_tx.try_send((p, hinted)).is_err() {
                flag.store(true, Ordering::Relaxed);
            }
        }
    };
    let config = notify::Config::default().with_follow_symlinks(false);
    let watcher = match notify::RecommendedWatcher::new(handler, config) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(
                "cannot watch artifact directories ({e}); relying on rescans every {rescan:?}"
            );
            None
        }
    };
    Events {
        watcher,
        paths,
        overflow,
    }
}

impl Watch {
    /// Refresh every `REFRESH` rather than every `RESYNC`?
    fn retrying(&self) -> bool {
        self.missing.is_some_and(|t| t.elapsed() < RESYNC)
    }

    /// Brings the watched set in line with the store; returns the newly
    /// watched directories (to scan once now).
    async fn refresh(&mut self, watcher: Option<&mut notify::RecommendedWatcher>) -> Vec<PathBuf> {
        let reader = self.reader.clone();
        let sessions = match tokio::task::spawn_blocking(move || {
            reader.watched_sessions(now_ns(), RECENT.as_nanos() as i64)
        })
        .await
        {
            Ok(Ok(s)) => s,
            failed => {
                if let Ok(Err(e)) = failed {
                    tracing::warn!("cannot list sessions to watch: {e}");
                }
                self.missing.get_or_insert_with(Instant::now);
                return Vec::new();
            }
        };
        let want: HashSet<Uuid> = sessions.iter().copied().collect();
        let was_missing = self.missing.take();
        let mut watcher = watcher;
        let gone: Vec<Uuid> = self
            .dirs
            .keys()
            .filter(|s| !want.contains(s))
            .copied()
            .collect();
        for s in gone {
            if let Some(dir) = self.dirs.remove(&s) {
                if let Some(w) = watcher.as_deref_mut() {
                    let _ = w.unwatch(&dir);
                }
            }
            self.candidates.retain(|(sess, _), _| *sess != s);
            self.reported.retain(|(sess, _), _| *sess != s);
        }
        let mut new = Vec::new();
        for s in sessions {
            if self.dirs.contains_key(&s) {
                continue;
            }
            let dir = self.cfg.view.artifact_dir(&s);
            // The directory itself must be a real directory: a symlink here
            // would send the whole session's uploads elsewhere.
            match std::fs::symlink_metadata(&dir) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    tracing::warn!(
                        "{} is not a directory (a symlink?); its files are not uploaded",
                        dir.display()
                    );
                    self.dirs.insert(s, dir);
                    continue;
                }
                // Not there (yet): try again at the next refresh.
                Err(_) => {
                    self.missing = Some(was_missing.unwrap_or_else(Instant::now));
                    continue;
                }
            }
            if let Some(w) = watcher.as_deref_mut() {
                if let Err(e) = w.watch(&dir, RecursiveMode::Recursive) {
                    tracing::warn!(
                        "cannot watch {} ({e}); its files are found by rescans",
                        dir.display()
                    );
                }
            }
            // Versions reported before a restart need no second report.
            let reader = self.reader.clone();
            if let Ok(Ok(known)) =
                tokio::task::spawn_blocking(move || reader.artifact_versions(s)).await
            {
                for (path, size, mtime, st) in known {
                    let v = if st == state::REFUSED {
                        None
                    } else {
                        Some((size, mtime))
                    };
                    self.reported.insert((s, path), v);
                }
            }
            self.dirs.insert(s, dir.clone());
            new.push(dir);
        }
        new
    }

    fn session_of(&self, path: &Path) -> Option<(Uuid, PathBuf)> {
        self.dirs
            .iter()
            .find(|(_, d)| path.starts_with(d))
            .map(|(s, d)| (*s, d.clone()))
    }

    async fn rescan(&mut self, dir: &Path) {
        // `symlink_metadata` so a directory swapped for a link is not walked.
        if !std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
            return;
        }
        let d = dir.to_owned();
        let Ok(entries) = tokio::task::spawn_blocking(move || scan::walk(&d)).await else {
            return;
        };
        let Some((session, _)) = self.session_of(dir) else {
            return;
        };
        let mut present = HashSet::new();
        for e in entries {
            if let Entry::File { rel, .. } | Entry::Refused { rel, .. } = &e {
                present.insert(rel.clone());
            }
            self.on_entry(session, dir, e, false, true).await;
        }
        // Files that vanished before they settled.
        self.candidates
            .retain(|(s, rel), _| *s != session || present.contains(rel));
    }

    async fn on_path(&mut self, path: &Path, hinted: bool, from_scan: bool) {
        let Some((session, dir)) = self.session_of(path) else {
            return;
        };
        let p = path.to_owned();
        let d = dir.clone();
        let Ok(entry) = tokio::task::spawn_blocking(move || scan::examine(&d, &p)).await else {
            return;
        };
        self.on_entry(session, &dir, entry, hinted, from_scan).await;
    }

    async fn on_entry(
        &mut self,
        session: Uuid,
        dir: &Path,
        entry: Entry,
        hinted: bool,
        from_scan: bool,
    ) {
        match entry {
            Entry::File {
                rel,
                size,
                mtime_ns,
            } => {
                let key = (session, rel);
                if self.reported.get(&key) == Some(&Some((size, mtime_ns))) {
                    self.candidates.remove(&key);
                    return;
                }
                let now = Instant::now();
                // A scan finding a file untouched for the settle time needs
                // no further wait (e.g. files written while the agent was down).
                let age = Duration::from_nanos((now_ns() - mtime_ns).max(0) as u64);
                let old = from_scan && age >= self.cfg.settle;
                let room = self.candidates.len() < MAX_CANDIDATES;
                match self.candidates.get_mut(&key) {
                    Some(c) if c.size == size && c.mtime_ns == mtime_ns => {
                        c.hinted |= hinted || old;
                    }
                    Some(c) => {
                        *c = Candidate {
                            size,
                            mtime_ns,
                            since: now,
                            hinted: hinted || old,
                        };
                    }
                    None if room => {
                        self.candidates.insert(
                            key,
                            Candidate {
                                size,
                                mtime_ns,
                                since: now,
                                hinted: hinted || old,
                            },
                        );
                    }
                    None => {}
                }
            }
            Entry::Refused { rel, reason } => {
                let key = (session, rel.clone());
                self.candidates.remove(&key);
                if self.reported.get(&key) == Some(&None) {
                    return;
                }
                tracing::warn!("refusing to upload {} in {}: {reason}", rel, dir.display());
                self.stats.refused_seen.fetch_add(1, Ordering::Relaxed);
                let cmd = ArtifactCmd::Refuse {
                    session,
                    path: rel,
                    reason,
                };
                if store(&self.writer, cmd).await.is_ok() {
                    self.reported.insert(key, None);
                }
            }
            Entry::Dir(d) if !from_scan => {
                // A directory created or moved in: its files came with it and
                // have no events of their own.
                Box::pin(self.rescan_subdir(session, dir, &d)).await;
            }
            Entry::Dir(_) | Entry::Ignored => {}
        }
    }

    async fn rescan_subdir(&mut self, session: Uuid, dir: &Path, sub: &Path) {
        let (root, s) = (dir.to_owned(), sub.to_owned());
        let Ok(entries) = tokio::task::spawn_blocking(move || {
            scan::walk(&s)
                .into_iter()
                .map(|e| match e {
                    // `walk` names entries relative to `sub`: re-examine
                    // them relative to the artifact directory.
                    Entry::File { rel, .. } | Entry::Refused { rel, .. } => {
                        scan::examine(&root, &s.join(rel))
                    }
                    other => other,
                })
                .collect::<Vec<_>>()
        })
        .await
        else {
            return;
        };
        for e in entries {
            self.on_entry(session, dir, e, false, true).await;
        }
    }

    /// Reports every candidate that is complete now.
    async fn settle(&mut self) {
        let settle = self.cfg.settle;
        let ready: Vec<Key> = self
            .candidates
            .iter()
            .filter(|(_, c)| c.hinted || c.since.elapsed() >= settle)
            .map(|(k, _)| k.clone())
            .collect();
        let mut any = false;
        for key in ready {
            let Some(dir) = self.dirs.get(&key.0).cloned() else {
                self.candidates.remove(&key);
                continue;
            };
            let full = dir.join(&key.1);
            let d = dir.clone();
            let Ok(entry) = tokio::task::spawn_blocking(move || scan::examine(&d, &full)).await
            else {
                continue;
            };
            match entry {
                Entry::File {
                    rel,
                    size,
                    mtime_ns,
                } => {
                    let c = self.candidates.get_mut(&key).expect("listed above");
                    if c.size != size || c.mtime_ns != mtime_ns {
                        // Still being written: wait again.
                        *c = Candidate {
                            size,
                            mtime_ns,
                            since: Instant::now(),
                            hinted: false,
                        };
                        continue;
                    }
                    let cmd = ArtifactCmd::Seen {
                        session: key.0,
                        path: rel,
                        size,
                        mtime_ns,
                    };
                    match store(&self.writer, cmd).await {
                        Ok(()) => {
                            tracing::debug!(
                                "artifact {} of {} is complete ({size} bytes)",
                                key.1,
                                key.0
                            );
                            self.candidates.remove(&key);
                            self.reported.insert(key, Some((size, mtime_ns)));
                            any = true;
                        }
                        Err(e) => tracing::warn!("cannot record artifact {}: {e}", key.1),
                    }
                }
                other => {
                    self.candidates.remove(&key);
                    self.on_entry(key.0, &dir, other, false, false).await;
                }
            }
        }
        if any {
            self.wake.notify_one();
        }
    }
}
