//! Test-only S3: one throwaway moto server (`moto[server]` from PyPI) per
//! test process, on a free port in a temporary directory, a fresh bucket
//! per test, and the server stopped when the test process exits.
//!
//! The server runs under a small shell that reads its stdin: the pipe
//! closes when this process ends however it ends (passed, panicked,
//! killed), and the shell then stops the server and removes its directory.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

struct Server {
    port: u16,
    /// Holding the shell's stdin open keeps the server running.
    _keeper: Mutex<Child>,
}

static SERVER: OnceLock<Result<Server, String>> = OnceLock::new();
static NEXT_BUCKET: AtomicU32 = AtomicU32::new(0);

/// A bucket of this process's server, and the `AWS_*` environment a hub
/// needs to reach it.
pub(crate) struct TestBucket {
    pub bucket: String,
    pub endpoint: String,
}

impl TestBucket {
    /// `s3://bucket/prefix` (the value of `storage.blobs`).
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{}/{prefix}", self.bucket)
    }

    /// The standard variables of a client of this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", "testing".into()),
            ("AWS_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
        ]
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// One HTTP/1.1 request without a body to the server; its status line.
fn request(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    let text = String::from_utf8_lossy(&out);
    text.lines().next().map(str::to_owned)
}

/// How to run moto's server here, if it is installed.
fn moto_command() -> Option<String> {
    let python_has_it = Command::new("python3")
        .args(["-c", "import moto.server, flask"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    python_has_it.then(|| "python3 -m moto.server".to_owned())
}

fn start() -> Result<Server, String> {
    let moto = moto_command().ok_or(
        "moto[server] is not installed (python3 -m pip install 'moto[server]'; bash .ci/run does)",
    )?;
    let dir = tempfile::Builder::new()
        .prefix("logbook-s3-")
        .tempdir()
        .map_err(|e| format!("temp dir: {e}"))?
        .keep();
    // A port taken between `free_port` and the server's bind: try another.
    let mut last_err = String::new();
    for _ in 0..3 {
        let port = free_port();
        let script = format!(
            "cd '{dir}' && {moto} -H 127.0.0.1 -p {port} >server.log 2>&1 &
             pid=$!
             read _ignored
             kill $pid; wait $pid; rm -rf '{dir}'",
            dir = dir.display(),
        );
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting moto: {e}"))?;
        // Python starts slowly on a busy machine: a generous bound, polled.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if request(port, "GET", "/").is_some_and(|s| s.contains(" 200")) {
                return Ok(Server {
                    port,
                    _keeper: Mutex::new(child),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
                last_err = format!("moto exited ({status}): {}", log.trim());
                break;
            }
            if Instant::now() > deadline {
                child.stdin.take().map(|mut s| s.write_all(b"\n"));
                return Err("moto did not answer within 120 s".into());
            }
            // Polling readiness, not a fixed wait.
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Err(last_err)
}

/// The endpoint (`http://127.0.0.1:PORT`) of this process's server, or
/// `None` (after printing `SKIPPED: ...`) when moto is not installed.
/// Under CI (`CI` set) a server that cannot start fails the test.
pub(crate) fn endpoint(test: &str) -> Option<String> {
    match SERVER.get_or_init(start) {
        Ok(s) => Some(format!("http://127.0.0.1:{}", s.port)),
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("{test}: an S3 server (moto) is required under CI: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: {test}: {e}");
            None
        }
    }
}

/// A fresh, empty bucket on this process's server, or `None` as
/// [`endpoint`] says.
pub(crate) fn fresh_bucket(test: &str) -> Option<TestBucket> {
    let endpoint = endpoint(test)?;
    let port: u16 = endpoint.rsplit(':').next()?.parse().ok()?;
    let n = NEXT_BUCKET.fetch_add(1, Ordering::Relaxed);
    let bucket = format!("logbook-test-{}-{n}", std::process::id());
    let status = request(port, "PUT", &format!("/{bucket}"))
        .unwrap_or_else(|| panic!("{test}: moto did not answer creating {bucket}"));
    assert!(
        status.contains(" 200"),
        "{test}: creating {bucket}: {status}"
    );
    Some(TestBucket { bucket, endpoint })
}
