//! Ingest: the JSON-lines listener on `ingest.sock` (one task per client,
//! trusted fields from `SO_PEERCRED`), the syslog ([`syslog`]) and Fluent
//! Forward ([`forward`]) listeners, and the [`Pipeline`] every listener
//! submits parsed records into on their way to the writer.
//!
//! Invariant: nothing here touches SQLite. A bad line costs a counter, never
//! the connection; a connection's buffer is bounded by
//! `4 × ingest.max_record_bytes` plus one read.

pub mod forward;
pub mod journal;
pub mod json;
pub mod mmsg;
pub mod syslog;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agent::record::{Incoming, Trusted};
use crate::agent::store::writer::Msg;
use crate::agent::store::{now_ns, Row, Stats};

/// Messages (each a batch of rows from one read) the writer channel holds.
pub const PIPELINE_CAPACITY: usize = 32;
/// Bytes read from a client at a time.
const READ_CHUNK: usize = 64 << 10;
/// Most reads one connection does for one flush or at shutdown.
const DRAIN_CHUNKS: usize = 64;

/// Why the syslog and Forward listeners refused input, in the order of
/// [`Stats::bad_formats`]; reported with the JSON-lines reasons in
/// `/v1/status` and `/metrics`.
pub const FORMAT_BAD_REASONS: [&str; 5] = [
    "syslog_empty",
    "syslog_malformed",
    "forward_bad_frame",
    "forward_bad_entry",
    "forward_broken_stream",
];

/// The protocols records arrive by, in the order of [`Stats::accepted_by`];
/// `accepted` is split by them in `/v1/status` and `/metrics`.
pub const PROTOCOLS: [&str; 4] = ["json", "syslog", "forward", "journal"];

/// Index into [`PROTOCOLS`] / [`Stats::accepted_by`].
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    Json = 0,
    Syslog = 1,
    Forward = 2,
    Journal = 3,
}

/// Index into [`FORMAT_BAD_REASONS`] / [`Stats::bad_formats`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum FormatBad {
    SyslogEmpty = 0,
    SyslogMalformed = 1,
    ForwardBadFrame = 2,
    ForwardBadEntry = 3,
    ForwardBrokenStream = 4,
}

/// A handle for submitting records to the writer. Cheap to clone.
#[derive(Clone)]
pub struct Pipeline {
    tx: mpsc::Sender<Msg>,
    pub stats: Arc<Stats>,
    /// Live stream connections, asked to hand over what they have read
    /// before a flush.
    conns: Arc<Mutex<HashMap<u64, FlushAsk>>>,
    /// Stream listeners, asked to accept their backlog before a flush (a
    /// client may have connected and written before being accepted).
    listeners: Arc<Mutex<Vec<FlushAsk>>>,
    next_conn: Arc<AtomicU64>,
    /// Which [`Stats::accepted_by`] counter this handle's records count in.
    protocol: Protocol,
}

/// Asks a task to hand over what it has; it answers by dropping the sender.
type FlushAsk = mpsc::Sender<oneshot::Sender<()>>;

async fn ask_all(asks: Vec<FlushAsk>) {
    let mut waits = Vec::with_capacity(asks.len());
    for a in asks {
        let (tx, rx) = oneshot::channel();
        if a.send(tx).await.is_ok() {
            waits.push(rx);
        }
    }
    // A task that went away meanwhile drops its sender: fine.
    futures_util::future::join_all(waits).await;
}

#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    #[error("the writer has stopped")]
    WriterGone,
    #[error("flush timed out")]
    Timeout,
}

impl Pipeline {
    pub fn new(tx: mpsc::Sender<Msg>, stats: Arc<Stats>) -> Pipeline {
        Pipeline {
            tx,
            stats,
            conns: Arc::default(),
            listeners: Arc::default(),
            next_conn: Arc::default(),
            protocol: Protocol::Json,
        }
    }

    /// The same pipeline, counting accepted records under `protocol`.
    pub fn for_protocol(&self, protocol: Protocol) -> Pipeline {
        Pipeline {
            protocol,
            ..self.clone()
        }
    }

