//! The batch uploader: reads what the hub has not acknowledged (session
//! revisions first, then records — errors and fatals first when behind —
//! then gap counters), packs a `wire::Batch`, compresses it, POSTs it with the
//! device token, and marks synced exactly what the hub's `BatchAck` says,
//! through the writer. A supervisor restarts it when it stops making
//! progress.
//!
//! It is a pipeline: while a full batch is in flight, the next one is read,
//! packed and compressed on a blocking thread, leaving out what is in flight and
//! what the writer is still marking; it is sent as soon as the hub acks the
//! one before, and discarded if that one fails. The writer marks an ack while
//! the next batch is already on the wire.
//!
//! Invariant: nothing is marked synced that the hub did not acknowledge
//! (or refuse for good, which becomes a `rejected` gap); the uploader never
//! writes SQLite itself. At most one request is in flight and at most one
//! acknowledgement is outstanding at the writer; a batch read while an
//! acknowledgement is outstanding leaves its records out, and when the writer
//! reports that it could not record one, the scan starts again from the first
//! unsynced record (so nothing waits for a restart to be resent).

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::header::{CONTENT_ENCODING, CONTENT_TYPE};
use reqwest::Method;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::error::{Action, SyncError, BATCH_ENCODING, BODY_CODING};
use super::link::{Link, LinkConfig};
use super::status::SyncShared;
use super::throttle::Throttle;
use crate::agent::config::SyncConfig;
use crate::agent::store::marks::Window;
use crate::agent::store::sync::{Acked, PendingRecord, SetAside, SyncReader};
use crate::agent::store::writer::Msg;
use crate::agent::store::{now_ns, Stats, StoreError};
use crate::wire::{
    AgentReport, Batch, BatchAck, Coding, Device, BATCHES_PATH, BATCH_VERSION, CONTENT_TYPE_MSGPACK,
};

/// gzip level of batch bodies. Measured on a batch of 20,000 robot log
/// lines (flate2 miniz, release; v1 msgpack 3.1 MB): level 6 140 ms ->
/// 566 KB; level 3 52 ms -> 612 KB (2.7x faster, 8% larger); level 1 22 ms
/// -> 709 KB. On batch v2, level 3 still sends under 1/9 of the bytes of
/// JSON lines (see `examples/wire_bench.rs`), and encoding is the drain's
/// CPU on a robot's small core.
const GZIP_LEVEL: i32 = 3;
/// zstd level of batch bodies, once the hub reads zstd: see
/// `examples/wire_bench.rs` for the bytes and CPU of each level.
const ZSTD_LEVEL: i32 = 3;
/// A batch packed longer ago than this (it waited for the bandwidth cap) is
/// stamped with the robot's clock and packed again before it is sent.
const RESTAMP_AFTER_NS: i64 = 1_000_000_000;
/// Most session states in one batch.
const MAX_SESSIONS: usize = 100;
/// An idle uploader still posts an empty batch this often, so the hub
/// knows the device is alive (and its clock skew) and the link state is
/// fresh.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Longest one post may take, body and answer: a batch is at most
/// `sync.batch_bytes` and goes once the bandwidth cap lets it.
const POST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest acknowledgement body read from the hub.
const MAX_ACK_BYTES: usize = 1 << 20;

/// Everything an uploader needs; shared by its restarts.
pub struct UploaderCtx {
    pub cfg: SyncConfig,
    pub device: Device,
    pub db_path: std::path::PathBuf,
    pub boot_id: String,
    pub writer: mpsc::Sender<Msg>,
    pub stats: Arc<Stats>,
    pub shared: Arc<SyncShared>,
    /// `sync.max_bytes_per_sec`, shared with the artifact uploader.
    pub throttle: Arc<Throttle>,
    /// `buffer.max_bytes`, for the report each batch carries.
    pub buffer_max_bytes: u64,
    /// `buffer.commit_interval`: how far apart the writer commits under
    /// steady logging (see [`linger`]).
    pub commit_interval: Duration,
}

/// Runs the uploader under its supervisor until `shutdown`.
pub async fn run(ctx: Arc<UploaderCtx>, shutdown: CancellationToken) {
    // A hub URL the link cannot use fails the same way on every restart.
    if let Err(e) = batch_link(&ctx) {
        tracing::error!("batch uploads disabled: {e}");
        ctx.shared.set_error(Some(e.to_string()));
        return;
    }
    let stall = ctx.cfg.stall_timeout;
    let shared = ctx.shared.clone();
    supervise(
        move || {
            let ctx = ctx.clone();
            let shutdown = shutdown.clone();
            async move {
                match Uploader::new(ctx) {
                    Ok(up) => up.run(shutdown).await,
                    Err(e) => Done::Restart(e.to_string()),
                }
            }
        },
        shared,
        stall,
    )
    .await
}

/// The batch uploader's link: `sync.retry_*`, the hub URL and device
/// token of `SyncShared` (reloaded on SIGHUP), which also shows its state.
fn batch_link(ctx: &UploaderCtx) -> Result<Link, SyncError> {
    let cfg = LinkConfig {
        retry_min: ctx.cfg.retry_min,
        retry_max: ctx.cfg.retry_max,
    };
    Link::new(
        "batch upload",
        &cfg,
        ctx.shared.remote_updates(),
        ctx.throttle.clone(),
        ctx.shared.clone(),
    )
}

/// Keeps one uploader running: restarts it when it returns early (a
/// panic, or an error it could not handle) or when its heartbeat stops for
/// `stall`, and counts every restart.
pub async fn supervise<F, Fut>(make: F, shared: Arc<SyncShared>, stall: Duration)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Done> + Send + 'static,
{
    let check = (stall / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let mut task = tokio::spawn(make());
        let mut last_beat = shared.heartbeat.load(Ordering::Relaxed);
        let mut last_change = tokio::time::Instant::now();
        let why = loop {
            tokio::select! {
                res = &mut task => match res {
                    Ok(Done::Shutdown) => return,
                    Ok(Done::Restart(why)) => break why,
                    Err(e) => break format!("the uploader crashed: {e}"),
                },
                _ = tokio::time::sleep(check) => {
                    let beat = shared.heartbeat.load(Ordering::Relaxed);
                    if beat != last_beat {
                        last_beat = beat;
                        last_change = tokio::time::Instant::now();
                    } else if last_change.elapsed() >= stall {
                        task.abort();
                        break format!("the uploader made no progress for {stall:?}");
                    }
                }
            }
        };
        shared.restarts.fetch_add(1, Ordering::Relaxed);
        tracing::error!("{why}; restarting it");
        shared.set_error(Some(why));
        // A crash loop must not spin.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How an uploader run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Done {
    Shutdown,
    Restart(String),
}

/// How far a record's own time may lie from when it was received and still
/// go up first with its marked window: windows are found among seqs by
/// time ([`SyncReader::seq_at_time`]), so a record stamped further off goes
/// with the rest of the backlog (eviction still keeps it).
const WINDOW_SLACK_NS: i64 = 10_000_000_000;
/// Most failed sessions whose records one batch reads first.
const FAILED_SESSIONS: usize = 16;
/// A window cursor past everything the window will ever hold.
const DONE: u64 = u64::MAX;

/// Where the reads of the next batch start. While behind, a batch is filled
/// in this order (README "Marks", sent first): the records of marked
/// windows (high priority first, the newest window first), errors and
/// fatals, the records of failed sessions (the newest session first), the
/// fresh run (after an outage), then the backlog in seq order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Scan {
    /// Where the in-order scan of unsynced records starts; `None`: at the
    /// first unsynced record (looked up).
    cursor: Option<u64>,
    /// Errors and fatals at or below this seq were sent (or are in flight).
    urgent_from: u64,
    /// Where the next read of each marked window starts (`DONE`: all of a
    /// closed window was read). Sorted by window. (Sorted vectors, not
    /// maps: the robot's binary carries less code.)
    windows: Vec<(Window, u64)>,
    /// Where the next read of each failed session (pk) starts.
    failed: Vec<(i64, u64)>,
    /// After an outage with a backlog, the newest records go first, then
    /// what arrives after them, while the backlog fills in behind: (the
    /// first seq of that fresh run, where its next read starts). The
    /// in-order scan stops below the first and goes on from the second
    /// once it gets there.
    fresh: Option<(u64, u64)>,
}

