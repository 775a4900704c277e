//! Benchmark of the operator console (BENCHMARKS.md, "Console"), not a
//! test: time to first byte of the session screen and of the first log
//! screen of a session, over HTTP from a real hub whose store holds 10
//! million records, beside a `/healthz` round trip measured in the same
//! run (the baseline); also the timeline's counts, the sessions and the
//! devices screens.
//!
//! The store is filled directly through `Store::ingest` in batches of
//! 50,000 records (one transaction each, the path every batch takes at
//! the hub, without HTTP and gzip), then the hub serves that data
//! directory. Each request is a fresh TCP connection with the sign-in
//! cookie; the figure is from writing the request to reading the first
//! byte of the answer.
//!
//!   cargo run --profile bench --example console_bench            # 10M records
//!   cargo run --profile bench --example console_bench -- 1000000  # a quick run
//!
//! `LOGBOOK_BENCH_DIR` keeps (and, when it holds a filled hub, reuses) the data.
//!
//! `LOGBOOK_BENCH_DATABASE=postgres` fills and serves a PostgreSQL store
//! instead, on a throwaway cluster of Debian's server (as the tests start
//! it: a temporary directory, a free port, `fsync=off`), removed when the
//! bench ends; a `postgres://` URL there uses (and, when it holds records,
//! reuses) that database. Besides the console's screens the bench times
//! the Sessions API's JSON routes an operator's tools use: the first page
//! of a session's logs, a filtered page, full-text searches (a common
//! word, a rare one, one no record holds) and the session list; each page
//! counts its whole match, as the API answers by default.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use logbook::hub::config::Database;
use logbook::hub::store::{DeviceScope, Store};
use logbook::hub::{self, HubConfig};
use logbook::wire::{
    Batch, Device, Level, Package, Record, SessionState, SessionStatus, BATCH_VERSION,
};
use uuid::Uuid;

#[path = "../src/hub/store/postgres/testdb.rs"]
#[allow(dead_code)]
mod testdb;

/// Sessions the records are spread over (100,000 records each at 10M).
const SESSIONS: u64 = 100;
const DEVICES: u64 = 10;
const PER_BATCH: u64 = 50_000;
const RUNS: usize = 30;
const WARMUP: usize = 3;
const START_NS: i64 = 1_736_496_000_000_000_000;
/// Records are 10 ms apart on the robot's clock.
const STEP_NS: i64 = 10_000_000;

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
    match r.below(6) {
        0 => format!("Detected {} obstacles in sector {}", n % 17, n % 8),
        1 => format!("planner replanned route in {} ms", n % 400),
        2 => format!("battery at {}% draw {} mA", n % 100, n),
        3 => format!("lidar frame {n} processed with {} points", n * 3),
        4 => format!("motor {} current {}.{} A", n % 4, n % 30, n % 10),
        _ => format!("waypoint {n} reached, heading {} deg", n % 360),
    }
}

fn session_uuid(i: u64) -> Uuid {
    Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + u128::from(i))
}

fn device_id(d: u64) -> String {
    format!("robot-{d:03}")
}

fn scope(d: u64) -> DeviceScope {
    DeviceScope {
        org: "acme".into(),
        project: "warehouse".into(),
        device_id: device_id(d),
    }
}

