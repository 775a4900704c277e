//! The syslog listener on `syslog.sock` (SOCK_DGRAM): one datagram is one
//! record, parsed by [`crate::agent::formats::syslog`], with trusted fields
//! from the `SCM_CREDENTIALS` the kernel attaches (we set `SO_PASSCRED`, so
//! every datagram carries the sender's pid/uid/gid even when the sender
//! passes none).
//!
//! Invariant: one thread (`logbook-syslog`) reads the socket and waits on
//! nothing but the socket and the pipeline. Nothing received is dropped:
//! when the writer falls behind, the thread waits for room after at most
//! one batch ([`BATCH`] records), the kernel's queue fills and senders are
//! slowed, as stream clients are. One receive buffer of `max_record_bytes`
//! plus headroom, reused; a longer datagram is kept cut, with a visible
//! mark.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UnixDatagram;
use tokio_util::sync::CancellationToken;

use super::mmsg::{Batch, Cred, Got};
use super::{process_name, FormatBad, Pipeline};
use crate::agent::formats::tz::Zone;
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
/// Datagrams one `recvmmsg` takes at most. The kernel queue of a Unix
/// datagram socket holds `net.unix.max_dgram_qlen` (10 by default, 512
/// under systemd), so a call rarely finds more; each buffer's pages cost
/// memory only once a datagram that long has arrived.
const MMSG: usize = 32;
/// Longest a smaller batch waits for more datagrams before it goes to the
/// pipeline anyway. A busy sender wakes the listener every few datagrams,
/// and the pipeline's slots count messages, not records: tiny batches
/// would fill it while the writer idles.
const COALESCE: Duration = Duration::from_millis(2);
/// Longest the thread sleeps in `recvmsg` when idle before it looks for
/// requests anyway: a flush or shutdown wakes it at once with a datagram
/// of its own, so this only bounds a wake-up that could not be sent
/// (BENCHMARKS.md, "Idle").
const IDLE_WAKE: Duration = Duration::from_secs(5);
/// How long a pid's process name is trusted before `/proc` is read again
/// (a pid can be reused by another program).
const NAME_TTL: Duration = Duration::from_secs(1);

/// The zone RFC 3164 times are read in, once at start-up: `TZ` when set
/// (a zone name or path, or a POSIX rule; empty means UTC), else
/// `/etc/localtime`; UTC when neither can be read. Read from the TZif
/// file rather than asked of libc or the `time` crate, which cannot query
/// the local offset soundly in a multithreaded process, and kept whole
/// (transitions and rule), so daylight-saving changes while the agent runs
/// are honoured.
pub fn local_zone() -> Zone {
    let from_file = |p: &std::path::Path| std::fs::read(p).ok().and_then(|d| Zone::from_tzif(&d));
    let zone = match std::env::var("TZ") {
        Ok(tz) if tz.is_empty() => Some(Zone::utc()),
        Ok(tz) => {
            let name = tz.strip_prefix(':').unwrap_or(&tz);
            let path = if name.starts_with('/') {
                std::path::PathBuf::from(name)
            } else {
                std::path::Path::new("/usr/share/zoneinfo").join(name)
            };
            let safe = !name.split('/').any(|part| part == "..");
            (if safe { from_file(&path) } else { None }).or_else(|| Zone::from_posix(name))
        }
        Err(_) => from_file(std::path::Path::new("/etc/localtime")),
    };
    zone.unwrap_or_else(|| {
        tracing::info!(
            "no local time zone found (TZ, /etc/localtime): RFC 3164 times are read as UTC"
        );
        Zone::utc()
    })
}

/// A receive that found nothing (non-blocking, or the timeout passed).
fn is_dry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// Makes a datagram socket systemd passed (adopted as a listener by
/// [`crate::agent::systemd::listen_fds`], which cannot tell) a datagram
/// socket again. `None` if it is not one.
pub fn datagram_from_passed(fd: OwnedFd) -> Option<std::os::unix::net::UnixDatagram> {
    match rustix::net::sockopt::socket_type(&fd) {
        Ok(rustix::net::SocketType::DGRAM) => Some(std::os::unix::net::UnixDatagram::from(fd)),
        _ => None,
    }
}

/// What the async side asks of the receiver thread.
enum Ctl {
    /// Hand over everything received so far, then drop the sender.
    Flush(tokio::sync::oneshot::Sender<()>),
    /// Hand over everything received so far and stop.
    Stop,
}

