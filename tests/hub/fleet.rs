//! A fleet behind a real load balancer (README "Running the hub for a
//! fleet"): nginx from Debian in front of three `logbook-hub` replicas on
//! one PostgreSQL database and one moto bucket; 200 simulated devices post
//! wire batches and tus artifact uploads through it while an operator
//! follows a live stream through it with the CLI's client; the replica
//! holding that stream is killed with SIGKILL mid-load and restarted.
//! Every record arrives exactly once, every artifact whole (SHA-256), and
//! the live stream resumes on another replica with nothing missed.
//!
//! `LOGBOOK_TEST_DEVICES` and `LOGBOOK_TEST_BATCHES` make it larger, and
//! `LOGBOOK_TEST_KILLS` kills replicas in turn that many times (the long
//! forms in TESTING.md). Skipped with a notice where nginx,
//! PostgreSQL or moto is missing, never under CI.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use logbook::client::hub::{FollowTiming, HubClient, LogFilter, LogScope};
use logbook::wire::{Batch, SessionStatus};
use sha2::Digest;

use super::replicas::{replica, shared_storage, Shared};
use super::*;
use crate::util::{KillOnDrop, TestDir};

const NGINX: &str = "/usr/sbin/nginx";

/// A private nginx (not a daemon, its own config, temp dir and port)
/// balancing over `upstreams`; killed on drop.
pub struct Nginx {
    _child: KillOnDrop,
    pub url: String,
    _dir: TestDir,
}

impl Nginx {
    /// Whether nginx is installed (a notice when not; under CI, a failure).
    pub fn available() -> bool {
        if Path::new(NGINX).exists() {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("nginx is not installed; .ci/run must install it");
        }
        eprintln!("SKIPPED: nginx is not installed (apt-get install nginx; bash .ci/run does)");
        false
    }