/// Fills the store: `total` records over [`SESSIONS`] sessions, each
/// session's records in batches of [`PER_BATCH`], one `ingest` each.
async fn fill(store: &dyn Store, total: u64) -> anyhow::Result<()> {
    let per_session = (total / SESSIONS).max(1);
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut next_seq = vec![1u64; DEVICES as usize];
    let start = Instant::now();
    let mut stored = 0u64;
    for i in 0..SESSIONS {
        let d = i % DEVICES;
        let started = START_NS + (i as i64) * 7_200_000_000_000;
        let state = SessionState {
            id: session_uuid(i),
            revision: 2,
            status: SessionStatus::Completed,
            started_at_ns: started,
            ended_at_ns: Some(started + per_session as i64 * STEP_NS),
            duration_ns: Some(per_session as i64 * STEP_NS),
            tags: vec![format!("shift-{}", i % 3)],
            package: Some(Package {
                name: "perception".into(),
                version: Some(format!("2.{}.0", i % 5)),
            }),
            metadata: serde_json::json!({"site": "berlin"})
                .as_object()
                .unwrap()
                .clone(),
            error: None,
        };
        let mut k = 0u64;
        while k < per_session {
            let n = (per_session - k).min(PER_BATCH);
            let records = (0..n)
                .map(|_| {
                    let seq = next_seq[d as usize];
                    next_seq[d as usize] += 1;
                    k += 1;
                    Record {
                        seq,
                        session_id: Some(session_uuid(i)),
                        timestamp_ns: started + k as i64 * STEP_NS,
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
            let batch = Batch {
                version: BATCH_VERSION,
                device: Device {
                    id: device_id(d),
                    name: format!("warehouse-robot-{d:03}"),
                },
                sent_at_ns: started,
                sessions: vec![state.clone()],
                records,
                gaps: Vec::new(),
                marks: Vec::new(),
                agent: None,
            };
            let done = store.ingest(&scope(d), Arc::new(batch), false).await?;
            stored += done.ack.stored;
        }
        if i % 10 == 9 {
            eprintln!(
                "  {stored} records stored ({:.0}/s)",
                stored as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "filled {stored} records in {:.1} s ({:.0}/s)",
        start.elapsed().as_secs_f64(),
        stored as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One GET on a fresh connection: (time to first byte, time to the last
/// byte, status line, the rest of the answer after its first byte). `auth` is a whole header line: the
/// console's cookie or the API's bearer token.
fn get(
    addr: &str,
    path: &str,
    auth: &str,
) -> anyhow::Result<(Duration, Duration, String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\nAccept: text/html\r\nConnection: close\r\n\r\n"
    );
    let t = Instant::now();
    s.write_all(req.as_bytes())?;
    let mut first = [0u8; 1];
    s.read_exact(&mut first)?;
    let ttfb = t.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    let total = t.elapsed();
    let text = String::from_utf8_lossy(&rest);
    let status = format!("{}{}", first[0] as char, text.lines().next().unwrap_or(""));
    Ok((ttfb, total, status, rest))
}

fn pct(mut v: Vec<Duration>, p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i].as_secs_f64() * 1000.0
}

/// What [`measure`] found: the times, and the last answer's size and
/// the `"total"` it counted (the API's log pages say how many match).
struct Measured {
    ttfb: Vec<Duration>,
    all: Vec<Duration>,
    bytes: usize,
    total: Option<u64>,
}

/// [`RUNS`] timed GETs of `path` after [`WARMUP`] untimed ones.
fn measure(addr: &str, path: &str, auth: &str) -> anyhow::Result<Measured> {
    let mut m = Measured {
        ttfb: Vec::new(),
        all: Vec::new(),
        bytes: 0,
        total: None,
    };
    for i in 0..WARMUP + RUNS {
        let (first, all, status, answer) = get(addr, path, auth)?;
        anyhow::ensure!(status.starts_with("HTTP/1.1 200"), "{path}: {status}");
        if i >= WARMUP {
            m.ttfb.push(first);
            m.all.push(all);
            m.bytes = answer.len() + 1;
            let text = String::from_utf8_lossy(&answer);
            m.total = text.split_once("\"total\":").and_then(|(_, rest)| {
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                digits.parse().ok()
            });
        }
    }
    Ok(m)
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
    std::fs::create_dir_all(&data)?;
    // The database: SQLite in the data directory, or PostgreSQL.
    let (database, filled, pg_url) = match std::env::var("LOGBOOK_BENCH_DATABASE").ok().as_deref() {
        None | Some("" | "sqlite") => (
            Database::SqliteInDataDir,
            data.join("hub.db").exists(),
            None,
        ),
        Some(v) => {
            let url = if v == "postgres" {
                testdb::fresh_database("console_bench")
                    .context("LOGBOOK_BENCH_DATABASE=postgres: PostgreSQL is not installed")?
            } else {
                v.to_owned()
            };
            let env = vec![("LOGBOOK_STORAGE_DATABASE".to_owned(), url.clone())];
            let database = HubConfig::load(None, env)?.database;
            let held = testdb::psql(
                &url,
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'logs'",
            );
            let filled = held.trim() == "1"
                && testdb::psql(&url, "SELECT EXISTS (SELECT 1 FROM logs)").trim() == "t";
            (database, filled, Some(url))
        }
    };
    let backend = match database {
        Database::SqliteInDataDir => "SQLite",
        Database::Postgres(_) => "PostgreSQL",
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if filled {
        eprintln!("reusing the {backend} store of {}", data.display());
    } else {
        eprintln!("filling the {backend} store with {total} records over {SESSIONS} sessions ...");
        rt.block_on(async {
            let store = hub::open_database(&database, &data).await?;
            fill(store.as_ref(), total).await
        })?;
    }
    let operator = hub::create_token_in(&database, &data, "acme", Some("warehouse"), None)?;

    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?.to_string();
    let config = HubConfig {
        data_dir: data.clone(),
        database,
        ..HubConfig::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(hub::serve(listener, config, async move {
        let _ = stopped.await;
    }));
    // Wait for the hub, then sign in (the cookie every console page needs).
    let mut ready = false;
    for _ in 0..2000 {
        if get(&addr, "/healthz", "Cookie: x=y")
            .is_ok_and(|(_, _, s, _)| s.starts_with("HTTP/1.1 200"))
        {
            ready = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    anyhow::ensure!(ready, "the hub did not answer");
    let cookie = format!("Cookie: {}", {
        let mut s = TcpStream::connect(&addr)?;
        let body = format!("key={operator}");
        write!(
            s,
            "POST /sign-in HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        answer
            .lines()
            .find_map(|l| {
                let l = l
                    .strip_prefix("set-cookie: ")
                    .or_else(|| l.strip_prefix("Set-Cookie: "))?;
                l.split(';').next().map(str::to_owned)
            })
            .with_context(|| format!("no sign-in cookie in: {answer}"))?
    });
    let bearer = format!("Authorization: Bearer {operator}");

    let session = session_uuid(SESSIONS / 2);
    let base = "/o/acme/warehouse";
    let api = "/api/v1/organizations/acme/projects/warehouse";
    let routes = [
        ("session screen", format!("{base}/sessions/{session}")),
        (
            "first log screen",
            format!("{base}/sessions/{session}/logs"),
        ),
        (
            "log screen, level=warn and module",
            format!("{base}/sessions/{session}/logs?level=warn&module=perception"),
        ),
        (
            "timeline counts",
            format!("{base}/sessions/{session}/timeline"),
        ),
        ("sessions screen", format!("{base}/sessions")),
        ("devices screen", format!("{base}/devices")),
    ];
    // The API's pages ask for the total too (the route's default), so a
    // filter's whole match is counted, not only its first 100 rows.
    let api_routes = [
        (
            "API: first page of a session's logs",
            format!("{api}/sessions/{session}/logs"),
        ),
        (
            "API: level=warn and module",
            format!("{api}/sessions/{session}/logs?level=warn&module=perception"),
        ),
        (
            "API: search, a common word (1 record in 6)",
            format!("{api}/sessions/{session}/logs?search=obstacles"),
        ),
        (
            "API: search, a rare word (a number)",
            format!("{api}/sessions/{session}/logs?search=4321"),
        ),
        (
            "API: search, a word no record holds",
            format!("{api}/sessions/{session}/logs?search=nosuchword"),
        ),
        ("API: session list", format!("{api}/sessions")),
        (
            "API: session list, tag filter",
            format!("{api}/sessions?tag=shift-1"),
        ),
    ];
    let health = measure(&addr, "/healthz", &cookie)?.ttfb;
    let h50 = pct(health.clone(), 0.5);
    println!(
        "console_bench: {total} records in the hub ({backend}), {SESSIONS} sessions of {} records, {DEVICES} devices; {RUNS} runs each, fresh connection per request; hub on 2 worker threads",
        total / SESSIONS
    );
    println!(
        "baseline /healthz: TTFB p50 {h50:.2} ms, p95 {:.2} ms",
        pct(health, 0.95)
    );
    let all_routes = routes
        .iter()
        .map(|(name, path)| (name, path, &cookie))
        .chain(api_routes.iter().map(|(name, path)| (name, path, &bearer)));
    for (name, path, auth) in all_routes {
        let m = measure(&addr, path, auth)?;
        let (p50, p95) = (pct(m.ttfb.clone(), 0.5), pct(m.ttfb, 0.95));
        let matches = m.total.map(|n| format!(", {n} match")).unwrap_or_default();
        println!(
            "{name}: TTFB p50 {p50:.2} ms, p95 {p95:.2} ms = {:.1}x /healthz; whole answer p50 {:.2} ms, {} KiB{matches}",
            p50 / h50,
            pct(m.all, 0.5),
            m.bytes >> 10
        );
    }
    let _ = stop.send(());
    rt.block_on(server)??;
    if let Some(url) = pg_url {
        let size = testdb::psql(&url, "SELECT pg_database_size(current_database())");
        println!(
            "hub data in PostgreSQL: {} MiB",
            size.trim().parse::<u64>()? >> 20
        );
        return Ok(());
    }
    let size: u64 = std::fs::read_dir(&data)?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("hub data on disk: {} MiB", size >> 20);
    Ok(())
}
