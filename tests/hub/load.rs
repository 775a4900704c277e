//! A thousand devices at once (issue 15, "Load"): 1,000 simulated devices,
//! each with its own device token and its own connection, open a session,
//! post their batches at an agent's pace and close it, all at the same
//! time, while operators query sessions, logs (with a text search) and
//! devices. The hub runs with its shipped per-device limits, so a 429 with
//! `Retry-After` is the only refusal allowed; a device honours it as the
//! agent does. At the end every session holds exactly what its device
//! sent, once; the ingest latency (p50, p99, max), the 429s and the hub's
//! peak memory are printed (TESTING.md) and the memory is bounded.
//!
//! `LOGBOOK_TEST_DEVICES`, `LOGBOOK_TEST_BATCHES` and
//! `LOGBOOK_TEST_OPERATORS` make it larger (the long form in TESTING.md).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use logbook::wire::SessionStatus;

use super::*;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Records per batch, and the pause between a device's batches (an
/// agent's `sync.interval` on a link that keeps up).
const PER_BATCH: u64 = 20;
const INTERVAL: Duration = Duration::from_millis(500);
/// Between an operator's queries.
const OPERATOR_PAUSE: Duration = Duration::from_millis(100);
/// The bound on the hub's resident memory under this load.
const PEAK_RSS_MAX_KIB: u64 = 512 * 1024;

/// What the devices saw.
#[derive(Default)]
struct Seen {
    /// Send to acknowledgement of every acknowledged batch.
    latencies: Mutex<Vec<Duration>>,
    throttled: AtomicU64,
    /// Anything but 200 and 429: status, body.
    errors: Mutex<Vec<String>>,
}

/// Posts `body` until it is acknowledged; a 429 waits its `Retry-After`.
async fn post(http: &reqwest::Client, url: &str, token: &str, body: &[u8], seen: &Seen) {
    loop {
        let started = Instant::now();
        let r = http
            .post(url)
            .bearer_auth(token)
            .header("content-type", "application/msgpack")
            .header("content-encoding", "gzip")
            .body(body.to_vec())
            .send()
            .await;
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                seen.errors.lock().unwrap().push(format!("post: {e:?}"));
                return;
            }
        };
        let status = r.status().as_u16();
        let wait = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let text = r.text().await.unwrap_or_default();
        match status {
            200 => {
                seen.latencies.lock().unwrap().push(started.elapsed());
                return;
            }
            429 => {
                seen.throttled.fetch_add(1, Relaxed);
                let wait = wait.expect("a 429 carries Retry-After");
                tokio::time::sleep(Duration::from_secs(wait.clamp(1, 10))).await;
            }
            _ => {
                seen.errors.lock().unwrap().push(format!("{status} {text}"));
                return;
            }
        }
    }
}

