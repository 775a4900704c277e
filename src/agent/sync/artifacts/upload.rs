//! The artifact uploader: takes the smallest pending file from the store
//! once the logs are not behind, hashes it (SHA-256 of the whole file),
//! creates a tus upload or asks an existing one for its offset (HEAD), and
//! appends chunks, committing the acknowledged offset after each. The
//! [`Link`] it owns waits out transient errors (backoff, `Retry-After`, the
//! probe) and a refused token; a file the hub will never take is set aside
//! with the hub's reason, and one whose upload went wrong starts over.
//!
//! Invariant: a PATCH is only ever sent at an offset the hub reported (by
//! the create, the last PATCH answer or a HEAD); after any failed request
//! the next one on that upload is a HEAD, so acknowledged bytes are never
//! sent again.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use super::scan::{mtime_ns, open_inside};
use super::{store, ArtifactStats, ArtifactsConfig};
use crate::agent::store::artifacts::{state, ArtifactCmd, ArtifactRow};
use crate::agent::store::read::Reader;
use crate::agent::store::writer::Msg;
use crate::agent::store::{now_ns, Stats};
use crate::agent::sync::error::{Action, SyncError};
use crate::agent::sync::link::{Link, LinkConfig};
use crate::agent::sync::tus::{Appended, NewUpload, TusClient};

/// Unsynced records above which logs count as behind (about one batch).
const LOGS_BEHIND: i64 = 10_000;
/// Longest an artifact waits for the logs, so artifacts never starve when
/// logs cannot drain (their uploader stopped, a set-aside loop).
const MAX_LOG_WAIT: Duration = Duration::from_secs(60);
/// Times a file is started over (checksum mismatch, upload lost) before it
/// is marked failed.
const MAX_ATTEMPTS: u64 = 5;
/// Smallest PATCH the uploader halves down to.
const MIN_CHUNK: u64 = 64 << 10;
/// Idle poll, in case a wake-up was missed: the watcher wakes the
/// uploader after every file it records (BENCHMARKS.md, "Idle").
const IDLE_POLL: Duration = Duration::from_secs(30);

struct Uploader {
    cfg: Arc<ArtifactsConfig>,
    reader: Arc<Reader>,
    writer: mpsc::Sender<Msg>,
    stats: Arc<ArtifactStats>,
    /// Client, token, backoff and probe; its bandwidth share is the one
    /// the batch uploader draws from too.
    link: Link,
    /// Bytes per PATCH: `artifacts.chunk_bytes`, halved on each 413 (a
    /// proxy in front of the hub with a smaller body limit).
    chunk: u64,
    shutdown: CancellationToken,
}

/// How one attempt at one file ended, when it did not fail.
enum Outcome {
    Done,
    /// Nothing sent; the row changed state (vanished, changed, restarted).
    Skipped,
}

/// Where an upload starts: at the hub's offset, or not at all.
enum Start {
    At { url: String, offset: u64 },
    Not(Outcome),
}

/// What the uploader does about a failed attempt at a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterFailure {
    /// Wait (the hub's `Retry-After`, or the backoff) and try again.
    Retry { after: Option<Duration> },
    /// The token was refused: wait for a new one.
    Stop,
    /// The hub will never take this file: set it aside in this state.
    SetAside(&'static str),
    /// The upload is in a state we cannot use (checksum mismatch, an
    /// answer we cannot read): start this version over, a bounded number
    /// of times.
    StartOver,
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
    let link_cfg = LinkConfig {
        retry_min: cfg.retry_min,
        retry_max: cfg.retry_max,
    };
    // The hub URL and device token are read for every request, so a
    // SIGHUP's new ones are used at once, and end a wait after a 401/403.
    let link = Link::new(
        "artifact upload",
        &link_cfg,
        cfg.remote.clone(),
        cfg.throttle.clone(),
        stats.clone(),
    );
    let link = match link {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("artifact uploads disabled: {e}");
            stats.set_error(Some(e.to_string()));
            return;
        }
    };
    let mut up = Uploader {
        chunk: cfg.chunk_bytes,
        cfg,
        reader,
        writer,
        stats,
        link,
        shutdown: shutdown.clone(),
    };
    while let Some(row) = up.next_row(&wake).await {
        wait_for_logs(&store_stats, &shutdown).await;
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = up.upload(&row) => r,
        };
        if up.settle(&row, result).await {
            return;
        }
    }
}

