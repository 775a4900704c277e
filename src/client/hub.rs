//! The operator's client for a hub's Sessions API (`logbook --hub URL …`):
//! sessions, tags, paged logs, live logs over WebSocket with reconnects,
//! and artifact downloads streamed to disk (resumed with `Range`).
//!
//! Invariant: this module speaks only HTTP + JSON to the hub and decodes
//! into its own types (it never names the hub's code); every failure is a
//! [`HubError`] whose one-line text names the hub URL, never the key.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};

use super::percent_encode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::wire::{ErrorBody, Level};

/// Environment variables of the hub flags (`--hub`, `--key`, `--org`,
/// `--project`); `logbook dev` prints them as exports.
pub const HUB_URL_ENV: &str = "LOGBOOK_HUB_URL";
pub const HUB_KEY_ENV: &str = "LOGBOOK_HUB_KEY";
pub const ORG_ENV: &str = "LOGBOOK_ORG";
pub const PROJECT_ENV: &str = "LOGBOOK_PROJECT";

/// Most items the hub gives in one page (its `MAX_LIMIT`).
pub const PAGE: usize = 500;
/// Most records the hub replays when a live stream (re)connects.
pub const LIVE_TAIL: usize = 1000;
/// Largest JSON answer accepted from the hub (a page of 500 big records).
const MAX_JSON: usize = 64 << 20;
/// Records remembered by `follow` to print each once across reconnects.
const SEEN_CAP: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("no operator key: give --key or set {HUB_KEY_ENV} (create one with `logbook-hub token create --operator`)")]
    NoKey,
    #[error("no {0}: give --{0} or set {1}")]
    Missing(&'static str, &'static str),
    #[error("--hub: expected an http:// or https:// URL, found {0:?}")]
    BadUrl(String),
    #[error("--ca-file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("cannot reach the hub at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the hub at {url} refused the operator key ({message}); check --key / {HUB_KEY_ENV}")]
    Unauthorized { url: String, message: String },
    #[error("the hub at {url} does not let this key see {what} ({message})")]
    Forbidden {
        url: String,
        what: String,
        message: String,
    },
    #[error("not found at the hub: {0}")]
    NotFound(String),
    #[error("the hub at {url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("unexpected answer from the hub at {url}: {reason}")]
    BadAnswer { url: String, reason: String },
    #[error("{0} changed at the hub while downloading (sha256 {1} expected, {2} written); remove the file and download again")]
    Checksum(String, String, String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl HubError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HubError {
        let what = what.into();
        move |source| HubError::Io { what, source }
    }
}

/// The innermost cause of a transport error: "Connection refused (os error
/// 111)" says more than reqwest's outer layers.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e;
    while let Some(next) = last.source() {
        last = next;
    }
    last.to_string()
}

// ----- JSON shapes of the hub's operator API -----

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubPackage {
    pub id: String,
    pub name: String,
    pub version: Option<String>,
}

/// A session as the hub shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubSession {
    pub id: String,
    pub device_id: String,
    pub device_name: String,
    pub status: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub duration_seconds: Option<f64>,
    pub tags: Vec<String>,
    pub artifact_count: u64,
    pub log_count: u64,
    pub has_errors: bool,
    pub package: Option<HubPackage>,
    pub metadata: serde_json::Value,
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
}

/// One log record as the hub shows it (the local API's fields plus
/// `device_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubLog {
    pub seq: u64,
    pub session_id: Option<String>,
    pub device_id: String,
    pub timestamp: String,
    pub level: Level,
    pub module: String,
    pub message: String,
    pub metadata: serde_json::Value,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub process: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubArtifact {
    pub path: String,
    pub size_bytes: u64,
    pub content_type: String,
    pub sha256: String,
    pub created_at: String,
}

