//! The client's delivery half: a bounded queue of ready JSON lines, drained
//! by one background std thread that owns the connection to `ingest.sock`,
//! reconnects with capped exponential backoff, and reports what it dropped.
//!
//! Invariant: [`Sender::send`] never blocks and never allocates beyond the
//! line it is given; every line is counted exactly once as written or
//! dropped, and the drop count reaches the agent as a record of its own.

use std::io::{self, ErrorKind};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Most bytes handed to one `send(2)`: lines queued during a burst go out
/// together, without a second unbounded buffer.
const BATCH_BYTES: usize = 64 << 10;
/// A stalled agent holds a write this long before the client gives up on
/// the connection (the queue absorbs the wait, never the caller).
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub socket: PathBuf,
    pub queue_capacity: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// Counters and wake-ups shared by the callers and the thread.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Lines accepted into the queue.
    enqueued: AtomicU64,
    /// Dropped and not yet reported to the agent.
    unreported: AtomicU64,
    /// Dropped since start (for [`super::Handle::dropped`]).
    dropped_total: AtomicU64,
    /// Lines the thread finished with (written or dropped); flush waits on it.
    done: Mutex<u64>,
    /// The same count, readable without the lock by callers deciding
    /// whether formatting an event is worth it.
    finished: AtomicU64,
    done_changed: Condvar,
    /// Set when the last `Sender` is gone; wakes a thread in backoff.
    closed: AtomicBool,
    wake: Mutex<()>,
    woken: Condvar,
    connected: AtomicBool,
}

impl Shared {
    fn drop_lines(&self, n: u64) {
        self.unreported.fetch_add(n, Ordering::Relaxed);
        self.dropped_total.fetch_add(n, Ordering::Relaxed);
    }

