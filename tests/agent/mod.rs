//! Integration tests of `logbookd` and the `logbook` CLI against it: a real
//! daemon per test on a fresh directory, spoken to over its real sockets.

mod console;
mod faults;
mod ingest;
pub mod marks;
mod sessions;
mod store;
mod systemd;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::util::{bin, wait_for, TestDir};

pub const DEVICE: &str = "test-device";

/// A running `logbookd`; killed on drop.
pub struct Agent {
    pub child: Child,
    pub state: PathBuf,
    pub runtime: PathBuf,
    pub log: PathBuf,
}

impl Agent {
    /// Starts `logbookd` on `dir` with extra environment, and waits until
    /// its API answers.
    pub fn start(dir: &TestDir, env: &[(&str, &str)]) -> Agent {
        let agent = Agent::spawn(dir, env, &[]);
        agent.wait_ready();
        agent
    }

    pub fn spawn(dir: &TestDir, env: &[(&str, &str)], args: &[&str]) -> Agent {
        let state = dir.join("state");
        let runtime = dir.join("run");
        let log = dir.join("logbookd.log");
        let mut cmd = Command::new(bin("logbookd"));
        cmd.arg("--state-dir")
            .arg(&state)
            .arg("--runtime-dir")
            .arg(&runtime)
            .args(args)
            .env("LOGBOOK_DEVICE_ID", DEVICE)
            .env("LOGBOOK_LOG_LEVEL", "debug")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            );
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start logbookd");
        Agent {
            child,
            state,
            runtime,
            log,
        }
    }

    pub fn wait_ready(&self) {
        wait_for("logbookd's API", Duration::from_secs(20), || {
            self.try_api("GET", "/healthz", None)
                .ok()
                .filter(|(s, _)| *s == 200)
        });
    }

    pub fn api_socket(&self) -> PathBuf {
        self.runtime.join("api.sock")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One HTTP/1.1 request over `api.sock`; the body parsed as JSON (or a
    /// JSON string holding the text).
    pub fn try_api(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> std::io::Result<(u16, Value)> {
        http(&self.api_socket(), method, path, body)
    }

    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        self.try_api(method, path, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nlog:\n{}", self.log_text()))
    }

    pub fn ok(&self, method: &str, path: &str, body: Option<&str>) -> Value {
        let (status, v) = self.api(method, path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path} -> {status}: {v}"
        );
        v
    }

    pub fn ingest(&self) -> UnixStream {
        UnixStream::connect(self.runtime.join("ingest.sock")).expect("connect ingest.sock")
    }

    /// `POST /v1/flush`; the last committed seq.
    pub fn flush(&self) -> u64 {
        self.ok("POST", "/v1/flush", None)["last_seq"]
            .as_u64()
            .unwrap()
    }

    /// Every record matching `query` (e.g. `level=warn`), oldest first.
    pub fn logs(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let page = self.ok(
                "GET",
                &format!("/v1/logs?after={after}&limit=1000&{query}"),
                None,
            );
            let items = page["items"].as_array().unwrap().clone();
            if let Some(last) = items.last() {
                after = last["seq"].as_u64().unwrap();
            }
            out.extend(items);
            if page["next_cursor"].is_null() {
                return out;
            }
        }
    }

    pub fn status(&self) -> Value {
        self.ok("GET", "/v1/status", None)
    }

    /// The CLI, pointed at this agent.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin("logbook"));
        c.arg("--runtime-dir").arg(&self.runtime);
        c
    }

    pub fn terminate(&mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        wait_for("logbookd to exit", Duration::from_secs(10), || {
            self.child.try_wait().unwrap()
        })
    }

    /// Whether the daemon is still running (it never exited on its own).
    pub fn child_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- logbookd log ({})\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }
}

pub fn http(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, Value)> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: logbookd\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line == "\r\n" || line.is_empty() {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut raw = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            raw.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut raw)?;
    }
    let text = String::from_utf8_lossy(&raw).into_owned();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok((status, v))
}

/// Sends lines on one connection and closes it.
pub fn send_lines(agent: &Agent, lines: &[&str]) {
    let mut s = agent.ingest();
    for l in lines {
        s.write_all(l.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
    }
}

/// Bytes of `agent.db` plus its WAL.
pub fn disk_bytes(agent: &Agent) -> u64 {
    ["agent.db", "agent.db-wal"]
        .iter()
        .map(|f| std::fs::metadata(agent.state.join(f)).map_or(0, |m| m.len()))
        .sum()
}