/// A mark as the hub shows it (`GET …/marks`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HubMark {
    pub session_id: Option<String>,
    pub device_id: String,
    pub id: i64,
    pub name: String,
    pub timestamp: String,
    pub start: String,
    pub end: String,
    pub before_seconds: f64,
    pub after_seconds: f64,
    pub priority: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub released: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// Filters of `logbook --hub … sessions`.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    pub device: Option<String>,
    pub status: Option<String>,
    pub tags: Vec<String>,
    /// Newest first; `None` for every session.
    pub limit: Option<usize>,
}

/// Log filters as query pairs (`level`, `module`, `search`, `since`,
/// `until`), shared by pages and live streams.
#[derive(Debug, Clone, Default)]
pub struct LogFilter(pub Vec<(&'static str, String)>);

impl LogFilter {
    fn query(&self) -> String {
        self.0
            .iter()
            .map(|(k, v)| format!("&{k}={}", percent_encode(v)))
            .collect()
    }
}

/// Timing of [`HubClient::follow`].
#[derive(Debug, Clone, Copy)]
pub struct FollowTiming {
    /// Longest wait between reconnect attempts.
    pub max_backoff: Duration,
    /// How often a quiet stream is pinged; three periods without an answer
    /// (not even a pong) count as a dead link.
    pub ping_every: Duration,
}

impl Default for FollowTiming {
    fn default() -> Self {
        FollowTiming {
            max_backoff: Duration::from_secs(10),
            ping_every: Duration::from_secs(15),
        }
    }
}

/// Whose logs: one session's, or one device's records logged while no
/// session was active (the hub's device logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogScope {
    Session(String),
    Device(String),
}

impl LogScope {
    /// The logs route under the project, for pages and live streams.
    fn logs_path(&self) -> String {
        match self {
            LogScope::Session(id) => format!("/sessions/{}/logs", percent_encode(id)),
            LogScope::Device(id) => format!("/devices/{}/logs", percent_encode(id)),
        }
    }
}

/// How [`HubClient::download`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Bytes fetched now (less than `size` when resumed).
    pub fetched: u64,
    pub size: u64,
    /// Bytes that were already on disk and kept.
    pub resumed_from: u64,
    pub sha256: String,
}

/// A relative artifact path with each segment encoded and the slashes kept.
fn enc_path(p: &str) -> String {
    p.split('/')
        .map(percent_encode)
        .collect::<Vec<_>>()
        .join("/")
}

/// One hub, one organization and project, one operator key.
#[derive(Clone)]
pub struct HubClient {
    http: reqwest::Client,
    /// Without a trailing slash.
    base: String,
    key: String,
    org: String,
    project: String,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key: this can end up in a bug report.
        f.debug_struct("HubClient")
            .field("base", &self.base)
            .field("org", &self.org)
            .field("project", &self.project)
            .finish_non_exhaustive()
    }
}

/// The HTTP client of the API and the live streams, trusting the
/// system's roots and `roots`.
fn http_client(base: &str, roots: Vec<reqwest::Certificate>) -> Result<reqwest::Client, HubError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .read_timeout(Duration::from_secs(60))
        .user_agent(concat!("logbook/", env!("CARGO_PKG_VERSION")));
    for root in roots {
        builder = builder.add_root_certificate(root);
    }
    builder.build().map_err(|e| HubError::Unreachable {
        url: base.to_owned(),
        reason: root_cause(&e),
    })
}

impl HubClient {
    pub fn new(
        url: &str,
        key: Option<&str>,
        org: Option<&str>,
        project: Option<&str>,
    ) -> Result<HubClient, HubError> {
        let base = url.trim().trim_end_matches('/');
        let host = base
            .strip_prefix("http://")
            .or_else(|| base.strip_prefix("https://"));
        if host.is_none_or(str::is_empty) {
            return Err(HubError::BadUrl(url.to_owned()));
        }
        let key = key
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or(HubError::NoKey)?;
        let org = org
            .filter(|o| !o.is_empty())
            .ok_or(HubError::Missing("org", ORG_ENV))?;
        let project = project
            .filter(|p| !p.is_empty())
            .ok_or(HubError::Missing("project", PROJECT_ENV))?;
        Ok(HubClient {
            http: http_client(base, Vec::new())?,
            base: base.to_owned(),
            key: key.to_owned(),
            org: org.to_owned(),
            project: project.to_owned(),
        })
    }