    /// Counts `n` inputs refused by a syslog or Forward listener.
    pub(crate) fn count_bad(&self, why: FormatBad, n: u64) {
        self.stats.bad_formats[why as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Registers a connection for flush handovers: its id (for
    /// [`Pipeline::unregister_conn`]) and where the asks arrive.
    pub(crate) fn register_conn(&self) -> (u64, Asked) {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        self.stats.connections_open.fetch_add(1, Ordering::Relaxed);
        let (ask, asked) = mpsc::channel(4);
        self.conns.lock().expect("conns").insert(id, ask);
        (id, asked)
    }

    pub(crate) fn unregister_conn(&self, id: u64) {
        self.conns.lock().expect("conns").remove(&id);
        self.stats.connections_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Registers a listener that must hand over what its socket holds
    /// before a flush (the datagram listener, or an accept backlog).
    pub(crate) fn register_listener(&self) -> mpsc::Receiver<oneshot::Sender<()>> {
        let (ask, asked) = mpsc::channel(4);
        self.listeners.lock().expect("listeners").push(ask);
        asked
    }

    /// The writer's channel, for commands that are not records.
    pub fn writer(&self) -> &mpsc::Sender<Msg> {
        &self.tx
    }

    /// Queues records without waiting. When the pipeline is full the
    /// records are refused and counted; returns whether they were queued.
    pub fn submit(&self, records: Vec<(Incoming, Arc<Trusted>)>) -> bool {
        let arrival = now_ns();
        let rows: Vec<Row> = records
            .into_iter()
            .map(|(r, t)| self.row(r, t, arrival))
            .collect();
        self.submit_rows(rows)
    }

    /// [`Pipeline::submit`] for one record (datagram listeners).
    pub fn submit_one(&self, record: Incoming, trusted: Trusted) -> bool {
        self.submit(vec![(record, Arc::new(trusted))])
    }

    fn submit_rows(&self, rows: Vec<Row>) -> bool {
        if rows.is_empty() {
            return true;
        }
        self.stats.spent.free();
        let n = rows.len() as u64;
        match self.tx.try_send(Msg::Rows(rows)) {
            Ok(()) => true,
            Err(_) => {
                self.stats.refused.fetch_add(n, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queues records, waiting for room: stream listeners use this, so a
    /// saturated agent slows its readers (the kernel's socket buffer holds
    /// the rest) instead of dropping.
    async fn submit_wait(&self, rows: Vec<Row>) {
        if rows.is_empty() {
            return;
        }
        self.stats.spent.free();
        let n = rows.len() as u64;
        if self.tx.send(Msg::Rows(rows)).await.is_err() {
            self.stats.refused.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Turns a parsed record into its stored form, counting it.
    pub fn row(&self, mut r: Incoming, trusted: Arc<Trusted>, arrival_ns: i64) -> Row {
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        self.stats.accepted_by[self.protocol as usize].fetch_add(1, Ordering::Relaxed);
        if r.truncated {
            self.stats.truncated.fetch_add(1, Ordering::Relaxed);
        }
        let client_dropped = r
            .metadata
            .get("logbook_dropped")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        let timestamp_ns = r.timestamp_ns.unwrap_or(arrival_ns);
        let mark = self.mark_of(&r, timestamp_ns);
        let metadata = r.take_metadata_text();
        Row {
            timestamp_ns,
            level: r.level,
            module: r.module.unwrap_or_default(),
            message: r.message,
            metadata,
            trusted,
            client_dropped,
            mark,
        }
    }

    /// The mark a record's `event` field asks for (README "Marks"); an
    /// invalid one is counted and logged, and the record kept as it is.
    fn mark_of(
        &self,
        r: &Incoming,
        timestamp_ns: i64,
    ) -> Option<Box<crate::agent::marks::MarkSpec>> {
        if r.metadata.is_empty() {
            return None;
        }
        match crate::agent::marks::from_record(&r.metadata, timestamp_ns)? {
            Ok(m) => Some(Box::new(m)),
            Err(e) => {
                self.stats.marks_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    "a record's event is not a valid mark ({e}); kept it as a plain record"
                );
                None
            }
        }
    }

    /// Makes every stream listener accept its backlog and every connection
    /// hand over the complete lines it can read now, so everything received
    /// before this call is queued for the writer when it returns.
    pub async fn handover(&self) {
        let listeners = self.listeners.lock().expect("listeners").clone();
        ask_all(listeners).await;
        let conns: Vec<_> = self
            .conns
            .lock()
            .expect("conns")
            .values()
            .cloned()
            .collect();
        ask_all(conns).await;
    }

    /// Returns once every record received before the call is committed.
    /// Returns the last committed seq.
    pub async fn flush(&self) -> Result<u64, FlushError> {
        let work = async {
            self.handover().await;
            let (tx, rx) = oneshot::channel();
            self.tx
                .send(Msg::Flush(tx))
                .await
                .map_err(|_| FlushError::WriterGone)?;
            rx.await.map_err(|_| FlushError::WriterGone)
        };
        tokio::time::timeout(Duration::from_secs(30), work)
            .await
            .map_err(|_| FlushError::Timeout)?
    }
}

/// Reads a peer's trusted fields; the process name from `/proc`.
pub fn trusted_of(stream: &UnixStream) -> Trusted {
    match stream.peer_cred() {
        Ok(cred) => {
            let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
            Trusted {
                pid,
                uid: Some(cred.uid()),
                gid: Some(cred.gid()),
                process: pid.and_then(process_name),
            }
        }
        Err(_) => Trusted::default(),
    }
}

/// `/proc/<pid>/comm`, the name the kernel knows the process by.
pub fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_owned())
        .filter(|s| !s.is_empty())
}

/// Accepts JSON-lines clients until `shutdown`; each connection runs on
/// `tracker` and stops at a safe point (after handing over every complete
/// line it has read) when `shutdown` fires.
pub async fn serve_json(
    listener: UnixListener,
    pipeline: Pipeline,
    max_record_bytes: usize,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let p = pipeline.clone();
    serve_stream(
        listener,
        &pipeline,
        max_connections,
        shutdown,
        tracker,
        move |stream, shutdown| {
            // Registered here, before the task runs, so a flush sees it.
            let conn = Connection::new(stream, p.clone(), max_record_bytes);
            conn.run(shutdown)
        },
    )
    .await
}

/// The accept loop every stream listener shares: bounded connections (a
/// refused client is logged, the others go on), backlog accepted on a
/// flush, one task per connection on `tracker`. `start` builds the
/// connection synchronously (so it registers for flushes before any later
/// flush) and returns the future that serves it.
pub(crate) async fn serve_stream<F, Fut>(
    listener: UnixListener,
    pipeline: &Pipeline,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    start: F,
) where
    F: Fn(UnixStream, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let limit = Arc::new(Semaphore::new(max_connections));
    let mut asked = pipeline.register_listener();
    let start = |stream: UnixStream| {
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(
                "refusing an ingest client: ingest.max_connections ({max_connections}) reached"
            );
            return;
        };
        let served = start(stream, shutdown.clone());
        // Owned by `tracker`, which shutdown waits on: no handle to keep.
        tracker.spawn(async move {
            served.await;
            drop(permit);
        });
    };
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => {
                // Clients that connected (and maybe wrote) before the stop
                // are served too: each connection sees the shutdown at once
                // and hands over what it can read.
                while let Some(s) = accept_now(&listener) {
                    start(s);
                }
                return;
            }
            Some(ack) = asked.recv() => {
                // Accept whatever the kernel already queued. A direct
                // accept(2): tokio's own would wait for the reactor to have
                // seen the connection, which may not have happened yet.
                while let Some(s) = accept_now(&listener) {
                    start(s);
                }
                drop(ack);
                continue;
            }
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!("accepting an ingest client failed: {e}");
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        start(stream);
    }
}

/// One non-blocking `accept(2)`, bypassing the reactor's readiness.
fn accept_now(listener: &UnixListener) -> Option<UnixStream> {
    use rustix::net::SocketFlags;
    let fd =
        rustix::net::accept_with(listener, SocketFlags::NONBLOCK | SocketFlags::CLOEXEC).ok()?;
    UnixStream::from_std(std::os::unix::net::UnixStream::from(fd)).ok()
}

/// Flush asks a connection receives: each is answered (dropped) once what
/// the connection had read is handed over.
pub(crate) type Asked = mpsc::Receiver<oneshot::Sender<()>>;

/// One connection of a stream listener (`ingest.sock`, `forward.sock`), as
/// the loop they share, [`serve_conn`], drives it.
pub(crate) trait StreamConn {
    /// The socket and the flush asks, borrowed together so the loop can
    /// wait on both.
    fn wait_parts(&mut self) -> (&UnixStream, &mut Asked);
    /// Reads what is available without waiting and hands over every
    /// complete record. False once the client closed or must be closed.
    async fn read_some(&mut self) -> bool;
    /// Hands over everything already readable (a flush or shutdown asked).
    /// Reads with read(2) directly: tokio's reads report WouldBlock until
    /// the reactor has seen the data arrive, and a flush must not depend on
    /// that. Bounded ([`DRAIN_CHUNKS`]), so a client that never pauses
    /// cannot hold up a flush or the shutdown. False once closed.
    async fn drain(&mut self) -> bool;
}

/// Serves one stream connection until its client closes or `shutdown`
/// fires; either way everything it had read is handed over first, and a
/// flush ask is answered only after that.
pub(crate) async fn serve_conn(conn: &mut impl StreamConn, shutdown: CancellationToken) {
    enum Woke {
        Shutdown,
        Asked(oneshot::Sender<()>),
        Readable(std::io::Result<()>),
    }
    loop {
        let (stream, asked) = conn.wait_parts();
        let woke = tokio::select! {
            biased;
            _ = shutdown.cancelled() => Woke::Shutdown,
            Some(ack) = asked.recv() => Woke::Asked(ack),
            r = stream.readable() => Woke::Readable(r),
        };
        let open = match woke {
            Woke::Shutdown => {
                conn.drain().await;
                false
            }
            Woke::Asked(ack) => {
                let open = conn.drain().await;
                drop(ack);
                open
            }
            Woke::Readable(r) => r.is_ok() && conn.read_some().await,
        };
        if !open {
            return;
        }
    }
}

struct Connection {
    stream: UnixStream,
    pipeline: Pipeline,
    trusted: Arc<Trusted>,
    max: usize,
    buf: Vec<u8>,
    /// An over-long line being skipped: its kept start and total length.
    cut: Option<(Vec<u8>, usize)>,
    id: u64,
    asked: Asked,
}

impl StreamConn for Connection {
    fn wait_parts(&mut self) -> (&UnixStream, &mut Asked) {
        (&self.stream, &mut self.asked)
    }

    async fn read_some(&mut self) -> bool {
        self.read_chunk().await.0
    }

    async fn drain(&mut self) -> bool {
        let mut open = true;
        // Bounded, so a client that never pauses cannot hold up a flush or
        // the shutdown: what it sends meanwhile arrived after the request.
        for _ in 0..DRAIN_CHUNKS {
            let len = self.buf.len();
            self.buf.resize(len + READ_CHUNK, 0);
            let r = rustix::io::read(&self.stream, &mut self.buf[len..]);
            match r {
                Ok(0) => {
                    self.buf.truncate(len);
                    open = false;
                }
                Ok(n) => {
                    self.buf.truncate(len + n);
                    let rows = self.lines(false);
                    self.pipeline.submit_wait(rows).await;
                    continue;
                }
                Err(rustix::io::Errno::INTR) => {
                    self.buf.truncate(len);
                    continue;
                }
                Err(rustix::io::Errno::AGAIN) => self.buf.truncate(len),
                Err(_) => {
                    self.buf.truncate(len);
                    open = false;
                }
            }
            break;
        }
        let rows = self.lines(!open);
        self.pipeline.submit_wait(rows).await;
        open
    }
}

impl Connection {
    fn new(stream: UnixStream, pipeline: Pipeline, max: usize) -> Connection {
        let trusted = Arc::new(trusted_of(&stream));
        let (id, asked) = pipeline.register_conn();
        Connection {
            asked,
            stream,
            pipeline,
            trusted,
            max,
            buf: Vec::with_capacity(READ_CHUNK),
            cut: None,
            id,
        }
    }

    async fn run(mut self, shutdown: CancellationToken) {
        serve_conn(&mut self, shutdown).await;
        self.pipeline.unregister_conn(self.id);
    }

    /// One read of up to [`READ_CHUNK`]: (client still open, more may be
    /// readable right away).
    async fn read_chunk(&mut self) -> (bool, bool) {
        let mut open = true;
        let mut more = false;
        loop {
            self.buf.reserve(READ_CHUNK);
            match self.stream.try_read_buf(&mut self.buf) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(_) => {
                    if self.buf.len() >= READ_CHUNK {
                        more = true;
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    open = false;
                    break;
                }
            }
        }
        let rows = self.lines(!open);
        self.pipeline.submit_wait(rows).await;
        (open, more)
    }

    /// Splits complete lines off the buffer and parses them. At EOF a final
    /// line without a newline counts too.
    fn lines(&mut self, eof: bool) -> Vec<Row> {
        let arrival = now_ns();
        let mut rows = Vec::new();
        let mut start = 0;
        let hard_cap = self.max.saturating_mul(4);
        loop {
            let rest = &self.buf[start..];
            let Some(nl) = rest.iter().position(|&b| b == b'\n') else {
                break;
            };
            let line = &rest[..nl];
            start += nl + 1;
            if let Some((prefix, total)) = self.cut.take() {
                // The end of a line too long to buffer.
                let r = json::cut_line(&prefix, total + line.len(), self.max);
                rows.push(self.pipeline.row(r, self.trusted.clone(), arrival));
                continue;
            }
            self.parse_into(line, arrival, &mut rows);
        }
        self.buf.drain(..start);
        if eof && !self.buf.is_empty() {
            let line = std::mem::take(&mut self.buf);
            if let Some((prefix, total)) = self.cut.take() {
                let r = json::cut_line(&prefix, total + line.len(), self.max);
                rows.push(self.pipeline.row(r, self.trusted.clone(), arrival));
            } else {
                self.parse_into(&line, arrival, &mut rows);
            }
        } else if self.buf.len() > hard_cap || (self.cut.is_some() && !self.buf.is_empty()) {
            // No newline within the cap: keep the start, skip the rest until
            // the newline comes.
            match &mut self.cut {
                Some((_, total)) => *total += self.buf.len(),
                None => {
                    let keep = self.buf[..self.max.min(self.buf.len())].to_vec();
                    self.cut = Some((keep, self.buf.len()));
                }
            }
            self.buf.clear();
        }
        if self.buf.capacity() > READ_CHUNK * 2 && self.buf.len() < READ_CHUNK {
            self.buf.shrink_to(READ_CHUNK);
        }
        rows
    }

    fn parse_into(&self, line: &[u8], arrival: i64, rows: &mut Vec<Row>) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match json::parse_line(line, self.max) {
            Ok(r) => rows.push(self.pipeline.row(r, self.trusted.clone(), arrival)),
            Err(bad) => {
                let i = json::BadRecord::ALL
                    .iter()
                    .position(|b| *b == bad)
                    .unwrap_or(0);
                self.pipeline.stats.bad[i].fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "skipped a bad record from pid {:?}: {bad}",
                    self.trusted.pid
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Level;

    fn incoming(msg: &str) -> Incoming {
        let mut metadata = serde_json::Map::new();
        metadata.insert("logbook_dropped".into(), 5.into());
        Incoming {
            timestamp_ns: None,
            level: Level::Warn,
            module: None,
            message: msg.into(),
            metadata,
            rendered: None,
            truncated: true,
        }
    }

    #[test]
    fn submit_never_waits_and_counts_what_it_refuses() {
        let (tx, mut rx) = mpsc::channel(1);
        let p = Pipeline::new(tx, Arc::new(Stats::default()));
        assert!(p.submit_one(incoming("a"), Trusted::default()));
        // The channel is full: refused at once, counted.
        assert!(!p.submit(vec![
            (incoming("b"), Arc::new(Trusted::default())),
            (incoming("c"), Arc::new(Trusted::default())),
        ]));
        assert_eq!(p.stats.refused.load(Ordering::Relaxed), 2);
        assert_eq!(p.stats.accepted.load(Ordering::Relaxed), 3);
        assert_eq!(p.stats.truncated.load(Ordering::Relaxed), 3);
        let Ok(Msg::Rows(rows)) = rx.try_recv() else {
            panic!("expected rows");
        };
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.message, "a");
        assert_eq!(r.client_dropped, 5);
        assert_eq!(r.metadata, r#"{"logbook_dropped":5}"#);
        assert!(r.timestamp_ns > 0, "stamped on arrival");
    }
}
