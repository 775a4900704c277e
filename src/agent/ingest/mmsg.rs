//! `recvmmsg(2)` for the syslog listener: many datagrams, each with the
//! sender's `SCM_CREDENTIALS`, in one system call. rustix 1.x wraps
//! `sendmmsg` but not `recvmmsg`, so this is a raw libc call. Public so
//! `agent_bench` measures the kernel's ceiling with this same receive.
//!
//! Invariant: one of the crate's three unsafe modules, with
//! `agent::systemd::adopt` and `agent::store::insert`. Every pointer handed to the kernel points into
//! buffers this struct owns and are rebuilt right before each call (so a
//! moved `Batch` can never leave stale pointers behind); lengths come from
//! those buffers; every file descriptor a sender passes (`SCM_RIGHTS`) is
//! closed at once.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// Control space per datagram: credentials (32 bytes) and room for a few
/// passed fds, which are closed.
const CONTROL: usize = 64;

/// One received datagram's size before any cut, whether it was cut, and
/// the sender the kernel vouches for.
#[derive(Debug, Clone, Copy)]
pub struct Got {
    pub len: usize,
    pub truncated: bool,
    pub cred: Option<Cred>,
}

/// `struct ucred`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cred {
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Receive buffers for up to `n` datagrams of up to `cap` bytes each.
pub struct Batch {
    cap: usize,
    data: Vec<u8>,
    /// `u64`s, so every control buffer is aligned for `cmsghdr`.
    control: Vec<u64>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    got: Vec<Got>,
}

// SAFETY: the raw pointers inside `iovs`/`hdrs` only ever point into
// `data` and `control`, owned by the same struct; they are rewritten before
// each use, so moving the struct to another thread moves what they point at.
#[allow(unsafe_code)]
unsafe impl Send for Batch {}

impl Batch {
    #[allow(unsafe_code)]
    pub fn new(n: usize, cap: usize) -> Batch {
        let n = n.max(1);
        Batch {
            cap,
            // Zeroed pages the kernel never wrote to cost no memory.
            data: vec![0; n * cap],
            control: vec![0; n * CONTROL / 8],
            iovs: (0..n)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: mmsghdr is plain old data (pointers, integers); all
            // zeroes is a valid value (null pointers, zero lengths).
            hdrs: (0..n).map(|_| unsafe { std::mem::zeroed() }).collect(),
            got: Vec::with_capacity(n),
        }
    }

