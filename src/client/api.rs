//! A small blocking client of `logbookd`'s local API (HTTP/1.1 over the
//! Unix socket `api.sock`): one typed method per route the CLI uses
//! (sessions, tags, logs and their live follow, artifacts, status, flush),
//! and session control for Rust programs on top of it: open a session with
//! tags, package and metadata, tag it, close it as completed or failed.
//!
//! Invariant: std only (no async runtime in the host program); every call,
//! and every read of a follow stream, is bounded by a timeout, and every
//! answer body (and every streamed line) by [`MAX_BODY`].

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::agent::types::{
    AddTag, ArtifactItem, Flushed, LogItem, MarkView, NewMark, OpenSession, Page, SessionView,
    Status, StopSession,
};
use crate::client::percent_encode;
use crate::wire::{ErrorBody, Package};

/// Where `logbookd`'s local API listens unless told otherwise.
pub const DEFAULT_API_SOCKET: &str = "/run/logbook/api.sock";
/// Environment variable naming the API socket (used when the program does
/// not set one with [`Api::socket`]).
pub const API_SOCKET_ENV: &str = "LOGBOOK_API_SOCKET";
/// Largest answer read from the agent.
pub const MAX_BODY: usize = 16 << 20;
/// Longest header block read from the agent.
const MAX_HEADERS: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("is logbookd running? no socket at {}", .0.display())]
    NotRunning(PathBuf),
    #[error("permission denied on {}: join the group that owns it (api.socket_group)", .0.display())]
    PermissionDenied(PathBuf),
    #[error("talking to logbookd at {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The agent refused the request; `code` is the API's error code (e.g.
    /// `conflict` when another session is active).
    #[error("{message} ({code}, HTTP {status})")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("unexpected answer from logbookd: {0}")]
    Protocol(String),
    /// A follow stream ended before its session did (the agent stopped,
    /// closed the connection or went silent).
    #[error("the follow stream ended: {0}")]
    Ended(String),
}

/// A handle on the local API. Cheap; each call is one connection.
#[derive(Debug, Clone)]
pub struct Api {
    socket: PathBuf,
    timeout: Duration,
}

impl Default for Api {
    fn default() -> Api {
        Api::new()
    }
}