/// What a failed attempt leads to. Statuses are read as for uploads:
/// conflicts and locks (another PATCH still running at the hub) are
/// transient, and a file can be neither split nor sent in another version.
fn after_failure(err: &SyncError) -> AfterFailure {
    if matches!(err, SyncError::BadResponse(_)) {
        return AfterFailure::StartOver;
    }
    if let SyncError::Status { status, .. } = err {
        match status.as_u16() {
            // The file changed between hashing and reading.
            460 => return AfterFailure::StartOver,
            409 | 423 => return AfterFailure::Retry { after: None },
            // Too large for the hub: retrying or splitting cannot help a
            // file (a chunk too large was halved before this).
            413 => return AfterFailure::SetAside(state::FAILED),
            401 | 403 | 408 | 429 => {}
            400..=499 => return AfterFailure::SetAside(state::REFUSED),
            _ => {}
        }
    }
    match err.action() {
        Action::Stop => AfterFailure::Stop,
        Action::Retry { after } => AfterFailure::Retry { after },
        Action::Split | Action::SetAside | Action::OlderVersion => {
            AfterFailure::Retry { after: None }
        }
    }
}

/// Artifacts go after the logs: while many records wait and they are
/// draining, let them have the link (bounded, so artifacts never starve).
async fn wait_for_logs(stats: &Stats, shutdown: &CancellationToken) {
    let unsynced = || {
        stats.records_stored.load(Ordering::Relaxed) - stats.records_synced.load(Ordering::Relaxed)
    };
    let start = Instant::now();
    let mut last = unsynced();
    while last > LOGS_BEHIND && start.elapsed() < MAX_LOG_WAIT {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        let now = unsynced();
        if now >= last {
            // Not draining: the logs are not using the link either.
            return;
        }
        last = now;
    }
}

impl Uploader {
    fn dir(&self, row: &ArtifactRow) -> std::path::PathBuf {
        self.cfg.view.artifact_dir(&row.session)
    }

