//! Benchmark of the hub as a fleet (BENCHMARKS.md, "Hub replicas on
//! PostgreSQL"), not a test: the same pre-encoded batches (the sync
//! bench's record mix, as agents send them) posted by concurrent clients
//! into one hub on SQLite (the baseline), one replica on PostgreSQL, and
//! two replicas on one PostgreSQL database (clients spread over both),
//! each on fresh storage, in one run; then the resident memory a replica
//! on PostgreSQL adds per 1,000 devices holding a connection to it.
//!
//! Needs PostgreSQL from Debian (a throwaway cluster is started, as the
//! tests do). Build the binaries first, in the profile you measure:
//!   cargo build --release --bins --examples
//!   target/release/examples/fleet_bench --records 1000000 --devices 1000

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logbook::hub::config::Database;
use logbook::wire::{Batch, Device, Level, Record, SessionState, SessionStatus, BATCH_VERSION};
use uuid::Uuid;

mod common;

#[path = "../src/hub/store/postgres/testdb.rs"]
#[allow(dead_code)]
mod testdb;

const DEVICES: u64 = 20;
const START_NS: i64 = 1_736_496_000_000_000_000;

/// A hub process on its own data directory; killed on drop.
struct Hub {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn database(url: Option<&str>) -> Database {
    let env: Vec<(String, String)> = url
        .map(|u| ("LOGBOOK_STORAGE_DATABASE".to_owned(), u.to_owned()))
        .into_iter()
        .collect();
    logbook::hub::HubConfig::load(None, env).unwrap().database
}

fn start_hub(db: Option<&str>) -> Hub {
    let dir = tempfile::tempdir().unwrap();
    let data: PathBuf = dir.path().join("data");
    let mut cmd = Command::new(common::bin_dir().join("logbook-hub"));
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("LOGBOOK_LOG", "error")
        // What is measured is the hub's ingest and its memory per
        // connection, not the per-device limits (the memory phase posts
        // for 1,000 connections with one device's token).
        .env("LOGBOOK_DEVICES_REQUESTS_PER_SEC", "0")
        .env("LOGBOOK_DEVICES_MAX_CONCURRENT", "4096")
        .env_remove("LOGBOOK_STORAGE_DATABASE")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(url) = db {
        cmd.env("LOGBOOK_STORAGE_DATABASE", url);
    }
    let child = cmd
        .spawn()
        .expect("start logbook-hub (build the binaries first)");
    let addr_file = data.join(logbook::hub::ADDR_FILE);
    let start = Instant::now();
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file) {
            if a.ends_with('\n') {
                break a.trim().to_owned();
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hub did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Serving (its store open and migrated) once /healthz answers.
    loop {
        let ok = std::net::TcpStream::connect(&addr).ok().and_then(|mut s| {
            use std::io::{Read, Write};
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            out.starts_with("HTTP/1.1 200").then_some(())
        });
        if ok.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "hub did not serve"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Hub {
        child,
        url: format!("http://{addr}"),
        _dir: dir,
    }
}

fn device_id(d: u64) -> String {
    format!("robot-{d:03}")
}

/// (device, records, gzip body) in sending order, round robin over devices.
fn build_batches(total: u64, per_batch: u64) -> Vec<(usize, u64, Vec<u8>)> {
    let per_device = total / DEVICES;
    let mut out = Vec::new();
    let mut seq = vec![1u64; DEVICES as usize];
    let mut left = vec![per_device; DEVICES as usize];
    while left.iter().any(|l| *l > 0) {
        for d in 0..DEVICES as usize {
            if left[d] == 0 {
                continue;
            }
            let n = left[d].min(per_batch);
            let session = Uuid::from_u128(0x0193_4d2a_0000_7000_8000_0000_0000_0000 + d as u128);
            let records = (0..n)
                .map(|_| {
                    let s = seq[d];
                    seq[d] += 1;
                    let line = common::line(s);
                    Record {
                        seq: s,
                        session_id: Some(session),
                        timestamp_ns: START_NS + s as i64 * 1_000_000,
                        level: [Level::Debug, Level::Info, Level::Info, Level::Warn]
                            [s as usize % 4],
                        module: common::MODULES[s as usize % common::MODULES.len()].into(),
                        message: line[..line.len().min(120)].to_owned(),
                        metadata: format!(r#"{{"seq":{s}}}"#),
                        pid: Some(4242),
                        uid: Some(1000),
                        gid: Some(1000),
                        process: Some("perceptiond".into()),
                    }
                })
                .collect();
            let first = seq[d] == n + 1;
            let batch = Batch {
                marks: Vec::new(),
                agent: None,
                version: BATCH_VERSION,
                device: Device {
                    id: device_id(d as u64),
                    name: device_id(d as u64),
                },
                sent_at_ns: START_NS,
                sessions: if first {
                    vec![SessionState {
                        id: session,
                        revision: 1,
                        status: SessionStatus::Active,
                        started_at_ns: START_NS,
                        ended_at_ns: None,
                        duration_ns: None,
                        tags: vec!["bench".into()],
                        package: None,
                        metadata: Default::default(),
                        error: None,
                    }]
                } else {
                    vec![]
                },
                records,
                gaps: vec![],
            };
            out.push((d, n, batch.encode(3)));
            left[d] -= n;
        }
    }
    out
}

/// Device tokens of every device for the store `db` names (blocking, as
/// `token create` is: run off the async threads).
fn tokens(db: &Database, data_dir: &Path, devices: &[String]) -> Vec<String> {
    tokio::task::block_in_place(|| {
        devices
            .iter()
            .map(|d| {
                logbook::hub::create_token_in(db, data_dir, "acme", Some("warehouse"), Some(d))
                    .unwrap()
            })
            .collect()
    })
}

/// Fails the bench unless the database holds every record it was sent,
/// each once: a rate of batches answered but not stored would mean
/// nothing.
async fn stored_all(url: &str, records: u64) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect to the bench's database");
    tokio::spawn(conn);
    let stored: i64 = client
        .query_one("SELECT count(*) FROM logs", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored as u64, records, "records stored");
}

/// Posts every batch through `clients` concurrent clients, client k to
/// hub `k % hubs.len()`; records per second.
async fn ingest(
    hubs: &[&Hub],
    tokens: &[String],
    batches: &[(usize, u64, Vec<u8>)],
    clients: usize,
) -> f64 {
    let queue = Arc::new(Mutex::new(batches.iter().cloned().collect::<VecDeque<_>>()));
    let total: u64 = batches.iter().map(|b| b.1).sum();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..clients {
        let url = format!("{}/api/v1/ingest/batches", hubs[k % hubs.len()].url);
        let (queue, tokens) = (queue.clone(), tokens.to_vec());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            loop {
                let Some((d, _, body)) = queue.lock().unwrap().pop_front() else {
                    return;
                };
                loop {
                    let r = http
                        .post(&url)
                        .bearer_auth(&tokens[d])
                        .header("content-type", "application/msgpack")
                        .header("content-encoding", "gzip")
                        .body(body.clone())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => break,
                        Ok(r) if r.status().is_server_error() || r.status() == 429 => {}
                        Ok(r) => panic!("batch refused: {}", r.status()),
                        Err(e) => panic!("post: {e}"),
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// VmRSS of the hub (KiB) before and after `n` devices each open a
/// connection, post one small batch and keep the connection open.
async fn memory_per_devices(hub: &Hub, token: &str, n: usize) -> (u64, u64) {
    let pid = hub.child.id();
    let before = common::proc_stats(pid).1;
    let mut clients = Vec::with_capacity(n);
    let url = format!("{}/api/v1/ingest/batches", hub.url);
    for i in 0..n {
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(1)
            .pool_idle_timeout(None)
            .build()
            .unwrap();
        let batch = Batch {
            marks: Vec::new(),
            agent: None,
            version: BATCH_VERSION,
            device: Device {
                id: "robot-mem".into(),
                name: "robot-mem".into(),
            },
            sent_at_ns: START_NS,
            sessions: vec![],
            records: vec![Record {
                seq: i as u64 + 1,
                session_id: None,
                timestamp_ns: START_NS,
                level: Level::Info,
                module: "mem".into(),
                message: "connected".into(),
                metadata: String::new(),
                pid: None,
                uid: None,
                gid: None,
                process: None,
            }],
            gaps: vec![],
        };
        let r = http
            .post(&url)
            .bearer_auth(token)
            .header("content-type", "application/msgpack")
            .header("content-encoding", "gzip")
            .body(batch.encode(3))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
        clients.push(http);
    }
    // Settled: the connections are idle and held open by `clients`.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = common::proc_stats(pid).1;
    drop(clients);
    (before, after)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let records: u64 = common::arg("--records", "300000").parse().unwrap();
    let per_batch: u64 = common::arg("--batch", "2000").parse().unwrap();
    let clients: usize = common::arg("--clients", "4").parse().unwrap();
    let devices: usize = common::arg("--devices", "1000").parse().unwrap();
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let names: Vec<String> = (0..DEVICES).map(device_id).collect();
    let batches = build_batches(records, per_batch);
    let total: u64 = batches.iter().map(|b| b.1).sum();
    println!(
        "fleet_bench ({profile}): {total} records in {} batches of up to {per_batch}, {clients} clients",
        batches.len()
    );

    // Baseline: one hub on SQLite.
    let lite = start_hub(None);
    let lite_tokens = tokens(&database(None), &lite._dir.path().join("data"), &names);
    let lite_rate = ingest(&[&lite], &lite_tokens, &batches, clients).await;
    drop(lite);
    println!("1 hub on SQLite:          {lite_rate:>10.0} rec/s (baseline)");

    let url = testdb::fresh_database("fleet_bench").expect("PostgreSQL is installed");
    let one = start_hub(Some(&url));
    let pg_tokens = tokens(&database(Some(&url)), Path::new("/nonexistent"), &names);
    let one_rate = ingest(&[&one], &pg_tokens, &batches, clients).await;
    println!(
        "1 replica on PostgreSQL:  {one_rate:>10.0} rec/s = {:.2}x",
        one_rate / lite_rate
    );
    stored_all(&url, total).await;
    drop(one);

    let url2 = testdb::fresh_database("fleet_bench").unwrap();
    let (a, b) = (start_hub(Some(&url2)), start_hub(Some(&url2)));
    let pg2_tokens = tokens(&database(Some(&url2)), Path::new("/nonexistent"), &names);
    let two_rate = ingest(&[&a, &b], &pg2_tokens, &batches, clients).await;
    println!(
        "2 replicas on PostgreSQL: {two_rate:>10.0} rec/s = {:.2}x",
        two_rate / lite_rate
    );
    stored_all(&url2, total).await;
    drop(b);

    // Memory per connected devices, on replica `a` (it has ingested).
    let token = tokens(
        &database(Some(&url2)),
        Path::new("/nonexistent"),
        &["robot-mem".to_owned()],
    )
    .remove(0);
    let (before, after) = memory_per_devices(&a, &token, devices).await;
    println!(
        "replica RSS: {before} KiB idle, {after} KiB with {devices} devices connected = {:.1} KiB per device, {:.1} MiB per 1,000",
        (after.saturating_sub(before)) as f64 / devices as f64,
        (after.saturating_sub(before)) as f64 / devices as f64 * 1000.0 / 1024.0
    );
}