/// One batch under way, with what the writer needs to mark it.
struct Work {
    batch: Batch,
    acked: Acked,
    records: Vec<(u64, i64, crate::wire::Level)>,
    /// The scan this batch was read from (its cursor looked up).
    start: Scan,
    /// The scan after this batch, once the hub has acked all of it.
    next: Scan,
    /// The batch closed on count or bytes (rather than on what there was):
    /// its reads stopped at a limit, so more is waiting.
    full: bool,
}

/// A batch packed for the wire.
struct Ready {
    work: Work,
    body: Vec<u8>,
    coding: Coding,
    raw_len: usize,
    read_time: Duration,
    encode_time: Duration,
}

/// What the writer said about the acknowledgement it was marking.
#[derive(Debug, PartialEq, Eq)]
enum Settled {
    Ok,
    /// It could not record it: those records are pending again.
    Failed,
    WriterGone,
}

impl Work {
    fn is_empty(&self) -> bool {
        self.batch.sessions.is_empty()
            && self.batch.records.is_empty()
            && self.batch.gaps.is_empty()
            // Marks alone are work only for a hub that reads them.
            && (self.batch.marks.is_empty() || BATCH_ENCODING.version() < 3)
    }
}

struct Uploader {
    ctx: Arc<UploaderCtx>,
    /// Client, token, backoff, probe and the bandwidth share; its state
    /// shows in `SyncShared`.
    link: Link,
    /// Held between batches; a Mutex only so `&Uploader` is `Send` across
    /// awaits (one task uses it).
    reader: std::sync::Mutex<Option<SyncReader>>,
    /// Where the next batch's reads start.
    scan: Scan,
    /// The next batch, read and packed while the previous one was in flight.
    prefetched: Option<Ready>,
    /// Records per batch after 413s and 400s (halved to isolate a poisoned
    /// record; grows back after successes).
    limit: usize,
    /// When the batch that is filling is due: `sync.linger` after its
    /// first records reached the writer (or earlier, see [`linger`]).
    due_at: Option<tokio::time::Instant>,
    last_post: Option<Instant>,
    /// The last acknowledgement handed to the writer and not yet committed
    /// (its reply, and its seq ranges): the next batch is read and sent
    /// while the writer marks the previous one, and leaves these out.
    marking: Option<Marking>,
    /// The next batch read starts a fresh run if it finds a backlog: set
    /// at start and when the link fails (see [`Scan::fresh`]).
    fresh_due: bool,
}

/// An acknowledgement in the writer's hands: its reply and its seq ranges.
type Marking = (oneshot::Receiver<Result<u64, String>>, Vec<(u64, u64)>);

/// What the next turn of the loop does.
enum Turn {
    Send(Box<Ready>),
    /// Nothing to send yet (lingering, idle, a failed read): look again.
    Again,
    Shutdown,
}

/// How long each stage of one batch took, for the debug log.
struct Timing {
    read: Duration,
    encode: Duration,
    post: Duration,
}

impl Uploader {
    fn new(ctx: Arc<UploaderCtx>) -> Result<Uploader, SyncError> {
        let link = batch_link(&ctx)?;
        Ok(Uploader {
            link,
            limit: ctx.cfg.batch_records,
            reader: std::sync::Mutex::new(None),
            scan: Scan::default(),
            prefetched: None,
            due_at: None,
            last_post: None,
            marking: None,
            fresh_due: true,
            ctx,
        })
    }

    async fn run(mut self, shutdown: CancellationToken) -> Done {
        loop {
            self.ctx.shared.beat();
            if shutdown.is_cancelled() {
                return Done::Shutdown;
            }
            let ready = match self.prefetched.take() {
                Some(r) => {
                    self.scan = r.work.start.clone();
                    r
                }
                None => match self.next_batch(&shutdown).await {
                    Turn::Send(r) => *r,
                    Turn::Again => continue,
                    Turn::Shutdown => return Done::Shutdown,
                },
            };
            match self.send(ready, &shutdown).await {
                Step::Next => {}
                Step::Shutdown => return Done::Shutdown,
                Step::WriterGone => {
                    // The writer only goes away at shutdown.
                    shutdown.cancelled().await;
                    return Done::Shutdown;
                }
            }
        }
    }

    /// Reads and packs the next batch once it is due: full, lingered long
    /// enough, or an idle heartbeat. Waits for new input when there is
    /// nothing to send.
    async fn next_batch(&mut self, shutdown: &CancellationToken) -> Turn {
        let gather_start = Instant::now();
        let work = match self.gather().await {
            Ok(w) => w,
            Err(e) => {
                tracing::error!("reading pending sync work failed: {e}");
                *self.reader.lock().expect("reader lock") = None;
                return match sleep_or_cancel(Duration::from_secs(1), shutdown).await {
                    true => Turn::Shutdown,
                    false => Turn::Again,
                };
            }
        };
        let heartbeat_due = self.last_post.is_none_or(|t| t.elapsed() >= HEARTBEAT);
        if work.is_empty() && !heartbeat_due {
            return self.idle(shutdown).await;
        }
        if !work.is_empty() && !work.full {
            // Let a batch fill for up to `linger` after its first records
            // came in.
            let due = self
                .due_at
                .unwrap_or_else(|| self.first_pending() + self.ctx.cfg.linger);
            self.due_at = Some(due);
            if tokio::time::Instant::now() < due {
                let (committed, every) =
                    (&self.ctx.stats.committed_notify, self.ctx.commit_interval);
                let Some(due) = linger(due, every, committed, shutdown).await else {
                    return Turn::Shutdown;
                };
                self.due_at = Some(due);
                return Turn::Again;
            }
        }
        let read_time = gather_start.elapsed();
        match tokio::task::spawn_blocking(move || encode(work, read_time)).await {
            Ok(r) => Turn::Send(Box::new(r)),
            Err(e) => {
                tracing::error!("packing a batch failed: {e}");
                Turn::Again
            }
        }
    }

    /// When the records just found began to come in: the start of the last
    /// transaction that committed records (they were found after it), or
    /// now if none is known.
    fn first_pending(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let began = *self
            .ctx
            .stats
            .records_began
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        began.map_or(now, |b| tokio::time::Instant::from_std(b).min(now))
    }

