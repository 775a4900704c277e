//! The syslog listener on `syslog.sock` (SOCK_DGRAM): one datagram is one
//! record, parsed by [`crate::agent::formats::syslog`], with trusted fields
//! from the `SCM_CREDENTIALS` the kernel attaches (we set `SO_PASSCRED`, so
//! every datagram carries the sender's pid/uid/gid even when the sender
//! passes none).
//!
//! Invariant: never waits on anything but the socket, so senders are never
//! held up by the writer. Records go to the pipeline without waiting; while
//! it is full they wait in a bounded pending batch ([`MAX_PENDING`] records,
//! [`MAX_PENDING_BYTES`]) and the socket keeps being drained; beyond that
//! bound they are dropped and counted (`refused`). One receive buffer of
//! `max_record_bytes` plus headroom, reused; a longer datagram is kept cut,
//! with a visible mark.

use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
use tokio::io::Interest;
use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;

use super::{process_name, FormatBad, Pipeline};
use crate::agent::formats::{self, syslog::ERROR_KEY, TRUNCATION_MARK};
use crate::agent::record::{Incoming, Trusted};
use crate::agent::store::writer::Msg;
use crate::agent::store::{now_ns, Row};

/// Bytes beyond `max_record_bytes` a datagram may have before it is cut:
/// the syslog header and structured data are not part of the message.
const HEADROOM: usize = 4096;
/// Receive buffer asked of the kernel for `syslog.sock`.
const SOCKET_RCVBUF: usize = 4 << 20;
/// Datagrams read per wake-up; also the batch size that goes to the
/// pipeline at once.
const BATCH: usize = 256;
/// Longest a smaller batch waits for more datagrams before it goes to the
/// pipeline anyway. A busy sender wakes the listener every few datagrams,
/// and the pipeline's slots count messages, not records: tiny batches
/// would fill it while the writer idles.
const COALESCE: Duration = Duration::from_millis(2);
/// Records held while the pipeline is full (its slots count messages, not
/// records: a burst of small wake-ups must not fill it with tiny batches
/// and drop the rest). About a second of a busy robot's logging.
pub const MAX_PENDING: usize = 16 << 10;
/// Bytes held while the pipeline is full.
pub const MAX_PENDING_BYTES: usize = 8 << 20;
/// How long a pid's process name is trusted before `/proc` is read again
/// (a pid can be reused by another program).
const NAME_TTL: Duration = Duration::from_secs(1);

/// Makes a datagram socket systemd passed (adopted as a listener by
/// [`crate::agent::systemd::listen_fds`], which cannot tell) a datagram
/// socket again. `None` if it is not one.
pub fn datagram_from_passed(fd: OwnedFd) -> Option<std::os::unix::net::UnixDatagram> {
    match rustix::net::sockopt::socket_type(&fd) {
        Ok(rustix::net::SocketType::DGRAM) => Some(std::os::unix::net::UnixDatagram::from(fd)),
        _ => None,
    }
}

/// Serves `socket` until `shutdown`, then hands over what it still holds.
pub async fn serve(
    socket: UnixDatagram,
    pipeline: Pipeline,
    max_record_bytes: usize,
    shutdown: CancellationToken,
) {
    if let Err(e) = rustix::net::sockopt::set_socket_passcred(&socket, true) {
        // Records still arrive, only without trusted fields.
        tracing::warn!("syslog.sock: cannot set SO_PASSCRED: {e}");
    }
    // Room for a burst while the listener is busy (the kernel caps it at
    // net.core.rmem_max, so it stays bounded).
    if let Err(e) = rustix::net::sockopt::set_socket_recv_buffer_size(&socket, SOCKET_RCVBUF) {
        tracing::debug!("syslog.sock: cannot set SO_RCVBUF: {e}");
    }
    let mut asked = pipeline.register_listener();
    let tx = pipeline.tx.clone();
    let mut rx = Receiver::new(pipeline, max_record_bytes);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                rx.drain(&socket).await;
                return;
            }
            Some(ack) = asked.recv() => {
                rx.drain(&socket).await;
                drop(ack);
            }
            // Room (again) for what is due: hand it over. (Reserving is
            // cancel-safe: a lost race only loses the place in line.)
            permit = tx.reserve(), if rx.due() => {
                if let Ok(permit) = permit {
                    permit.send(Msg::Rows(rx.take_pending()));
                }
            }
            _ = tokio::time::sleep_until(rx.deadline()), if !rx.pending.is_empty() && !rx.due() => {}
            r = socket.readable() => {
                if r.is_err() {
                    return;
                }
                // try_io clears the readiness when the socket runs dry.
                let _ = socket.try_io(Interest::READABLE, || rx.batch(&socket));
            }
        }
    }
}

