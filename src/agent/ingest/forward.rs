//! The Fluent Forward listener on `forward.sock` (SOCK_STREAM, msgpack):
//! one [`ForwardDecoder`] per connection, trusted fields from `SO_PEERCRED`,
//! `chunk` acks written back once the frame's records are queued.
//!
//! Invariant: a connection holds at most one partial frame plus one read
//! (the decoder's bound is [`MAX_FRAME_BYTES`]), and all connections
//! together at most [`PARTIAL_BUDGET`] of partial frames beyond 1 MiB each;
//! a frame error costs a counter, a fatal one (the stream lost its framing)
//! closes only that connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{
    serve_conn, serve_stream, trusted_of, Asked, FormatBad, Pipeline, StreamConn, DRAIN_CHUNKS,
    READ_CHUNK,
};
use crate::agent::formats::forward::{BadForward, ForwardDecoder, Frame, Limits};
use crate::agent::record::Trusted;
use crate::agent::store::now_ns;

/// Largest Forward frame accepted. Fluent Bit sends chunks of about 2 MiB;
/// Fluentd's default buffer chunk is 8 MiB.
pub const MAX_FRAME_BYTES: usize = 8 << 20;
/// Largest gunzipped CompressedPackedForward payload.
pub const MAX_DECOMPRESSED_BYTES: usize = 32 << 20;
/// Partial-frame bytes all connections may hold together. A connection
/// holding more than [`SMALL_PARTIAL`] when the total is over this is
/// closed (counted as a broken stream): many clients each sending a huge
/// frame slowly must not exhaust the robot's memory.
pub const PARTIAL_BUDGET: usize = 64 << 20;
/// A partial frame this small never counts against the budget's check.
const SMALL_PARTIAL: usize = 1 << 20;
/// How long an ack write may wait on a client that does not read them
/// before the connection is given up.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts Forward clients until `shutdown`; each connection stops at a
/// safe point (every complete frame read handed over) when it fires.
pub async fn serve(
    listener: UnixListener,
    pipeline: Pipeline,
    max_record_bytes: usize,
    max_connections: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let pipeline = pipeline.for_protocol(super::Protocol::Forward);
    let p = pipeline.clone();
    let partial: Arc<AtomicUsize> = Arc::default();
    let limits = Limits {
        max_frame_bytes: MAX_FRAME_BYTES,
        max_decompressed_bytes: MAX_DECOMPRESSED_BYTES,
        max_record_bytes,
    };
    serve_stream(
        listener,
        &pipeline,
        max_connections,
        shutdown,
        tracker,
        move |stream, shutdown| Conn::new(stream, p.clone(), limits, partial.clone()).run(shutdown),
    )
    .await
}

struct Conn {
    stream: UnixStream,
    pipeline: Pipeline,
    trusted: Arc<Trusted>,
    decoder: ForwardDecoder,
    buf: Vec<u8>,
    id: u64,
    asked: Asked,
    /// Partial-frame bytes of every connection ([`PARTIAL_BUDGET`]).
    partial: Arc<AtomicUsize>,
    /// This connection's share of `partial`.
    held: usize,
}

/// What a read found.
enum Read {
    /// Bytes fed to the decoder (maybe none: nothing was ready).
    Open,
    /// The client closed (or the connection broke).
    Closed,
}

impl StreamConn for Conn {
    fn wait_parts(&mut self) -> (&UnixStream, &mut Asked) {
        (&self.stream, &mut self.asked)
    }

    async fn read_some(&mut self) -> bool {
        match self.stream.try_read(&mut self.buf) {
            Ok(0) => false,
            Ok(n) => {
                self.decoder.feed(&self.buf[..n]);
                self.frames().await && self.within_budget()
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => true,
            Err(_) => false,
        }
    }

    async fn drain(&mut self) -> bool {
        for _ in 0..DRAIN_CHUNKS {
            match self.read_now() {
                Some(Read::Open) => {
                    if !(self.frames().await && self.within_budget()) {
                        return false;
                    }
                }
                Some(Read::Closed) => return false,
                None => return true,
            }
        }
        true
    }
}

impl Conn {
    fn new(
        stream: UnixStream,
        pipeline: Pipeline,
        limits: Limits,
        partial: Arc<AtomicUsize>,
    ) -> Conn {
        let trusted = Arc::new(trusted_of(&stream));
        let (id, asked) = pipeline.register_conn();
        Conn {
            stream,
            pipeline,
            trusted,
            decoder: ForwardDecoder::new(limits),
            buf: vec![0; READ_CHUNK],
            id,
            asked,
            partial,
            held: 0,
        }
    }