    /// Trusts the certificates of a PEM file (a private CA, `--ca-file`)
    /// besides the system's roots, for the API and live streams alike.
    pub fn trusting(mut self, ca_file: &std::path::Path) -> Result<HubClient, HubError> {
        let bad = |reason: String| HubError::CaFile {
            path: ca_file.display().to_string(),
            reason,
        };
        let pem = std::fs::read(ca_file).map_err(|e| bad(format!("cannot read: {e}")))?;
        let roots = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| bad(format!("bad PEM: {e}")))?;
        if roots.is_empty() {
            return Err(bad("no CERTIFICATE block in this PEM file".into()));
        }
        self.http = http_client(&self.base, roots)?;
        Ok(self)
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    /// `{hub}/api/v1/organizations/{org}/projects/{project}{path}`.
    fn project_url(&self, path: &str) -> String {
        format!(
            "{}/api/v1/organizations/{}/projects/{}{path}",
            self.base,
            percent_encode(&self.org),
            percent_encode(&self.project)
        )
    }

    fn unreachable(&self, e: reqwest::Error) -> HubError {
        HubError::Unreachable {
            url: self.base.clone(),
            reason: if e.is_timeout() {
                "timed out".into()
            } else {
                root_cause(&e)
            },
        }
    }

    /// Turns a non-success answer into the error a user can act on.
    async fn refusal(&self, resp: reqwest::Response) -> HubError {
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        let mut resp = resp;
        // The error body is small; read at most 64 KiB of it.
        while let Ok(Some(chunk)) = resp.chunk().await {
            body.extend_from_slice(&chunk);
            if body.len() > 64 << 10 {
                break;
            }
        }
        let message = match serde_json::from_slice::<ErrorBody>(&body) {
            Ok(e) => e.error.message,
            Err(_) => String::from_utf8_lossy(&body)
                .trim()
                .chars()
                .take(200)
                .collect(),
        };
        let url = self.base.clone();
        match status {
            401 => HubError::Unauthorized { url, message },
            403 => HubError::Forbidden {
                url,
                what: format!("organization {}", self.org),
                message,
            },
            404 => HubError::NotFound(message),
            _ => HubError::Status {
                url,
                status,
                message,
            },
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, HubError> {
        let resp = req
            .bearer_auth(&self.key)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.refusal(resp).await)
        }
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, HubError> {
        let mut resp = self.send(req.timeout(Duration::from_secs(60))).await?;
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
            if body.len() + chunk.len() > MAX_JSON {
                return Err(HubError::BadAnswer {
                    url: self.base.clone(),
                    reason: format!("a JSON answer larger than {MAX_JSON} bytes"),
                });
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|e| HubError::BadAnswer {
            url: self.base.clone(),
            reason: e.to_string(),
        })
    }

    /// Sessions, newest first, following `next_cursor` until `limit`.
    pub async fn sessions(&self, f: &SessionFilter) -> Result<Vec<HubSession>, HubError> {
        if f.limit == Some(0) {
            return Ok(Vec::new());
        }
        let mut filter = String::new();
        if let Some(d) = &f.device {
            filter.push_str(&format!("&device_id={}", percent_encode(d)));
        }
        if let Some(s) = &f.status {
            filter.push_str(&format!("&status={}", percent_encode(s)));
        }
        for t in &f.tags {
            filter.push_str(&format!("&tag={}", percent_encode(t)));
        }
        let mut out = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let want = f.limit.map_or(PAGE, |n| (n - out.len()).min(PAGE));
            let mut url = self.project_url(&format!("/sessions?limit={want}{filter}"));
            if let Some(b) = &before {
                url.push_str(&format!("&before={}", percent_encode(b)));
            }
            let page: Page<HubSession> = self.json(self.http.get(url)).await?;
            let n = page.items.len();
            out.extend(page.items);
            match page.next_cursor {
                Some(c) if n > 0 && f.limit.is_none_or(|l| out.len() < l) => before = Some(c),
                _ => return Ok(out),
            }
        }
    }

