//! The client against a real Unix socket standing in for `logbookd`'s
//! `ingest.sock`: delivery, format, and an agent that stops and restarts.

use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing_subscriber::prelude::*;

use super::*;

/// A listener that reads JSON lines like the agent does, and can be
/// stopped (socket closed, connections shut, file removed) and restarted.
struct FakeAgent {
    path: PathBuf,
    lines: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<UnixStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn start(path: &Path, lines: Arc<Mutex<Vec<Value>>>) -> FakeAgent {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let (stop2, conns2, lines2) = (stop.clone(), conns.clone(), lines.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let conn = conn.unwrap();
                conns2.lock().unwrap().push(conn.try_clone().unwrap());
                let lines = lines2.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(conn).lines() {
                        let Ok(line) = line else { return };
                        let v: Value = serde_json::from_str(&line)
                            .unwrap_or_else(|e| panic!("not JSON: {line:?}: {e}"));
                        lines.lock().unwrap().push(v);
                    }
                });
            }
        });
        FakeAgent {
            path: path.to_owned(),
            lines,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    fn count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    fn wait_for_count(&self, n: usize) {
        let start = Instant::now();
        while self.count() < n {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out waiting for {n} lines, have {}",
                self.count()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag and drops the listener.
        let _ = UnixStream::connect(&self.path);
        self.accept.take().unwrap().join().unwrap();
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
        std::fs::remove_file(&self.path).unwrap();
    }
}

fn socket_path(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::Builder::new().prefix(name).tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    (dir, path)
}

#[test]
fn events_arrive_as_json_lines() {
    let (_dir, path) = socket_path("client-format");
    let lines = Arc::default();
    let agent = FakeAgent::start(&path, lines);
    let layer = LogbookLayer::builder().socket(&path).build();
    let handle = layer.handle();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let outer = tracing::info_span!("mission", id = 7);
        let _o = outer.enter();
        let inner = tracing::debug_span!("plan");
        let _i = inner.enter();
        tracing::warn!(target: "nav::planner", obstacles = 5, ok = false, ratio = 0.5, who = ?"lidar", "replanning around {}", "a box");
        let err = std::io::Error::other("motor stalled");
        tracing::error!(error = &err as &dyn std::error::Error, "arm failed");
        tracing::warn!(
            mark = "collision",
            mark_before = "5s",
            mark_priority = "high",
            speed = 1.5,
            "bumped"
        );
    });
    assert!(handle.flush(Duration::from_secs(10)), "flush timed out");
    agent.wait_for_count(3);
    // A `mark` field becomes the `event` the agent makes a mark of.
    let got = agent.lines.lock().unwrap().clone();
    assert_eq!(
        (&got[2]["event"], &got[2]["fields"]),
        (
            &json!({"name": "collision", "before": "5s", "priority": "high"}),
            &json!({"speed": 1.5})
        )
    );
    let got = agent.lines.lock().unwrap().clone();
    let ts = got[0]["timestamp"].as_str().unwrap();
    // RFC 3339 with nanoseconds in UTC, e.g. 2026-11-26T01:02:03.123456789Z.
    assert_eq!(
        (ts.len(), &ts[10..11], &ts[19..20], &ts[29..]),
        (30, "T", ".", "Z"),
        "{ts}"
    );
    let without_ts = |v: &Value| {
        let mut v = v.clone();
        v.as_object_mut().unwrap().remove("timestamp");
        v
    };
    assert_eq!(
        without_ts(&got[0]),
        json!({"level": "warn", "module": "nav::planner", "message": "replanning around a box",
               "fields": {"obstacles": 5, "ok": false, "ratio": 0.5, "who": "\"lidar\""},
               "spans": ["mission", "plan"]})
    );
    assert_eq!(got[1]["fields"]["error"], json!("motor stalled"));
    assert_eq!(got[1]["level"], json!("error"));
    assert_eq!(handle.dropped(), 0);
    agent.stop();
}

