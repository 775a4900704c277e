//! The artifact uploader: takes the smallest pending file from the store
//! once the logs are not behind, hashes it (SHA-256 of the whole file),
//! creates a tus upload or asks an existing one for its offset (HEAD), and
//! appends chunks, committing the acknowledged offset after each. Errors
//! follow the design's classes: transient ones back off (cut short by a TCP
//! probe when the hub was unreachable), 401/403 stop uploads, and a file the
//! hub will never take is set aside with the hub's reason.
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
use crate::agent::sync::backoff::Backoff;
use crate::agent::sync::error::{Action, SyncError};
use crate::agent::sync::throttle::Throttle;
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
/// Period of the TCP probe while backing off from an unreachable hub.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// Idle poll, in case a wake-up was missed.
const IDLE_POLL: Duration = Duration::from_secs(2);

struct Uploader {
    cfg: Arc<ArtifactsConfig>,
    reader: Arc<Reader>,
    writer: mpsc::Sender<Msg>,
    stats: Arc<ArtifactStats>,
    tus: TusClient,
    /// Shared with the batch uploader: one cap for logs and artifacts.
    throttle: Arc<Throttle>,
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

pub async fn run(
    cfg: Arc<ArtifactsConfig>,
    reader: Arc<Reader>,
    writer: mpsc::Sender<Msg>,
    store_stats: Arc<Stats>,
    stats: Arc<ArtifactStats>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        // A dead link must not hold a PATCH forever; a chunk at a slow
        // rate still fits (the throttle waits before sending, not during).
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("logbookd/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(h) => h,
        Err(e) => {
            tracing::error!("artifact uploads disabled: cannot build an HTTP client: {e}");
            stats.set_error(Some(e.to_string()));
            return;
        }
    };
    // The device token: read now, and again whenever a SIGHUP brings a new
    // one (checked before each file, and awaited after a 401/403).
    let mut token = cfg.token.clone();
    let mut used = token.borrow_and_update().clone();
    let tus = match TusClient::new(http.clone(), &cfg.hub, &used) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("artifact uploads disabled: {e}");
            stats.set_error(Some(e.to_string()));
            return;
        }
    };
    let probe = probe_addr(&cfg.hub);
    let mut up = Uploader {
        throttle: cfg.throttle.clone(),
        chunk: cfg.chunk_bytes,
        cfg: cfg.clone(),
        reader,
        writer,
        stats: stats.clone(),
        tus,
        shutdown: shutdown.clone(),
    };
    let mut backoff = Backoff::new(Duration::from_millis(250), cfg.retry_max);
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let now = token.borrow_and_update().clone();
        if now != used {
            match TusClient::new(http.clone(), &cfg.hub, &now) {
                Ok(t) => {
                    up.tus = t;
                    used = now;
                    stats.auth_failed.store(false, Ordering::Relaxed);
                    tracing::info!("artifact uploads use the new device token");
                }
                Err(e) => {
                    // Counted as seen, so a 401 waits for the next one.
                    tracing::error!("cannot use the new device token: {e}");
                    used = now;
                }
            }
        }
        let r = up.reader.clone();
        let next = match tokio::task::spawn_blocking(move || r.next_artifact()).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                tracing::warn!("cannot read artifact state: {e}");
                None
            }
            Err(_) => None,
        };
        let Some(row) = next else {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            continue;
        };
        wait_for_logs(&store_stats, &shutdown).await;
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = up.upload(&row) => r,
        };
        let err = match result {
            Ok(Outcome::Done) => {
                backoff.reset();
                stats.backoff_ms.store(0, Ordering::Relaxed);
                stats.set_error(None);
                continue;
            }
            Ok(Outcome::Skipped) => continue,
            Err(e) => e,
        };
        stats.set_error(Some(format!("{}: {err}", row.path)));
        if let Some(state) = give_up_state(&err) {
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
            let _ = store(&up.writer, cmd).await;
            continue;
        }
        if is_checksum_mismatch(&err) || matches!(&err, SyncError::BadResponse(_)) {
            // The file changed between hashing and reading, or the upload is
            // in a state we cannot read: start this version over, a bounded
            // number of times.
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
            let _ = store(&up.writer, cmd).await;
            continue;
        }
        match err.action() {
            Action::Stop => {
                stats.auth_failed.store(true, Ordering::Relaxed);
                // A token that arrived during the request is tried at once;
                // otherwise wait for the next one (the loop's top uses it).
                if *token.borrow() == used {
                    tracing::error!(
                        "the hub refuses this device's token ({err}); artifact uploads stopped until \
                         sync.token is fixed and logbookd reloaded (SIGHUP)"
                    );
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        r = token.changed() => if r.is_err() {
                            shutdown.cancelled().await;
                            return;
                        },
                    }
                }
            }
            _ => {
                let after = match err.action() {
                    Action::Retry { after } => after,
                    _ => None,
                };
                let delay = backoff.next_delay(after);
                stats
                    .backoff_ms
                    .store(delay.as_millis().max(1) as u64, Ordering::Relaxed);
                tracing::info!(
                    "artifact upload of {} failed ({err}); retrying in {delay:.1?}",
                    row.path
                );
                let probing = err.is_offline() && after.is_none();
                wait_retry(
                    delay,
                    probing.then_some(probe.as_deref()).flatten(),
                    &shutdown,
                )
                .await;
                stats.backoff_ms.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// The state a file is set aside in for errors retrying cannot fix.
fn give_up_state(err: &SyncError) -> Option<&'static str> {
    let SyncError::Status { status, .. } = err else {
        return None;
    };
    match status.as_u16() {
        // Locked (another PATCH still running at the hub) and conflicts are
        // transient for uploads.
        409 | 423 => None,
        460 => None,
        // Too large for the hub: retrying or splitting cannot help a file.
        413 => Some(state::FAILED),
        401 | 403 | 408 | 429 => None,
        400..=499 => Some(state::REFUSED),
        _ => None,
    }
}