impl Api {
    /// The socket from `$LOGBOOK_API_SOCKET`, else [`DEFAULT_API_SOCKET`].
    pub fn new() -> Api {
        let socket = std::env::var_os(API_SOCKET_ENV)
            .filter(|s| !s.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_API_SOCKET), PathBuf::from);
        Api {
            socket,
            timeout: Duration::from_secs(30),
        }
    }

    pub fn socket(mut self, path: impl AsRef<Path>) -> Api {
        self.socket = path.as_ref().to_owned();
        self
    }

    /// How long one call may take (connect, send, answer). Default 30 s: a
    /// session change first commits what clients already sent.
    pub fn timeout(mut self, timeout: Duration) -> Api {
        self.timeout = timeout;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Opens a session; fails with [`ApiError::Refused`] (`conflict`) when
    /// one is already active.
    pub fn open(&self, new: &NewSession) -> Result<Session, ApiError> {
        let body = serde_json::to_vec(&new.0).expect("serializable");
        let view: SessionView = self.json("POST", "/v1/sessions", Some(&body))?;
        Ok(Session {
            api: self.clone(),
            view,
        })
    }

    /// The active session, if any, to tag or close it.
    pub fn current(&self) -> Result<Option<Session>, ApiError> {
        match self.json::<SessionView>("GET", "/v1/sessions/current", None) {
            Ok(view) => Ok(Some(Session {
                api: self.clone(),
                view,
            })),
            Err(ApiError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `GET /v1/sessions/{id}` (`id` may be `current`).
    pub fn session(&self, id: &str) -> Result<SessionView, ApiError> {
        self.json("GET", &format!("/v1/sessions/{}", percent_encode(id)), None)
    }

    /// The active session's view, if any.
    pub fn current_view(&self) -> Result<Option<SessionView>, ApiError> {
        match self.session("current") {
            Ok(view) => Ok(Some(view)),
            Err(ApiError::Refused { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Sessions newest first; `before` is the `next_cursor` of the page
    /// before.
    pub fn sessions(
        &self,
        status: Option<&str>,
        limit: usize,
        before: Option<&str>,
    ) -> Result<Page<SessionView>, ApiError> {
        let mut path = format!("/v1/sessions?limit={limit}");
        if let Some(s) = status {
            path.push_str(&format!("&status={}", percent_encode(s)));
        }
        if let Some(b) = before {
            path.push_str(&format!("&before={}", percent_encode(b)));
        }
        self.json("GET", &path, None)
    }

    /// Adds `tag` to the session `id` (or `current`).
    pub fn add_tag(&self, id: &str, tag: &str) -> Result<SessionView, ApiError> {
        let body = serde_json::to_vec(&AddTag { tag: tag.into() }).expect("serializable");
        let path = format!("/v1/sessions/{}/tags", percent_encode(id));
        self.json("POST", &path, Some(&body))
    }

    /// Closes the session `id` (or `current`).
    pub fn stop(&self, id: &str, req: &StopSession) -> Result<SessionView, ApiError> {
        let body = serde_json::to_vec(req).expect("serializable");
        let path = format!("/v1/sessions/{}/stop", percent_encode(id));
        self.json("POST", &path, Some(&body))
    }

    /// One page of records matching `filter`: the newest `limit` below
    /// `Before(seq)` (newest first), or the oldest above `After(seq)`.
    pub fn logs(
        &self,
        filter: &LogFilter,
        limit: usize,
        cursor: Option<Cursor>,
    ) -> Result<Page<LogItem>, ApiError> {
        let mut path = format!("/v1/logs?limit={limit}{}", filter.query());
        match cursor {
            Some(Cursor::Before(b)) => path.push_str(&format!("&before={b}")),
            Some(Cursor::After(a)) => path.push_str(&format!("&after={a}")),
            None => {}
        }
        self.json("GET", &path, None)
    }

    /// The newest `n` records matching `filter`, oldest first.
    pub fn newest(&self, filter: &LogFilter, n: usize) -> Result<Vec<LogItem>, ApiError> {
        let mut items = Vec::new();
        let mut before = None;
        while items.len() < n {
            let page = self.logs(filter, (n - items.len()).min(PAGE), before)?;
            let done = page.next_cursor.is_none() || page.items.is_empty();
            before = page.items.last().map(|r| Cursor::Before(r.seq));
            items.extend(page.items);
            if done {
                break;
            }
        }
        items.reverse();
        Ok(items)
    }

    /// Every record matching `filter`, oldest first, a page at a time.
    pub fn every_log<'a>(&'a self, filter: &'a LogFilter) -> LogPages<'a> {
        LogPages {
            api: self,
            filter,
            page: Vec::new().into_iter(),
            after: 0,
            last: false,
        }
    }

    /// Every session (with `status`), newest first, at most `limit`.
    pub fn every_session(
        &self,
        status: Option<&str>,
        limit: Option<usize>,
    ) -> Result<Vec<SessionView>, ApiError> {
        let mut out = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let want = limit.map_or(PAGE, |n| (n - out.len()).min(PAGE));
            if want == 0 {
                return Ok(out);
            }
            let page = self.sessions(status, want, before.as_deref())?;
            let empty = page.items.is_empty();
            out.extend(page.items);
            match page.next_cursor {
                Some(c) if !empty => before = Some(c),
                _ => return Ok(out),
            }
        }
    }

    /// Follows the records matching `filter` (`GET /v1/logs/follow`): the
    /// newest `tail` first (oldest first), then each new record as the
    /// agent commits it, until the filter's session ends. `after` resumes
    /// after a seq instead of a tail.
    pub fn follow(&self, filter: &LogFilter, from: FollowFrom) -> Result<Follow, ApiError> {
        let mut path = format!("/v1/logs/follow?{}", filter.query().trim_start_matches('&'));
        match from {
            FollowFrom::Tail(n) => path.push_str(&format!("&tail={n}")),
            FollowFrom::After(seq) => path.push_str(&format!("&after={seq}")),
        }
        let s = self.request("GET", &path, None)?;
        let mut r = BufReader::new(s);
        let head = read_head(&mut r).map_err(|e| self.answer_error(e))?;
        if head.status != 200 {
            let body = read_body(&mut r, head.framing).map_err(|e| self.answer_error(e))?;
            return Err(refused(head.status, &body));
        }
        if !matches!(head.framing, Framing::Chunked) {
            return Err(ApiError::Protocol(format!(
                "{path}: the stream is not chunked"
            )));
        }
        Ok(Follow {
            lines: BufReader::new(Chunked {
                r,
                left: 0,
                done: false,
            }),
            socket: self.socket.clone(),
            line: Vec::new(),
            ended: false,
            covered: None,
        })
    }

    /// [`Api::follow`] across agent restarts: when the stream is cut (the
    /// agent stopped, went silent or closed it), `notice` says so and it
    /// reconnects, every second or two, resuming after the seq the last
    /// stream covered, so each record is given once. An error before the
    /// first stream, or a refusal, ends it.
    pub fn follow_resuming<'a, N: FnMut(&str)>(
        &'a self,
        filter: &'a LogFilter,
        from: FollowFrom,
        notice: N,
    ) -> Resuming<'a, N> {
        Resuming {
            api: self,
            filter,
            from,
            notice,
            stream: None,
            cut: false,
            done: false,
        }
    }

    /// The files the agent knows in a session's artifact directory.
    pub fn artifacts(&self, id: &str) -> Result<Vec<ArtifactItem>, ApiError> {
        #[derive(serde::Deserialize)]
        struct Items {
            items: Vec<ArtifactItem>,
        }
        let path = format!("/v1/sessions/{}/artifacts", percent_encode(id));
        Ok(self.json::<Items>("GET", &path, None)?.items)
    }

    /// `POST /v1/marks`: a mark in the active session.
    pub fn mark(&self, new: &NewMark) -> Result<MarkView, ApiError> {
        let body = serde_json::to_vec(new).expect("serializable");
        self.json("POST", "/v1/marks", Some(&body))
    }

    /// Every mark (of `session`, an id or `current`), newest first, paging
    /// through `GET /v1/marks`.
    pub fn every_mark(&self, session: Option<&str>) -> Result<Vec<MarkView>, ApiError> {
        let mut out = Vec::new();
        let mut before: Option<String> = None;
        loop {
            let mut path = format!("/v1/marks?limit={PAGE}");
            if let Some(s) = session {
                path.push_str(&format!("&session={}", percent_encode(s)));
            }
            if let Some(b) = &before {
                path.push_str(&format!("&before={}", percent_encode(b)));
            }
            let page: Page<MarkView> = self.json("GET", &path, None)?;
            out.extend(page.items);
            match page.next_cursor {
                Some(c) => before = Some(c),
                None => return Ok(out),
            }
        }
    }

    /// `GET /v1/status`.
    pub fn status(&self) -> Result<Status, ApiError> {
        self.json("GET", "/v1/status", None)
    }

    /// Returns once everything the agent received before the call is
    /// committed.
    pub fn flush(&self) -> Result<Flushed, ApiError> {
        self.json("POST", "/v1/flush", Some(b"{}"))
    }

    /// One request; the status and body of the answer.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Vec<u8>), ApiError> {
        let mut r = BufReader::new(self.request(method, path, body)?);
        let head = read_head(&mut r).map_err(|e| self.answer_error(e))?;
        let body = read_body(&mut r, head.framing).map_err(|e| self.answer_error(e))?;
        Ok((head.status, body))
    }

    /// Connects and sends one request.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<UnixStream, ApiError> {
        let io = |source| ApiError::Io {
            path: self.socket.clone(),
            source,
        };
        let mut s = UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                ApiError::NotRunning(self.socket.clone())
            }
            std::io::ErrorKind::PermissionDenied => ApiError::PermissionDenied(self.socket.clone()),
            _ => io(e),
        })?;
        s.set_read_timeout(Some(self.timeout)).map_err(io)?;
        s.set_write_timeout(Some(self.timeout)).map_err(io)?;
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: logbookd\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let mut msg = req.into_bytes();
        msg.extend_from_slice(body);
        s.write_all(&msg).map_err(io)?;
        Ok(s)
    }

    fn answer_error(&self, e: Answer) -> ApiError {
        match e {
            Answer::Io(source) => ApiError::Io {
                path: self.socket.clone(),
                source,
            },
            Answer::Bad(m) => ApiError::Protocol(m),
        }
    }

    /// Calls and decodes a success body; an error body becomes
    /// [`ApiError::Refused`].
    pub fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<T, ApiError> {
        let (status, bytes) = self.call(method, path, body)?;
        if !(200..300).contains(&status) {
            return Err(refused(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Protocol(format!("{path}: {e}")))
    }
}

/// What to open a session with.
#[derive(Debug, Clone, Default)]
pub struct NewSession(OpenSession);

impl NewSession {
    pub fn new() -> NewSession {
        NewSession::default()
    }

    pub fn tag(mut self, tag: impl Into<String>) -> NewSession {
        self.0.tags.push(tag.into());
        self
    }

    /// The software running (name and optional version).
    pub fn package(mut self, name: impl Into<String>, version: Option<&str>) -> NewSession {
        self.0.package = Some(Package {
            name: name.into(),
            version: version.map(str::to_owned),
        });
        self
    }

    /// The software running, as `NAME` or `NAME@VERSION`.
    pub fn package_spec(self, spec: &str) -> NewSession {
        match spec.split_once('@') {
            Some((name, version)) => self.package(name, Some(version).filter(|v| !v.is_empty())),
            None => self.package(spec, None),
        }
    }

    pub fn meta(
        mut self,
        key: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> NewSession {
        self.0.metadata.insert(key.into(), value.into());
        self
    }
}

/// An open session. Dropping it leaves the session open (it outlives the
/// program unless closed, like `logbook session start`).
#[derive(Debug, Clone)]
pub struct Session {
    api: Api,
    view: SessionView,
}

impl Session {
    pub fn id(&self) -> uuid::Uuid {
        self.view.id
    }

    /// Where files for this session go; the agent uploads what appears.
    pub fn artifact_dir(&self) -> &Path {
        Path::new(&self.view.artifact_dir)
    }

    /// The session as the agent last answered.
    pub fn view(&self) -> &SessionView {
        &self.view
    }

    pub fn tag(&mut self, tag: &str) -> Result<(), ApiError> {
        let body = serde_json::to_vec(&AddTag { tag: tag.into() }).expect("serializable");
        self.view = self.api.json(
            "POST",
            &format!("/v1/sessions/{}/tags", self.view.id),
            Some(&body),
        )?;
        Ok(())
    }

    /// Closes the session as completed.
    pub fn close(self) -> Result<SessionView, ApiError> {
        self.stop(StopSession::default())
    }

    /// Closes the session as failed, with the reason.
    pub fn fail(self, error: &str) -> Result<SessionView, ApiError> {
        self.stop(StopSession {
            failed: true,
            error: Some(error.into()),
        })
    }

    fn stop(self, req: StopSession) -> Result<SessionView, ApiError> {
        let body = serde_json::to_vec(&req).expect("serializable");
        self.api.json(
            "POST",
            &format!("/v1/sessions/{}/stop", self.view.id),
            Some(&body),
        )
    }
}

/// Filters of `GET /v1/logs` and `/v1/logs/follow`, as text (the agent
/// checks them and says what is wrong).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogFilter {
    /// A session id, or `current`.
    pub session: Option<String>,
    /// This level and above.
    pub level: Option<String>,
    /// A module and its children.
    pub module: Option<String>,
    /// Text the message contains.
    pub search: Option<String>,
    /// RFC 3339 times.
    pub since: Option<String>,
    pub until: Option<String>,
    /// The window of the newest mark of this name.
    pub mark: Option<String>,
}

impl LogFilter {
    /// `&key=value` for each filter set.
    fn query(&self) -> String {
        let mut q = String::new();
        for (k, v) in [
            ("session", &self.session),
            ("level", &self.level),
            ("module", &self.module),
            ("search", &self.search),
            ("since", &self.since),
            ("until", &self.until),
            ("mark", &self.mark),
        ] {
            if let Some(v) = v {
                q.push_str(&format!("&{k}={}", percent_encode(v)));
            }
        }
        q
    }
}

/// Most records or sessions one page asks for (the agent's maximum).
const PAGE: usize = 1000;

/// The records of [`Api::every_log`], fetched a page at a time.
pub struct LogPages<'a> {
    api: &'a Api,
    filter: &'a LogFilter,
    page: std::vec::IntoIter<LogItem>,
    after: u64,
    /// The page held is the last one.
    last: bool,
}