#[test]
fn agent_restart_never_blocks_and_reports_drops() {
    const CAPACITY: usize = 1000;
    const BURST: usize = 100_000;
    let (_dir, path) = socket_path("client-restart");
    let lines: Arc<Mutex<Vec<Value>>> = Arc::default();
    let agent = FakeAgent::start(&path, lines.clone());
    let layer = LogbookLayer::builder()
        .socket(&path)
        .queue_capacity(CAPACITY)
        .backoff(Duration::from_millis(5), Duration::from_millis(50))
        .build();
    let handle = layer.handle();
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));

    tracing::dispatcher::with_default(&dispatch, || tracing::info!(n = 0, "before"));
    assert!(handle.flush(Duration::from_secs(10)));
    agent.wait_for_count(1);
    agent.stop();

    // The agent is gone: every event must be either queued (at most the
    // capacity, plus the one line the sender holds while reconnecting) or
    // dropped and counted, and the caller must not wait for anything.
    let start = Instant::now();
    tracing::dispatcher::with_default(&dispatch, || {
        for i in 0..BURST {
            tracing::info!(n = i as u64 + 1, "while away");
        }
    });
    let elapsed = start.elapsed();
    eprintln!("{BURST} events with the agent away took {elapsed:?}");
    let dropped = handle.dropped();
    assert!(
        dropped as usize >= BURST - CAPACITY - 1,
        "only {dropped} of {BURST} dropped with a queue of {CAPACITY}: the caller must have waited"
    );
    let start = Instant::now();
    while handle.connected() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "sender never noticed the agent left"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let agent = FakeAgent::start(&path, lines.clone());
    assert!(handle.flush(Duration::from_secs(20)), "flush after restart");
    // First line after the restart is the drop count; then what was queued.
    agent.wait_for_count(2);
    let report = lines.lock().unwrap()[1].clone();
    assert_eq!(report["level"], json!("warn"));
    assert_eq!(report["module"], json!(CLIENT_MODULE));
    let n = report["logbook_dropped"].as_u64().unwrap();
    assert_eq!(
        report["message"],
        json!(format!("dropped {n} events while logbookd was unreachable"))
    );
    // Every event is accounted for: delivered after the restart, or in the
    // count. flush() returned, so all of them are in the socket already.
    assert_eq!(n, dropped);
    agent.wait_for_count(2 + BURST - n as usize);
    let got = lines.lock().unwrap().clone();
    assert_eq!(got.len() - 2 + n as usize, BURST, "dropped {n}");
    // Delivered ones keep their order.
    let seq: Vec<u64> = got[2..]
        .iter()
        .map(|v| v["fields"]["n"].as_u64().unwrap())
        .collect();
    assert!(seq.windows(2).all(|w| w[0] < w[1]));
    agent.stop();
}

#[test]
fn socket_path_precedence() {
    let check = |explicit: Option<&str>, env: Option<&str>, expected: &str| {
        assert_eq!(
            layer_resolve(explicit.map(PathBuf::from), env.map(PathBuf::from)),
            PathBuf::from(expected)
        );
    };
    check(None, None, DEFAULT_INGEST_SOCKET);
    check(None, Some("/tmp/e.sock"), "/tmp/e.sock");
    check(None, Some(""), DEFAULT_INGEST_SOCKET);
    check(Some("/tmp/x.sock"), Some("/tmp/e.sock"), "/tmp/x.sock");
}

fn layer_resolve(explicit: Option<PathBuf>, env: Option<PathBuf>) -> PathBuf {
    super::layer::resolve_socket(explicit, env)
}

#[test]
fn flush_gives_up_when_no_agent_ever_listens() {
    let (_dir, path) = socket_path("client-absent");
    let layer = LogbookLayer::builder()
        .socket(&path)
        .backoff(Duration::from_millis(1), Duration::from_millis(5))
        .build();
    let handle = layer.handle();
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    tracing::dispatcher::with_default(&dispatch, || tracing::info!("nobody listens"));
    assert!(!handle.flush(Duration::from_millis(50)));
    // Dropping the subscriber closes the sender: the held event is counted
    // and flush returns instead of waiting for an agent that never comes.
    drop(dispatch);
    assert!(handle.flush(Duration::from_secs(10)));
    assert_eq!(handle.dropped(), 1);
}

#[test]
fn stalled_agent_never_blocks_the_caller() {
    const CAPACITY: usize = 1000;
    const BURST: usize = 50_000;
    let (_dir, path) = socket_path("client-stalled");
    // Accepts and never reads: the socket buffer fills, then the sender's
    // write blocks; the caller must not notice.
    let listener = UnixListener::bind(&path).unwrap();
    let held: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
    let held2 = held.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            held2.lock().unwrap().push(conn);
        }
    });
    let layer = LogbookLayer::builder()
        .socket(&path)
        .queue_capacity(CAPACITY)
        .build();
    let handle = layer.handle();
    let dispatch = tracing::Dispatch::new(tracing_subscriber::registry().with(layer));
    let filler = "x".repeat(1000);
    let start = Instant::now();
    tracing::dispatcher::with_default(&dispatch, || {
        for i in 0..BURST {
            tracing::info!(n = i as u64, "{filler}");
        }
    });
    eprintln!(
        "{BURST} events into a stalled agent took {:?}",
        start.elapsed()
    );
    // At most the queue, the line held by the sender and what the kernel
    // buffers for the socket (a few hundred KiB, so at most ~2000 lines of
    // 1 KiB) escaped dropping.
    let dropped = handle.dropped() as usize;
    assert!(
        dropped >= BURST - CAPACITY - 1 - 2000,
        "only {dropped} of {BURST} dropped: the caller must have waited"
    );
    assert!(!handle.flush(Duration::from_millis(50)));
}

#[test]
fn percent_encoding_of_query_values_and_path_segments() {
    let check = |input: &str, expected: &str| assert_eq!(super::percent_encode(input), expected);
    check("robot-1_a.b~c", "robot-1_a.b~c");
    check("a b/c?d&e=f", "a%20b%2Fc%3Fd%26e%3Df");
    check("nav*", "nav%2A");
    check("über", "%C3%BCber");
    check("", "");
}