    fn finish(&self, n: u64) {
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *done += n;
        self.finished.store(*done, Ordering::SeqCst);
        self.done_changed.notify_all();
    }

    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits until every line queued before the call is written or dropped.
    pub fn flush(&self, timeout: Duration) -> bool {
        let target = self.enqueued.load(Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        while *done < target {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            done = self
                .done_changed
                .wait_timeout(done, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// The callers' end. Dropping it lets the thread deliver what is queued
/// (while connected) and exit.
#[derive(Debug)]
pub(crate) struct Sender {
    tx: SyncSender<Vec<u8>>,
    capacity: u64,
    pub shared: Arc<Shared>,
}

impl Sender {
    pub fn start(config: Config) -> Sender {
        let (tx, rx) = mpsc::sync_channel(config.queue_capacity.max(1));
        let capacity = config.queue_capacity.max(1) as u64;
        let shared = Arc::new(Shared::default());
        let thread_shared = shared.clone();
        // If no thread can be started the receiver is dropped with the
        // closure, and every send is counted as dropped: logging must never
        // take the host program down.
        let _ = std::thread::Builder::new()
            .name("logbook-client".into())
            .spawn(move || run(config, rx, &thread_shared));
        Sender {
            tx,
            capacity,
            shared,
        }
    }

    /// True when the queue is certainly full (the queue plus the one line
    /// the thread may hold): the caller can count a drop without first
    /// formatting the event. Racy on purpose; `send` stays authoritative.
    pub fn surely_full(&self) -> bool {
        let queued = self.shared.enqueued.load(Ordering::Relaxed);
        let finished = self.shared.finished.load(Ordering::Relaxed);
        queued.saturating_sub(finished) > self.capacity
    }

    /// Counts an event the caller chose not to format.
    pub fn count_drop(&self) {
        self.shared.drop_lines(1);
    }

    /// Queues one line (ending in `\n`), or counts it as dropped.
    pub fn send(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {
                self.shared.enqueued.fetch_add(1, Ordering::SeqCst);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.drop_lines(1);
            }
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::SeqCst);
        let _guard = self.shared.wake.lock();
        self.shared.woken.notify_all();
    }
}

/// The thread: take a line, make sure there is a connection, write it with
/// whatever else is already queued.
fn run(config: Config, rx: Receiver<Vec<u8>>, shared: &Shared) {
    let mut conn: Option<UnixStream> = None;
    let mut backoff = config.backoff_min;
    let mut batch: Vec<u8> = Vec::with_capacity(BATCH_BYTES);
    let mut held: Option<Vec<u8>> = None;
    // Whether the connection is new: drops counted before it happened while
    // the agent was away, later ones because the queue was full.
    let mut fresh = true;
    loop {
        let first = match held.take() {
            Some(line) => line,
            None => match rx.recv() {
                Ok(line) => line,
                Err(_) => return, // every Sender is gone and the queue is empty
            },
        };
        if conn.is_none() {
            match connect(&config) {
                Ok(stream) => {
                    backoff = config.backoff_min;
                    shared.connected.store(true, Ordering::Relaxed);
                    conn = Some(stream);
                    fresh = true;
                }
                Err(_) => {
                    shared.connected.store(false, Ordering::Relaxed);
                    if shared.closed.load(Ordering::SeqCst) {
                        // Nobody will log again and the agent is away: count
                        // the rest as dropped so flush() returns, and stop.
                        let rest = 1 + rx.try_iter().count() as u64;
                        shared.drop_lines(rest);
                        shared.finish(rest);
                        return;
                    }
                    // Hold the line; the queue fills meanwhile and callers
                    // drop and count from there on.
                    held = Some(first);
                    sleep_unless_closed(shared, backoff);
                    backoff = (backoff * 2).min(config.backoff_max);
                    continue;
                }
            }
        }
        let stream = conn.as_ref().expect("connected above");

        // The drop count goes first, so the agent sees the gap where it was.
        let unreported = shared.unreported.swap(0, Ordering::Relaxed);
        batch.clear();
        if unreported > 0 {
            batch.extend_from_slice(&dropped_record(unreported, fresh));
        }
        batch.extend_from_slice(&first);
        let mut lines = 1u64;
        while batch.len() < BATCH_BYTES {
            match rx.try_recv() {
                Ok(line) => {
                    batch.extend_from_slice(&line);
                    lines += 1;
                }
                Err(_) => break,
            }
        }
        match write_all(stream, &batch) {
            Ok(()) => {
                shared.finish(lines);
                fresh = false;
            }
            Err(_) => {
                // The agent went away mid-write: these lines may be partly
                // delivered, so they count as dropped (an over-count, never
                // an under-count), and so does the unreported total again.
                shared.unreported.fetch_add(unreported, Ordering::Relaxed);
                shared.drop_lines(lines);
                shared.finish(lines);
                shared.connected.store(false, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

fn connect(config: &Config) -> io::Result<UnixStream> {
    let stream = UnixStream::connect(&config.socket)?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    Ok(stream)
}

/// `send(2)` with `MSG_NOSIGNAL`: a host program that did not ignore
/// SIGPIPE (a C host, or a Rust one that restored it) must not die because
/// the agent restarted.
fn write_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match rustix::net::send(stream, buf, rustix::net::SendFlags::NOSIGNAL) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn sleep_unless_closed(shared: &Shared, d: Duration) {
    let guard = shared.wake.lock().unwrap_or_else(|e| e.into_inner());
    if shared.closed.load(Ordering::SeqCst) {
        return;
    }
    let _ = shared.woken.wait_timeout(guard, d);
}

/// The record that tells the agent (and through it the hub) how many events
/// never made it.
pub(crate) fn dropped_record(n: u64, unreachable: bool) -> Vec<u8> {
    let message = if unreachable {
        format!("dropped {n} events while logbookd was unreachable")
    } else {
        format!("dropped {n} events: the queue to logbookd was full")
    };
    let mut line = serde_json::to_vec(&serde_json::json!({
        "timestamp": super::layer::now_rfc3339(),
        "level": "warn",
        "module": super::CLIENT_MODULE,
        "message": message,
        "logbook_dropped": n,
    }))
    .expect("a JSON object always serializes");
    line.push(b'\n');
    line
}