impl Iterator for LogPages<'_> {
    type Item = Result<LogItem, ApiError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.page.next() {
                self.after = r.seq;
                return Some(Ok(r));
            }
            if self.last {
                return None;
            }
            match self
                .api
                .logs(self.filter, PAGE, Some(Cursor::After(self.after)))
            {
                Ok(page) => {
                    self.last = page.next_cursor.is_none() || page.items.is_empty();
                    self.page = page.items.into_iter();
                }
                Err(e) => {
                    self.last = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Where a page of records starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cursor {
    /// Newest first, below this seq.
    Before(u64),
    /// Oldest first, above this seq.
    After(u64),
}

/// Where a follow starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowFrom {
    /// The newest N records that match (0: only new ones).
    Tail(usize),
    /// Every matching record above this seq (to resume).
    After(u64),
}

/// A live follow of the agent's records ([`Api::follow`]): each matching
/// record once, in seq order, as the agent commits them. Ends (`None`)
/// when the followed session has ended; an agent that stops or goes
/// silent past the timeout is an error.
pub struct Follow {
    lines: BufReader<Chunked<BufReader<UnixStream>>>,
    socket: PathBuf,
    line: Vec<u8>,
    ended: bool,
    /// Every matching record up to this seq was given (the last record's,
    /// or the agent's cursor from the end event).
    covered: Option<u64>,
}

impl Follow {
    /// Where to resume ([`FollowFrom::After`]) once this stream ended: the
    /// seq every matching record up to which was given, if known.
    pub fn covered(&self) -> Option<u64> {
        self.covered
    }
}

/// One line of a follow stream: a record, or the event that ends it.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum FollowLine {
    Record(LogItem),
    End {
        event: String,
        reason: String,
        seq: Option<u64>,
    },
}