    pub fn start(name: &str, upstreams: &[&str]) -> Nginx {
        let dir = TestDir::new(name);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("    server {u} max_fails=1 fail_timeout=2s;\n"))
            .collect();
        let d = dir.join("").display().to_string();
        // The README's example, with test paths: WebSocket upgrades
        // passed on, bodies streamed (tus PATCHes are large), a dead
        // replica skipped on connection errors.
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {d}nginx.pid;
error_log {d}error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {d}body;
  proxy_temp_path {d}proxy;
  fastcgi_temp_path {d}fastcgi;
  uwsgi_temp_path {d}uwsgi;
  scgi_temp_path {d}scgi;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  upstream logbook_hubs {{
{servers}    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 64m;
    location / {{
      proxy_pass http://logbook_hubs;
      proxy_http_version 1.1;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_request_buffering off;
      proxy_buffering off;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
      proxy_next_upstream error timeout;
    }}
  }}
}}
"
        );
        let conf_path: PathBuf = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let child = Command::new(NGINX)
            .arg("-c")
            .arg(&conf_path)
            .arg("-p")
            .arg(dir.join(""))
            .arg("-e")
            .arg(dir.join("error.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let mut child = KillOnDrop(child);
        let addr = format!("127.0.0.1:{port}");
        crate::util::wait_for("nginx answering /healthz", Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.0.try_wait() {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default();
                panic!("nginx exited: {status}\n{log}");
            }
            raw_request(
                &addr,
                "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .filter(|r| r.starts_with("HTTP/1.1 200"))
        });
        Nginx {
            _child: child,
            url: format!("http://{addr}"),
            _dir: dir,
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every retry of the load, and what each device last heard while it is
/// still retrying: a load that never ends fails naming who is stuck on what.
#[derive(Default)]
struct Retries {
    count: AtomicU64,
    stuck: Mutex<BTreeMap<String, String>>,
}

impl Retries {
    fn note(&self, who: &str, what: String) {
        self.count.fetch_add(1, Relaxed);
        self.stuck.lock().unwrap().insert(who.to_owned(), what);
    }

    fn clear(&self, who: &str) {
        self.stuck.lock().unwrap().remove(who);
    }

    fn report(&self) -> String {
        let stuck = self.stuck.lock().unwrap();
        let first: Vec<String> = stuck
            .iter()
            .take(20)
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        format!(
            "{} devices still retrying; the first:\n{}",
            stuck.len(),
            first.join("\n")
        )
    }
}

/// What a failed request said, for [`Retries::note`].
async fn heard(what: &str, r: Result<reqwest::Response, reqwest::Error>) -> String {
    match r {
        Ok(r) => {
            let status = r.status();
            format!("{what}: {status} {}", r.text().await.unwrap_or_default())
        }
        Err(e) => format!("{what}: {e}"),
    }
}

/// Jittered backoff between retries, as an agent's (`sync.retry_*`).
async fn backoff(attempt: &mut u32) {
    let ms = (20u64 << (*attempt).min(6)).min(1000);
    *attempt += 1;
    tokio::time::sleep(Duration::from_millis(rand::random_range(ms / 2..=ms))).await;
}

/// Posts one batch until the hub (any replica) acknowledges it: transport
/// errors, 5xx and 429 are retried, as the agent does; anything else fails.
async fn post_until_acked(
    http: &reqwest::Client,
    lb: &str,
    token: &str,
    b: &Batch,
    retries: &Retries,
) {
    let body = b.encode(1);
    let who = &b.device.id;
    let mut attempt = 0;
    loop {
        let r = http
            .post(format!("{lb}/api/v1/ingest/batches"))
            .bearer_auth(token)
            .header("content-type", "application/msgpack")
            .header("content-encoding", "gzip")
            .body(body.clone())
            .send()
            .await;
        match r {
            Ok(r) if r.status() == 200 => {
                let text = r.text().await.unwrap_or_default();
                let ack: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                if ack["acked"].is_array() {
                    retries.clear(who);
                    return;
                }
                retries.note(who, format!("POST batch: 200 without acks: {text}"));
            }
            Ok(r) if r.status().is_server_error() || r.status() == 429 => {
                retries.note(who, heard("POST batch", Ok(r)).await);
            }
            Ok(r) => panic!(
                "batch refused: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            ),
            Err(e) => retries.note(who, heard("POST batch", Err(e)).await),
        }
        backoff(&mut attempt).await;
    }
}

/// Uploads `data` as artifact `path` of `session` by tus through the load
/// balancer, the way the agent does: create (a retried creation resumes
/// the same upload, or is complete at once when the hub holds the file),
/// then PATCH from the offset HEAD reports, after any failure asking again.
async fn upload(
    http: &reqwest::Client,
    lb: &str,
    token: &str,
    session: Uuid,
    path: &str,
    data: &[u8],
    retries: &Retries,
) {
    let who = &format!("{session}");
    let digest = hex::encode(sha2::Sha256::digest(data));
    let meta = format!(
        "session_id {},path {},content_type {},sha256 {}",
        b64(session.to_string().as_bytes()),
        b64(path.as_bytes()),
        b64(b"application/octet-stream"),
        b64(digest.as_bytes())
    );
    // A 404 at HEAD: the upload finished (its last answer lost) or
    // expired; the agent starts over, and so does this.
    'start: loop {
        let mut attempt = 0;
        let location = loop {
            let r = http
                .post(format!("{lb}/api/v1/ingest/uploads"))
                .bearer_auth(token)
                .header("tus-resumable", "1.0.0")
                .header("upload-length", data.len().to_string())
                .header("upload-metadata", &meta)
                .send()
                .await;
            match r {
                // The hub already holds this file (a finishing PATCH's
                // answer was lost): every byte is in, nothing to send.
                Ok(r)
                    if r.status() == 201
                        && r.headers()
                            .get("upload-offset")
                            .is_some_and(|o| o.to_str().ok() == Some(&data.len().to_string())) =>
                {
                    retries.clear(who);
                    return;
                }
                Ok(r) if r.status() == 201 => {
                    break format!("{lb}{}", r.headers()["location"].to_str().unwrap());
                }
                Ok(r) if r.status().is_server_error() || r.status() == 429 => {
                    retries.note(who, heard("POST upload", Ok(r)).await);
                }
                Ok(r) => panic!(
                    "upload refused: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(e) => retries.note(who, heard("POST upload", Err(e)).await),
            }
            backoff(&mut attempt).await;
        };
        const CHUNK: usize = 32 << 10;
        let mut attempt = 0;
        loop {
            let head = http
                .head(&location)
                .bearer_auth(token)
                .header("tus-resumable", "1.0.0")
                .send()
                .await;
            let offset = match head {
                Ok(r) if r.status() == 200 => r.headers()["upload-offset"]
                    .to_str()
                    .unwrap()
                    .parse::<usize>()
                    .unwrap(),
                Ok(r) if r.status() == 404 => {
                    retries.note(who, heard(&format!("HEAD {location}"), Ok(r)).await);
                    backoff(&mut attempt).await;
                    continue 'start;
                }
                // Busy (another replica's PATCH, or a dead one's lease running
                // out), or a replica going away: ask again.
                Ok(r) if r.status().is_server_error() || r.status() == 423 || r.status() == 429 => {
                    retries.note(who, heard(&format!("HEAD {location}"), Ok(r)).await);
                    backoff(&mut attempt).await;
                    continue;
                }
                Ok(r) => panic!("HEAD {location}: {}", r.status()),
                Err(e) => {
                    retries.note(who, heard(&format!("HEAD {location}"), Err(e)).await);
                    backoff(&mut attempt).await;
                    continue;
                }
            };
            if offset == data.len() {
                retries.clear(who);
                return;
            }
            let end = (offset + CHUNK).min(data.len());
            let r = http
                .patch(&location)
                .bearer_auth(token)
                .header("tus-resumable", "1.0.0")
                .header("upload-offset", offset.to_string())
                .header("content-type", "application/offset+octet-stream")
                .body(data[offset..end].to_vec())
                .send()
                .await;
            match r {
                Ok(r) if r.status() == 204 => {
                    attempt = 0;
                    if r.headers()["upload-offset"].to_str().unwrap() == data.len().to_string() {
                        retries.clear(who);
                        return;
                    }
                }
                Ok(r)
                    if r.status().is_server_error()
                        || [409, 423, 429].contains(&r.status().as_u16()) =>
                {
                    retries.note(who, heard(&format!("PATCH {location}"), Ok(r)).await);
                    backoff(&mut attempt).await;
                }
                Ok(r) if r.status() == 404 => {
                    retries.note(who, heard(&format!("PATCH {location}"), Ok(r)).await);
                    backoff(&mut attempt).await;
                    continue 'start;
                }
                Ok(r) => panic!(
                    "PATCH {location}: {} {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                ),
                Err(e) => {
                    retries.note(who, heard(&format!("PATCH {location}"), Err(e)).await);
                    backoff(&mut attempt).await;
                }
            }
        }
    }
}

/// The artifact a device uploads: a few chunks, distinct per device.
fn artifact(i: u64) -> Vec<u8> {
    let mut rng = 0x2545_f491_4f6c_dd1d_u64 ^ i;
    (0..(96 << 10) + i * 7)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_nginx_survives_a_replica_killed_mid_load() {
    let test = "hub::fleet::behind_nginx";
    if !Nginx::available() {
        return;
    }
    let Some(Shared { url, _bucket, env }) = shared_storage(test) else {
        return;
    };
    let devices = env_or("LOGBOOK_TEST_DEVICES", 200);
    let batches = env_or("LOGBOOK_TEST_BATCHES", 4).max(2);
    const PER_BATCH: u64 = 25;
    let uploaders = devices.div_ceil(10);

    let mut hubs = [
        replica("hub_fleet_1", &env),
        replica("hub_fleet_2", &env),
        replica("hub_fleet_3", &env),
    ];
    let addrs: Vec<&str> = hubs.iter().map(|h| h.addr.as_str()).collect();
    let lb = Nginx::start("hub_fleet_nginx", &addrs);
    let lb_url = lb.url.clone();
    let operator = hubs[0].operator.clone();

    let names: Vec<String> = (0..=devices).map(|i| format!("robot-{i:04}")).collect();
    let tokens = device_tokens(
        vec![("LOGBOOK_STORAGE_DATABASE".to_owned(), url.clone())],
        hubs[0].data_dir(),
        &names,
    )
    .await;

    // The watched device (the last name) and an operator following its
    // session through the load balancer with the CLI's client.
    let watched = session_id(1_000_000);
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let retries = Arc::new(Retries::default());
    let (wname, wtoken) = (
        names[devices as usize].clone(),
        tokens[devices as usize].clone(),
    );
    post_until_acked(
        &http,
        &lb_url,
        &wtoken,
        &device_batch(&wname, watched, Some(SessionStatus::Active), 1, 1..=10),
        &retries,
    )
    .await;
    let seen = Arc::new(Mutex::new(Vec::<u64>::new()));
    let notes = Arc::new(Mutex::new(Vec::<String>::new()));
    let follow = {
        let client = HubClient::new(&lb_url, Some(&operator), Some(ORG), Some(PROJECT)).unwrap();
        let (seen, notes) = (seen.clone(), notes.clone());
        tokio::spawn(async move {
            client
                .follow(
                    &LogScope::Session(watched.to_string()),
                    &LogFilter(vec![]),
                    BTreeSet::new(),
                    |r| {
                        seen.lock().unwrap().push(r.seq);
                        Ok(())
                    },
                    |n| notes.lock().unwrap().push(n.to_owned()),
                    FollowTiming {
                        max_backoff: Duration::from_secs(1),
                        ping_every: Duration::from_secs(2),
                    },
                )
                .await
        })
    };
    crate::util::wait_for("the follow's tail", Duration::from_secs(30), || {
        (seen.lock().unwrap().len() == 10).then_some(())
    });

    // The load: every device opens a session, posts its batches, closes
    // it; every tenth uploads an artifact meanwhile.
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..devices {
        let (http, lb, name, token) = (
            http.clone(),
            lb_url.clone(),
            names[i as usize].clone(),
            tokens[i as usize].clone(),
        );
        let (acked, retries) = (acked.clone(), retries.clone());
        tasks.push(tokio::spawn(async move {
            let session = session_id(i as u128);
            for b in 0..batches {
                let status = match b {
                    0 => Some(SessionStatus::Active),
                    b if b == batches - 1 => Some(SessionStatus::Completed),
                    _ => None,
                };
                let seqs = b * PER_BATCH + 1..=(b + 1) * PER_BATCH;
                let batch = device_batch(&name, session, status, b + 1, seqs);
                post_until_acked(&http, &lb, &token, &batch, &retries).await;
                acked.fetch_add(1, Relaxed);
                if b == 0 && i % 10 == 0 {
                    let data = artifact(i);
                    upload(
                        &http,
                        &lb,
                        &token,
                        session,
                        "bags/run.mcap",
                        &data,
                        &retries,
                    )
                    .await;
                }
            }
        }));
    }
    // The watched device keeps posting while the load runs.
    let load_total = devices * batches;
    let watched_task = {
        let (http, lb, acked, retries) =
            (http.clone(), lb_url.clone(), acked.clone(), retries.clone());
        tokio::spawn(async move {
            let mut next = 11u64;
            let mut rev = 2;
            loop {
                let done = acked.load(Relaxed) >= load_total;
                let status = done.then_some(SessionStatus::Completed);
                let b = device_batch(&wname, watched, status, rev, next..=next + 9);
                post_until_acked(&http, &lb, &wtoken, &b, &retries).await;
                next += 10;
                rev += 1;
                if done {
                    return next - 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    // Mid-load, the replica holding the live stream dies without a word;
    // with LOGBOOK_TEST_KILLS > 1, the next replica in turn dies at each
    // further share of the load, restarted each time.
    let kills = env_or("LOGBOOK_TEST_KILLS", 1).max(1);
    let mut victims = Vec::new();
    for j in 1..=kills {
        let share = load_total * j / (kills + 1);
        let deadline = std::time::Instant::now() + Duration::from_secs(300);
        while acked.load(Relaxed) < share {
            assert!(
                std::time::Instant::now() < deadline,
                "the load stalled before {share} batches: {}",
                retries.report()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let victim = match victims.last() {
            Some(last) => (last + 1) % hubs.len(),
            None => {
                let mut holder = None;
                for (k, h) in hubs.iter().enumerate() {
                    if h.metric("logbook_hub_active_streams").await >= 1 {
                        holder = Some(k);
                    }
                }
                holder.expect("one replica holds the live stream")
            }
        };
        Command::new("kill")
            .args(["-KILL", &hubs[victim].pid().to_string()])
            .status()
            .unwrap();
        tokio::task::block_in_place(|| {
            let _ = hubs[victim].wait_exit();
            hubs[victim].restart();
        });
        victims.push(victim);
    }

    // Bounded: a load that never ends fails with what the devices last
    // heard, not a CI run that times out.
    let all = async {
        for t in tasks {
            t.await.unwrap();
        }
    };
    if tokio::time::timeout(Duration::from_secs(600), all)
        .await
        .is_err()
    {
        panic!(
            "the load did not end within 10 minutes: {}",
            retries.report()
        );
    }
    let last = tokio::time::timeout(Duration::from_secs(120), watched_task)
        .await
        .expect("the watched device finishes")
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), follow)
        .await
        .expect("the live stream ends with its session")
        .unwrap()
        .unwrap();

    // Every record once: per device, as many rows as distinct seqs, 1..=N.
    let rows = testdb::psql(
        &url,
        "SELECT d.device_id, count(*), count(DISTINCT l.seq), min(l.seq), max(l.seq)
         FROM logs l JOIN devices d ON d.pk = l.device_pk GROUP BY d.device_id ORDER BY 1",
    );
    let rows: Vec<Vec<&str>> = rows.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len() as u64, devices + 1, "every device stored");
    let n = (batches * PER_BATCH).to_string();
    for r in &rows {
        if r[0] == names[devices as usize] {
            let last = last.to_string();
            assert_eq!(
                r[1..],
                [last.as_str(), last.as_str(), "1", last.as_str()],
                "{r:?}"
            );
        } else {
            assert_eq!(r[1..], [n.as_str(), n.as_str(), "1", n.as_str()], "{r:?}");
        }
    }
    // Sessions closed, and their counts right, as the API tells them.
    for i in [0, devices / 2, devices - 1] {
        let (st, s) = hubs[0]
            .get(&hubs[0].api(&format!("/sessions/{}", session_id(i as u128))))
            .await;
        assert_eq!(st, 200, "{s}");
        assert_eq!(s["status"], "completed", "{s}");
        assert_eq!(s["log_count"], batches * PER_BATCH, "{s}");
    }

    // Every artifact whole, downloaded through the load balancer.
    for i in (0..devices).step_by(10) {
        let url = format!(
            "{lb_url}/api/v1/organizations/{ORG}/projects/{PROJECT}/sessions/{}/files/bags/run.mcap",
            session_id(i as u128)
        );
        let r = http.get(&url).bearer_auth(&operator).send().await.unwrap();
        assert_eq!(r.status(), 200, "{url}");
        let body = r.bytes().await.unwrap();
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&body)),
            hex::encode(sha2::Sha256::digest(artifact(i))),
            "artifact of device {i}"
        );
    }
    assert_eq!(uploaders, devices.div_ceil(10));

    // The stream: every record of the watched session, once, in order,
    // across the reconnect the kill forced.
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (1..=last).collect::<Vec<_>>(),
        "each record once, in order"
    );
    let notes = notes.lock().unwrap().clone();
    assert!(
        notes.iter().any(|n| n.contains("reconnected")),
        "the stream resumed after the kill: {notes:?}"
    );
    eprintln!(
        "fleet: {devices} devices x {batches} batches of {PER_BATCH} records, {uploaders} artifacts, \
         {} retries; replicas killed and restarted in turn: {:?}",
        retries.count.load(Relaxed),
        victims.iter().map(|v| v + 1).collect::<Vec<_>>()
    );
}
