//! Shared test support: a fresh directory per test, the real binaries, and
//! polling waits (never fixed sleeps).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Path of a binary of this crate, built by cargo for the integration tests.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "logbookd" => PathBuf::from(env!("CARGO_BIN_EXE_logbookd")),
        "logbook-hub" => PathBuf::from(env!("CARGO_BIN_EXE_logbook-hub")),
        "logbook" => PathBuf::from(env!("CARGO_BIN_EXE_logbook")),
        other => panic!("no binary {other}"),
    }
}

/// A fresh directory for one test, named after it, removed on drop unless
/// the test panicked (so the evidence stays for a look).
pub struct TestDir {
    pub path: PathBuf,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        // Unix socket paths are limited to 108 bytes: keep the root short.
        let root = std::env::temp_dir().join("lbt");
        std::fs::create_dir_all(&root).unwrap();
        let short: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(24)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{short}-"))
            .tempdir_in(&root)
            .unwrap()
            .keep();
        TestDir { path: dir }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// A listing of the directory, for failure messages.
    pub fn listing(&self) -> String {
        let mut out = String::new();
        list(&self.path, &self.path, &mut out);
        out
    }
}

fn list(root: &Path, dir: &Path, out: &mut String) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        let len = e.metadata().map(|m| m.len()).unwrap_or(0);
        out.push_str(&format!(
            "  {} ({len} bytes)\n",
            p.strip_prefix(root).unwrap().display()
        ));
        if p.is_dir() {
            list(root, &p, out);
        }
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Polls `f` every 10 ms until it returns `Some`, or panics after `timeout`
/// naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a command to completion; panics with its command line and stderr
/// when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Whether an outside program is installed (interop tests need it; `.ci/run`
/// installs them, a bare `cargo test` skips those tests with a notice).
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// For interop tests: true when `program` is installed. Without it, a plain
/// `cargo test` skips the test with a notice on stderr; under CI (`CI` set,
/// where `.ci/run` installs every client) a missing program fails the test,
/// so an interop test can never pass by not running.
pub fn interop_client(program: &str) -> bool {
    if have(program) {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("interop client {program} is not installed; .ci/run must install it");
    }
    eprintln!("SKIPPED: {program} is not installed (bash .ci/run installs it)");
    false
}

/// A child process killed and reaped when the guard drops, so a failing
/// test never leaves a daemon or a follower behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
