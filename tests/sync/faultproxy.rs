//! A fault-injecting TCP proxy for sync tests: sits between agent and hub
//! and, as the test switches its [`Fault`], passes traffic, refuses
//! connections, resets them mid-request, delays them, cuts the link, or
//! answers every request itself with an HTTP status and `Retry-After`.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// What the proxy does to connections, from now on.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Forward both ways untouched.
    Pass,
    /// Accept, then close at once without reading: the client sees a reset
    /// or an early EOF before any answer.
    Refuse,
    /// Forward, but reset the connection after this many bytes from the
    /// client (mid-request for anything larger).
    ResetAfter(u64),
    /// Forward, holding every chunk this long in each direction.
    Delay(Duration),
    /// Cut every open connection now, and refuse new ones until changed.
    Down,
    /// Answer every request with this status (and `Retry-After` seconds,
    /// when given) without forwarding it.
    Status { code: u16, retry_after: Option<u32> },
}

/// A reproducible generator for a fault schedule: seeded from
/// `LOGBOOK_TEST_SEED` when set, else at random, the seed printed so a
/// failing schedule can be replayed.
pub fn schedule_rng() -> StdRng {
    let seed: u64 = std::env::var("LOGBOOK_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("fault schedule seed {seed} (rerun with LOGBOOK_TEST_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

impl Fault {
    /// One step of a fault schedule: a pass one time in four, else each
    /// fault alike, with a reset after `reset_after` client bytes and a
    /// delay of `delay_ms`, the ranges sized to what the test sends.
    pub fn random(rng: &mut StdRng, reset_after: Range<u64>, delay_ms: Range<u64>) -> Fault {
        match rng.random_range(0..8) {
            0 | 1 => Fault::Pass,
            2 => Fault::Refuse,
            3 => Fault::ResetAfter(rng.random_range(reset_after)),
            4 => Fault::Delay(Duration::from_millis(rng.random_range(delay_ms))),
            5 => Fault::Down,
            6 => Fault::Status {
                code: 503,
                retry_after: Some(1),
            },
            _ => Fault::Status {
                code: 429,
                retry_after: Some(1),
            },
        }
    }
}

struct Shared {
    /// Where traffic goes; switchable, so a test can point an agent at the
    /// proxy before the hub exists.
    upstream: Mutex<SocketAddr>,
    fault: Mutex<Fault>,
    stop: AtomicBool,
    /// Open streams by connection number, so `Down` can cut them.
    open: Mutex<Vec<(u64, TcpStream)>>,
    accepted: AtomicU64,
    faulted: AtomicU64,
}

pub struct FaultProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            fault: Mutex::new(Fault::Pass),
            stop: AtomicBool::new(false),
            open: Mutex::new(Vec::new()),
            accepted: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
        });
        let s = shared.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let id = s.accepted.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                thread::spawn(move || handle(s, id, client));
            }
        });
        FaultProxy { addr, shared }
    }

    /// Sends new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.shared.upstream.lock().unwrap() = upstream;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, fault: Fault) {
        let cut = fault == Fault::Down;
        *self.shared.fault.lock().unwrap() = fault;
        if cut {
            for (_, s) in self.shared.open.lock().unwrap().drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Cuts every open connection (the fault stays as it is), so the next
    /// request meets the current fault instead of a pooled connection.
    pub fn cut(&self) {
        for (_, s) in self.shared.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }

    /// Connections accepted so far, and how many of them a fault touched.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.shared.accepted.load(Ordering::SeqCst),
            self.shared.faulted.load(Ordering::SeqCst),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.set(Fault::Down);
        // Wake the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
    }
}

