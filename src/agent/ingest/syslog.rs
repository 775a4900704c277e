//! The syslog listener on `syslog.sock` (SOCK_DGRAM): one datagram is one
//! record, parsed by [`crate::agent::formats::syslog`], with trusted fields
//! from the `SCM_CREDENTIALS` the kernel attaches (we set `SO_PASSCRED`, so
//! every datagram carries the sender's pid/uid/gid even when the sender
//! passes none).
//!
//! Invariant: never waits on anything but the socket. Records go to the
//! pipeline with a non-blocking submit; when it is full they are dropped and
//! counted (`refused`). One receive buffer of `max_record_bytes` plus
//! headroom, reused; a longer datagram is kept cut, with a visible mark.

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

/// Bytes beyond `max_record_bytes` a datagram may have before it is cut:
/// the syslog header and structured data are not part of the message.
const HEADROOM: usize = 4096;
/// Datagrams read per wake-up before the records go to the pipeline: one
/// pipeline slot per batch instead of per datagram.
const BATCH: usize = 256;
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
    let mut asked = pipeline.register_listener();
    let mut rx = Receiver::new(pipeline, max_record_bytes);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                rx.drain(&socket);
                return;
            }
            Some(ack) = asked.recv() => {
                rx.drain(&socket);
                drop(ack);
            }
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
            last: None,
        }
    }

    /// Reads up to [`BATCH`] datagrams and submits them. `Err(WouldBlock)`
    /// when the socket ran dry (so the reactor waits again).
    fn batch(&mut self, socket: &impl AsFd) -> std::io::Result<()> {
        let mut records = Vec::new();
        let mut result = Ok(());
        for _ in 0..BATCH {
            match self.recv(socket) {
                Ok(d) => {
                    if let Some(r) = self.record(d) {
                        records.push(r);
                    }
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.pipeline.submit(records);
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                tracing::warn!("syslog.sock: receive failed: {e}");
                Ok(())
            }
            other => other,
        }
    }

    /// Hands over every datagram queued now (a flush or shutdown asked).
    /// Bounded, so a sender that never pauses cannot hold it up.
    fn drain(&mut self, socket: &impl AsFd) {
        for _ in 0..64 {
            if self.batch(socket).is_err() {
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