    /// Nothing to send: hears the writer out (so a failed marking brings
    /// its records back now), then waits for a commit (the writer wakes it
    /// after every one, a wake-up kept if it is not waiting yet), the next
    /// heartbeat, or a quarter of the stall timeout (the supervisor's
    /// watch), whichever comes first: an idle agent does not poll
    /// (BENCHMARKS.md, "Idle").
    async fn idle(&mut self, shutdown: &CancellationToken) -> Turn {
        self.due_at = None;
        match self.settle_marking().await {
            Settled::Ok => {}
            Settled::Failed => return Turn::Again,
            Settled::WriterGone => {
                shutdown.cancelled().await;
                return Turn::Shutdown;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => Turn::Shutdown,
            _ = self.ctx.stats.committed_notify.notified() => Turn::Again,
            _ = tokio::time::sleep(self.idle_nap()) => Turn::Again,
        }
    }

    /// How long [`Self::idle`] waits for a commit: until the heartbeat is
    /// due, at most a quarter of the stall timeout.
    fn idle_nap(&self) -> Duration {
        let to_heartbeat = self
            .last_post
            .map_or(Duration::ZERO, |t| HEARTBEAT.saturating_sub(t.elapsed()));
        to_heartbeat
            .min(self.ctx.cfg.stall_timeout / 4)
            .max(Duration::from_millis(10))
    }

    /// Takes the held read connection, or opens one.
    async fn take_reader(&self) -> Result<SyncReader, StoreError> {
        let held = self.reader.lock().expect("reader lock").take();
        match held {
            Some(r) if r.is_current(&self.ctx.db_path) => Ok(r),
            _ => {
                let (path, boot) = (self.ctx.db_path.clone(), self.ctx.boot_id.clone());
                tokio::task::spawn_blocking(move || SyncReader::open(&path, &boot))
                    .await
                    .map_err(join_err)?
            }
        }
    }

    /// What the next batch is read with: the scan `scan`, leaving out the
    /// ranges being marked and `in_flight`.
    fn plan(&self, scan: Scan, in_flight: &[(u64, u64)], fresh_due: bool) -> Plan {
        let stats = &self.ctx.stats;
        let unsynced = (stats.records_stored.load(Ordering::Relaxed)
            - stats.records_synced.load(Ordering::Relaxed))
        .max(0) as usize;
        let mut skip: Vec<(u64, u64)> = self
            .marking
            .as_ref()
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        skip.extend_from_slice(in_flight);
        Plan {
            deletions: stats.deletions.load(Ordering::SeqCst),
            device: self.ctx.device.clone(),
            scan,
            unsynced,
            limit: self.limit,
            max_bytes: self.ctx.cfg.batch_bytes,
            skip,
            agent: report(stats, self.ctx.buffer_max_bytes),
            now_ns: now_ns(),
            fresh_due,
        }
    }

    /// Reads the next batch on a blocking thread.
    async fn gather(&mut self) -> Result<Work, StoreError> {
        let reader = self.take_reader().await?;
        let plan = self.plan(self.scan.clone(), &[], self.fresh_due);
        self.fresh_due = false;
        let (reader, work) = tokio::task::spawn_blocking(move || {
            let out = build(&reader, plan);
            out.map(|w| (reader, w))
        })
        .await
        .map_err(join_err)??;
        *self.reader.lock().expect("reader lock") = Some(reader);
        self.scan = work.start.clone();
        Ok(work)
    }

    /// Sends one batch and acts on the hub's answer: waits for the
    /// bandwidth share, posts (reading the next batch meanwhile when this
    /// one is full), then marks what was acked or handles the failure.
    async fn send(&mut self, ready: Ready, shutdown: &CancellationToken) -> Step {
        let body_len = ready.body.len() as u64;
        if self.link.share(body_len, shutdown).await {
            return Step::Shutdown;
        }
        let Some(ready) = restamped(ready).await else {
            return Step::Next;
        };
        let Ready {
            work,
            body,
            coding,
            raw_len,
            read_time,
            encode_time,
        } = ready;
        let post_start = Instant::now();
        self.ctx.shared.beat();
        // The hub as it is now: a reload may have moved it.
        let url = self.link.endpoint(BATCHES_PATH);
        let request = self
            .link
            .request(Method::POST, &url)
            .timeout(POST_TIMEOUT)
            .header(CONTENT_TYPE, CONTENT_TYPE_MSGPACK)
            .header(CONTENT_ENCODING, coding.as_str())
            .body(body);
        let read_ahead = self.read_ahead(&work).await;
        let (result, read_ahead) = tokio::select! {
            _ = shutdown.cancelled() => return Step::Shutdown,
            r = async { tokio::join!(post(request), read_ahead) } => r,
        };
        let prefetched = self.keep_read_ahead(read_ahead);
        self.last_post = Some(Instant::now());
        let timing = Timing {
            read: read_time,
            encode: encode_time,
            post: post_start.elapsed(),
        };
        match result {
            Ok(ack) => {
                let sizes = (body_len, raw_len as u64);
                self.acknowledged(work, ack, prefetched, sizes, timing)
                    .await
            }
            Err(e) => self.failed(work, coding, e, shutdown).await,
        }
    }

    /// A full batch says a backlog is draining: starts reading and packing
    /// the next one (leaving out this one's records) to run while this one
    /// is on the wire.
    async fn read_ahead(&self, work: &Work) -> impl Future<Output = Option<ReadAhead>> {
        let handle = if work.full {
            match self.take_reader().await {
                Ok(reader) => {
                    let sent = crate::wire::seq_ranges(work.records.iter().map(|r| r.0));
                    let plan = self.plan(work.next.clone(), &sent, false);
                    Some(tokio::task::spawn_blocking(move || {
                        let start = Instant::now();
                        let out = build(&reader, plan);
                        let read_time = start.elapsed();
                        (reader, out.map(|w| w.full.then(|| encode(w, read_time))))
                    }))
                }
                Err(e) => {
                    tracing::warn!("cannot read ahead: {e}");
                    None
                }
            }
        } else {
            None
        };
        async move {
            match handle {
                Some(h) => h.await.ok(),
                None => None,
            }
        }
    }

    /// Takes the read connection back from a read-ahead, and its batch.
    fn keep_read_ahead(&self, read_ahead: Option<ReadAhead>) -> Option<Ready> {
        let (reader, out) = read_ahead?;
        *self.reader.lock().expect("reader lock") = Some(reader);
        out.unwrap_or_else(|e| {
            tracing::warn!("reading ahead failed: {e}");
            None
        })
    }

    /// The hub answered with a `BatchAck`: hands exactly the acked seqs
    /// this batch carried to the writer and moves the scan on.
    async fn acknowledged(
        &mut self,
        mut work: Work,
        ack: BatchAck,
        prefetched: Option<Ready>,
        (body_len, raw_len): (u64, u64),
        timing: Timing,
    ) -> Step {
        let mut acked = std::mem::take(&mut work.acked);
        // Only what this batch carried is marked, whatever else the hub's
        // ranges may span.
        let mut ranges = ack.acked.clone();
        ranges.sort_unstable();
        acked.records = crate::wire::seq_ranges(
            work.records
                .iter()
                .map(|r| r.0)
                .filter(|seq| covered(&ranges, *seq)),
        );
        let acked_all = acked
            .records
            .iter()
            .map(|(lo, hi)| hi - lo + 1)
            .sum::<u64>();
        // The scan moves past this batch only if all of it was acked;
        // otherwise start again from the first unsynced record, and the
        // batch read ahead (which assumed it) goes.
        let all = acked_all == work.records.len() as u64;
        let mark_start = Instant::now();
        let mut keep = all;
        self.scan = if all { work.next } else { Scan::default() };
        if !self.hand_over(acked, &mut keep).await {
            return Step::WriterGone;
        }
        if keep {
            self.prefetched = prefetched;
        }
        let mark_time = mark_start.elapsed();
        self.link.progressed();
        let shared = &self.ctx.shared;
        shared.set_error(None);
        shared.last_success_ns.store(now_ns(), Ordering::Relaxed);
        shared.bytes_sent.fetch_add(body_len, Ordering::Relaxed);
        shared.bytes_raw.fetch_add(raw_len, Ordering::Relaxed);
        shared.batches_sent.fetch_add(1, Ordering::Relaxed);
        shared.records_sent.fetch_add(acked_all, Ordering::Relaxed);
        self.due_at = None;
        if self.limit < self.ctx.cfg.batch_records {
            self.limit = (self.limit * 2).min(self.ctx.cfg.batch_records);
        }
        tracing::debug!(
            records = work.batch.records.len(),
            stored = ack.stored,
            duplicates = ack.duplicates,
            bytes = body_len,
            read_ms = timing.read.as_millis() as u64,
            encode_ms = timing.encode.as_millis() as u64,
            post_ms = timing.post.as_millis() as u64,
            mark_ms = mark_time.as_millis() as u64,
            "batch acknowledged"
        );
        Step::Next
    }

    /// The post failed: counts it, then does what its class says.
    async fn failed(
        &mut self,
        work: Work,
        coding: Coding,
        e: SyncError,
        shutdown: &CancellationToken,
    ) -> Step {
        let shared = &self.ctx.shared;
        shared.failures.fetch_add(1, Ordering::Relaxed);
        shared.set_error(Some(e.to_string()));
        if BODY_CODING.refused(&e, coding) {
            // Nothing was marked: the next round sends them in gzip.
            return Step::Next;
        }
        let n_records = work.batch.records.len();
        match BATCH_ENCODING.decide(&e, work.batch.version) {
            // Nothing was marked: the next round reads the same records
            // and sends them in the older version.
            Action::OlderVersion => Step::Next,
            Action::Stop => match self.link.refused(&e, shutdown).await {
                true => Step::Shutdown,
                false => Step::Next,
            },
            Action::Split | Action::SetAside if n_records > 1 => {
                // Halve until the batch fits (413) or the record the hub
                // refuses stands alone (400), so one bad record never costs
                // its neighbours.
                self.limit = (n_records / 2).max(1);
                tracing::warn!("{e}; retrying with {} records per batch", self.limit);
                Step::Next
            }
            Action::Split | Action::SetAside => self.set_aside(work, e).await,
            Action::Retry { after } => {
                // When the link comes back, the newest records go first.
                self.fresh_due = true;
                match self.link.retry(&e, after, shutdown).await {
                    true => Step::Shutdown,
                    false => Step::Next,
                }
            }
        }
    }

    /// The hub refused a batch of one record for good: it becomes a
    /// `rejected` gap, and the ones after it go on.
    async fn set_aside(&mut self, mut work: Work, e: SyncError) -> Step {
        let reason = e.to_string();
        tracing::error!("the hub refused a batch for good ({reason}); setting it aside as a gap");
        let aside = SetAside {
            acked: std::mem::take(&mut work.acked),
            records: std::mem::take(&mut work.records),
            reason,
        };
        let n = aside.records.len() as u64;
        if self.settle_marking().await == Settled::WriterGone {
            return Step::WriterGone;
        }
        match self.to_writer(|tx| Msg::SetAside(aside, tx)).await {
            Settled::Ok => {}
            Settled::Failed => self.scan = Scan::default(),
            Settled::WriterGone => return Step::WriterGone,
        }
        let shared = &self.ctx.shared;
        shared.set_aside_batches.fetch_add(1, Ordering::Relaxed);
        shared.set_aside_records.fetch_add(n, Ordering::Relaxed);
        // The hub answered: the link itself works.
        self.link.answered();
        Step::Next
    }

    /// Hands an acknowledgement to the writer without waiting for its
    /// commit, after the previous one settled (at most one outstanding).
    /// A previous one that failed resets the scan and clears `keep` (the
    /// batch read ahead left those records out). False when the writer is
    /// gone.
    async fn hand_over(&mut self, acked: Acked, keep: &mut bool) -> bool {
        match self.settle_marking().await {
            Settled::Ok => {}
            Settled::Failed => *keep = false,
            Settled::WriterGone => return false,
        }
        let ranges = acked.records.clone();
        let (tx, rx) = oneshot::channel();
        if self.ctx.writer.send(Msg::Acked(acked, tx)).await.is_err() {
            return false;
        }
        self.marking = Some((rx, ranges));
        true
    }

    /// Waits until the writer has committed the outstanding
    /// acknowledgement, if any. When it could not record it, those records
    /// are unsynced again: the scan restarts at the first unsynced record
    /// and anything read ahead (which left them out) is dropped.
    async fn settle_marking(&mut self) -> Settled {
        let Some((rx, _)) = self.marking.take() else {
            return Settled::Ok;
        };
        let out = settled(rx.await);
        if out == Settled::Failed {
            self.scan = Scan::default();
            self.prefetched = None;
        }
        out
    }

    async fn to_writer(
        &self,
        msg: impl FnOnce(oneshot::Sender<Result<u64, String>>) -> Msg,
    ) -> Settled {
        let (tx, rx) = oneshot::channel();
        if self.ctx.writer.send(msg(tx)).await.is_err() {
            return Settled::WriterGone;
        }
        settled(rx.await)
    }
}

/// Waits for a batch to fill until `due`; returns when it is due (`None`
/// on shutdown). Records become readable a commit at a time, `every`
/// (`buffer.commit_interval`) apart under steady logging: once a commit
/// leaves less than that before `due`, the next one would come after it,
/// so the batch is due now, with the records it would have had at `due`
/// (whatever comes in meanwhile goes in the next batch). Sent right after
/// a commit, the newest records are not left waiting for the clock.
async fn linger(
    due: tokio::time::Instant,
    every: Duration,
    committed: &tokio::sync::Notify,
    shutdown: &CancellationToken,
) -> Option<tokio::time::Instant> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep_until(due) => return Some(due),
            _ = committed.notified() => {
                let now = tokio::time::Instant::now();
                if due.saturating_duration_since(now) < every {
                    return Some(now);
                }
            }
        }
    }
}