    /// Accounts this connection's partial frame; false when it must close
    /// because all connections together hold too much.
    fn within_budget(&mut self) -> bool {
        let now = self.decoder.pending_bytes();
        let total = if now >= self.held {
            self.partial.fetch_add(now - self.held, Ordering::Relaxed) + (now - self.held)
        } else {
            self.partial.fetch_sub(self.held - now, Ordering::Relaxed) - (self.held - now)
        };
        self.held = now;
        if now > SMALL_PARTIAL && total > PARTIAL_BUDGET {
            self.pipeline.count_bad(FormatBad::ForwardBrokenStream, 1);
            tracing::warn!(
                "forward.sock: closing the connection of pid {:?}: {} MiB of partial frames \
                 across connections (limit {} MiB)",
                self.trusted.pid,
                total >> 20,
                PARTIAL_BUDGET >> 20
            );
            return false;
        }
        true
    }

    async fn run(mut self, shutdown: CancellationToken) {
        serve_conn(&mut self, shutdown).await;
        self.partial.fetch_sub(self.held, Ordering::Relaxed);
        self.pipeline.unregister_conn(self.id);
    }

    /// One non-blocking read(2); `None` when nothing is ready.
    fn read_now(&mut self) -> Option<Read> {
        loop {
            return match rustix::io::read(&self.stream, &mut self.buf) {
                Ok(0) => Some(Read::Closed),
                Ok(n) => {
                    self.decoder.feed(&self.buf[..n]);
                    Some(Read::Open)
                }
                Err(rustix::io::Errno::INTR) => continue,
                Err(rustix::io::Errno::AGAIN) => None,
                Err(_) => Some(Read::Closed),
            };
        }
    }

    /// Hands over every complete frame read so far (one pipeline message
    /// for all of them: a fluent-logger sends one record per frame) and then
    /// answers their acks, in order. Returns false when the connection must
    /// close.
    async fn frames(&mut self) -> bool {
        let arrival = now_ns();
        let mut rows = Vec::new();
        let mut acks = Vec::new();
        let mut open = true;
        let (pipeline, trusted) = (&self.pipeline, &self.trusted);
        loop {
            // Each record becomes a row as soon as it is decoded.
            let mut row = |r| rows.push(pipeline.row(r, trusted.clone(), arrival));
            match self.decoder.next_frame_with(&mut row) {
                Ok(Some(frame)) => {
                    self.count(&frame);
                    acks.extend(frame.ack);
                }
                Ok(None) => break,
                Err(e) => {
                    self.pipeline.count_bad(FormatBad::ForwardBrokenStream, 1);
                    tracing::warn!(
                        "forward.sock: closing the connection of pid {:?}: {e}",
                        self.trusted.pid
                    );
                    // The frames before the break are good: keep them.
                    open = false;
                    break;
                }
            }
        }
        // Waits for room: a stream sender is slowed (the kernel buffers the
        // rest), never dropped, as on ingest.sock.
        self.pipeline.submit_wait(rows).await;
        // Acked only once queued: the sender may then forget them.
        for ack in acks {
            if !open {
                break;
            }
            match tokio::time::timeout(ACK_TIMEOUT, self.stream.write_all(&ack)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => open = false,
                Err(_) => {
                    tracing::warn!(
                        "forward.sock: pid {:?} does not read its acks; closing",
                        self.trusted.pid
                    );
                    open = false;
                }
            }
        }
        open
    }

    /// Counts what a frame could not use.
    fn count(&self, frame: &Frame) {
        if frame.bad == 0 {
            return;
        }
        let why = match &frame.first_error {
            Some(BadForward::BadEntry { .. }) => FormatBad::ForwardBadEntry,
            _ => FormatBad::ForwardBadFrame,
        };
        self.pipeline.count_bad(why, frame.bad as u64);
        if let Some(e) = &frame.first_error {
            tracing::debug!(
                "forward.sock: {} bad in a frame tagged {:?} from pid {:?}: {e}",
                frame.bad,
                frame.tag,
                self.trusted.pid
            );
        }
    }
}