fn handle(s: Arc<Shared>, id: u64, client: TcpStream) {
    let fault = s.fault.lock().unwrap().clone();
    match fault {
        Fault::Refuse | Fault::Down => {
            s.faulted.fetch_add(1, Ordering::SeqCst);
            // Linger 0 would send RST; a plain close is an early EOF, which
            // clients treat the same way (no answer: retry).
            let _ = client.shutdown(Shutdown::Both);
        }
        Fault::Status { code, retry_after } => {
            s.faulted.fetch_add(1, Ordering::SeqCst);
            answer_status(client, code, retry_after);
        }
        Fault::Pass | Fault::Delay(_) | Fault::ResetAfter(_) => {
            let to = *s.upstream.lock().unwrap();
            let Ok(upstream) = TcpStream::connect(to) else {
                return;
            };
            {
                let mut open = s.open.lock().unwrap();
                open.extend(client.try_clone().ok().map(|c| (id, c)));
                open.extend(upstream.try_clone().ok().map(|u| (id, u)));
            }
            let (delay, reset_after) = match fault {
                Fault::Delay(d) => (Some(d), None),
                Fault::ResetAfter(n) => {
                    s.faulted.fetch_add(1, Ordering::SeqCst);
                    (None, Some(n))
                }
                _ => (None, None),
            };
            let (c2, u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            let back = thread::spawn(move || pump(u2, c2, delay, None));
            pump(client, upstream, delay, reset_after);
            let _ = back.join();
            s.open.lock().unwrap().retain(|(i, _)| *i != id);
        }
    }
}

/// Copies `from` to `to` until EOF or error; with `limit`, cuts both after
/// that many bytes.
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Option<Duration>, limit: Option<u64>) {
    let mut buf = [0u8; 16 * 1024];
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(d) = delay {
            thread::sleep(d);
        }
        let n = match limit {
            Some(l) if sent + n as u64 >= l => {
                let part = (l - sent) as usize;
                let _ = to.write_all(&buf[..part]);
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
            _ => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Reads one request (head, and a body by Content-Length) and answers it.
fn answer_status(mut client: TcpStream, code: u16, retry_after: Option<u32>) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match client.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let _ = std::io::copy(&mut (&client).take(len), &mut std::io::sink());
    let reason = match code {
        429 => "Too Many Requests",
        503 => "Service Unavailable",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        _ => "Injected",
    };
    let retry = retry_after
        .map(|s| format!("Retry-After: {s}\r\n"))
        .unwrap_or_default();
    let resp = format!(
        "HTTP/1.1 {code} {reason}\r\n{retry}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let _ = client.write_all(resp.as_bytes());
    let _ = client.shutdown(Shutdown::Both);
}

/// The proxy's own behaviour, checked against a tiny echo upstream.
#[test]
fn faultproxy_faults_behave() {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    thread::spawn(move || {
        for c in upstream.incoming().flatten() {
            thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                let _ = std::io::copy(&mut &c, &mut w);
            });
        }
    });
    let proxy = FaultProxy::start(up_addr);
    let roundtrip = |msg: &[u8]| -> std::io::Result<Vec<u8>> {
        let mut c = TcpStream::connect(proxy.addr)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(msg)?;
        c.shutdown(Shutdown::Write)?;
        let mut out = Vec::new();
        c.read_to_end(&mut out)?;
        Ok(out)
    };
    assert_eq!(roundtrip(b"hello").unwrap(), b"hello");

    proxy.set(Fault::Refuse);
    assert!(roundtrip(b"hello").map(|v| v.is_empty()).unwrap_or(true));

    proxy.set(Fault::ResetAfter(4));
    let got = roundtrip(b"0123456789").unwrap_or_default();
    assert!(got.len() <= 4, "{got:?}");

    proxy.set(Fault::Status {
        code: 503,
        retry_after: Some(2),
    });
    let got = roundtrip(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").unwrap();
    let got = String::from_utf8(got).unwrap();
    assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
    assert!(got.contains("Retry-After: 2\r\n"), "{got}");

    proxy.set(Fault::Pass);
    assert_eq!(roundtrip(b"again").unwrap(), b"again");
    let (accepted, faulted) = proxy.counts();
    assert_eq!((accepted, faulted), (5, 3));
}