/// The state one listener keeps between datagrams.
struct Receiver {
    pipeline: Pipeline,
    max: usize,
    buf: Vec<u8>,
    /// Rows not yet handed to the pipeline (still coalescing, or no room
    /// yet), oldest first.
    pending: Vec<Row>,
    pending_bytes: usize,
    /// When the oldest pending row arrived.
    pending_since: Instant,
    /// [`COALESCE`] (tests change it).
    coalesce: Duration,
    /// The last sender's trusted fields, so a burst from one process reads
    /// `/proc` once.
    last: Option<(rustix::net::UCred, Arc<Trusted>, Instant)>,
}

/// One received datagram's size (before any cut) and sender.
struct Datagram {
    len: usize,
    truncated: bool,
    cred: Option<rustix::net::UCred>,
}

impl Receiver {
    fn new(pipeline: Pipeline, max: usize) -> Receiver {
        Receiver {
            pipeline,
            max,
            buf: vec![0; max + HEADROOM],
            pending: Vec::new(),
            pending_bytes: 0,
            pending_since: Instant::now(),
            coalesce: COALESCE,
            last: None,
        }
    }

    /// Reads up to [`BATCH`] datagrams and offers them to the pipeline.
    /// `Err(WouldBlock)` when the socket ran dry (so the reactor waits
    /// again).
    fn batch(&mut self, socket: &impl AsFd) -> std::io::Result<()> {
        let mut result = Ok(());
        let arrival = now_ns();
        for _ in 0..BATCH {
            match self.recv(socket) {
                Ok(d) => {
                    if let Some((r, t)) = self.record(d) {
                        let row = self.pipeline.row(r, t, arrival);
                        self.hold(row);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if self.due() {
            self.offer();
        }
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                tracing::warn!("syslog.sock: receive failed: {e}");
                Ok(())
            }
            other => other,
        }
    }

    /// Keeps a row for the pipeline, or drops and counts it when the
    /// pending batch is at its bound.
    fn hold(&mut self, row: Row) {
        let bytes = row.approx_bytes();
        if self.pending.len() >= MAX_PENDING || self.pending_bytes + bytes > MAX_PENDING_BYTES {
            self.pipeline
                .stats
                .refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        if self.pending.is_empty() {
            self.pending_since = Instant::now();
        }
        self.pending_bytes += bytes;
        self.pending.push(row);
    }

    /// Whether the pending rows should go to the pipeline now.
    fn due(&self) -> bool {
        !self.pending.is_empty()
            && (self.pending.len() >= BATCH || self.pending_since.elapsed() >= self.coalesce)
    }

    fn deadline(&self) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.pending_since + self.coalesce)
    }

    /// Hands the pending rows to the pipeline if it has room now.
    fn offer(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // Full: they wait (bounded) while the socket is drained on.
        let rows = std::mem::take(&mut self.pending);
        match self.pipeline.tx.try_send(Msg::Rows(rows)) {
            Ok(()) => self.pending_bytes = 0,
            Err(e) => match e.into_inner() {
                Msg::Rows(rows) => self.pending = rows,
                _ => unreachable!("sent rows"),
            },
        }
    }

    fn take_pending(&mut self) -> Vec<Row> {
        self.pending_bytes = 0;
        std::mem::take(&mut self.pending)
    }

    /// Hands over every datagram queued now and what is pending (a flush
    /// or shutdown asked: waiting for the writer is right here). Bounded,
    /// so a sender that never pauses cannot hold it up.
    async fn drain(&mut self, socket: &impl AsFd) {
        for _ in 0..64 {
            let dry = self.batch(socket).is_err();
            if !self.pending.is_empty() {
                let rows = self.take_pending();
                let n = rows.len() as u64;
                if self.pipeline.tx.send(Msg::Rows(rows)).await.is_err() {
                    self.pipeline
                        .stats
                        .refused
                        .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
            if dry {
                return;
            }
        }
    }

    fn recv(&mut self, socket: &impl AsFd) -> std::io::Result<Datagram> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let msg = loop {
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            match rustix::net::recvmsg(
                socket,
                &mut iov,
                &mut control,
                // TRUNC: learn the real size of a datagram that did not fit.
                RecvFlags::DONTWAIT | RecvFlags::TRUNC | RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        let mut cred = None;
        // Draining also closes any fds a sender passed along (ScmRights).
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmCredentials(c) = m {
                cred = Some(c);
            }
        }
        Ok(Datagram {
            len: msg.bytes,
            truncated: msg.flags.contains(ReturnFlags::TRUNC) || msg.bytes > self.buf.len(),
            cred,
        })
    }

    /// Parses one datagram; counts what is bad.
    fn record(&mut self, d: Datagram) -> Option<(Incoming, Arc<Trusted>)> {
        let got = d.len.min(self.buf.len());
        let mut r = match formats::syslog::parse(&self.buf[..got], self.max) {
            Ok(r) => r,
            Err(e) => {
                self.pipeline.count_bad(FormatBad::SyslogEmpty, 1);
                tracing::debug!("syslog.sock: skipped a datagram: {e}");
                return None;
            }
        };
        if r.metadata.contains_key(ERROR_KEY) {
            // Kept as text, but the sender should hear about it.
            self.pipeline.count_bad(FormatBad::SyslogMalformed, 1);
        }
        if d.truncated {
            r.truncated = true;
            if !r.message.ends_with(TRUNCATION_MARK) {
                formats::truncate_message(&mut r.message, self.max.saturating_sub(1));
                if !r.message.ends_with(TRUNCATION_MARK) {
                    r.message.push_str(TRUNCATION_MARK);
                }
            }
            r.metadata
                .insert("logbook_original_bytes".into(), d.len.into());
        }
        Some((r, self.trusted(d.cred)))
    }

    fn trusted(&mut self, cred: Option<rustix::net::UCred>) -> Arc<Trusted> {
        let Some(c) = cred else {
            return Arc::new(Trusted::default());
        };
        if let Some((last, t, at)) = &self.last {
            if last.pid == c.pid
                && last.uid == c.uid
                && last.gid == c.gid
                && at.elapsed() < NAME_TTL
            {
                return t.clone();
            }
        }
        let pid = u32::try_from(c.pid.as_raw_nonzero().get()).ok();
        let t = Arc::new(Trusted {
            pid,
            uid: Some(c.uid.as_raw()),
            gid: Some(c.gid.as_raw()),
            process: pid.and_then(process_name),
        });
        self.last = Some((c, t.clone(), Instant::now()));
        t
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::sync::mpsc;

    use super::*;
    use crate::agent::store::Stats;

    fn receiver(capacity: usize) -> (Receiver, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel(capacity);
        let p = Pipeline::new(tx, Arc::new(Stats::default()));
        (Receiver::new(p, 1024), rx)
    }

    fn rows(m: Option<Msg>) -> Vec<Row> {
        match m {
            Some(Msg::Rows(r)) => r,
            _ => panic!("expected rows"),
        }
    }

    #[test]
    fn a_full_pipeline_holds_a_bounded_batch_then_drops_and_counts() {
        let (mut rx, mut chan) = receiver(1);
        rx.pipeline.tx.try_send(Msg::Rows(Vec::new())).unwrap();
        let row = |i: usize| {
            let r = formats::syslog::parse(format!("<14>t: {i}").as_bytes(), 1024).unwrap();
            rx.pipeline.row(r, Arc::default(), 1)
        };
        let all: Vec<Row> = (0..MAX_PENDING + 5).map(row).collect();
        for r in all {
            rx.hold(r);
        }
        rx.offer();
        assert_eq!(rx.pending.len(), MAX_PENDING, "kept while full");
        assert_eq!(rx.pipeline.stats.refused.load(Ordering::Relaxed), 5);
        assert!(rows(chan.try_recv().ok()).is_empty());
        rx.offer();
        assert!(rx.pending.is_empty() && rx.pending_bytes == 0);
        let got = rows(chan.try_recv().ok());
        assert_eq!(got.len(), MAX_PENDING);
        assert_eq!(got[0].message, "0", "oldest first");
    }

    #[test]
    fn credentials_and_cut_datagrams_from_a_real_socket() {
        let (mut rx, mut chan) = receiver(4);
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        rustix::net::sockopt::set_socket_passcred(&b, true).unwrap();
        a.send(b"<11>1 - - app - - - hi").unwrap();
        let long = format!("<14>big: {}", "x".repeat(1024 + HEADROOM + 100));
        a.send(long.as_bytes()).unwrap();
        a.send(b"\n").unwrap();
        rx.coalesce = Duration::from_secs(3600);
        let e = rx.batch(&b).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        // A small batch waits for more before it is handed over...
        assert!(chan.try_recv().is_err());
        assert_eq!(rx.pending.len(), 2);
        assert!(!rx.due());
        // ...until it has waited long enough.
        rx.coalesce = Duration::ZERO;
        assert!(rx.due());
        rx.offer();
        let got = rows(chan.try_recv().ok());
        assert_eq!(got.len(), 2, "the empty datagram is not a record");
        assert_eq!(got[0].message, "hi");
        assert_eq!(got[0].module, "app");
        assert_eq!(got[0].trusted.pid, Some(std::process::id()));
        assert_eq!(got[0].trusted.uid, Some(rustix::process::getuid().as_raw()));
        assert!(got[1].message.ends_with(TRUNCATION_MARK) && got[1].message.len() <= 1024);
        assert!(
            got[1]
                .metadata
                .contains(&format!("\"logbook_original_bytes\":{}", long.len())),
            "{}",
            got[1].metadata
        );
        let s = &rx.pipeline.stats;
        assert_eq!(
            s.bad_formats[FormatBad::SyslogEmpty as usize].load(Ordering::Relaxed),
            1
        );
        assert_eq!(s.truncated.load(Ordering::Relaxed), 1);
    }
}