    pub async fn session(&self, id: &str) -> Result<HubSession, HubError> {
        let url = self.project_url(&format!("/sessions/{}", percent_encode(id)));
        self.json(self.http.get(url)).await
    }

    pub async fn add_tag(&self, id: &str, tag: &str) -> Result<HubSession, HubError> {
        let url = self.project_url(&format!("/sessions/{}/tags", percent_encode(id)));
        let body = serde_json::json!({ "tag": tag }).to_string();
        self.json(
            self.http
                .post(url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body),
        )
        .await
    }

    /// One page of a session's (or a device's) logs; `cursor` is
    /// `before=N` or `after=N`.
    pub async fn logs_page(
        &self,
        scope: &LogScope,
        filter: &LogFilter,
        limit: usize,
        cursor: Option<(&str, u64)>,
    ) -> Result<Page<HubLog>, HubError> {
        let path = scope.logs_path();
        let mut url = self.project_url(&format!(
            "{path}?limit={}{}",
            limit.clamp(1, PAGE),
            filter.query()
        ));
        if let Some((k, v)) = cursor {
            url.push_str(&format!("&{k}={v}"));
        }
        self.json(self.http.get(url)).await
    }

    /// The newest `n` records matching, oldest first (paging down).
    pub async fn newest(
        &self,
        scope: &LogScope,
        filter: &LogFilter,
        n: usize,
    ) -> Result<Vec<HubLog>, HubError> {
        let mut items: Vec<HubLog> = Vec::new();
        let mut before: Option<u64> = None;
        while items.len() < n {
            let want = n - items.len();
            let page = self
                .logs_page(scope, filter, want, before.map(|b| ("before", b)))
                .await?;
            let done = page.next_cursor.is_none() || page.items.is_empty();
            before = page.items.last().map(|r| r.seq);
            items.extend(page.items);
            if done {
                break;
            }
        }
        items.reverse();
        Ok(items)
    }

    /// Every record matching, oldest first, a page at a time, each handed
    /// to `each`.
    pub async fn each_log(
        &self,
        scope: &LogScope,
        filter: &LogFilter,
        mut each: impl FnMut(&HubLog) -> std::io::Result<()>,
    ) -> Result<(), HubError> {
        let mut after = 0u64;
        loop {
            let page = self
                .logs_page(scope, filter, PAGE, Some(("after", after)))
                .await?;
            for r in &page.items {
                each(r).map_err(HubError::io("printing"))?;
                after = r.seq;
            }
            if page.next_cursor.is_none() || page.items.is_empty() {
                return Ok(());
            }
        }
    }