    /// Receives up to `n` datagrams. `wait`: block for the first one (up
    /// to the socket's receive timeout), then take what is queued
    /// (`MSG_WAITFORONE`); otherwise never block. Returns how many arrived;
    /// `Err(WouldBlock)` when none.
    #[allow(unsafe_code)]
    pub fn recv(&mut self, socket: &impl AsFd, wait: bool) -> std::io::Result<usize> {
        let n = self.hdrs.len();
        let data = self.data.as_mut_ptr();
        let control = self.control.as_mut_ptr().cast::<u8>();
        for i in 0..n {
            self.iovs[i] = libc::iovec {
                // SAFETY: pointer arithmetic within `data`: i * cap < data.len().
                iov_base: unsafe { data.add(i * self.cap) }.cast(),
                iov_len: self.cap,
            };
        }
        let iovs = self.iovs.as_mut_ptr();
        for (i, h) in self.hdrs.iter_mut().enumerate() {
            let m = &mut h.msg_hdr;
            m.msg_name = std::ptr::null_mut();
            m.msg_namelen = 0;
            // SAFETY: pointer arithmetic within `iovs`: i < iovs.len().
            m.msg_iov = unsafe { iovs.add(i) };
            m.msg_iovlen = 1;
            // SAFETY: pointer arithmetic within `control`:
            // i * CONTROL < control.len() * 8.
            m.msg_control = unsafe { control.add(i * CONTROL) }.cast();
            m.msg_controllen = CONTROL as _;
            m.msg_flags = 0;
            h.msg_len = 0;
        }
        let flags = libc::MSG_TRUNC
            | libc::MSG_CMSG_CLOEXEC
            | if wait {
                libc::MSG_WAITFORONE
            } else {
                libc::MSG_DONTWAIT
            };
        // SAFETY: `hdrs` holds `n` initialized headers whose iovecs and
        // control buffers point into `data`/`control` with the lengths
        // given, all alive and not otherwise borrowed during the call; no
        // timeout pointer.
        let r = unsafe {
            libc::recvmmsg(
                socket.as_fd().as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                n as _,
                flags as _,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let got = r as usize;
        self.got.clear();
        for i in 0..got {
            let h = &self.hdrs[i];
            let len = h.msg_len as usize;
            let cred = self.control_of(i);
            self.got.push(Got {
                len,
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 || len > self.cap,
                cred,
            });
        }
        Ok(got)
    }

    /// Datagram `i` of the last [`Batch::recv`]: its bytes (cut to the
    /// buffer) and what the kernel said about it.
    pub fn get(&self, i: usize) -> (&[u8], Got) {
        let g = self.got[i];
        let start = i * self.cap;
        (&self.data[start..start + g.len.min(self.cap)], g)
    }

    /// Reads the credentials of datagram `i` and closes any fds passed.
    #[allow(unsafe_code)]
    fn control_of(&self, i: usize) -> Option<Cred> {
        let h = &self.hdrs[i].msg_hdr;
        let mut cred = None;
        // SAFETY: the kernel wrote `msg_controllen` bytes of control
        // messages into our buffer; CMSG_FIRSTHDR/NXTHDR stay within it
        // and return null at its end. Each payload is read unaligned with
        // the size its type implies, bounded by `cmsg_len`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                let payload = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let p = libc::CMSG_DATA(c);
                if (*c).cmsg_level == libc::SOL_SOCKET {
                    if (*c).cmsg_type == libc::SCM_CREDENTIALS
                        && payload >= std::mem::size_of::<libc::ucred>()
                    {
                        let u = std::ptr::read_unaligned(p.cast::<libc::ucred>());
                        cred = Some(Cred {
                            pid: u.pid as u32,
                            uid: u.uid,
                            gid: u.gid,
                        });
                    } else if (*c).cmsg_type == libc::SCM_RIGHTS {
                        for k in 0..payload / std::mem::size_of::<libc::c_int>() {
                            let fd = std::ptr::read_unaligned(p.cast::<libc::c_int>().add(k));
                            // The kernel installed it for us: we own it
                            // and close it here.
                            drop(OwnedFd::from_raw_fd(fd));
                        }
                    }
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        cred
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn many_datagrams_with_credentials_and_cuts_in_one_call() {
        let (a, b) = UnixDatagram::pair().unwrap();
        rustix::net::sockopt::set_socket_passcred(&b, true).unwrap();
        a.send(b"one").unwrap();
        a.send(b"").unwrap();
        a.send(&[b'x'; 40]).unwrap();
        let mut batch = Batch::new(8, 16);
        assert_eq!(batch.recv(&b, false).unwrap(), 3);
        let me = Cred {
            pid: std::process::id(),
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
        };
        let (d, g) = batch.get(0);
        assert_eq!(
            (d, g.len, g.truncated, g.cred),
            (&b"one"[..], 3, false, Some(me))
        );
        let (d, g) = batch.get(1);
        assert_eq!((d.len(), g.len, g.truncated), (0, 0, false));
        let (d, g) = batch.get(2);
        assert_eq!((d, g.len, g.truncated), (&[b'x'; 16][..], 40, true));
        let e = batch.recv(&b, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn passed_fds_are_closed() {
        use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
        let (a, b) = UnixDatagram::pair().unwrap();
        rustix::net::sockopt::set_socket_passcred(&b, true).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passed");
        let file = std::fs::File::create(&path).unwrap();
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [file.as_fd()];
        assert!(control.push(SendAncillaryMessage::ScmRights(&fds)));
        rustix::net::sendmsg(
            &a,
            &[std::io::IoSlice::new(b"hi")],
            &mut control,
            SendFlags::empty(),
        )
        .unwrap();
        drop(file);
        // Whether any fd of this process still points at the file.
        let held = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
        };
        let mut batch = Batch::new(2, 16);
        assert_eq!(batch.recv(&b, true).unwrap(), 1);
        assert_eq!(batch.get(0).0, b"hi");
        assert!(batch.get(0).1.cred.is_some());
        assert!(!held(), "the passed fd was closed");
    }
}
