//! Benchmark of `logbook-hub` (BENCHMARKS.md, "Hub"), not a test:
//! ingest of pre-encoded batches over HTTP into a fresh hub, then the
//! latency of the first page of a filtered log query, of a full-text
//! search and of a filtered session list, each beside a baseline measured
//! in the same run (plain SQLite inserts; a `/healthz` round trip); and
//! how long after the last batch the full-text index held every record.
//!
//! Full size (10,000,000 records across 1,000 sessions):
//!   cargo run --release --example hub_bench
//! Quick run: `cargo run --release --example hub_bench -- 500000`
//! (or `LOGBOOK_BENCH_RECORDS=500000`). `LOGBOOK_BENCH_DIR` keeps the data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use logbook::hub::{self, HubConfig};
use logbook::wire::{
    Batch, Device, Level, Package, Record, SessionState, SessionStatus, BATCH_VERSION,
};
use uuid::Uuid;

const SESSIONS: u64 = 1000;
const DEVICES: u64 = 100;
const PER_BATCH: u64 = 5000;
const CLIENTS: usize = 4;
const QUERY_RUNS: usize = 30;
const START_NS: i64 = 1_736_496_000_000_000_000;

const MODULES: &[&str] = &[
    "perception",
    "perception.lidar",
    "nav",
    "nav.planner",
    "control",
    "battery",
    "system",
    "comms",
];

/// A cheap deterministic generator (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn level(r: &mut Rng) -> Level {
    match r.below(100) {
        0..=9 => Level::Trace,
        10..=49 => Level::Debug,
        50..=84 => Level::Info,
        85..=94 => Level::Warn,
        95..=98 => Level::Error,
        _ => Level::Fatal,
    }
}

fn message(r: &mut Rng) -> String {
    let n = r.below(10_000);
    match r.below(8) {
        0 => format!("Detected {} obstacles in sector {}", n % 17, n % 8),
        1 => format!("planner replanned route in {} ms", n % 400),
        2 => format!("battery at {}% draw {} mA", n % 100, n),
        3 => format!("lidar frame {n} processed with {} points", n * 3),
        4 => format!("motor {} current {}.{} A", n % 4, n % 30, n % 10),
        5 => format!("waypoint {n} reached, heading {} deg", n % 360),
        6 => format!("heartbeat from controller seq {n}"),
        _ => format!(
            "obstacle {} at distance {}.{} m, slowing down",
            n % 50,
            n % 20,
            n % 10
        ),
    }
}

fn session_uuid(i: u64) -> Uuid {
    Uuid::from_u128(0x0193_4d2a_0000_7000_8000_0000_0000_0000 + i as u128)
}

fn device_id(d: u64) -> String {
    format!("robot-{d:03}")
}

/// Session `i` belongs to device `i % DEVICES`; its records follow the
/// device's earlier sessions in seq order.
/// (device index, record count, gzip body) in sending order.
type Encoded = (usize, u64, Vec<u8>);