fn settled(reply: Result<Result<u64, String>, oneshot::error::RecvError>) -> Settled {
    match reply {
        Ok(Ok(_)) => Settled::Ok,
        Ok(Err(e)) => {
            tracing::warn!(
                "the agent could not record an acknowledgement ({e}); resending those records"
            );
            Settled::Failed
        }
        Err(_) => Settled::WriterGone,
    }
}

/// Is `seq` in one of the sorted inclusive ranges? (Binary search: an
/// errors-first batch is acked in thousands of ranges.)
fn covered(sorted: &[(u64, u64)], seq: u64) -> bool {
    let i = sorted.partition_point(|(lo, _)| *lo <= seq);
    i > 0 && sorted[i - 1].1 >= seq
}

/// Packs a batch for the wire: msgpack, then gzip or zstd. The clock it carries
/// is read here; for a batch read ahead that is up to one request earlier
/// than it leaves, well within what the hub's skew figure can resolve.
fn encode(mut work: Work, read_time: Duration) -> Ready {
    let start = Instant::now();
    work.batch.sent_at_ns = now_ns();
    work.batch.version = BATCH_ENCODING.version();
    if work.batch.version < 3 {
        // An older hub: v1 and v2 carry no marks; they stay pending.
        work.batch.marks.clear();
        work.acked.marks.clear();
    }
    if work.batch.version < 4 {
        // v1 to v3 carry no report; the hub keeps the last one it read.
        work.batch.agent = None;
    }
    let raw = work.batch.to_msgpack();
    let raw_len = raw.len();
    let coding = BODY_CODING.current();
    let level = match coding {
        Coding::Zstd => ZSTD_LEVEL,
        _ => GZIP_LEVEL,
    };
    let body = coding.compress(&raw, level);
    Ready {
        work,
        body,
        coding,
        raw_len,
        read_time,
        encode_time: start.elapsed(),
    }
}