    /// Marks of `session`, or across sessions, of `name` when given, oldest
    /// first (at most the hub's page of 1000).
    pub async fn marks(
        &self,
        session: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<HubMark>, HubError> {
        let path = match session {
            Some(s) => format!("/sessions/{}/marks", percent_encode(s)),
            None => "/marks".to_owned(),
        };
        let mut url = self.project_url(&format!("{path}?limit={PAGE}"));
        if let Some(n) = name {
            url.push_str(&format!("&name={}", percent_encode(n)));
        }
        #[derive(Deserialize)]
        struct Items {
            items: Vec<HubMark>,
        }
        let page: Items = self.json(self.http.get(url)).await?;
        Ok(page.items)
    }

    pub async fn artifacts(&self, session: &str) -> Result<Vec<HubArtifact>, HubError> {
        let url = self.project_url(&format!("/sessions/{}/files", percent_encode(session)));
        let page: Page<HubArtifact> = self.json(self.http.get(url)).await?;
        Ok(page.items)
    }

    /// Streams one artifact into `file`. A shorter file already there is
    /// taken as an interrupted download and continued with `Range` (the
    /// SHA-256 of the whole file is checked at the end, so a stale prefix
    /// is caught, not silently kept).
    pub async fn download(
        &self,
        session: &str,
        path: &str,
        file: &Path,
    ) -> Result<Downloaded, HubError> {
        let art = self
            .artifacts(session)
            .await?
            .into_iter()
            .find(|a| a.path == path)
            .ok_or_else(|| {
                HubError::NotFound(format!("session {session} has no artifact {path:?}"))
            })?;
        let shown = file.display().to_string();
        let have = match std::fs::metadata(file) {
            Ok(m) if m.is_file() => m.len(),
            Ok(_) => {
                return Err(HubError::Io {
                    what: format!("writing {shown}"),
                    source: std::io::Error::other("not a regular file"),
                })
            }
            Err(_) => 0,
        };
        let mut hasher = Sha256::new();
        let resumed_from = if have > 0 && have <= art.size_bytes {
            // Hash what is there, so the end check covers the whole file.
            let mut f =
                std::fs::File::open(file).map_err(HubError::io(format!("reading {shown}")))?;
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = f
                    .read(&mut buf)
                    .map_err(HubError::io(format!("reading {shown}")))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            have
        } else {
            0
        };
        let mut fetched = 0u64;
        if resumed_from < art.size_bytes {
            let url = self.project_url(&format!(
                "/sessions/{}/files/{}",
                percent_encode(session),
                enc_path(path)
            ));
            let mut req = self.http.get(url);
            if resumed_from > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={resumed_from}-"));
            }
            let mut resp = self.send(req).await?;
            let partial = resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
            let mut out = if partial {
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(file)
                    .map_err(HubError::io(format!("opening {shown}")))?
            } else {
                // The hub sent the whole file: start over.
                hasher = Sha256::new();
                std::fs::File::create(file).map_err(HubError::io(format!("creating {shown}")))?
            };
            while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
                hasher.update(&chunk);
                out.write_all(&chunk)
                    .map_err(HubError::io(format!("writing {shown}")))?;
                fetched += chunk.len() as u64;
            }
            out.sync_all()
                .map_err(HubError::io(format!("writing {shown}")))?;
        } else if have > art.size_bytes {
            return Err(HubError::Io {
                what: format!("resuming into {shown}"),
                source: std::io::Error::other(format!(
                    "the file holds {have} bytes, more than the artifact's {}; remove it or pick another -o",
                    art.size_bytes
                )),
            });
        }
        let got = hex::encode(hasher.finalize());
        if got != art.sha256 {
            return Err(HubError::Checksum(shown, art.sha256, got));
        }
        Ok(Downloaded {
            fetched,
            size: art.size_bytes,
            // Resumed only when bytes were kept and more fetched.
            resumed_from: if fetched == art.size_bytes || fetched == 0 {
                0
            } else {
                resumed_from
            },
            sha256: got,
        })
    }

    /// Streams one artifact to `out` (`-o -`), no resuming.
    pub async fn download_to(
        &self,
        session: &str,
        path: &str,
        out: &mut impl Write,
    ) -> Result<u64, HubError> {
        let url = self.project_url(&format!(
            "/sessions/{}/files/{}",
            percent_encode(session),
            enc_path(path)
        ));
        let mut resp = self.send(self.http.get(url)).await?;
        let mut n = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
            out.write_all(&chunk)
                .map_err(HubError::io("writing to stdout"))?;
            n += chunk.len() as u64;
        }
        out.flush().map_err(HubError::io("writing to stdout"))?;
        Ok(n)
    }

    /// Opens the live stream of a session (HTTP/1.1 upgrade through the
    /// same client, so https hubs need no second TLS stack).
    async fn connect_live(
        &self,
        scope: &LogScope,
        filter: &LogFilter,
        start: LiveStart,
    ) -> Result<WebSocketStream<reqwest::Upgraded>, HubError> {
        let start = match start {
            LiveStart::Tail(n) => format!("tail={n}"),
            LiveStart::After(id) => format!("after_id={id}"),
        };
        let url = format!(
            "{}/api/v1/ws/organizations/{}/projects/{}{}?{start}{}",
            self.base,
            percent_encode(&self.org),
            percent_encode(&self.project),
            scope.logs_path(),
            filter.query()
        );
        let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
        let resp = self
            .http
            .get(url)
            .bearer_auth(&self.key)
            .header(reqwest::header::CONNECTION, "Upgrade")
            .header(reqwest::header::UPGRADE, "websocket")
            .header(reqwest::header::SEC_WEBSOCKET_VERSION, "13")
            .header(reqwest::header::SEC_WEBSOCKET_KEY, &key)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if resp.status() != reqwest::StatusCode::SWITCHING_PROTOCOLS {
            return Err(if resp.status().is_success() {
                HubError::BadAnswer {
                    url: self.base.clone(),
                    reason: format!("{} instead of a WebSocket upgrade", resp.status()),
                }
            } else {
                self.refusal(resp).await
            });
        }
        let want = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        let accept = resp
            .headers()
            .get(reqwest::header::SEC_WEBSOCKET_ACCEPT)
            .and_then(|v| v.to_str().ok());
        if accept != Some(want.as_str()) {
            return Err(HubError::BadAnswer {
                url: self.base.clone(),
                reason: "a WebSocket upgrade with a wrong Sec-WebSocket-Accept".into(),
            });
        }
        let upgraded = resp.upgrade().await.map_err(|e| self.unreachable(e))?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(4 << 20))
            .max_frame_size(Some(4 << 20));
        Ok(WebSocketStream::from_raw_socket(upgraded, Role::Client, Some(config)).await)
    }

    /// Follows the live logs of `scope` (a session's until the hub says it
    /// ended; a device's records outside sessions until interrupted),
    /// calling `each` once per record. The first connection replays the
    /// newest [`LIVE_TAIL`] records and skips those already passed to
    /// `each`: `seen` holds the seqs printed before following (the tail
    /// read by pages), and tail records older than the oldest of them were
    /// left out on purpose and stay out; they are printed once the
    /// `caught_up` mark after them arrives, so nothing printed is beyond
    /// the resume point. A dropped connection (or a hub
    /// restart) is retried with jittered exponential backoff (`timing`),
    /// resuming after the hub row id of the last record the stream gave
    /// (or its `caught_up` mark), so nothing committed meanwhile is missed,
    /// however much it is. `notice` gets one-line notes (reconnecting,
    /// lagging) meant for stderr.
    pub async fn follow(
        &self,
        scope: &LogScope,
        filter: &LogFilter,
        mut seen: BTreeSet<u64>,
        mut each: impl FnMut(&HubLog) -> std::io::Result<()>,
        mut notice: impl FnMut(&str),
        timing: FollowTiming,
    ) -> Result<(), HubError> {
        let max_backoff = timing.max_backoff;
        let floor = seen.first().copied().unwrap_or(0);
        let mut delay = Duration::from_millis(200);
        let mut connected_once = false;
        // Where to resume: the hub row id every record up to which was
        // given (or deliberately left out).
        let mut resume: Option<i64> = None;
        loop {
            let start = match resume {
                Some(id) => LiveStart::After(id),
                None => LiveStart::Tail(LIVE_TAIL),
            };
            let ws = match self.connect_live(scope, filter, start).await {
                Ok(ws) => ws,
                // Only a link problem is worth retrying; a refused key or
                // an unknown session stays refused.
                Err(e @ HubError::Unreachable { .. }) | Err(e @ HubError::Status { .. })
                    if connected_once =>
                {
                    let wait = jitter(delay);
                    notice(&format!("{e}; retrying in {wait:.1?}"));
                    tokio::time::sleep(wait).await;
                    delay = (delay * 2).min(max_backoff);
                    continue;
                }
                Err(e) => return Err(e),
            };
            if connected_once {
                notice("live stream reconnected");
            }
            connected_once = true;
            delay = Duration::from_millis(200);
            let (mut tx, mut rx) = ws.split();
            // A link that dies without a FIN (a laptop changing networks)
            // would wait forever: ping, and reconnect when nothing (not even
            // a pong) came back for a while.
            let mut ping = tokio::time::interval(timing.ping_every);
            ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ping.tick().await;
            let mut heard = tokio::time::Instant::now();
            // Tail records wait here for their `caught_up` mark, so that
            // whatever is printed is covered by a resume point: a link cut
            // between the tail and its mark would otherwise resume with a
            // tail again, and miss what arrived meanwhile beyond its size.
            let mut tail: Vec<HubLog> = Vec::new();
            let ended = loop {
                let next = tokio::select! {
                    m = rx.next() => m,
                    _ = ping.tick() => {
                        if heard.elapsed() > timing.ping_every * 3 {
                            break Some(Err(format!("no answer for {:?}", heard.elapsed())));
                        }
                        if let Err(e) = tx.send(Message::Ping(Default::default())).await {
                            break Some(Err(e.to_string()));
                        }
                        continue;
                    }
                };
                heard = tokio::time::Instant::now();
                let msg = match next {
                    None => break None,
                    Some(Err(e)) => break Some(Err(e.to_string())),
                    Some(Ok(m)) => m,
                };
                match msg {
                    Message::Text(t) => {
                        let v: serde_json::Value = match serde_json::from_str(t.as_str()) {
                            Ok(v) => v,
                            Err(e) => break Some(Err(format!("a bad live message: {e}"))),
                        };
                        if let Some(event) = v.get("event") {
                            match event.as_str() {
                                Some("caught_up") => {
                                    for r in tail.drain(..) {
                                        if r.seq >= floor && seen.insert(r.seq) {
                                            if seen.len() > SEEN_CAP {
                                                seen.pop_first();
                                            }
                                            each(&r).map_err(HubError::io("printing"))?;
                                        }
                                    }
                                    resume = resume.max(v["id"].as_i64());
                                }
                                Some("lagged") => notice(&format!(
                                    "the live stream fell behind and skipped {} batches (read them with `logs` without --follow)",
                                    v["missed_batches"]
                                )),
                                // A newer hub's note: nothing to print.
                                _ => {}
                            }
                            continue;
                        }
                        let is_tail = v["tail"].as_bool() == Some(true);
                        let id = v["id"].as_i64();
                        let r: HubLog = match serde_json::from_value(v) {
                            Ok(r) => r,
                            Err(e) => break Some(Err(format!("a bad live record: {e}"))),
                        };
                        // Tail records come newest seq last, not in id order,
                        // and are printed with their mark; the others in the
                        // order the hub committed them.
                        if is_tail {
                            if tail.len() < LIVE_TAIL {
                                tail.push(r);
                            }
                            continue;
                        }
                        resume = resume.max(id);
                        if seen.insert(r.seq) {
                            if seen.len() > SEEN_CAP {
                                seen.pop_first();
                            }
                            each(&r).map_err(HubError::io("printing"))?;
                        }
                    }
                    Message::Close(frame) => {
                        let reason = frame.map(|f| f.reason.to_string()).unwrap_or_default();
                        break Some(Ok(reason));
                    }
                    Message::Ping(p) => {
                        let _ = tx.send(Message::Pong(p)).await;
                    }
                    _ => {}
                }
            };
            match ended {
                // The hub ends the stream for good when the session is (or
                // becomes) inactive; anything else is a reconnect.
                Some(Ok(reason)) if reason.contains("not active") || reason.contains("ended") => {
                    return Ok(())
                }
                Some(Ok(reason)) => notice(&format!(
                    "the hub at {} closed the live stream ({reason}); reconnecting",
                    self.base
                )),
                Some(Err(e)) => notice(&format!(
                    "live stream from {} broke ({e}); reconnecting",
                    self.base
                )),
                None => notice(&format!(
                    "live stream from {} dropped; reconnecting",
                    self.base
                )),
            }
            tokio::time::sleep(jitter(delay)).await;
            delay = (delay * 2).min(max_backoff);
        }
    }
}