fn build_batches(total: u64) -> Vec<Encoded> {
    let per_session = (total / SESSIONS).max(1);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut per_device: Vec<Vec<Encoded>> = vec![Vec::new(); DEVICES as usize];
    let mut next_seq = vec![1u64; DEVICES as usize];
    for i in 0..SESSIONS {
        let d = i % DEVICES;
        let session = session_uuid(i);
        let started = START_NS + (i as i64) * 3_600_000_000_000;
        let state = SessionState {
            id: session,
            revision: 2,
            status: if i % 10 == 0 {
                SessionStatus::Failed
            } else {
                SessionStatus::Completed
            },
            started_at_ns: started,
            ended_at_ns: Some(started + per_session as i64 * 10_000_000),
            duration_ns: Some(per_session as i64 * 10_000_000 + (i as i64 % 7) * 1_000_000_000),
            tags: vec![
                format!("shift-{}", i % 3),
                if i % 4 == 0 { "night" } else { "day" }.into(),
            ],
            package: Some(Package {
                name: "perception".into(),
                version: Some(format!("2.{}.0", i % 5)),
            }),
            metadata: serde_json::json!({"site": if i % 2 == 0 { "berlin" } else { "austin" }})
                .as_object()
                .unwrap()
                .clone(),
            error: (i % 10 == 0).then(|| "device rebooted".to_owned()),
        };
        let mut first = true;
        let mut left = per_session;
        let mut k = 0u64;
        while left > 0 {
            let n = left.min(PER_BATCH);
            let records = (0..n)
                .map(|_| {
                    let seq = next_seq[d as usize];
                    next_seq[d as usize] += 1;
                    k += 1;
                    Record {
                        seq,
                        session_id: Some(session),
                        timestamp_ns: started + k as i64 * 10_000_000,
                        level: level(&mut rng),
                        module: MODULES[rng.below(MODULES.len() as u64) as usize].into(),
                        message: message(&mut rng),
                        metadata: if k.is_multiple_of(4) {
                            format!(r#"{{"frame":{k}}}"#)
                        } else {
                            String::new()
                        },
                        pid: Some(1000 + d as u32),
                        uid: Some(1000),
                        gid: Some(1000),
                        process: Some("perceptiond".into()),
                    }
                })
                .collect();
            let b = Batch {
                marks: Vec::new(),
                agent: None,
                version: BATCH_VERSION,
                device: Device {
                    id: device_id(d),
                    name: format!("warehouse-robot-{d:03}"),
                },
                sent_at_ns: started,
                sessions: if first { vec![state.clone()] } else { vec![] },
                records,
                gaps: vec![],
            };
            first = false;
            left -= n;
            per_device[d as usize].push((d as usize, n, b.encode(1)));
        }
    }
    // Round-robin over devices, as a fleet's uploads interleave.
    let mut out = Vec::new();
    let mut iters: Vec<_> = per_device.into_iter().map(|v| v.into_iter()).collect();
    loop {
        let mut any = false;
        for it in iters.iter_mut() {
            if let Some(b) = it.next() {
                out.push(b);
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    out
}

/// The floor: the same number of rows into an unindexed SQLite table, one
/// transaction, one prepared statement.
fn baseline_insert(dir: &std::path::Path, rows: u64) -> anyhow::Result<f64> {
    let conn = rusqlite::Connection::open(dir.join("baseline.db"))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(
        "CREATE TABLE t (seq INTEGER, ts INTEGER, level INTEGER, module TEXT, message TEXT, metadata TEXT)",
    )?;
    let mut rng = Rng(7);
    let msgs: Vec<String> = (0..1000).map(|_| message(&mut rng)).collect();
    let start = Instant::now();
    let tx = conn.unchecked_transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO t VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?;
        for i in 0..rows {
            st.execute(rusqlite::params![
                i as i64,
                i as i64,
                (i % 6) as i64,
                MODULES[(i % 8) as usize],
                msgs[(i % 1000) as usize],
                ""
            ])?;
        }
    }
    tx.commit()?;
    Ok(rows as f64 / start.elapsed().as_secs_f64())
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

async fn time_get(http: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<Vec<Duration>> {
    let mut out = Vec::new();
    for _ in 0..QUERY_RUNS {
        let t = Instant::now();
        let r = http.get(url).bearer_auth(token).send().await?;
        anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
        let _ = r.bytes().await?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// Waits until the hub's full-text index (its own file, written after
/// ingest) holds every stored record; how long that took.
fn index_caught_up(data: &std::path::Path) -> anyhow::Result<f64> {
    let start = Instant::now();
    let db = rusqlite::Connection::open(data.join("hub.db"))?;
    let index = rusqlite::Connection::open(data.join("hub-search.db"))?;
    loop {
        let max: i64 = db.query_row("SELECT coalesce(max(id), 0) FROM logs", [], |r| r.get(0))?;
        let indexed: i64 = index.query_row("SELECT indexed FROM state", [], |r| r.get(0))?;
        if indexed >= max {
            return Ok(start.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() -> anyhow::Result<()> {
    let total: u64 = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("LOGBOOK_BENCH_RECORDS").ok())
        .map(|v| v.parse())
        .transpose()
        .context("record count")?
        .unwrap_or(10_000_000);
    let tmp;
    let dir = match std::env::var_os("LOGBOOK_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let data = dir.join("hub");
    let operator = hub::create_token(&data, "acme", Some("warehouse"), None)?;
    let tokens: Vec<String> = (0..DEVICES)
        .map(|d| hub::create_token(&data, "acme", Some("warehouse"), Some(&device_id(d))))
        .collect::<Result<_, _>>()?;

    eprintln!("encoding {total} records across {SESSIONS} sessions ...");
    let batches = build_batches(total);
    let records: u64 = batches.iter().map(|(_, n, _)| n).sum();
    let wire_bytes: usize = batches.iter().map(|(_, _, b)| b.len()).sum();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let config = HubConfig {
            data_dir: data.clone(),
            ..HubConfig::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(hub::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        let base = format!("http://{addr}");
        let http = reqwest::Client::new();
        // Wait for the hub to answer.
        for _ in 0..1000 {
            if http.get(format!("{base}/healthz")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }

        eprintln!("ingesting {} batches ({} MiB on the wire) ...", batches.len(), wire_bytes >> 20);
        let queue = Arc::new(std::sync::Mutex::new(batches.into_iter()));
        let tokens = Arc::new(tokens);
        let start = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..CLIENTS {
            let (queue, tokens, http, base) = (queue.clone(), tokens.clone(), http.clone(), base.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let next = queue.lock().unwrap().next();
                    let Some((device, _, body)) = next else { break };
                    let r = http
                        .post(format!("{base}/api/v1/ingest/batches"))
                        .bearer_auth(&tokens[device])
                        .header("content-type", "application/msgpack")
                        .header("content-encoding", "gzip")
                        .body(body)
                        .send()
                        .await?;
                    anyhow::ensure!(r.status().is_success(), "ingest: {}", r.status());
                }
                Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        let ingest_secs = start.elapsed().as_secs_f64();
        let ingest_rate = records as f64 / ingest_secs;
        let index_secs = {
            let data = data.clone();
            tokio::task::spawn_blocking(move || index_caught_up(&data)).await??
        };

        // Queries on sessions spread over the run.
        let api = format!("{base}/api/v1/organizations/acme/projects/warehouse");
        let per_session = (total / SESSIONS).max(1) as i64;
        let (mut filtered, mut search, mut list, mut health) = (vec![], vec![], vec![], vec![]);
        for i in [17u64, 250, 499, 777, 998] {
            let session = session_uuid(i);
            let started = START_NS + (i as i64) * 3_600_000_000_000;
            let fmt = |ns: i64| {
                time::OffsetDateTime::from_unix_timestamp_nanos(ns as i128)
                    .unwrap()
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap()
            };
            let since = fmt(started + per_session * 10_000_000 / 4);
            let until = fmt(started + per_session * 10_000_000 * 3 / 4);
            filtered.extend(
                time_get(
                    &http,
                    &format!("{api}/sessions/{session}/logs?level=warn&module=perception&since={since}&until={until}&limit=100"),
                    &operator,
                )
                .await?,
            );
            search.extend(
                time_get(&http, &format!("{api}/sessions/{session}/logs?search=obstacles%20sector&limit=100"), &operator)
                    .await?,
            );
        }
        list.extend(
            time_get(
                &http,
                &format!("{api}/sessions?status=completed&tag=night&has_errors=true&package=perception@2.1.0&sort=duration&limit=50"),
                &operator,
            )
            .await?,
        );
        list.extend(time_get(&http, &format!("{api}/sessions?device_id=robot-042&since=2025-01-20T00:00:00Z"), &operator).await?);
        health.extend(time_get(&http, &format!("{base}/healthz"), &operator).await?);
        let _ = stop.send(());
        server.await??;

        let baseline = baseline_insert(&dir, records.min(2_000_000))?;
        let h50 = pct(health.clone(), 0.5);
        println!("hub_bench: {records} records, {SESSIONS} sessions, {DEVICES} devices, {CLIENTS} clients, 2 worker threads");
        println!(
            "ingest: {:.0} records/s ({ingest_secs:.1} s; goal >= 300000) = {:.2}x plain unindexed SQLite inserts ({baseline:.0}/s)",
            ingest_rate,
            ingest_rate / baseline
        );
        println!("full-text index: every record indexed {index_secs:.2} s after the last acknowledgement");
        for (name, v, goal) in [
            ("filtered log page (level+module+time)", filtered, 20.0),
            ("full-text search page", search, 100.0),
            ("filtered session list", list, 10.0),
        ] {
            let (p50, p95) = (pct(v.clone(), 0.5), pct(v, 0.95));
            println!(
                "{name}: p50 {p50:.2} ms, p95 {p95:.2} ms (goal < {goal} ms) = {:.1}x a /healthz round trip ({h50:.2} ms)",
                p50 / h50
            );
        }
        let size: u64 = std::fs::read_dir(&data)?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum();
        println!("hub data on disk: {} MiB", size >> 20);
        Ok::<_, anyhow::Error>(())
    })
}