/// The batch carries the robot's clock for the hub's skew figure: one that
/// waited long (a capped link) is stamped and packed again. `None` when
/// packing failed.
async fn restamped(ready: Ready) -> Option<Ready> {
    if now_ns().saturating_sub(ready.work.batch.sent_at_ns) <= RESTAMP_AFTER_NS {
        return Some(ready);
    }
    let read_time = ready.read_time;
    match tokio::task::spawn_blocking(move || encode(ready.work, read_time)).await {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!("packing a batch failed: {e}");
            None
        }
    }
}

/// A batch read ahead: the read connection back, and the packed batch when
/// it was full (a partial one is read again when it is due).
type ReadAhead = (SyncReader, Result<Option<Ready>, StoreError>);

/// What [`build`] reads with.
struct Plan {
    device: Device,
    scan: Scan,
    /// Unsynced records in the store (to tell whether we are behind).
    unsynced: usize,
    limit: usize,
    max_bytes: usize,
    /// Inclusive seq ranges to leave out: being marked, or in flight.
    skip: Vec<(u64, u64)>,
    /// What the agent says about itself in this batch (v4 and later).
    agent: AgentReport,
    /// `Stats::deletions` before the read (see `Acked::read_at`).
    deletions: u64,
    /// The robot's clock (whether a marked window is still open).
    now_ns: i64,
    /// The link came back (or the uploader started): a backlog found now
    /// starts a fresh run (see [`Scan::fresh`]).
    fresh_due: bool,
}

/// The agent's report for a batch (README "Devices"): what `/v1/status`
/// says of its version, buffer and drops, read from the same counters.
/// Dropped means never stored or lost unsynced: evicted before it was
/// synced, refused by a full writer queue, refused by SQLite, or a bad
/// record, by reason; only reasons with a count are sent.
fn report(stats: &Stats, buffer_max_bytes: u64) -> AgentReport {
    use crate::agent::ingest::json::BadRecord;
    use crate::agent::ingest::FORMAT_BAD_REASONS;
    let fixed = [
        ("evicted", Stats::get(&stats.evicted_unsynced)),
        ("refused", Stats::get(&stats.refused)),
        ("write_failed", Stats::get(&stats.write_failed)),
    ];
    let bad = BadRecord::ALL
        .iter()
        .enumerate()
        .map(|(i, b)| (b.reason(), Stats::get(&stats.bad[i])));
    let formats = FORMAT_BAD_REASONS
        .iter()
        .zip(&stats.bad_formats)
        .map(|(r, n)| (*r, Stats::get(n)));
    AgentReport {
        version: env!("CARGO_PKG_VERSION").into(),
        buffer_bytes: Stats::get(&stats.disk_bytes),
        buffer_max_bytes,
        dropped: fixed
            .into_iter()
            .chain(bad)
            .chain(formats)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (r.to_owned(), n))
            .collect(),
    }
}

enum Step {
    Next,
    Shutdown,
    WriterGone,
}

/// The records of one batch, gathered by several reads in turn.
struct Fill {
    records: Vec<PendingRecord>,
    taken: HashSet<u64, foldhash::fast::RandomState>,
    bytes: usize,
    limit: usize,
    max_bytes: usize,
    /// Sorted inclusive seq ranges to leave out: being marked, or in flight.
    skip: Vec<(u64, u64)>,
    /// A read stopped at its count or byte limit: more is waiting, even
    /// when records in flight or being marked were then left out, so the
    /// batch goes without a linger and reading ahead pays.
    more_waiting: bool,
}

impl Fill {
    /// What the next read may take (records, bytes); `None` when full.
    fn room(&mut self) -> Option<(usize, usize)> {
        if self.records.len() >= self.limit || self.bytes >= self.max_bytes {
            self.more_waiting = true;
            return None;
        }
        Some((self.limit - self.records.len(), self.max_bytes - self.bytes))
    }

    /// Adds what a read of at most `room` returned, leaving out records
    /// skipped or already taken. Returns where that read would go on: after
    /// its last record when it stopped at its limit, `None` when it read
    /// everything there was.
    fn take(&mut self, got: Vec<PendingRecord>, (count, budget): (usize, usize)) -> Option<u64> {
        let read: usize = got.iter().map(|r| r.approx_bytes).sum();
        let stopped = got.len() >= count || read >= budget;
        self.more_waiting |= stopped;
        let next = got.last().filter(|_| stopped).map(|r| r.record.seq + 1);
        for r in got {
            let seq = r.record.seq;
            let i = self.skip.partition_point(|(lo, _)| *lo <= seq);
            let skipped = i > 0 && self.skip[i - 1].1 >= seq;
            if !skipped && self.taken.insert(seq) {
                self.bytes += r.approx_bytes;
                self.records.push(r);
            }
        }
        next
    }
}