    fn tus(&self) -> TusClient<'_> {
        TusClient::new(&self.link)
    }

    /// The next file to upload, waiting while there is none; `None` on
    /// shutdown.
    async fn next_row(&self, wake: &Notify) -> Option<ArtifactRow> {
        loop {
            if self.shutdown.is_cancelled() {
                return None;
            }
            let r = self.reader.clone();
            let next = match tokio::task::spawn_blocking(move || r.next_artifact()).await {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    tracing::warn!("cannot read artifact state: {e}");
                    None
                }
                Err(_) => None,
            };
            if next.is_some() {
                return next;
            }
            self.link.idle();
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    /// Acts on how an attempt at `row` ended. True on shutdown.
    async fn settle(&mut self, row: &ArtifactRow, result: Result<Outcome, SyncError>) -> bool {
        let err = match result {
            Ok(Outcome::Done) => {
                self.link.progressed();
                self.stats.set_error(None);
                return false;
            }
            Ok(Outcome::Skipped) => return false,
            Err(e) => e,
        };
        self.stats.set_error(Some(format!("{}: {err}", row.path)));
        match after_failure(&err) {
            AfterFailure::SetAside(state) => {
                tracing::warn!(
                    "artifact {} of session {} set aside: {err}",
                    row.path,
                    row.session
                );
                let cmd = ArtifactCmd::Fail {
                    of: row.version(),
                    state,
                    error: err.to_string(),
                };
                let _ = store(&self.writer, cmd).await;
                false
            }
            AfterFailure::StartOver => {
                let cmd = if row.attempts + 1 >= MAX_ATTEMPTS {
                    ArtifactCmd::Fail {
                        of: row.version(),
                        state: state::FAILED,
                        error: format!("gave up after {MAX_ATTEMPTS} attempts: {err}"),
                    }
                } else {
                    ArtifactCmd::Reset {
                        of: row.version(),
                        error: err.to_string(),
                    }
                };
                let _ = store(&self.writer, cmd).await;
                false
            }
            AfterFailure::Stop => self.link.refused(&err, &self.shutdown).await,
            AfterFailure::Retry { after } => {
                tracing::info!("artifact upload of {} failed: {err}", row.path);
                self.link.retry(&err, after, &self.shutdown).await
            }
        }
    }

    /// One attempt at one file: open it, start or resume its upload, send
    /// what the hub lacks, record it done.
    async fn upload(&mut self, row: &ArtifactRow) -> Result<Outcome, SyncError> {
        let Some(file) = self.open(row).await? else {
            return Ok(Outcome::Skipped);
        };
        if !self.unchanged(&file, row)? {
            return self.changed(row, row.upload_url.as_deref()).await;
        }
        let (url, offset) = match self.start(row, &file).await? {
            Start::At { url, offset } => (url, offset),
            Start::Not(outcome) => return Ok(outcome),
        };
        let offset = within(row, offset)?;
        if offset != row.acked {
            let cmd = ArtifactCmd::Progress {
                of: row.version(),
                acked: offset,
            };
            store(&self.writer, cmd).await?;
        }
        if let Some(outcome) = self.send_from(row, &file, &url, offset).await? {
            return Ok(outcome);
        }
        store(&self.writer, ArtifactCmd::Done { of: row.version() }).await?;
        self.stats
            .last_success_ns
            .store(now_ns(), Ordering::Relaxed);
        tracing::info!("artifact {} of session {} uploaded", row.path, row.session);
        Ok(Outcome::Done)
    }

    /// Opens the file safely; `None` when it cannot be (set aside, with
    /// the reason).
    async fn open(&self, row: &ArtifactRow) -> Result<Option<Arc<std::fs::File>>, SyncError> {
        let (r, rel) = (self.dir(row), row.path.clone());
        let opened = tokio::task::spawn_blocking(move || open_inside(&r, &rel))
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?;
        let e = match opened {
            Ok(f) => return Ok(Some(Arc::new(f))),
            Err(e) => e,
        };
        let (st, why) = if e.kind() == std::io::ErrorKind::NotFound {
            (
                state::FAILED,
                "the file disappeared before it was uploaded".to_string(),
            )
        } else {
            (state::REFUSED, format!("cannot open it safely: {e}"))
        };
        tracing::warn!("artifact {}: {why}", row.path);
        let cmd = ArtifactCmd::Fail {
            of: row.version(),
            state: st,
            error: why,
        };
        store(&self.writer, cmd).await?;
        Ok(None)
    }

    /// Resumes the row's upload at the hub's offset (HEAD), or hashes the
    /// file and creates one.
    async fn start(
        &self,
        row: &ArtifactRow,
        file: &Arc<std::fs::File>,
    ) -> Result<Start, SyncError> {
        if let (Some(url), Some(_)) = (&row.upload_url, &row.sha256) {
            if !self.link.at_hub(url) {
                return Ok(Start::Not(self.moved(row).await?));
            }
            return Ok(match self.tus().offset(url).await? {
                Some(offset) => Start::At {
                    url: url.clone(),
                    offset,
                },
                None => Start::Not(self.forgotten(row).await?),
            });
        }
        let f = file.clone();
        let sha = tokio::task::spawn_blocking(move || hash(&f))
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?
            .map_err(|e| SyncError::Local(format!("reading {}: {e}", row.path)))?;
        if !self.unchanged(file, row)? {
            let outcome = self.changed(row, row.upload_url.as_deref()).await?;
            return Ok(Start::Not(outcome));
        }
        let (url, offset) = self
            .tus()
            .create(&NewUpload {
                session_id: &row.session.to_string(),
                path: &row.path,
                content_type: content_type(&row.path),
                sha256: &sha,
                length: row.size,
            })
            .await?;
        let cmd = ArtifactCmd::Started {
            of: row.version(),
            sha256: sha,
            url: url.clone(),
        };
        store(&self.writer, cmd).await?;
        tracing::info!(
            "uploading artifact {} ({} bytes) to {url} from offset {offset}",
            row.path,
            row.size
        );
        Ok(Start::At { url, offset })
    }

    /// Appends the file from `offset` to its end, a chunk at a time, each
    /// at the offset the hub last reported. `Some` when the attempt ended
    /// before the end without an error.
    async fn send_from(
        &mut self,
        row: &ArtifactRow,
        file: &Arc<std::fs::File>,
        url: &str,
        mut offset: u64,
    ) -> Result<Option<Outcome>, SyncError> {
        while offset < row.size {
            if self.shutdown.is_cancelled() {
                return Ok(Some(Outcome::Skipped));
            }
            if !self.link.at_hub(url) {
                return self.moved(row).await.map(Some);
            }
            let Some(chunk) = self.read_chunk(row, file, offset).await? else {
                return self.changed(row, Some(url)).await.map(Some);
            };
            if self.link.share(chunk.len() as u64, &self.shutdown).await {
                return Ok(Some(Outcome::Skipped));
            }
            let appended = match self.tus().append(url, offset, chunk.into()).await {
                Err(SyncError::Status { status, .. })
                    if status.as_u16() == 413 && self.chunk > MIN_CHUNK =>
                {
                    self.chunk = (self.chunk / 2).max(MIN_CHUNK);
                    tracing::info!(
                        "the hub found a chunk too large; sending {} bytes per PATCH",
                        self.chunk
                    );
                    // Where the hub stands after the refused PATCH.
                    Appended::OffsetMismatch
                }
                Err(SyncError::Status { status, .. }) if matches!(status.as_u16(), 404 | 410) => {
                    // The upload expired or was deleted mid-way: start over.
                    return self.forgotten(row).await.map(Some);
                }
                other => other?,
            };
            offset = match appended {
                Appended::Offset(o) => self.acked(row, offset, o).await?,
                // Ask where the hub is rather than guess.
                Appended::OffsetMismatch => match self.tus().offset(url).await? {
                    Some(o) => within(row, o)?,
                    None => return self.forgotten(row).await.map(Some),
                },
            };
        }
        Ok(None)
    }

    /// The next chunk at `offset`; `None` when the file changed (a rewrite
    /// may land between the check and the read, and a shorter file fails
    /// the read: that is a changed file, not a read error to retry).
    async fn read_chunk(
        &self,
        row: &ArtifactRow,
        file: &Arc<std::fs::File>,
        offset: u64,
    ) -> Result<Option<Vec<u8>>, SyncError> {
        if !self.unchanged(file, row)? {
            return Ok(None);
        }
        let n = (row.size - offset).min(self.chunk);
        let f = file.clone();
        let chunk = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; n as usize];
            f.read_exact_at(&mut buf, offset).map(|()| buf)
        })
        .await
        .map_err(|e| SyncError::Local(e.to_string()))?;
        if !self.unchanged(file, row)? {
            return Ok(None);
        }
        chunk
            .map(Some)
            .map_err(|e| SyncError::Local(format!("reading {}: {e}", row.path)))
    }

    /// The hub took a PATCH at `offset` and now holds `o` bytes: count and
    /// commit it. The link made progress, so its backoff starts over.
    async fn acked(&mut self, row: &ArtifactRow, offset: u64, o: u64) -> Result<u64, SyncError> {
        if o <= offset || o > row.size {
            return Err(SyncError::BadResponse(format!(
                "PATCH at {offset} answered with offset {o}"
            )));
        }
        self.link.progressed();
        self.stats
            .bytes_sent
            .fetch_add(o - offset, Ordering::Relaxed);
        self.stats
            .last_success_ns
            .store(now_ns(), Ordering::Relaxed);
        let cmd = ArtifactCmd::Progress {
            of: row.version(),
            acked: o,
        };
        store(&self.writer, cmd).await?;
        Ok(o)
    }

    /// The hub no longer knows the upload (expired or deleted): reset the
    /// row, so the file starts over with a new upload on the next pass.
    async fn forgotten(&self, row: &ArtifactRow) -> Result<Outcome, SyncError> {
        tracing::info!("upload of {} is gone at the hub; starting over", row.path);
        store(
            &self.writer,
            ArtifactCmd::Reset {
                of: row.version(),
                error: "the hub no longer knew the upload; started over".into(),
            },
        )
        .await?;
        Ok(Outcome::Skipped)
    }

    /// A reload moved the uploaders to another hub while this file's
    /// upload was at the old one: reset the row, so the file starts over
    /// at the new hub on the next pass.
    async fn moved(&self, row: &ArtifactRow) -> Result<Outcome, SyncError> {
        tracing::info!(
            "sync.hub changed while {} was uploading; starting over at the new hub",
            row.path
        );
        store(
            &self.writer,
            ArtifactCmd::Reset {
                of: row.version(),
                error: "sync.hub changed during the upload; started over at the new hub".into(),
            },
        )
        .await?;
        Ok(Outcome::Skipped)
    }

    /// True while the open file is still the version the row names.
    fn unchanged(&self, file: &std::fs::File, row: &ArtifactRow) -> Result<bool, SyncError> {
        let meta = file
            .metadata()
            .map_err(|e| SyncError::Local(format!("stat {}: {e}", row.path)))?;
        Ok(meta.len() == row.size && mtime_ns(&meta) == row.mtime_ns)
    }

    /// The file changed since the watcher saw it complete: set this version
    /// aside; the watcher reports the new one once it is complete, which
    /// makes the row pending again.
    async fn changed(&self, row: &ArtifactRow, url: Option<&str>) -> Result<Outcome, SyncError> {
        tracing::info!("artifact {} changed; waiting for the new version", row.path);
        if let Some(url) = url {
            // The hub bounds unfinished uploads per device: free this one.
            // Best effort; a failure leaves only a partial file at the hub.
            if let Err(e) = self.tus().terminate(url).await {
                tracing::debug!("cannot terminate the upload of the old version: {e}");
            }
        }
        store(
            &self.writer,
            ArtifactCmd::Fail {
                of: row.version(),
                state: state::FAILED,
                error: "changed while being uploaded; the new version goes up once complete".into(),
            },
        )
        .await?;
        Ok(Outcome::Skipped)
    }
}

