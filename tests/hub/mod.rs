//! Integration tests of `logbook-hub`: a real hub process on a fresh data
//! directory and port 0 (address read from `<data-dir>/hub.addr`), driven
//! over HTTP, WebSocket and tus the way agents and operators use it.

mod api;
mod console;
mod console_devices;
mod export;
mod fleet;
mod hostile;
mod interop;
mod live;
mod load;
mod postgres;
mod refusals;
mod replicas;
mod timeline;
mod tokens;
mod uploads;
mod versions;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use logbook::wire::{
    Batch, Device, Gap, Level, Package, Record, SessionState, SessionStatus, BATCH_VERSION,
};
use serde_json::Value;
use uuid::Uuid;

use crate::util::{self, TestDir};

#[path = "../../src/hub/store/postgres/testdb.rs"]
#[allow(dead_code)]
pub mod testdb;

#[path = "../../src/hub/blobs/testbucket.rs"]
#[allow(dead_code)]
pub mod testbucket;

/// The variable that runs every hub these tests start on other backends:
/// `sqlite` (the default: SQLite and a blob directory), `postgres`, `s3`,
/// or `postgres+s3`; each on this process's throwaway PostgreSQL cluster
/// (a fresh database per hub) and moto server (a fresh bucket per hub).
pub const STORAGE_VAR: &str = "LOGBOOK_TEST_HUB_STORAGE";

/// Where a test hub stores: the backends [`STORAGE_VAR`] names, or
/// (for tests parametrized over them) the ones a test asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Storage {
    pub postgres: bool,
    pub s3: bool,
}

impl Storage {
    /// What [`STORAGE_VAR`] asks for (SQLite and a directory when unset).
    pub fn from_env() -> Storage {
        let v = std::env::var(STORAGE_VAR).unwrap_or_default();
        let parts: Vec<&str> = v
            .split('+')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        for p in &parts {
            assert!(
                ["sqlite", "dir", "postgres", "s3"].contains(p),
                "{STORAGE_VAR}={v:?}: expected sqlite, postgres, s3 or postgres+s3"
            );
        }
        Storage {
            postgres: parts.contains(&"postgres"),
            s3: parts.contains(&"s3"),
        }
    }

    /// The same with blobs in S3.
    pub fn with_s3(self) -> Storage {
        Storage { s3: true, ..self }
    }

    /// Whether the backends this needs are installed; a notice when not
    /// (under CI, a failure).
    pub fn available(self, test: &str) -> bool {
        (!self.postgres || testdb::cluster_port(test).is_some())
            && (!self.s3 || testbucket::endpoint(test).is_some())
    }

    /// The hub's environment for a fresh database and bucket.
    fn env(self, test: &str) -> (Vec<(String, String)>, Option<testbucket::TestBucket>) {
        let mut env = Vec::new();
        if self.postgres {
            let url = testdb::fresh_database(test)
                .unwrap_or_else(|| panic!("{test}: PostgreSQL is not installed"));
            env.push(("LOGBOOK_STORAGE_DATABASE".to_owned(), url));
        }
        let mut bucket = None;
        if self.s3 {
            let b = testbucket::fresh_bucket(test)
                .unwrap_or_else(|| panic!("{test}: moto[server] is not installed"));
            env.push(("LOGBOOK_STORAGE_BLOBS".to_owned(), b.url("hub")));
            env.extend(b.env().into_iter().map(|(k, v)| (k.to_owned(), v)));
            bucket = Some(b);
        }
        (env, bucket)
    }
}

/// Runs each listed `async fn test(storage: Storage)` as a test on the
/// suite's storage ([`STORAGE_VAR`]) and again with its blobs in S3.
#[macro_export]
macro_rules! per_blobs {
    ($($test:ident),* $(,)?) => {
        mod on_default {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::hub::Storage::from_env()).await;
                }
            )*
        }
        mod on_s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let storage = $crate::hub::Storage::from_env().with_s3();
                    if storage.available(concat!("hub::", stringify!($test), " on S3")) {
                        super::$test(storage).await;
                    }
                }
            )*
        }
    };
}