/// Serves `socket` until `shutdown`, then hands over what it still holds.
///
/// The socket is read by a dedicated blocking thread (`logbook-syslog`):
/// a datagram sender wakes it straight out of `recvmsg`, with no reactor,
/// task wake-up or `epoll_wait` in between, which is most of the cost of
/// one small datagram. This task only relays flush and shutdown requests
/// (waking the thread with an empty datagram of our own) and waits for
/// the thread to finish.
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
    let pipeline = pipeline.for_protocol(super::Protocol::Syslog);
    let mut asked = pipeline.register_listener();
    let socket = match socket.into_std().and_then(|s| {
        s.set_nonblocking(false)?;
        Ok(s)
    }) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("syslog.sock: cannot read the socket: {e}");
            return;
        }
    };
    let wake = Waker::new(&socket);
    let (ctl_tx, ctl_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut rx = Receiver::new(pipeline, max_record_bytes);
    rx.zone = local_zone();
    let spawned = std::thread::Builder::new()
        .name("logbook-syslog".into())
        .spawn(move || {
            rx.run(&socket, &ctl_rx);
            drop(done_tx);
        });
    let thread = match spawned {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("syslog.sock: cannot start the receiver thread: {e}");
            return;
        }
    };
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let _ = ctl_tx.send(Ctl::Stop);
                wake.wake();
                break;
            }
            Some(ack) = asked.recv() => {
                let _ = ctl_tx.send(Ctl::Flush(ack));
                wake.wake();
            }
        }
    }
    let _ = done_rx.await;
    // It has ended (or is unwinding): joined to report a panic.
    if let Ok(Err(_)) = tokio::task::spawn_blocking(move || thread.join()).await {
        tracing::error!("syslog.sock: the receiver thread panicked");
    }
}

/// Wakes the receiver thread out of a blocking `recvmsg` with an empty
/// datagram from this process, which the thread recognizes by the kernel's
/// credentials and does not count.
struct Waker {
    socket: Option<std::os::unix::net::UnixDatagram>,
    to: Option<std::os::unix::net::SocketAddr>,
}

impl Waker {
    fn new(listener: &std::os::unix::net::UnixDatagram) -> Waker {
        Waker {
            socket: std::os::unix::net::UnixDatagram::unbound().ok(),
            to: listener.local_addr().ok(),
        }
    }

    fn wake(&self) {
        let (Some(s), Some(to)) = (&self.socket, &self.to) else {
            return;
        };
        // Non-blocking: when the queue is full the thread is awake anyway,
        // and it checks for requests after every batch. A failed wake
        // costs at most IDLE_WAKE.
        let _ = s.set_nonblocking(true);
        if let Err(e) = s.send_to_addr(b"", to) {
            tracing::debug!("syslog.sock: waking the receiver: {e}");
        }
    }
}

/// The state one listener keeps between datagrams.
struct Receiver {
    pipeline: Pipeline,
    max: usize,
    /// Receive buffers for [`MMSG`] datagrams of `max_record_bytes` plus
    /// [`HEADROOM`] each.
    mm: Batch,
    /// Rows not yet handed to the pipeline (still coalescing), oldest
    /// first.
    pending: Vec<Row>,
    /// When the oldest pending row arrived.
    pending_since: Instant,
    /// [`COALESCE`] (tests change it).
    coalesce: Duration,
    /// Recent senders' trusted fields, so interleaved bursts from a few
    /// processes read `/proc` once per process, not once per datagram.
    /// `/proc` once.
    last: Senders,
    /// The receive timeout currently set on the socket.
    timeout: Option<Duration>,
    /// This process, whose empty datagrams are wake-ups.
    me: u32,
    /// The zone of RFC 3164 times.
    zone: Zone,
}

impl Receiver {
    fn new(pipeline: Pipeline, max: usize) -> Receiver {
        Receiver {
            pipeline,
            max,
            mm: Batch::new(MMSG, max + HEADROOM),
            pending: Vec::with_capacity(BATCH),
            pending_since: Instant::now(),
            coalesce: COALESCE,
            last: Senders::default(),
            timeout: None,
            me: std::process::id(),
            zone: Zone::utc(),
        }
    }