impl Iterator for Follow {
    type Item = Result<LogItem, ApiError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.ended {
            self.line.clear();
            let read = (&mut self.lines)
                .take(MAX_BODY as u64 + 1)
                .read_until(b'\n', &mut self.line);
            let io = |source| ApiError::Io {
                path: self.socket.clone(),
                source,
            };
            match read {
                Err(e) => {
                    self.ended = true;
                    return Some(Err(match e.kind() {
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                            ApiError::Ended("logbookd stopped answering".into())
                        }
                        _ => io(e),
                    }));
                }
                Ok(0) => {
                    self.ended = true;
                    return Some(Err(ApiError::Ended(
                        "logbookd closed the connection".into(),
                    )));
                }
                Ok(_) if !self.line.ends_with(b"\n") => {
                    self.ended = true;
                    return Some(Err(ApiError::Protocol(format!(
                        "a streamed line over {MAX_BODY} bytes, or cut short"
                    ))));
                }
                Ok(_) => {}
            }
            if self.line.iter().all(u8::is_ascii_whitespace) {
                continue; // a heartbeat
            }
            match serde_json::from_slice::<FollowLine>(&self.line) {
                Ok(FollowLine::Record(r)) => {
                    self.covered = Some(r.seq);
                    return Some(Ok(r));
                }
                Ok(FollowLine::End { event, reason, seq }) => {
                    self.ended = true;
                    self.covered = seq.max(self.covered);
                    if event == "end" && reason == END_SESSION {
                        return None;
                    }
                    return Some(Err(ApiError::Ended(reason)));
                }
                Err(e) => {
                    self.ended = true;
                    return Some(Err(ApiError::Protocol(format!("follow stream: {e}"))));
                }
            }
        }
        None
    }
}