/// Builds the next batch: pending session states, then records (when more
/// than a batch is waiting, in the order [`Scan`] gives), then grown gap
/// counters.
fn build(reader: &SyncReader, plan: Plan) -> Result<Work, StoreError> {
    let Plan {
        device,
        scan,
        unsynced,
        limit,
        max_bytes,
        mut skip,
        agent,
        deletions,
        now_ns,
        fresh_due,
    } = plan;
    skip.sort_unstable();
    let sessions = reader.pending_sessions(MAX_SESSIONS)?;
    let start = Scan {
        cursor: match scan.cursor {
            Some(c) => Some(c),
            None => reader.first_unsynced()?,
        },
        ..scan
    };
    let mut next = start.clone();
    let mut fill = Fill {
        records: Vec::new(),
        taken: HashSet::default(),
        bytes: 0,
        limit,
        max_bytes,
        skip,
        more_waiting: false,
    };
    let newest = match unsynced > limit || next.fresh.is_some() {
        true => reader.newest_seq()?,
        false => 0,
    };
    if unsynced > limit {
        let w = reader.watermark()?;
        marked_first(reader, &mut fill, &mut next, (w, newest), now_ns)?;
        if let Some(room) = fill.room() {
            let got = reader.urgent_records(start.urgent_from, room.0, room.1)?;
            if let Some(last) = got.last() {
                next.urgent_from = last.record.seq;
            }
            fill.take(got, room);
        }
        failed_first(reader, &mut fill, &mut next, (w, newest))?;
        let fresh = newest.saturating_sub(limit as u64 / 2) + 1;
        let far = start
            .cursor
            .is_some_and(|c| fresh > c.saturating_add(limit as u64));
        if fresh_due && next.fresh.is_none() && unsynced > 2 * limit && far {
            next.fresh = Some((fresh, fresh));
        }
    }
    if let Some((first, from)) = next.fresh {
        // At most half a batch, so the backlog always moves too.
        if let Some((count, budget)) = fill.room() {
            let room = (
                count.min(limit.div_ceil(2)),
                budget.min(max_bytes.div_ceil(2)),
            );
            let got = reader.records_from(from, newest, room.0, room.1)?;
            let at = fill.take(got, room).unwrap_or((newest + 1).max(from));
            next.fresh = Some((first, at));
        }
    }
    // The backlog in seq order, up to the fresh run; once it is there, on
    // from where the fresh run is.
    while let (Some(from), Some(room)) = (next.cursor, fill.room()) {
        let through = next.fresh.map_or(DONE, |(first, _)| first - 1);
        let got = reader.records_from(from, through, room.0, room.1)?;
        let last = got.last().map(|r| r.record.seq);
        if let Some(at) = fill.take(got, room) {
            next.cursor = Some(at);
            break;
        }
        match next.fresh.take() {
            Some((_, resume)) => next.cursor = Some(resume.max(from)),
            None => {
                if let Some(last) = last {
                    next.cursor = Some(last + 1);
                }
                break;
            }
        }
    }
    let more_waiting = fill.more_waiting;
    let records = fill.records;
    let bytes: usize = records.iter().map(|r| r.approx_bytes).sum();
    let full = more_waiting || records.len() >= limit || bytes >= max_bytes;
    let gaps = reader.pending_gaps()?;
    let marks = reader.pending_marks()?;
    let acked = Acked {
        read_at: Some(deletions),
        marks: marks.iter().map(|m| (m.id as i64, m.revision)).collect(),
        records: Vec::new(),
        sessions: sessions.iter().map(|s| (s.pk, s.state.revision)).collect(),
        gaps: gaps
            .iter()
            .map(|g| (g.session, g.gap.level, g.gap.reason.clone(), g.gap.dropped))
            .collect(),
    };
    let refs = records
        .iter()
        .map(|r| (r.record.seq, r.pk, r.record.level))
        .collect();
    let batch = Batch {
        marks,
        agent: Some(agent),
        version: BATCH_VERSION,
        device,
        sent_at_ns: 0,
        sessions: sessions.into_iter().map(|s| s.state).collect(),
        records: records.into_iter().map(|r| r.record).collect(),
        gaps: gaps.into_iter().map(|g| g.gap).collect(),
    };
    Ok(Work {
        batch,
        acked,
        records: refs,
        start,
        next,
        full,
    })
}

/// Reads the unsynced records of marked windows into `fill`, in the order
/// [`SyncReader::marked_windows`] gives, each window from where its last
/// read stopped. `(w, newest)`: the watermark and the newest stored seq.
fn marked_first(
    reader: &SyncReader,
    fill: &mut Fill,
    next: &mut Scan,
    (w, newest): (u64, u64),
    now_ns: i64,
) -> Result<(), StoreError> {
    // Windows that ended before the oldest unsynced record are all synced.
    let Some(oldest) = reader.time_at(w + 1)? else {
        next.windows.clear();
        return Ok(());
    };
    let windows = reader.marked_windows(oldest.saturating_sub(WINDOW_SLACK_NS))?;
    // The cursors of windows that still exist, carried over.
    let old = std::mem::take(&mut next.windows);
    let cursor = |win: &Window| {
        old.binary_search_by_key(win, |e| e.0)
            .ok()
            .map(|i| old[i].1)
    };
    for win in windows {
        let Some(room) = fill.room() else {
            next.windows.extend(cursor(&win).map(|at| (win, at)));
            continue;
        };
        let from = match cursor(&win) {
            Some(at) => at,
            None => {
                reader.seq_at_time(win.start_ns.saturating_sub(WINDOW_SLACK_NS), w + 1, newest)?
            }
        };
        if from == DONE {
            continue;
        }
        // A window still open (or within the slack of its end) may gain
        // records: read to the newest and come back.
        let after = win.end_ns.saturating_add(WINDOW_SLACK_NS);
        let open = after >= now_ns;
        let through = match open {
            true => newest,
            false => reader
                .seq_at_time(after.saturating_add(1), from, newest)?
                .saturating_sub(1),
        };
        let got = match from <= through {
            true => reader.session_records(
                win.session,
                (from, through),
                Some((win.start_ns, win.end_ns)),
                room.0,
                room.1,
            )?,
            false => Vec::new(),
        };
        let at = match fill.take(got, room) {
            Some(at) => at,
            None if open => (newest + 1).max(from),
            None => DONE,
        };
        next.windows.push((win, at));
    }
    next.windows.sort_unstable_by_key(|e| e.0);
    Ok(())
}

/// Reads the unsynced records of failed sessions into `fill`, the newest
/// session first, each from where its last read stopped.
fn failed_first(
    reader: &SyncReader,
    fill: &mut Fill,
    next: &mut Scan,
    (w, newest): (u64, u64),
) -> Result<(), StoreError> {
    let failed = reader.failed_sessions_behind(FAILED_SESSIONS)?;
    let old = std::mem::take(&mut next.failed);
    for pk in failed {
        let cursor = old.iter().find(|e| e.0 == pk).map(|e| e.1);
        let Some(room) = fill.room() else {
            next.failed.extend(cursor.map(|at| (pk, at)));
            continue;
        };
        let from = cursor.unwrap_or(w + 1);
        let got = reader.session_records(pk, (from, newest), None, room.0, room.1)?;
        let at = fill.take(got, room).unwrap_or((newest + 1).max(from));
        next.failed.push((pk, at));
    }
    Ok(())
}