fn is_checksum_mismatch(err: &SyncError) -> bool {
    matches!(err, SyncError::Status { status, .. } if status.as_u16() == 460)
}

/// `host:port` of the hub, for the reachability probe.
fn probe_addr(hub: &str) -> Option<String> {
    let url = reqwest::Url::parse(hub).ok()?;
    Some(format!(
        "{}:{}",
        url.host_str()?,
        url.port_or_known_default()?
    ))
}

/// Waits `delay`, or less: with `probe`, a TCP connect every couple of
/// seconds ends the wait as soon as the hub accepts connections again, so a
/// long outage does not leave uploads waiting out the full backoff.
async fn wait_retry(delay: Duration, probe: Option<&str>, shutdown: &CancellationToken) {
    let end = tokio::time::Instant::now() + delay;
    loop {
        let step = end
            .saturating_duration_since(tokio::time::Instant::now())
            .min(if probe.is_some() { PROBE_EVERY } else { delay });
        if step.is_zero() {
            return;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(step) => {}
        }
        if let Some(addr) = probe {
            let connect = tokio::net::TcpStream::connect(addr);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), connect).await {
                return;
            }
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

    async fn upload(&mut self, row: &ArtifactRow) -> Result<Outcome, SyncError> {
        let root = self.dir(row);
        let (r, rel) = (root.clone(), row.path.clone());
        let opened = tokio::task::spawn_blocking(move || open_inside(&r, &rel))
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?;
        let file = match opened {
            Ok(f) => Arc::new(f),
            Err(e) => {
                let (st, why) = if e.kind() == std::io::ErrorKind::NotFound {
                    (
                        state::FAILED,
                        "the file disappeared before it was uploaded".to_string(),
                    )
                } else {
                    (state::REFUSED, format!("cannot open it safely: {e}"))
                };
                tracing::warn!("artifact {}: {why}", row.path);
                store(
                    &self.writer,
                    ArtifactCmd::Fail {
                        of: row.version(),
                        state: st,
                        error: why,
                    },
                )
                .await?;
                return Ok(Outcome::Skipped);
            }
        };
        if !self.unchanged(&file, row)? {
            return self.changed(row, row.upload_url.as_deref()).await;
        }
        let (url, mut offset) = match (&row.upload_url, &row.sha256) {
            (Some(url), Some(_)) => match self.tus.offset(url).await? {
                Some(o) => (url.clone(), o),
                None => return self.forgotten(row).await,
            },
            _ => {
                let f = file.clone();
                let sha = tokio::task::spawn_blocking(move || hash(&f))
                    .await
                    .map_err(|e| SyncError::Local(e.to_string()))?
                    .map_err(|e| SyncError::Local(format!("reading {}: {e}", row.path)))?;
                if !self.unchanged(&file, row)? {
                    return self.changed(row, row.upload_url.as_deref()).await;
                }
                let (url, offset) = self
                    .tus
                    .create(&NewUpload {
                        session_id: &row.session.to_string(),
                        path: &row.path,
                        content_type: content_type(&row.path),
                        sha256: &sha,
                        length: row.size,
                    })
                    .await?;
                store(
                    &self.writer,
                    ArtifactCmd::Started {
                        of: row.version(),
                        sha256: sha,
                        url: url.clone(),
                    },
                )
                .await?;
                tracing::info!(
                    "uploading artifact {} ({} bytes) to {url} from offset {offset}",
                    row.path,
                    row.size
                );
                (url, offset)
            }
        };
        if offset > row.size {
            return Err(SyncError::BadResponse(format!(
                "the hub reports offset {offset} past the file's {} bytes",
                row.size
            )));
        }
        if offset != row.acked {
            store(
                &self.writer,
                ArtifactCmd::Progress {
                    of: row.version(),
                    acked: offset,
                },
            )
            .await?;
        }
        while offset < row.size {
            if self.shutdown.is_cancelled() {
                return Ok(Outcome::Skipped);
            }
            if !self.unchanged(&file, row)? {
                return self.changed(row, Some(&url)).await;
            }
            let n = (row.size - offset).min(self.chunk);
            let f = file.clone();
            let chunk = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n as usize];
                f.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .map_err(|e| SyncError::Local(e.to_string()))?;
            // A rewrite may land between the check above and the read (a
            // shorter file fails the read): that is a changed file, not a
            // read error to retry.
            if !self.unchanged(&file, row)? {
                return self.changed(row, Some(&url)).await;
            }
            let chunk =
                chunk.map_err(|e| SyncError::Local(format!("reading {}: {e}", row.path)))?;
            self.throttle.take(n).await;
            let appended = match self
                .tus
                .append(&url, offset, bytes::Bytes::from(chunk))
                .await
            {
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
                    return self.forgotten(row).await;
                }
                other => other?,
            };
            match appended {
                Appended::Offset(o) => {
                    if o <= offset || o > row.size {
                        return Err(SyncError::BadResponse(format!(
                            "PATCH at {offset} answered with offset {o}"
                        )));
                    }
                    self.stats
                        .bytes_sent
                        .fetch_add(o - offset, Ordering::Relaxed);
                    self.stats
                        .last_success_ns
                        .store(now_ns(), Ordering::Relaxed);
                    offset = o;
                    store(
                        &self.writer,
                        ArtifactCmd::Progress {
                            of: row.version(),
                            acked: offset,
                        },
                    )
                    .await?;
                }
                Appended::OffsetMismatch => {
                    // Ask where the hub is rather than guess.
                    offset = match self.tus.offset(&url).await? {
                        Some(o) if o <= row.size => o,
                        Some(o) => {
                            return Err(SyncError::BadResponse(format!(
                                "the hub reports offset {o} past the file's {} bytes",
                                row.size
                            )))
                        }
                        None => return self.forgotten(row).await,
                    };
                }
            }
        }
        store(&self.writer, ArtifactCmd::Done { of: row.version() }).await?;
        self.stats
            .last_success_ns
            .store(now_ns(), Ordering::Relaxed);
        tracing::info!("artifact {} of session {} uploaded", row.path, row.session);
        Ok(Outcome::Done)
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
            if let Err(e) = self.tus.terminate(url).await {
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
    fn errors_the_hub_will_repeat_set_the_file_aside() {
        let check = |code: u16, want: Option<&str>| {
            let e = SyncError::Status {
                status: StatusCode::from_u16(code).unwrap(),
                message: String::new(),
                retry_after: None,
            };
            assert_eq!(give_up_state(&e), want, "{code}");
        };
        check(400, Some("refused"));
        check(404, Some("refused"));
        check(413, Some("failed"));
        check(409, None);
        check(423, None);
        check(460, None);
        check(401, None);
        check(429, None);
        check(503, None);
    }

    #[test]
    fn content_types() {
        let check = |p: &str, want: &str| assert_eq!(content_type(p), want, "{p}");
        check("notes.txt", "text/plain");
        check("cam/frame.PNG", "image/png");
        check("run.mcap", "application/octet-stream");
        check("noext", "application/octet-stream");
    }

    #[test]
    fn probe_address_from_the_hub_url() {
        assert_eq!(
            probe_addr("http://127.0.0.1:9000").as_deref(),
            Some("127.0.0.1:9000")
        );
        assert_eq!(
            probe_addr("https://hub.example").as_deref(),
            Some("hub.example:443")
        );
        assert_eq!(probe_addr("nonsense"), None);
    }
}