/// The records of [`Api::follow_resuming`].
pub struct Resuming<'a, N> {
    api: &'a Api,
    filter: &'a LogFilter,
    /// Where the next stream starts.
    from: FollowFrom,
    notice: N,
    stream: Option<Follow>,
    /// A stream was cut; reconnecting.
    cut: bool,
    done: bool,
}

impl<N: FnMut(&str)> Iterator for Resuming<'_, N> {
    type Item = Result<LogItem, ApiError>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut delay = Duration::from_millis(200);
        while !self.done {
            let Some(stream) = self.stream.as_mut() else {
                match self.api.follow(self.filter, self.from) {
                    Ok(f) => {
                        if self.cut {
                            (self.notice)("logbookd is back; following again");
                            self.cut = false;
                        }
                        self.stream = Some(f);
                    }
                    Err(ApiError::NotRunning(_) | ApiError::Io { .. }) if self.cut => {
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            };
            let next = stream.next();
            if let Some(seq) = stream.covered() {
                self.from = FollowFrom::After(seq);
            }
            match next {
                Some(Err(ApiError::Ended(reason))) => {
                    (self.notice)(&format!(
                        "the follow stream ended ({reason}); waiting for logbookd"
                    ));
                    self.stream = None;
                    self.cut = true;
                }
                None => self.done = true,
                Some(Err(e)) => {
                    self.done = true;
                    return Some(Err(e));
                }
                Some(Ok(r)) => return Some(Ok(r)),
            }
        }
        None
    }
}

/// The `reason` of the last line of a follow stream whose session ended;
/// any other reason is an error.
pub use crate::agent::types::FOLLOW_END_SESSION as END_SESSION;

fn refused(status: u16, bytes: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(e) => ApiError::Refused {
            status,
            code: e.error.code,
            message: e.error.message,
        },
        Err(_) => ApiError::Refused {
            status,
            code: "http".into(),
            message: String::from_utf8_lossy(bytes).into_owned(),
        },
    }
}