/// Sends one request and reads the hub's answer.
async fn post(request: reqwest::RequestBuilder) -> Result<BatchAck, SyncError> {
    let mut resp = request.send().await.map_err(SyncError::Transport)?;
    let status = resp.status();
    let headers = resp.headers().clone();
    BODY_CODING.offered(
        headers
            .get(reqwest::header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(SyncError::Transport)? {
        if body.len() + chunk.len() > MAX_ACK_BYTES {
            return Err(SyncError::BadResponse(format!(
                "answer larger than {MAX_ACK_BYTES} bytes (status {status})"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    if !status.is_success() {
        return Err(SyncError::from_response(status, &headers, &body));
    }
    serde_json::from_slice(&body).map_err(|e| {
        SyncError::BadResponse(format!(
            "status {status} with an unreadable acknowledgement: {e}"
        ))
    })
}

fn join_err(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        what: "a sync query".into(),
        source: std::io::Error::other(e),
    }
}

/// Sleeps; true when `shutdown` fired first.
async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = shutdown.cancelled() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Device, Level};

    /// When [`linger`] says a batch is due, with the writer committing at
    /// the times given (ms after the start; paused clock), a linger of
    /// 500 ms and commits 200 ms apart.
    async fn due_with_commits_at(commits: &[u64], shutdown_at: Option<u64>) -> Option<u64> {
        let ms = Duration::from_millis;
        let start = tokio::time::Instant::now();
        let committed = tokio::sync::Notify::new();
        let shutdown = CancellationToken::new();
        let writer = async {
            for &at in commits {
                tokio::time::sleep_until(start + ms(at)).await;
                committed.notify_one();
            }
            if let Some(at) = shutdown_at {
                tokio::time::sleep_until(start + ms(at)).await;
                shutdown.cancel();
            }
            std::future::pending::<()>().await
        };
        tokio::select! {
            at = linger(start + ms(500), ms(200), &committed, &shutdown) => {
                at.map(|at| (at - start).as_millis() as u64)
            }
            _ = writer => unreachable!(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lingering_batch_goes_right_after_the_last_commit_before_it_is_due() {
        // Less than a commit interval left: the next commit comes too late.
        assert_eq!(due_with_commits_at(&[100, 310, 480], None).await, Some(310));
        assert_eq!(due_with_commits_at(&[200, 400], None).await, Some(400));
        // Exactly one left: the next can still make it.
        assert_eq!(due_with_commits_at(&[100, 300, 480], None).await, Some(480));
        // No commit close to it (logging stopped): at the linger's end.
        assert_eq!(due_with_commits_at(&[50], None).await, Some(500));
        assert_eq!(due_with_commits_at(&[], None).await, Some(500));
        assert_eq!(due_with_commits_at(&[100], Some(250)).await, None);
    }

    #[test]
    fn a_batch_that_leaves_out_records_in_flight_still_counts_as_full() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = crate::agent::store::schema::open_writer(&path, false).unwrap();
        for seq in 1..=10 {
            conn.execute(
                "INSERT INTO records(seq, ts_ns, level, module, message, metadata) VALUES (?1, 1, 2, 'm', 'x', '')",
                [seq],
            )
            .unwrap();
        }
        let reader = SyncReader::open(&path, "b").unwrap();
        // (limit, skipped ranges, seqs sent, full, next cursor)
        let check = |limit: usize, skip: &[(u64, u64)], seqs: &[u64], full: bool, next: u64| {
            let plan = Plan {
                device: Device {
                    id: "d".into(),
                    name: "n".into(),
                },
                scan: Scan::default(),
                unsynced: 10,
                limit,
                max_bytes: 1 << 20,
                skip: skip.to_vec(),
                agent: report(&Stats::default(), 1 << 20),
                deletions: 0,
                now_ns: 0,
                fresh_due: true,
            };
            let w = build(&reader, plan).unwrap();
            let got: Vec<u64> = w.batch.records.iter().map(|r| r.seq).collect();
            assert_eq!(
                (got.as_slice(), w.full, w.next.cursor),
                (seqs, full, Some(next))
            );
        };
        check(5, &[], &[1, 2, 3, 4, 5], true, 6);
        check(5, &[(2, 3)], &[1, 4, 5], true, 6);
        check(20, &[(2, 3)], &[1, 4, 5, 6, 7, 8, 9, 10], false, 11);
    }

    /// While behind: marked windows (high first), errors, failed sessions,
    /// the newest records, then the backlog in seq order, each read going
    /// on where it stopped.
    #[test]
    fn a_backlog_goes_marks_errors_failed_sessions_fresh_then_in_order() {
        const S: i64 = 1_000_000_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = crate::agent::store::schema::open_writer(&path, false).unwrap();
        for (pk, status) in [(1, "active"), (2, "failed")] {
            conn.execute(
                "INSERT INTO sessions(pk, id, status, started_at_ns, boot_id, started_boottime_ns) \
                 VALUES (?1, ?2, ?3, 0, 'b', 0)",
                rusqlite::params![pk, format!("00000000-0000-0000-0000-00000000000{pk}"), status],
            )
            .unwrap();
        }
        // Seq n at n seconds; 61..=70 belong to the failed session; 50 is
        // an error.
        for seq in 1..=100i64 {
            let session = if (61..=70).contains(&seq) { 2 } else { 1 };
            let level = if seq == 50 { Level::Error } else { Level::Info };
            conn.execute(
                "INSERT INTO records(seq, session, ts_ns, level, module, message, metadata) \
                 VALUES (?1, ?2, ?3, ?4, 'm', 'x', '')",
                rusqlite::params![seq, session, seq * S, level.code() as i64],
            )
            .unwrap();
        }
        // A normal mark at 80 s (79..=81) and a high one at 20 s (18..=22).
        for (ts, before, after, priority) in [(80, 1, 1, 0), (20, 2, 2, 1)] {
            conn.execute(
                "INSERT INTO marks(session, ts_ns, before_ns, after_ns, name, metadata, priority) \
                 VALUES (1, ?1, ?2, ?3, 'm', '{}', ?4)",
                rusqlite::params![ts * S, before * S, after * S, priority],
            )
            .unwrap();
        }
        let reader = SyncReader::open(&path, "b").unwrap();
        let plan = |scan: Scan, skip: Vec<(u64, u64)>, now_s: i64, fresh_due: bool| Plan {
            device: Device {
                id: "d".into(),
                name: "n".into(),
            },
            scan,
            unsynced: 100,
            limit: 30,
            max_bytes: 1 << 20,
            skip,
            agent: report(&Stats::default(), 1 << 20),
            deletions: 0,
            now_ns: now_s * S,
            fresh_due,
        };
        let seqs = |w: &Work| w.batch.records.iter().map(|r| r.seq).collect::<Vec<_>>();

        let first = build(&reader, plan(Scan::default(), vec![], 1000, true)).unwrap();
        let want: Vec<u64> = (18..=22)
            .chain(79..=81)
            .chain([50])
            .chain(61..=70)
            .chain(86..=96)
            .collect();
        assert_eq!(seqs(&first), want);
        assert!(first.full);
        assert_eq!(first.next.fresh, Some((86, 97)));
        assert!(first.next.windows.iter().all(|&(_, at)| at == DONE));

        // The next batch, with the first still in flight: the rest of the
        // fresh run, then the backlog from the start, around what is out.
        let sent = crate::wire::seq_ranges(first.records.iter().map(|r| r.0));
        let second = build(&reader, plan(first.next.clone(), sent, 1000, false)).unwrap();
        let want: Vec<u64> = (97..=100).chain(1..=17).chain(23..=26).collect();
        assert_eq!(seqs(&second), want);
        assert_eq!(second.next.cursor, Some(27));
        assert_eq!(second.next.fresh, Some((86, 101)));

        // Without an outage there is no fresh run; a window still open is
        // read again for what it may gain.
        let w = build(&reader, plan(Scan::default(), vec![], 21, false)).unwrap();
        assert_eq!(w.next.fresh, None);
        assert_eq!(&seqs(&w)[..8], &[18, 19, 20, 21, 22, 79, 80, 81]);
        let high = Window {
            session: 1,
            start_ns: 18 * S,
            end_ns: 22 * S,
        };
        assert!(
            w.next.windows.contains(&(high, 101)),
            "{:?}",
            w.next.windows
        );

        // Windows are found by time among seqs, holes and all.
        conn.execute("DELETE FROM records WHERE seq BETWEEN 30 AND 60", [])
            .unwrap();
        let at = |s: i64, lo: u64, hi: u64| reader.seq_at_time(s * S, lo, hi).unwrap();
        assert_eq!(at(18, 1, 100), 18);
        assert_eq!(
            at(45, 1, 100),
            30,
            "the first seq whose next record is at or after"
        );
        assert_eq!(at(0, 5, 100), 5);
        assert_eq!(at(500, 1, 100), 101);
        assert_eq!(at(90, 1, 80), 81);
    }

    #[test]
    fn acked_ranges_cover_seqs() {
        let ranges = [(1, 3), (7, 7), (9, 12)];
        let check = |seq: u64, want: bool| assert_eq!(covered(&ranges, seq), want, "{seq}");
        check(0, false);
        check(1, true);
        check(3, true);
        check(4, false);
        check(7, true);
        check(8, false);
        check(12, true);
        check(13, false);
        assert!(!covered(&[], 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_uploader_is_restarted_and_counted() {
        let shared = Arc::new(SyncShared::new(true));
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s2, r2) = (shared.clone(), runs.clone());
        let make = move || {
            let (shared, runs) = (s2.clone(), r2.clone());
            async move {
                let n = runs.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    // Hangs without a heartbeat: a stall.
                    std::future::pending::<()>().await;
                }
                // The second run makes progress for a while, then stops.
                for _ in 0..20 {
                    shared.beat();
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Done::Shutdown
            }
        };
        supervise(make, shared.clone(), Duration::from_secs(1)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(shared.restarts.load(Ordering::Relaxed), 1);
        let err = shared.view(0, 0).last_error.unwrap();
        assert!(err.contains("no progress"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashed_uploader_is_restarted() {
        let shared = Arc::new(SyncShared::new(true));
        let runs = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let r2 = runs.clone();
        let make = move || {
            let runs = r2.clone();
            async move {
                if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("boom");
                }
                Done::Shutdown
            }
        };
        supervise(make, shared.clone(), Duration::from_secs(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        assert_eq!(shared.restarts.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ack_the_writer_could_not_record_is_sent_again_without_a_restart() {
        use crate::agent::record::Trusted;
        use crate::agent::store::read::ViewCtx;
        use crate::agent::store::writer::{Writer, WriterConfig};
        use crate::agent::store::Row;

        let dir = tempfile::tempdir().unwrap();
        let db_path = dir.path().join("agent.db");
        let stats = Arc::new(Stats::default());
        let writer = Writer::open(
            WriterConfig {
                db_path: db_path.clone(),
                state_dir: dir.path().to_owned(),
                synchronous_full: false,
                max_bytes: 1 << 30,
                min_free_bytes: 0,
                pinned_max: 1 << 28,
                commit_interval: Duration::from_millis(5),
                commit_records: 1000,
                idle_turn: Duration::from_secs(1),
                view: ViewCtx {
                    device_id: "d".into(),
                    device_name: "n".into(),
                    sessions_dir: dir.path().join("sessions"),
                    boot_id: "b".into(),
                },
            },
            stats.clone(),
        )
        .unwrap();
        let (tx, rx) = mpsc::channel(16);
        let thread = writer.spawn(rx, tokio::runtime::Handle::current()).unwrap();
        let rows = (0..5)
            .map(|i| Row {
                timestamp_ns: i,
                level: crate::wire::Level::Info,
                module: "m".into(),
                message: format!("line {i}"),
                metadata: String::new(),
                trusted: Arc::new(Trusted::default()),
                client_dropped: 0,
                mark: None,
            })
            .collect();
        tx.send(Msg::Rows(rows)).await.unwrap();
        let (ftx, frx) = oneshot::channel();
        tx.send(Msg::Flush(ftx)).await.unwrap();
        assert_eq!(frx.await.unwrap(), 5);

        let cfg = SyncConfig {
            hub: "http://127.0.0.1:9".into(),
            token: "t".into(),
            tls: Default::default(),
            max_bytes_per_sec: None,
            batch_records: 100,
            batch_bytes: 1 << 20,
            linger: Duration::ZERO,
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(60),
        };
        // As `SyncParts::new` does: the hub and token the links read.
        let shared = Arc::new(SyncShared::new(true));
        shared.set_remote(&cfg.hub, &cfg.token);
        let mut up = Uploader::new(Arc::new(UploaderCtx {
            cfg,
            device: Device {
                id: "d".into(),
                name: "n".into(),
            },
            db_path: db_path.clone(),
            boot_id: "b".into(),
            writer: tx,
            stats: stats.clone(),
            shared,
            throttle: Arc::new(Throttle::new(None)),
            buffer_max_bytes: 1 << 20,
            commit_interval: Duration::from_millis(5),
        }))
        .unwrap();
        let seqs = |w: &Work| w.batch.records.iter().map(|r| r.seq).collect::<Vec<_>>();
        let ack = || Acked {
            marks: Vec::new(),
            records: vec![(1, 5)],
            ..Acked::default()
        };

        let w = up.gather().await.unwrap();
        assert_eq!(seqs(&w), vec![1, 2, 3, 4, 5]);
        // The hub acked all of it (as in `send`), and SQLite refuses to
        // record that: a trigger stands in for a full disk.
        up.scan = w.next;
        let side = rusqlite::Connection::open(&db_path).unwrap();
        side.execute_batch(
            "CREATE TRIGGER full BEFORE INSERT ON meta WHEN NEW.key = 'synced_through' \
             BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;",
        )
        .unwrap();
        let mut keep = true;
        assert!(up.hand_over(ack(), &mut keep).await);
        assert!(keep);
        // While the writer holds the ack, a read leaves those records out.
        assert_eq!(seqs(&up.gather().await.unwrap()), Vec::<u64>::new());
        // The writer's answer brings them back, with no restart.
        assert_eq!(up.settle_marking().await, Settled::Failed);
        let w = up.gather().await.unwrap();
        assert_eq!(seqs(&w), vec![1, 2, 3, 4, 5]);

        // Once SQLite records the resend's ack, nothing is pending.
        side.execute_batch("DROP TRIGGER full").unwrap();
        up.scan = w.next;
        assert!(up.hand_over(ack(), &mut keep).await);
        assert_eq!(up.settle_marking().await, Settled::Ok);
        assert_eq!(seqs(&up.gather().await.unwrap()), Vec::<u64>::new());
        assert_eq!(stats.records_synced.load(Ordering::Relaxed), 5);

        drop(up);
        tokio::task::spawn_blocking(move || thread.join().unwrap())
            .await
            .unwrap();
    }
    /// The report carries the buffer and every drop counter with a count,
    /// by the reasons `/v1/status` uses, and nothing for zero counts.
    #[test]
    fn report_reads_the_status_counters() {
        let stats = Stats::default();
        let r = report(&stats, 1 << 20);
        assert_eq!(r.version, env!("CARGO_PKG_VERSION"));
        assert_eq!((r.buffer_bytes, r.buffer_max_bytes), (0, 1 << 20));
        assert!(r.dropped.is_empty(), "{:?}", r.dropped);
        stats.disk_bytes.store(4096, Ordering::Relaxed);
        stats.evicted_unsynced.store(12, Ordering::Relaxed);
        stats.refused.store(3, Ordering::Relaxed);
        stats.bad[0].store(2, Ordering::Relaxed);
        stats.bad_formats[1].store(1, Ordering::Relaxed);
        let r = report(&stats, 1 << 20);
        assert_eq!(r.buffer_bytes, 4096);
        let bad0 = crate::agent::ingest::json::BadRecord::ALL[0]
            .reason()
            .to_owned();
        assert_eq!(
            r.dropped,
            vec![
                ("evicted".to_owned(), 12),
                ("refused".to_owned(), 3),
                (bad0, 2),
                ("syslog_malformed".to_owned(), 1),
            ]
        );
        assert!(r.check().is_ok());
    }
}