    /// The thread's loop: block for a datagram, read what else is queued
    /// (up to [`BATCH`]), hand full or old batches to the pipeline, serve
    /// requests. Returns after a [`Ctl::Stop`] (or when the agent side is
    /// gone), having handed over everything.
    fn run(mut self, socket: &impl AsFd, ctl: &std::sync::mpsc::Receiver<Ctl>) {
        loop {
            // Idle: sleep until a datagram comes; rows waiting to coalesce:
            // only until they are due.
            let want = if self.pending.is_empty() {
                IDLE_WAKE
            } else {
                self.coalesce
                    .saturating_sub(self.pending_since.elapsed())
                    .max(Duration::from_micros(100))
            };
            self.set_timeout(socket, want);
            match self.mm.recv(socket, true) {
                Ok(n) => {
                    let arrival = now_ns();
                    self.take(n, arrival);
                    let _ = self.batch(socket, arrival);
                }
                Err(e) if is_dry(&e) => {}
                Err(e) => {
                    tracing::warn!("syslog.sock: receive failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            if self.due() {
                self.send_pending();
            }
            loop {
                match ctl.try_recv() {
                    Ok(Ctl::Flush(ack)) => {
                        self.drain(socket);
                        drop(ack);
                    }
                    Ok(Ctl::Stop) | Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                        self.drain(socket);
                        return;
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                }
            }
        }
    }

    fn set_timeout(&mut self, socket: &impl AsFd, want: Duration) {
        // Only changed when it must: a busy socket keeps one setting.
        let close = self
            .timeout
            .is_some_and(|t| t.abs_diff(want) < Duration::from_micros(500));
        if close {
            return;
        }
        let r = rustix::net::sockopt::set_socket_timeout(
            socket,
            rustix::net::sockopt::Timeout::Recv,
            Some(want),
        );
        if r.is_ok() {
            self.timeout = Some(want);
        }
    }

    /// Reads what is queued now, until [`BATCH`] rows are pending,
    /// without waiting. `Err(WouldBlock)` when the socket ran dry.
    fn batch(&mut self, socket: &impl AsFd, arrival: i64) -> std::io::Result<()> {
        while self.pending.len() < BATCH {
            match self.mm.recv(socket, false) {
                Ok(n) => self.take(n, arrival),
                Err(e) => {
                    if !is_dry(&e) {
                        tracing::warn!("syslog.sock: receive failed: {e}");
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Parses the `n` datagrams just received into the pending batch.
    fn take(&mut self, n: usize, arrival: i64) {
        let now = time::OffsetDateTime::from_unix_timestamp_nanos(arrival as i128)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        for i in 0..n {
            let (bytes, d) = self.mm.get(i);
            if d.len == 0 && d.cred.is_some_and(|c| c.pid == self.me) {
                // Our own wake-up (see Waker).
                continue;
            }
            let parsed = formats::syslog::parse_in(bytes, self.max, now, &self.zone);
            if let Some((r, t)) = record(&self.pipeline, self.max, parsed, d, &mut self.last) {
                let row = self.pipeline.row(r, t, arrival);
                if self.pending.is_empty() {
                    self.pending_since = Instant::now();
                }
                self.pending.push(row);
            }
        }
    }

    /// Hands the pending rows to the pipeline, waiting for room: a writer
    /// that falls behind holds up this thread, the kernel's queue fills and
    /// senders wait (or, if non-blocking, are told EAGAIN), exactly as
    /// stream clients are slowed, instead of records being dropped here.
    fn send_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let rows = std::mem::replace(&mut self.pending, Vec::with_capacity(BATCH));
        self.pipeline.stats.spent.free();
        let n = rows.len() as u64;
        if self.pipeline.tx.blocking_send(Msg::Rows(rows)).is_err() {
            self.pipeline
                .stats
                .refused
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Whether the pending rows should go to the pipeline now.
    fn due(&self) -> bool {
        !self.pending.is_empty()
            && (self.pending.len() >= BATCH || self.pending_since.elapsed() >= self.coalesce)
    }

    /// Hands over every datagram queued now and what is pending (a flush
    /// or shutdown asked). Bounded, so a sender that never pauses cannot
    /// hold it up: what it sends meanwhile arrived after the request.
    fn drain(&mut self, socket: &impl AsFd) {
        for _ in 0..64 {
            let dry = self.batch(socket, now_ns()).is_err();
            self.send_pending();
            if dry {
                return;
            }
        }
    }
}

/// Completes one parsed datagram; counts what is bad. `last`: recent
/// senders' trusted fields (see [`Receiver::last`]).
fn record(
    pipeline: &Pipeline,
    max: usize,
    parsed: Result<Incoming, formats::syslog::BadSyslog>,
    d: Got,
    last: &mut Senders,
) -> Option<(Incoming, Arc<Trusted>)> {
    let mut r = match parsed {
        Ok(r) => r,
        Err(e) => {
            pipeline.count_bad(FormatBad::SyslogEmpty, 1);
            tracing::debug!("syslog.sock: skipped a datagram: {e}");
            return None;
        }
    };
    if r.metadata.contains_key(ERROR_KEY) {
        // Kept as text, but the sender should hear about it.
        pipeline.count_bad(FormatBad::SyslogMalformed, 1);
    }
    if d.truncated {
        r.truncated = true;
        if !r.message.ends_with(TRUNCATION_MARK) {
            formats::truncate_message(&mut r.message, max.saturating_sub(1));
            if !r.message.ends_with(TRUNCATION_MARK) {
                r.message.push_str(TRUNCATION_MARK);
            }
        }
        r.metadata
            .insert("logbook_original_bytes".into(), d.len.into());
    }
    Some((r, trusted(d.cred, last)))
}

/// Senders whose process names were read recently. Robot software logs
/// from a handful of processes at once, so a few entries keep `/proc` reads
/// to one per process per [`NAME_TTL`], however their datagrams interleave.
#[derive(Default)]
struct Senders {
    recent: Vec<(Cred, Arc<Trusted>, Instant)>,
}

/// Senders remembered at most; the oldest entry makes room for a new one.
const SENDERS: usize = 16;

fn trusted(cred: Option<Cred>, senders: &mut Senders) -> Arc<Trusted> {
    let Some(c) = cred else {
        return Arc::new(Trusted::default());
    };
    let recent = &mut senders.recent;
    if let Some(i) = recent.iter().position(|(l, _, _)| *l == c) {
        if recent[i].2.elapsed() < NAME_TTL {
            return recent[i].1.clone();
        }
        recent.swap_remove(i);
    }
    let pid = (c.pid != 0).then_some(c.pid);
    let t = Arc::new(Trusted {
        pid,
        uid: Some(c.uid),
        gid: Some(c.gid),
        process: pid.and_then(process_name),
    });
    if recent.len() >= SENDERS {
        let oldest = (0..recent.len())
            .min_by_key(|&i| recent[i].2)
            .expect("the list is full");
        recent.swap_remove(oldest);
    }
    recent.push((c, t.clone(), Instant::now()));
    t
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
    fn a_full_pipeline_holds_up_the_receiver_instead_of_dropping() {
        let (mut rx, mut chan) = receiver(1);
        rx.pipeline.tx.try_send(Msg::Rows(Vec::new())).unwrap();
        let row = |i: usize| {
            let r = formats::syslog::parse(format!("<14>t: {i}").as_bytes(), 1024).unwrap();
            rx.pipeline.row(r, Arc::default(), 1)
        };
        rx.pending = (0..BATCH + 5).map(row).collect();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            rx.send_pending();
            done_tx.send(()).unwrap();
            rx
        });
        // The channel is full: the receiver waits (nothing dropped)...
        assert!(done_rx.recv_timeout(Duration::from_millis(200)).is_err());
        assert!(rows(chan.blocking_recv()).is_empty());
        // ...and goes on once the writer took a message.
        let got = rows(chan.blocking_recv());
        let rx = t.join().unwrap();
        assert_eq!(got.len(), BATCH + 5);
        assert_eq!(got[0].message, "0", "oldest first");
        assert!(rx.pending.is_empty());
        assert_eq!(rx.pipeline.stats.refused.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn interleaved_senders_keep_their_trusted_fields_cached() {
        let cred = |pid| {
            Some(Cred {
                pid,
                uid: 1000,
                gid: 1000,
            })
        };
        let mut senders = Senders::default();
        let me = std::process::id();
        let first: Vec<Arc<Trusted>> = (0..SENDERS as u32)
            .map(|i| trusted(cred(me + i), &mut senders))
            .collect();
        assert_eq!(first[0].process.as_deref().map(str::is_empty), Some(false));
        // Round robin over as many senders as the cache holds: every one is
        // a hit (the same Arc, no second /proc read).
        for _ in 0..3 {
            for (i, t) in first.iter().enumerate() {
                assert!(Arc::ptr_eq(t, &trusted(cred(me + i as u32), &mut senders)));
            }
        }
        // One more sender evicts the oldest entry only.
        let _ = trusted(cred(me + SENDERS as u32), &mut senders);
        assert_eq!(senders.recent.len(), SENDERS);
        assert!(!Arc::ptr_eq(&first[0], &trusted(cred(me), &mut senders)));
        assert!(Arc::ptr_eq(
            &first[SENDERS - 1],
            &trusted(cred(me + SENDERS as u32 - 1), &mut senders)
        ));
        // No credentials: nothing trusted, nothing cached.
        assert_eq!(*trusted(None, &mut senders), Trusted::default());
    }

    #[test]
    fn our_own_empty_datagram_only_wakes() {
        let (mut rx, _chan) = receiver(4);
        let (a, b) = std::os::unix::net::UnixDatagram::pair().unwrap();
        rustix::net::sockopt::set_socket_passcred(&b, true).unwrap();
        a.send(b"").unwrap();
        let e = rx.batch(&b, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert!(rx.pending.is_empty());
        let s = &rx.pipeline.stats;
        assert_eq!(
            s.bad_formats[FormatBad::SyslogEmpty as usize].load(Ordering::Relaxed),
            0
        );
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
        let e = rx.batch(&b, 1).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        // A small batch waits for more before it is handed over...
        assert_eq!(rx.pending.len(), 2);
        assert!(!rx.due());
        // ...until it has waited long enough.
        rx.coalesce = Duration::ZERO;
        assert!(rx.due());
        rx.send_pending();
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