enum Answer {
    Io(std::io::Error),
    Bad(String),
}

impl From<std::io::Error> for Answer {
    fn from(e: std::io::Error) -> Answer {
        Answer::Io(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Length(usize),
    Chunked,
    ToEnd,
}

struct Head {
    status: u16,
    framing: Framing,
}

/// Reads the status line and headers of one HTTP/1.1 answer.
fn read_head(r: &mut impl BufRead) -> Result<Head, Answer> {
    let mut head = 0;
    let mut line = String::new();
    let mut next_line = |r: &mut dyn BufRead, line: &mut String| -> Result<(), Answer> {
        line.clear();
        let n = r.take((MAX_HEADERS - head) as u64).read_line(line)?;
        head += n;
        if n == 0 || !line.ends_with('\n') {
            return Err(Answer::Bad("the answer's head ended early".into()));
        }
        Ok(())
    };
    next_line(r, &mut line)?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Answer::Bad(format!("bad status line {:?}", line.trim_end())))?;
    let mut framing = Framing::ToEnd;
    loop {
        next_line(r, &mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((name, value)) = l.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(
                value
                    .parse::<usize>()
                    .map_err(|_| Answer::Bad(format!("bad Content-Length {value:?}")))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().contains("chunked")
        {
            framing = Framing::Chunked;
        }
    }
    Ok(Head { status, framing })
}

/// Reads a whole body of at most [`MAX_BODY`] bytes.
fn read_body(r: &mut impl BufRead, framing: Framing) -> Result<Vec<u8>, Answer> {
    let too_big = || Answer::Bad(format!("answer over {MAX_BODY} bytes"));
    let mut body = Vec::new();
    match framing {
        Framing::Length(n) => {
            if n > MAX_BODY {
                return Err(too_big());
            }
            body.resize(n, 0);
            r.read_exact(&mut body)?;
        }
        Framing::Chunked => {
            Chunked {
                r,
                left: 0,
                done: false,
            }
            .take(MAX_BODY as u64 + 1)
            .read_to_end(&mut body)?;
        }
        Framing::ToEnd => {
            r.take(MAX_BODY as u64 + 1).read_to_end(&mut body)?;
        }
    }
    if body.len() > MAX_BODY {
        return Err(too_big());
    }
    Ok(body)
}

/// A chunked body as a plain reader (chunk sizes and their CRLFs removed).
struct Chunked<R> {
    r: R,
    /// Bytes left in the current chunk.
    left: usize,
    /// The last chunk was read.
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            (&mut self.r).take(1024).read_line(&mut line)?;
            if line.trim_end().is_empty() {
                // The CRLF that ends the chunk before.
                line.clear();
                (&mut self.r).take(1024).read_line(&mut line)?;
            }
            if line.is_empty() {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let size = line.trim_end().split(';').next().unwrap_or("");
            let n = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {size:?}"),
                )
            })?;
            if n == 0 {
                self.done = true;
                return Ok(0);
            }
            self.left = n;
        }
        let want = buf.len().min(self.left);
        let n = self.r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.left -= n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, expected: Result<(u16, &str), &str>) {
        let mut r = raw.as_bytes();
        let got =
            match read_head(&mut r).and_then(|h| Ok((h.status, read_body(&mut r, h.framing)?))) {
                Ok((s, b)) => Ok((s, String::from_utf8(b).unwrap())),
                Err(Answer::Bad(m)) => Err(m),
                Err(Answer::Io(e)) => Err(e.to_string()),
            };
        let expected = expected
            .map(|(s, b)| (s, b.to_owned()))
            .map_err(str::to_owned);
        assert_eq!(got, expected, "{raw:?}");
    }

    #[test]
    fn answers() {
        check(
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            Ok((200, "{}")),
        );
        check(
            "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
            Ok((201, "abcde")),
        );
        check(
            "HTTP/1.1 404 Not Found\r\n\r\nto the end",
            Ok((404, "to the end")),
        );
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
            Err("failed to fill whole buffer"),
        );
        check("garbage\r\n\r\n", Err("bad status line \"garbage\""));
        check("HTTP/1.1 200 OK\r\n", Err("the answer's head ended early"));
        check(
            &format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                MAX_BODY + 1
            ),
            Err("answer over 16777216 bytes"),
        );
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            Err("bad Content-Length \"x\""),
        );
    }
}