pub const ORG: &str = "acme";
pub const PROJECT: &str = "warehouse";
pub const DEVICE: &str = "robot-1";

/// A running hub; killed on drop.
pub struct HubProc {
    child: Child,
    pub dir: TestDir,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    pub addr: String,
    /// Operator key of `acme`.
    pub operator: String,
    /// Device token of `robot-1` in acme/warehouse.
    pub device: String,
    pub http: reqwest::Client,
    /// The storage variables it was started with (a restart and `token`
    /// reuse them).
    pub env: Vec<(String, String)>,
    /// Its bucket, when its blobs are in S3.
    pub bucket: Option<testbucket::TestBucket>,
}

impl HubProc {
    pub fn start(name: &str) -> HubProc {
        HubProc::start_with(name, &[])
    }

    /// A hub on the suite's storage ([`STORAGE_VAR`]) with `env` over it.
    pub fn start_with(name: &str, env: &[(&str, &str)]) -> HubProc {
        HubProc::start_on(name, Storage::from_env(), env)
    }

    /// A hub on `storage` (a fresh database and bucket) with `env` over it.
    pub fn start_on(name: &str, storage: Storage, env: &[(&str, &str)]) -> HubProc {
        let (mut all, bucket) = storage.env(name);
        // Tests post as fast as a loop goes, as one device: no per-device
        // rate unless a test sets one (tests/sync/limits.rs).
        all.push(("LOGBOOK_DEVICES_REQUESTS_PER_SEC".into(), "0".into()));
        all.push(("LOGBOOK_DEVICES_MAX_CONCURRENT".into(), "64".into()));
        // Clients that read nothing while a test posts (hub::live) are
        // not closed as slow unless a test asks for it.
        all.push(("LOGBOOK_SERVER_STREAM_SEND_TIMEOUT".into(), "600".into()));
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let env = all;
        let dir = TestDir::new(name);
        let data = dir.join("data");
        let token = |args: &[&str]| {
            let out = util::run_ok(
                Command::new(util::bin("logbook-hub"))
                    .args(["token", "create", "--data-dir"])
                    .arg(&data)
                    .args(args)
                    .envs(env.iter().map(|(k, v)| (k, v))),
            );
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        };
        let operator = token(&["--org", ORG, "--project", PROJECT, "--operator"]);
        let device = token(&["--org", ORG, "--project", PROJECT, "--device", DEVICE]);
        let child = Command::new(util::bin("logbook-hub"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .env("LOGBOOK_LOG", "error")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start logbook-hub");
        let mut hub = HubProc {
            child,
            url: String::new(),
            addr: String::new(),
            operator,
            device,
            http: reqwest::Client::new(),
            dir,
            env,
            bucket,
        };
        let addr_file = data.join("hub.addr");
        let addr = util::wait_for("hub.addr", Duration::from_secs(20), || {
            if let Ok(Some(status)) = hub.child.try_wait() {
                panic!("logbook-hub exited early: {status}");
            }
            std::fs::read_to_string(&addr_file)
                .ok()
                .filter(|s| s.ends_with('\n'))
        });
        hub.addr = addr.trim().to_owned();
        // A hub serving TLS (tests/sync/tls.rs): its certificate names
        // localhost, and its chain file ends with the CA that signed it.
        let tls_cert = hub
            .env
            .iter()
            .find(|(k, _)| k == "LOGBOOK_SERVER_TLS_CERT")
            .map(|(_, v)| v.clone());
        if let Some(chain) = tls_cert {
            let port = hub.addr.rsplit(':').next().unwrap().to_owned();
            hub.url = format!("https://localhost:{port}");
            let pem = std::fs::read(chain).unwrap();
            let mut client = reqwest::Client::builder();
            for c in reqwest::Certificate::from_pem_bundle(&pem).unwrap() {
                client = client.add_root_certificate(c);
            }
            hub.http = client.build().unwrap();
            // The listener is bound before hub.addr is written; requests
            // wait in its backlog until the hub serves.
            return hub;
        }
        hub.url = format!("http://{}", hub.addr);
        util::wait_for("/healthz", Duration::from_secs(20), || {
            raw_request(
                &hub.addr,
                "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .filter(|r| r.starts_with("HTTP/1.1 200"))
        });
        hub
    }

    /// Starts the hub again on the same data directory and address (after
    /// [`HubProc::terminate`]), for tests of an outage and its end.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Command::new(util::bin("logbook-hub"))
            .args(["serve", "--listen", &self.addr, "--data-dir"])
            .arg(self.data_dir())
            .env("LOGBOOK_LOG", "error")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("restart logbook-hub");
        util::wait_for("/healthz after restart", Duration::from_secs(20), || {
            raw_request(
                &self.addr,
                "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .filter(|r| r.starts_with("HTTP/1.1 200"))
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn data_dir(&self) -> std::path::PathBuf {
        self.dir.join("data")
    }

    /// The names of the finished artifacts (`"blobs"`) or uploads in
    /// progress (`"uploads"`) the hub holds, wherever its blobs are.
    pub fn stored(&self, what: &str) -> Vec<String> {
        let mut names: Vec<String> = match &self.bucket {
            None => match std::fs::read_dir(self.data_dir().join(what)) {
                Ok(rd) => rd
                    .flatten()
                    .map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.trim_end_matches(".part").to_owned()
                    })
                    .collect(),
                Err(_) => vec![],
            },
            Some(b) => {
                // moto answers unsigned requests; the listing's keys are
                // hub/<what>/<name>[/<segment>].
                let addr = b.endpoint.trim_start_matches("http://");
                let req = format!(
                    "GET /{}?list-type=2&prefix=hub/{what}/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n",
                    b.bucket
                );
                let listing = raw_request(addr, &req).expect("moto answers");
                listing
                    .split("<Key>")
                    .skip(1)
                    .filter_map(|k| k.split("</Key>").next())
                    .filter_map(|k| k.strip_prefix(&format!("hub/{what}/")))
                    .map(|k| k.split('/').next().unwrap_or(k).to_owned())
                    .collect()
            }
        };
        names.sort();
        names.dedup();
        names
    }

    /// A new token (`device: None` makes an operator key of `project`
    /// only).
    pub fn token(&self, org: &str, project: &str, device: Option<&str>) -> String {
        let mut cmd = Command::new(util::bin("logbook-hub"));
        cmd.args(["token", "create", "--data-dir"])
            .arg(self.data_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--org", org, "--project", project]);
        match device {
            Some(d) => cmd.args(["--device", d]),
            None => cmd.arg("--operator"),
        };
        String::from_utf8(util::run_ok(&mut cmd).stdout)
            .unwrap()
            .trim()
            .to_owned()
    }

    /// A new organization-wide operator key (no `--project`: it reads
    /// every project of `org`).
    pub fn org_key(&self, org: &str) -> String {
        let mut cmd = Command::new(util::bin("logbook-hub"));
        cmd.args(["token", "create", "--operator", "--data-dir"])
            .arg(self.data_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--org", org]);
        String::from_utf8(util::run_ok(&mut cmd).stdout)
            .unwrap()
            .trim()
            .to_owned()
    }

    /// `/api/v1/organizations/acme/projects/warehouse` + `path`.
    pub fn api(&self, path: &str) -> String {
        format!(
            "{}/api/v1/organizations/{ORG}/projects/{PROJECT}{path}",
            self.url
        )
    }

    /// GET with the operator key; returns status and JSON (Null if none).
    pub async fn get(&self, url: &str) -> (u16, Value) {
        self.get_as(url, &self.operator).await
    }

    pub async fn get_as(&self, url: &str, token: &str) -> (u16, Value) {
        let r = self.http.get(url).bearer_auth(token).send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Creates a tus upload of `data` as artifact `path` of `session`, as
    /// an agent does (`sha256`: the digest declared, by default the data's
    /// own); returns the upload's absolute URL.
    pub async fn create_upload(
        &self,
        session: Uuid,
        path: &str,
        data: &[u8],
        sha256: Option<&str>,
    ) -> String {
        use sha2::Digest;
        let digest = hex::encode(sha2::Sha256::digest(data));
        let meta = format!(
            "session_id {},path {},content_type {},sha256 {}",
            b64(session.to_string().as_bytes()),
            b64(path.as_bytes()),
            b64(b"application/octet-stream"),
            b64(sha256.unwrap_or(&digest).as_bytes())
        );
        let r = self
            .http
            .post(format!("{}/api/v1/ingest/uploads", self.url))
            .bearer_auth(&self.device)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", data.len().to_string())
            .header("upload-metadata", meta)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        format!("{}{}", self.url, r.headers()["location"].to_str().unwrap())
    }

    /// `GET /metrics` as an operator: the Prometheus text.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(&self.operator)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One sample of `/metrics` (0 when absent), by its name and labels.
    pub async fn metric(&self, sample: &str) -> u64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    }

    /// Posts a batch, gzipped, with the device token.
    pub async fn post_batch(&self, batch: &Batch) -> (u16, Value) {
        self.post_body(&batch.encode(1), &self.device).await
    }

    pub async fn post_body(&self, body: &[u8], token: &str) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}/api/v1/ingest/batches", self.url))
            .bearer_auth(token)
            .header("content-type", "application/msgpack")
            .header("content-encoding", "gzip")
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Peak resident memory of the hub process (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/<pid>/status")
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.sigterm();
        self.wait_exit()
    }

    pub fn sigterm(&self) {
        util::run_ok(Command::new("kill").args(["-TERM", &self.pid().to_string()]));
    }

    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        util::wait_for("hub exit", Duration::from_secs(30), || {
            self.child.try_wait().unwrap()
        })
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One raw HTTP/1.1 exchange (the whole response as text), or `None` if
/// the hub does not answer yet.
/// A simulated fleet device's batch (`hub::fleet`, `hub::load`): its
/// session's state when `status` is given (first and last batch) and
/// records `seqs`, every fourth an error.
pub fn device_batch(
    device: &str,
    session: Uuid,
    status: Option<SessionStatus>,
    revision: u64,
    seqs: std::ops::RangeInclusive<u64>,
) -> Batch {
    Batch {
        marks: Vec::new(),
        agent: None,
        version: BATCH_VERSION,
        device: Device {
            id: device.into(),
            name: device.into(),
        },
        sent_at_ns: at(0),
        sessions: status
            .map(|st| vec![state(session, revision, st, &["fleet"])])
            .unwrap_or_default(),
        records: seqs
            .map(|i| {
                record(
                    i,
                    Some(session),
                    [Level::Info, Level::Warn, Level::Debug, Level::Error][i as usize % 4],
                    "drive",
                    &format!("{device} odometry tick {i}"),
                )
            })
            .collect(),
        gaps: vec![],
    }
}

/// Device tokens of acme/warehouse for each of `names`, made through the
/// library as `token create` does, on the storage `env` names (a hub's
/// [`HubProc::env`]) and `data_dir`.
pub async fn device_tokens(
    env: Vec<(String, String)>,
    data_dir: std::path::PathBuf,
    names: &[String],
) -> Vec<String> {
    let names = names.to_vec();
    tokio::task::spawn_blocking(move || {
        let database = logbook::hub::HubConfig::load(None, env).unwrap().database;
        names
            .iter()
            .map(|n| {
                logbook::hub::create_token_in(&database, &data_dir, ORG, Some(PROJECT), Some(n))
                    .unwrap()
            })
            .collect()
    })
    .await
    .unwrap()
}

pub fn raw_request(addr: &str, request: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Standard base64, as tus `Upload-Metadata` values are written.
pub fn b64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

pub fn session_id(n: u128) -> Uuid {
    Uuid::from_u128(0x0193_4d2a_0000_7000_8000_0000_0000_0000 + n)
}

/// 2025-01-10T08:00:00Z in Unix nanoseconds, plus `secs`.
pub fn at(secs: i64) -> i64 {
    1_736_496_000_000_000_000 + secs * 1_000_000_000
}

pub fn state(id: Uuid, revision: u64, status: SessionStatus, tags: &[&str]) -> SessionState {
    let ended = status != SessionStatus::Active;
    SessionState {
        id,
        revision,
        status,
        started_at_ns: at(0),
        ended_at_ns: ended.then_some(at(9000)),
        duration_ns: Some(if ended { 9000 } else { 60 } * 1_000_000_000),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        package: Some(Package {
            name: "perception".into(),
            version: Some("2.1.0".into()),
        }),
        metadata: serde_json::json!({"site": "berlin"})
            .as_object()
            .unwrap()
            .clone(),
        error: None,
    }
}

pub fn record(
    seq: u64,
    session: Option<Uuid>,
    level: Level,
    module: &str,
    message: &str,
) -> Record {
    Record {
        seq,
        session_id: session,
        timestamp_ns: at(seq as i64),
        level,
        module: module.into(),
        message: message.into(),
        metadata: format!(r#"{{"n":{seq}}}"#),
        pid: Some(4242),
        uid: Some(1000),
        gid: Some(1000),
        process: Some("perceptiond".into()),
    }
}

pub fn batch(sessions: Vec<SessionState>, records: Vec<Record>, gaps: Vec<Gap>) -> Batch {
    Batch {
        marks: Vec::new(),
        agent: None,
        version: BATCH_VERSION,
        device: Device {
            id: DEVICE.into(),
            name: "warehouse-robot-01".into(),
        },
        sent_at_ns: at(0),
        sessions,
        records,
        gaps,
    }
}

/// A minimal blocking WebSocket client (text and close frames), enough to
/// watch a live log stream the way a browser would.
pub struct WsClient {
    stream: TcpStream,
}

pub enum WsMessage {
    Text(String),
    Close(String),
}

impl WsClient {
    /// Connects and upgrades; `Err` holds the HTTP response when refused.
    pub fn connect(addr: &str, path: &str, token: &str) -> Result<WsClient, String> {
        let mut stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n\r\n"
        );
        stream
            .write_all(req.as_bytes())
            .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).map_err(|e| e.to_string())? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        if !head.starts_with("HTTP/1.1 101") {
            return Err(head);
        }
        Ok(WsClient { stream })
    }

    /// A client on no connection (a placeholder while the real one is
    /// lent to a blocking task).
    pub fn dangling() -> WsClient {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        WsClient { stream }
    }

    /// The next message, waiting at most `timeout`.
    pub fn next(&mut self, timeout: Duration) -> Option<WsMessage> {
        self.stream.set_read_timeout(Some(timeout)).unwrap();
        let mut h = [0u8; 2];
        self.stream.read_exact(&mut h).ok()?;
        let opcode = h[0] & 0x0f;
        let mut len = (h[1] & 0x7f) as u64;
        if len == 126 {
            let mut b = [0u8; 2];
            self.stream.read_exact(&mut b).ok()?;
            len = u16::from_be_bytes(b) as u64;
        } else if len == 127 {
            let mut b = [0u8; 8];
            self.stream.read_exact(&mut b).ok()?;
            len = u64::from_be_bytes(b);
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).ok()?;
        match opcode {
            1 => Some(WsMessage::Text(String::from_utf8(payload).unwrap())),
            8 => Some(WsMessage::Close(
                String::from_utf8_lossy(payload.get(2..).unwrap_or(&[])).into_owned(),
            )),
            _ => self.next(timeout),
        }
    }

    /// The next text message as JSON; panics on close or timeout.
    pub fn json(&mut self, timeout: Duration) -> Value {
        match self.next(timeout) {
            Some(WsMessage::Text(t)) => serde_json::from_str(&t).unwrap(),
            Some(WsMessage::Close(why)) => panic!("stream closed: {why}"),
            None => panic!("no message within {timeout:?}"),
        }
    }
}
