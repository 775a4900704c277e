//! systemd integration without libsystemd: `sd_notify` messages (READY=1,
//! WATCHDOG=1, STATUS=, STOPPING=1) over `$NOTIFY_SOCKET`, and socket
//! activation (adopting `$LISTEN_FDS` sockets by `$LISTEN_FDNAMES`).
//!
//! Invariant: the only unsafe code here is `adopt::listener`, which takes
//! ownership of a file descriptor systemd passed and nothing else owns (the
//! crate's other unsafe code is in `ingest::mmsg`, `store::insert` and
//! `memory`).

use std::collections::HashMap;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A connection to the service manager; sends are best effort (a missing
/// or dead manager must never stop the agent).
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a no-op notifier when unset.
    pub fn from_env() -> Notifier {
        Notifier::new(std::env::var_os("NOTIFY_SOCKET").map(|s| s.to_string_lossy().into_owned()))
    }

    pub fn new(path: Option<String>) -> Notifier {
        let socket = path.and_then(|p| {
            let addr = if let Some(name) = p.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&p).ok()?
            };
            let sock = UnixDatagram::unbound().ok()?;
            Some((sock, addr))
        });
        Notifier { socket }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    pub fn notify(&self, state: &str) {
        if let Some((sock, addr)) = &self.socket {
            if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
                tracing::debug!("sd_notify {state:?} failed: {e}");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=stopping: committing buffered records");
    }
}

/// Half of `$WATCHDOG_USEC` when the watchdog is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Socket names logbookd looks for.
pub const KNOWN: &[&str] = &["ingest", "api", "syslog", "forward"];

/// Listening Unix sockets passed by systemd, by `FileDescriptorName=`
/// (unnamed ones are named after the socket path's file stem, e.g.
/// `ingest` for `…/ingest.sock`).
pub fn listen_fds() -> HashMap<String, std::os::unix::net::UnixListener> {
    let mut out = HashMap::new();
    let Some(pid) = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return out;
    };
    if pid != std::process::id() {
        return out;
    }
    let n: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    for i in 0..n.clamp(0, 64) {
        let fd = 3 + i;
        let Some(listener) = adopt::listener(fd) else {
            tracing::warn!("ignoring passed fd {fd}: not a listening Unix stream socket");
            continue;
        };
        let name = match names
            .get(i as usize)
            .filter(|n| !n.is_empty() && *n != "unknown")
        {
            Some(n) => n.clone(),
            None => listener
                .local_addr()
                .ok()
                .and_then(|a| {
                    a.as_pathname()
                        .and_then(|p| p.file_stem())
                        .map(|s| s.to_string_lossy().into_owned())
                })
                .unwrap_or_else(|| format!("fd{fd}")),
        };
        if listener.set_nonblocking(true).is_ok() {
            out.insert(name, listener);
        }
    }
    // The variables are for this process only, not its children.
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    out
}

mod adopt {
    use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

    /// Takes ownership of `fd` if it is an open Unix stream socket.
    ///
    /// Safety argument: systemd's protocol hands fds 3..3+LISTEN_FDS to this
    /// process (LISTEN_PID checked by the caller) and nothing in this
    /// program opens or owns them before `listen_fds` runs, which happens
    /// once at startup before any other file is opened. The fd is checked to
    /// be open and a socket before ownership is taken.
    #[allow(unsafe_code)]
    pub fn listener(fd: RawFd) -> Option<std::os::unix::net::UnixListener> {
        // SAFETY: borrowing only to inspect; fcntl on a closed fd fails
        // harmlessly with EBADF.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        rustix::io::fcntl_getfd(borrowed).ok()?;
        let stat = rustix::fs::fstat(borrowed).ok()?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::Socket {
            return None;
        }
        // SAFETY: the fd is open, is a socket, and is owned by no one else
        // (see above); from here the OwnedFd closes it exactly once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC);
        Some(std::os::unix::net::UnixListener::from(owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(Some(path.display().to_string()));
        n.ready("ok");
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
    }

    #[test]
    fn notify_reaches_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("logbook-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(Some(format!("@{name}"))).watchdog();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }
}