/// `offset` when it lies within the file; an offset past its end is an
/// answer we cannot use.
fn within(row: &ArtifactRow, offset: u64) -> Result<u64, SyncError> {
    if offset > row.size {
        return Err(SyncError::BadResponse(format!(
            "the hub reports offset {offset} past the file's {} bytes",
            row.size
        )));
    }
    Ok(offset)
}

fn hash(file: &std::fs::File) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = file.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(hex::encode(h.finalize()))
}

/// A content type from the extension, for the hub's downloads (which are
/// sandboxed anyway); unknown types are octet streams.
fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match ext.as_deref() {
        Some("txt" | "log") => "text/plain",
        Some("json") => "application/json",
        Some("csv") => "text/csv",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("mp4") => "video/mp4",
        Some("yaml" | "yml") => "application/yaml",
        Some("gz") => "application/gzip",
        Some("zip") => "application/zip",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

    #[test]
    fn each_failure_leads_to_its_step() {
        let check = |code: u16, retry_after: Option<u64>, want: AfterFailure| {
            let e = SyncError::Status {
                status: StatusCode::from_u16(code).unwrap(),
                message: String::new(),
                retry_after: retry_after.map(Duration::from_secs),
            };
            assert_eq!(after_failure(&e), want, "{code}");
        };
        let retry = AfterFailure::Retry { after: None };
        check(400, None, AfterFailure::SetAside("refused"));
        check(404, None, AfterFailure::SetAside("refused"));
        check(413, None, AfterFailure::SetAside("failed"));
        check(409, None, retry);
        check(423, None, retry);
        check(460, None, AfterFailure::StartOver);
        check(401, None, AfterFailure::Stop);
        check(403, None, AfterFailure::Stop);
        check(408, None, retry);
        check(500, None, retry);
        let after = Some(Duration::from_secs(3));
        check(429, Some(3), AfterFailure::Retry { after });
        check(503, Some(3), AfterFailure::Retry { after });
        let unreadable = SyncError::BadResponse("no Upload-Offset".into());
        assert_eq!(after_failure(&unreadable), AfterFailure::StartOver);
        let local = SyncError::Local("reading a.txt: EIO".into());
        assert_eq!(after_failure(&local), retry);
    }

    #[test]
    fn content_types() {
        let check = |p: &str, want: &str| assert_eq!(content_type(p), want, "{p}");
        check("notes.txt", "text/plain");
        check("cam/frame.PNG", "image/png");
        check("run.mcap", "application/octet-stream");
        check("noext", "application/octet-stream");
    }
}