/// GET `url` with operator key `key`: its JSON, or what went wrong.
async fn operator_get(http: &reqwest::Client, url: &str, key: &str) -> Result<Value, String> {
    let r = http
        .get(url)
        .bearer_auth(key)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    if r.status() != 200 {
        return Err(format!("{url}: {}", r.status()));
    }
    Ok(serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_sync_at_once_while_operators_query() {
    let devices = env_or("LOGBOOK_TEST_DEVICES", 1000);
    let batches = env_or("LOGBOOK_TEST_BATCHES", 3).max(2);
    let operators = env_or("LOGBOOK_TEST_OPERATORS", 4);
    // The hub's shipped per-device limits, not the suite's relaxed ones.
    let hub = HubProc::start_with(
        "hub_load",
        &[
            ("LOGBOOK_DEVICES_REQUESTS_PER_SEC", "20"),
            ("LOGBOOK_DEVICES_MAX_CONCURRENT", "4"),
        ],
    );
    let idle_rss = hub.peak_rss_kib();

    let names: Vec<String> = (0..devices).map(|i| format!("robot-{i:04}")).collect();
    let tokens = device_tokens(hub.env.clone(), hub.data_dir(), &names).await;

    // The fleet: every device with its own client (its own connection) and
    // its batches packed before the load starts, so the test's own CPU
    // does not hold a connection silent past the hub's header timeout.
    let fleet: Vec<(reqwest::Client, String, Vec<Vec<u8>>)> = {
        let (names, tokens) = (names.clone(), tokens.clone());
        tokio::task::spawn_blocking(move || {
            names
                .iter()
                .zip(tokens)
                .enumerate()
                .map(|(d, (name, token))| {
                    let http = reqwest::Client::builder()
                        .pool_max_idle_per_host(1)
                        .build()
                        .unwrap();
                    let session = session_id(d as u128);
                    // The session opens with the first batch and completes
                    // with the last.
                    let bodies = (0..batches)
                        .map(|n| {
                            let status = match n {
                                0 => Some(SessionStatus::Active),
                                n if n == batches - 1 => Some(SessionStatus::Completed),
                                _ => None,
                            };
                            let first = n * PER_BATCH + 1;
                            device_batch(
                                name,
                                session,
                                status,
                                n + 1,
                                first..=first + PER_BATCH - 1,
                            )
                            .encode(1)
                        })
                        .collect();
                    (http, token, bodies)
                })
                .collect()
        })
        .await
        .unwrap()
    };
    // Operators query until the devices are done, each about ten times a
    // second.
    let done = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicU64::new(0));
    let query_errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut operator_tasks = Vec::new();
    for k in 0..operators {
        let (done, queries, query_errors) = (done.clone(), queries.clone(), query_errors.clone());
        let (api, key) = (hub.api(""), hub.operator.clone());
        let device = names[(k as usize * 97) % names.len()].clone();
        operator_tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            // (query, whether it lists sessions)
            let urls = [
                (format!("{api}/sessions?limit=50&sort=started_at"), true),
                (
                    format!("{api}/sessions?device_id={device}&has_errors=true"),
                    true,
                ),
                (format!("{api}/devices"), false),
                (format!("{api}/sessions?search=fleet&limit=20"), true),
            ];
            let mut n = 0usize;
            while !done.load(Relaxed) {
                let (url, sessions) = &urls[n % urls.len()];
                n += 1;
                let listed = operator_get(&http, url, &key).await;
                // A session of a list, and its logs searched.
                let logs = match (&listed, sessions) {
                    (Ok(v), true) => match v["items"][0]["id"].as_str() {
                        Some(id) => {
                            let logs = format!(
                                "{api}/sessions/{id}/logs?search=odometry&level=warn&limit=50"
                            );
                            Some(operator_get(&http, &logs, &key).await)
                        }
                        None => None,
                    },
                    _ => None,
                };
                for answer in std::iter::once(listed).chain(logs) {
                    queries.fetch_add(1, Relaxed);
                    if let Err(e) = answer {
                        query_errors.lock().unwrap().push(e);
                    }
                }
                // An operator's console, not a tight loop.
                tokio::time::sleep(OPERATOR_PAUSE).await;
            }
        }));
    }

    let seen = Arc::new(Seen::default());
    let url = format!("{}/api/v1/ingest/batches", hub.url);
    let started = Instant::now();
    let mut device_tasks = Vec::new();
    for (d, (http, token, bodies)) in fleet.into_iter().enumerate() {
        let (url, seen) = (url.clone(), seen.clone());
        device_tasks.push(tokio::spawn(async move {
            // Each starts within the first interval, then keeps an
            // agent's pace.
            tokio::time::sleep(INTERVAL.mul_f64(d as f64 / devices as f64)).await;
            for (n, body) in bodies.iter().enumerate() {
                if n > 0 {
                    tokio::time::sleep(INTERVAL).await;
                }
                post(&http, &url, &token, body, &seen).await;
            }
        }));
    }
    for t in device_tasks {
        t.await.unwrap();
    }
    let load_secs = started.elapsed().as_secs_f64();
    done.store(true, Relaxed);
    for t in operator_tasks {
        t.await.unwrap();
    }
    let peak_rss = hub.peak_rss_kib();

    let errors = seen.errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} device requests failed other than with 429, first: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let query_errors = query_errors.lock().unwrap().clone();
    assert!(
        query_errors.is_empty(),
        "{} operator queries failed, first: {:?}",
        query_errors.len(),
        &query_errors[..query_errors.len().min(5)]
    );

    // Exactly once: each session completed, with every record once.
    let per_session = batches * PER_BATCH;
    let http = reqwest::Client::new();
    let mut checks = Vec::new();
    for d in 0..devices {
        let (http, url, key) = (
            http.clone(),
            hub.api(&format!("/sessions/{}", session_id(d as u128))),
            hub.operator.clone(),
        );
        checks.push(tokio::spawn(async move {
            let r = http.get(&url).bearer_auth(&key).send().await.unwrap();
            assert_eq!(r.status(), 200, "{url}");
            let s: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
            (
                s["status"].as_str().unwrap_or("").to_owned(),
                s["metrics"]["log_count"].as_u64().unwrap_or(0),
            )
        }));
        if checks.len() == 32 {
            for c in checks.drain(..) {
                let (status, count) = c.await.unwrap();
                assert_eq!((status.as_str(), count), ("completed", per_session));
            }
        }
    }
    for c in checks {
        let (status, count) = c.await.unwrap();
        assert_eq!((status.as_str(), count), ("completed", per_session));
    }

    let mut lat = seen.latencies.lock().unwrap().clone();
    lat.sort();
    assert_eq!(
        lat.len() as u64,
        devices * batches,
        "every batch acknowledged"
    );
    println!(
        "hub::load: {devices} devices x {batches} batches of {PER_BATCH} records ({} records) in {load_secs:.1} s, \
         {operators} operators made {} queries; ingest latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; \
         {} x 429; hub RSS {} MiB idle, peak {} MiB; stored once: {} records, lost 0, doubled 0",
        devices * batches * PER_BATCH,
        queries.load(Relaxed),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        seen.throttled.load(Relaxed),
        idle_rss / 1024,
        peak_rss / 1024,
        devices * per_session,
    );
    assert!(
        peak_rss < PEAK_RSS_MAX_KIB,
        "hub peak RSS {peak_rss} KiB over {PEAK_RSS_MAX_KIB} KiB"
    );
}