/// Where a live stream starts.
#[derive(Debug, Clone, Copy)]
enum LiveStart {
    /// The newest N records first.
    Tail(usize),
    /// Every record the hub committed after this row id.
    After(i64),
}

/// Between half and all of `d`: many CLIs following one hub that restarts
/// do not all reconnect in the same instant.
fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::random_range(0.5..=1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        let check = |s: &str, want: &str| assert_eq!(percent_encode(s), want, "{s}");
        check("abc-1_2.3~", "abc-1_2.3~");
        check("a b/c", "a%20b%2Fc");
        check("ü", "%C3%BC");
        let check = |s: &str, want: &str| assert_eq!(enc_path(s), want, "{s}");
        check("bags/run 1.mcap", "bags/run%201.mcap");
        check("a.txt", "a.txt");
    }

    #[test]
    fn arguments() {
        let check = |url: &str, key: Option<&str>, org: Option<&str>, want: &str| {
            let got = HubClient::new(url, key, org, Some("p"))
                .map(|_| "ok".to_owned())
                .unwrap_or_else(|e| e.to_string());
            assert!(got.starts_with(want), "{url}: {got}");
        };
        check("http://127.0.0.1:1/", Some("k"), Some("o"), "ok");
        check("https://hub.example", Some("k"), Some("o"), "ok");
        check("hub.example", Some("k"), Some("o"), "--hub: expected");
        check("http://", Some("k"), Some("o"), "--hub: expected");
        check("http://h", None, Some("o"), "no operator key");
        check("http://h", Some("  "), Some("o"), "no operator key");
        check(
            "http://h",
            Some("k"),
            None,
            "no org: give --org or set LOGBOOK_ORG",
        );
    }

    /// Reads one HTTP request head; returns its Sec-WebSocket-Key.
    async fn request_key(s: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).await.unwrap(), 1);
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| v.trim().to_owned())
            })
            .expect("a WebSocket key")
    }

    #[tokio::test]
    async fn a_silent_live_link_is_noticed_and_redialled() {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            // First: accept the upgrade, then never answer (a dead link).
            let (mut first, _) = listener.accept().await.unwrap();
            let key = request_key(&mut first).await;
            let accept =
                tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
            first
                .write_all(
                    format!(
                        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                         Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            // Second: the session is gone, which ends the follow.
            let (mut second, _) = listener.accept().await.unwrap();
            request_key(&mut second).await;
            let body = r#"{"error":{"code":"not_found","message":"no session s1"}}"#;
            second
                .write_all(
                    format!(
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            drop(first);
        });
        let client = HubClient::new(&url, Some("k"), Some("o"), Some("p")).unwrap();
        let mut notes = Vec::new();
        let timing = FollowTiming {
            max_backoff: Duration::from_millis(50),
            ping_every: Duration::from_millis(50),
        };
        // Without the pings this would wait forever: bound it.
        let r = tokio::time::timeout(
            Duration::from_secs(10),
            client.follow(
                &LogScope::Session("s1".into()),
                &LogFilter::default(),
                BTreeSet::new(),
                |_| Ok(()),
                |n| notes.push(n.to_owned()),
                timing,
            ),
        )
        .await
        .expect("the dead link was noticed");
        server.await.unwrap();
        assert!(
            matches!(&r, Err(HubError::NotFound(m)) if m == "no session s1"),
            "{r:?}"
        );
        assert!(
            notes.iter().any(|n| n.contains("no answer for")),
            "{notes:?}"
        );
    }

    #[test]
    fn the_key_is_never_shown() {
        let c = HubClient::new("http://h", Some("lbk_secret"), Some("o"), Some("p")).unwrap();
        assert!(!format!("{c:?}").contains("lbk_secret"));
    }
}
