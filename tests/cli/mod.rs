//! Integration tests of `logbook --hub URL …`: a real `logbook-hub` fed with
//! batches and uploads the way agents send them, queried by the real
//! `logbook` binary the way an operator on a laptop would; and of the local
//! commands that only this CLI has (`local`).

mod errors;
mod follow;
mod local;
mod query;
mod reload;
mod same;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::hub::{HubProc, ORG, PROJECT};
use crate::util::bin;

/// `logbook` pointed at `hub` with its operator key (through the
/// environment, as `logbook dev` prints it).
pub fn cli(hub: &HubProc) -> Command {
    let mut c = Command::new(bin("logbook"));
    c.env("LOGBOOK_HUB_URL", &hub.url)
        .env("LOGBOOK_HUB_KEY", &hub.operator)
        .env("LOGBOOK_ORG", ORG)
        .env("LOGBOOK_PROJECT", PROJECT)
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` with `args`; panics when it fails.
pub fn ok(mut cmd: Command, args: &[&str]) -> String {
    let out = cmd.args(args).output().expect("run logbook");
    assert!(
        out.status.success(),
        "logbook {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `cmd` with `args` expecting a failure; returns stderr.
pub fn fails(mut cmd: Command, args: &[&str]) -> String {
    let out: Output = cmd.args(args).output().expect("run logbook");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "logbook {args:?} should fail; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    stderr
}

/// Each stdout line parsed as JSON.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// A running `logbook` whose stdout lines are collected as they come;
/// killed on drop.
pub struct Running {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
    pub stderr: Arc<Mutex<String>>,
    /// The threads reading stdout and stderr: they end at the pipes' EOF.
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn spawn(mut cmd: Command, args: &[&str]) -> Running {
        let mut child = cmd
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start logbook");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (out, l) = (child.stdout.take().unwrap(), lines.clone());
        let stdout = std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l.lock().unwrap().push(line);
            }
        });
        let (err, e) = (child.stderr.take().unwrap(), stderr.clone());
        let errors = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut e = e.lock().unwrap();
                e.push_str(&line);
                e.push('\n');
            }
        });
        Running {
            child,
            lines,
            stderr,
            readers: vec![stdout, errors],
        }
    }

    /// Waits (at most `timeout`) for the process to exit, then for every
    /// line it wrote: the pipes' last lines may still be unread when the
    /// exit is seen.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let status = crate::util::wait_for("logbook to exit", timeout, || {
            self.child.try_wait().unwrap()
        });
        for r in self.readers.drain(..) {
            r.join().unwrap();
        }
        status
    }

    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
