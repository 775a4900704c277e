//! The agent's read-only console (`api.console`, off by default): the
//! buffer's state (fill, backlog, the link to the hub, every drop and why)
//! and its sessions, one session (tags, metadata, gaps, marks, artifacts
//! and their upload state), and a log viewer over the buffer, for triage
//! on the robot when there is no hub. Pages are server-rendered, with the
//! hub console's stylesheet, helpers and log table (`crate::console`),
//! and no script.
//!
//! Invariant: served on a loopback address only (`agent::config` refuses
//! any other) and answers only requests whose `Host` is a loopback name,
//! so no other machine, and no web page through DNS rebinding, reads the
//! buffer; it reads through the local API's own queries (`api::log_query`,
//! `api::gather`, the store's `Reader`) and changes nothing.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use uuid::Uuid;

use crate::agent::api::{self, ApiError, ApiState, LogsQuery};
use crate::agent::store::marks::MarkQuery;
use crate::agent::sync::status::LinkState;
use crate::agent::types::{ArtifactItem, MarkView, SessionView, Status};
use crate::console::view::{self, enc, level_chips, qs, value, Chip, Line, Opt, Record};
use crate::wire::{Level, SessionStatus};

type St = State<Arc<ApiState>>;
type Params = Query<Vec<(String, String)>>;

/// Sessions per page of the home screen; log lines per page.
const SESSIONS_PER_PAGE: usize = 50;
const LINES_PER_PAGE: usize = 100;
/// Marks a session screen lists.
const MARKS_SHOWN: usize = 100;

/// The console's routes over the local API's state.
pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/sessions/{id}", get(session))
        .route("/logs", get(logs))
        .route("/assets/{version}/console.css", get(style))
        .fallback(|| async { Page::not_found("no such page".into()) })
        .layer(axum::middleware::from_fn(guard))
        .with_state(state)
}

/// Whether `host` (a `Host` header: name or address, maybe a port) names
/// this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // `[::1]:8900`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Refuses a request whose `Host` is not a loopback name (a page on
/// another site that resolves its own name to 127.0.0.1, DNS rebinding,
/// gets nothing), and puts the security headers on every answer.
async fn guard(req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let mut resp = if is_loopback_host(host) {
        next.run(req).await
    } else {
        Page::error(
            StatusCode::FORBIDDEN,
            format!(
                "this console answers only to localhost, 127.0.0.1 or [::1] (Host was {host:?}); \
                 from another machine, use an SSH tunnel"
            ),
        )
    };
    crate::console::headers::set(resp.headers_mut());
    resp
}

async fn style(Path(version): Path<String>) -> Response {
    if version != *crate::console::STYLE_VERSION {
        return Page::not_found("no such stylesheet".into());
    }
    crate::console::immutable("text/css; charset=utf-8", crate::console::STYLE)
}

/// The parts of `agent_base.html` every page fills.
pub struct Layout {
    pub css: String,
    pub device: String,
}

impl Layout {
    fn new(device: &str) -> Layout {
        Layout {
            css: format!("/assets/{}/console.css", *crate::console::STYLE_VERSION),
            device: device.to_owned(),
        }
    }
}

/// Error pages.
struct Page;

impl Page {
    fn error(status: StatusCode, message: String) -> Response {
        let page = ErrorPage {
            layout: Layout::new(""),
            status: status.as_u16(),
            message: &message,
        };
        let body = page
            .render()
            .unwrap_or_else(|_| format!("{} {message}", status.as_u16()));
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response()
    }

    fn not_found(message: String) -> Response {
        Page::error(StatusCode::NOT_FOUND, message)
    }
}

#[derive(Template)]
#[template(path = "agent_error.html")]
pub struct ErrorPage<'a> {
    pub layout: Layout,
    pub status: u16,
    pub message: &'a str,
}

/// A handler's failure: the API's error, shown as a page.
struct Failed(ApiError);

impl From<ApiError> for Failed {
    fn from(e: ApiError) -> Failed {
        Failed(e)
    }
}

impl From<askama::Error> for Failed {
    fn from(e: askama::Error) -> Failed {
        tracing::error!(error = %e, "console template failed");
        Failed(ApiError::internal(
            "page rendering failed (see logbookd's log)",
        ))
    }
}

impl IntoResponse for Failed {
    fn into_response(self) -> Response {
        Page::error(self.0.status(), self.0.message().to_owned())
    }
}

fn bad(message: String) -> Failed {
    Failed(ApiError::bad(message))
}

fn session_id(s: &str) -> Result<Uuid, Failed> {
    Uuid::parse_str(s).map_err(|_| bad(format!("{s:?} is not a session id")))
}

/// A session's row in a list.
pub struct SessionLine {
    pub id: String,
    pub href: String,
    pub status: &'static str,
    pub started: String,
    pub duration: String,
    pub tags: Vec<String>,
    pub package: String,
    pub log_count: u64,
}

fn session_line(s: &SessionView) -> SessionLine {
    SessionLine {
        id: s.id.to_string(),
        href: format!("/sessions/{}", s.id),
        status: s.status.as_str(),
        started: view::time_of(&s.started_at),
        duration: view::duration((s.duration_seconds * 1e9) as i64),
        tags: s.tags.clone(),
        package: s
            .package
            .as_ref()
            .map_or_else(String::new, |p| match &p.version {
                Some(v) => format!("{} {v}", p.name),
                None => p.name.clone(),
            }),
        log_count: s.log_count,
    }
}

/// A named count (`evicted before sync: 12`).
pub struct Count {
    pub name: String,
    pub value: u64,
}

/// A gap: records the agent could not keep, and why.
pub struct GapLine {
    pub session: Option<String>,
    pub level: &'static str,
    pub reason: String,
    pub dropped: u64,
}

#[derive(Template)]
#[template(path = "agent_home.html")]
pub struct HomePage {
    pub layout: Layout,
    pub device_id: String,
    pub version: String,
    pub uptime: String,
    pub current: Option<String>,
    pub buffer_used: String,
    pub buffer_limit: String,
    pub buffer_percent: u64,
    pub disk_full: bool,
    pub quarantined_to: Option<String>,
    pub stored: i64,
    pub unsynced: i64,
    pub link: &'static str,
    /// `None` when sync is off.
    pub last_success: Option<String>,
    pub sync_error: Option<String>,
    /// Non-zero losses and refusals, by name.
    pub losses: Vec<Count>,
    pub gaps: Vec<GapLine>,
    pub statuses: Vec<Opt>,
    pub sessions: Vec<SessionLine>,
    pub older: Option<String>,
    pub newest: Option<String>,
}

impl GapLine {
    fn new(session: Option<Uuid>, level: Level, reason: &str, dropped: u64) -> GapLine {
        GapLine {
            session: session.map(|s| s.to_string()),
            level: level.as_str(),
            reason: reason.to_owned(),
            dropped,
        }
    }
}

/// Every count of something lost or refused that is not zero.
fn losses(s: &Status) -> Vec<Count> {
    let named = [
        (
            "records evicted before they were synced",
            s.records.evicted_unsynced,
        ),
        ("records refused (queue full)", s.ingest.refused),
        ("records truncated", s.ingest.truncated),
        ("records that failed to commit", s.ingest.write_failed),
        ("database files quarantined", s.buffer.quarantined),
    ];
    named
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .chain(
            s.ingest
                .bad
                .iter()
                .map(|(r, v)| (format!("bad input: {r}"), *v)),
        )
        .filter(|(_, v)| *v > 0)
        .map(|(name, value)| Count { name, value })
        .collect()
}

async fn home(State(st): St, Query(p): Params) -> Result<Html<String>, Failed> {
    let status = match value(&p, "status") {
        "" => None,
        s => Some(SessionStatus::parse(s).ok_or_else(|| {
            bad(format!(
                "status {s:?} is not one of active, completed, failed"
            ))
        })?),
    };
    let before = match value(&p, "before") {
        "" => None,
        b => Some(session_id(b)?),
    };
    let st2 = st.clone();
    let page =
        api::blocking(move || st2.reader.sessions(status, SESSIONS_PER_PAGE, before)).await?;
    let s = api::gather(st.clone()).await?;
    let filter = value(&p, "status");
    let html = HomePage {
        layout: Layout::new(&s.device_name),
        device_id: s.device_id.clone(),
        version: s.version.clone(),
        uptime: view::duration((s.uptime_seconds * 1e9) as i64),
        current: s.current_session.map(|c| c.to_string()),
        buffer_used: view::bytes(s.buffer.bytes_used),
        buffer_limit: view::bytes(s.buffer.bytes_limit),
        buffer_percent: (s.buffer.bytes_used.saturating_mul(100))
            .checked_div(s.buffer.bytes_limit)
            .unwrap_or(0),
        disk_full: s.buffer.disk_full,
        quarantined_to: s.buffer.quarantined_to.clone(),
        stored: s.records.stored,
        unsynced: s.records.unsynced,
        link: s.sync.link.as_str(),
        last_success: (s.sync.link != LinkState::Disabled).then(|| {
            s.sync
                .last_success
                .as_deref()
                .map_or_else(|| "never".to_owned(), view::time_of)
        }),
        sync_error: s.sync.last_error.clone(),
        losses: losses(&s),
        gaps: s
            .gaps
            .iter()
            .map(|g| GapLine::new(g.session_id, g.level, &g.reason, g.dropped))
            .collect(),
        statuses: view::options(
            filter,
            &[
                ("", "any"),
                ("active", "active"),
                ("completed", "completed"),
                ("failed", "failed"),
            ],
        ),
        sessions: page.items.iter().map(session_line).collect(),
        older: page
            .next_cursor
            .map(|c| format!("/{}", qs([("status", filter), ("before", c.as_str())]))),
        newest: before.map(|_| format!("/{}", qs([("status", filter)]))),
    }
    .render()?;
    Ok(Html(html))
}

/// A file of the session's artifact directory.
pub struct ArtifactLine {
    pub path: String,
    pub size: String,
    pub state: String,
    /// Percent uploaded while uploading.
    pub percent: Option<u64>,
    pub error: String,
}

fn artifact_line(a: &ArtifactItem) -> ArtifactLine {
    ArtifactLine {
        path: a.path.clone(),
        size: view::bytes(a.size),
        state: a.state.clone(),
        percent: (a.state == "uploading").then(|| {
            (a.uploaded_bytes.saturating_mul(100))
                .checked_div(a.size)
                .unwrap_or(0)
        }),
        error: a.error.clone().unwrap_or_default(),
    }
}

/// A mark and the link to its window's logs.
pub struct MarkLine {
    pub name: String,
    pub time: String,
    pub window: String,
    pub priority: String,
    pub released: String,
    pub logs: String,
}

fn mark_line(m: &MarkView, session: &str) -> MarkLine {
    MarkLine {
        name: m.name.clone(),
        time: view::time_of(&m.timestamp),
        window: format!("-{}s / +{}s", m.before_seconds, m.after_seconds),
        priority: m.priority.clone(),
        released: m.released.clone().unwrap_or_default(),
        logs: format!(
            "/logs{}",
            qs([("session", session), ("mark", m.name.as_str())])
        ),
    }
}

#[derive(Template)]
#[template(path = "agent_session.html")]
pub struct SessionPage {
    pub layout: Layout,
    pub s: SessionLine,
    pub ended: String,
    pub error: String,
    pub metadata: String,
    pub artifact_dir: String,
    pub logs: String,
    pub errors: String,
    pub gaps: Vec<GapLine>,
    pub marks: Vec<MarkLine>,
    pub artifacts: Vec<ArtifactLine>,
}

async fn session(State(st): St, Path(id): Path<String>) -> Result<Response, Failed> {
    let uuid = session_id(&id)?;
    let st2 = st.clone();
    let found = api::blocking(move || {
        let Some(s) = st2.reader.session(uuid)? else {
            return Ok(None);
        };
        let artifacts = st2.reader.artifacts(uuid)?;
        let marks = st2.reader.marks(&MarkQuery {
            session: Some(uuid),
            name: None,
            limit: MARKS_SHOWN,
            before: None,
        })?;
        let gaps = st2.reader.gaps()?;
        Ok(Some((s, artifacts, marks, gaps)))
    })
    .await?;
    let Some((s, artifacts, marks, gaps)) = found else {
        return Ok(Page::not_found(format!("no session {id} in this buffer")));
    };
    let sid = s.id.to_string();
    let html = SessionPage {
        layout: Layout::new(&st.device_name),
        ended: s
            .ended_at
            .as_deref()
            .map_or_else(|| "still running".to_owned(), view::time_of),
        error: s.error.clone().unwrap_or_default(),
        metadata: if s.metadata.is_empty() {
            String::new()
        } else {
            serde_json::to_string_pretty(&s.metadata).unwrap_or_default()
        },
        artifact_dir: s.artifact_dir.clone(),
        logs: format!("/logs{}", qs([("session", sid.as_str())])),
        errors: format!(
            "/logs{}",
            qs([("session", sid.as_str()), ("level", "error")])
        ),
        gaps: gaps
            .iter()
            .filter(|g| g.session_id == Some(s.id))
            .map(|g| GapLine::new(g.session_id, g.level, &g.reason, g.dropped))
            .collect(),
        marks: marks.iter().map(|m| mark_line(m, &sid)).collect(),
        artifacts: artifacts.iter().map(artifact_line).collect(),
        s: session_line(&s),
    }
    .render()?;
    Ok(Html(html).into_response())
}

/// Filter fields echoed into links (paging keeps them).
const FIELDS: [&str; 7] = [
    "session", "level", "module", "search", "since", "until", "mark",
];

#[derive(Template)]
#[template(path = "agent_logs.html")]
pub struct LogsPage<'a> {
    pub layout: Layout,
    /// The session the lines are of, with its screen's link.
    pub session: Option<(String, String)>,
    pub action: &'static str,
    /// The viewer with no filter but the session.
    pub reset: String,
    pub level: &'a str,
    pub module: &'a str,
    pub search: &'a str,
    pub since: &'a str,
    pub until: &'a str,
    pub mark: &'a str,
    pub chips: Vec<Chip>,
    pub lines: Vec<Line<'a>>,
    pub older: Option<String>,
    pub newest: Option<String>,
}

async fn logs(State(st): St, Query(p): Params) -> Result<Html<String>, Failed> {
    let number = |name: &str| -> Result<Option<u64>, Failed> {
        match value(&p, name) {
            "" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| bad(format!("{name} {v:?} is not a record number"))),
        }
    };
    let (before, after) = (number("before")?, number("after")?);
    let paged = before.is_some() || after.is_some();
    let some = |name: &str| Some(value(&p, name).to_owned()).filter(|v| !v.is_empty());
    let q = LogsQuery {
        session: some("session"),
        level: some("level"),
        module: some("module"),
        search: some("search"),
        since: some("since"),
        until: some("until"),
        mark: some("mark"),
        before,
        after,
        limit: Some(LINES_PER_PAGE),
        ..LogsQuery::default()
    };
    let query = api::log_query(&st, q).await?;
    let st2 = st.clone();
    let page = api::blocking(move || st2.reader.logs(&query)).await?;
    let device = st.device_name.clone();
    let filters: Vec<(&str, &str)> = FIELDS.iter().map(|f| (*f, value(&p, f))).collect();
    let here = format!("/logs{}", qs(filters.iter().copied()));
    let t = view::terms(value(&p, "search"));
    let session = value(&p, "session");
    let lines = page
        .items
        .iter()
        .map(|r| {
            Line::new(
                Record {
                    seq: r.seq,
                    time: view::time_of(&r.timestamp),
                    level: r.level,
                    module: &r.module,
                    message: &r.message,
                    metadata: if r.metadata.is_empty() {
                        "".into()
                    } else {
                        serde_json::Value::Object(r.metadata.clone())
                            .to_string()
                            .into()
                    },
                    process: r.process.as_deref(),
                    pid: r.pid,
                },
                &here,
                &t,
            )
        })
        .collect();
    let html = LogsPage {
        layout: Layout::new(&device),
        session: (!session.is_empty())
            .then(|| (session.to_owned(), format!("/sessions/{}", enc(session)))),
        action: "/logs",
        reset: format!("/logs{}", qs([("session", session)])),
        chips: level_chips("/logs", &filters, value(&p, "level")),
        level: value(&p, "level"),
        module: value(&p, "module"),
        search: value(&p, "search"),
        since: value(&p, "since"),
        until: value(&p, "until"),
        mark: value(&p, "mark"),
        lines,
        older: page.next_cursor.map(|c| {
            let mut pairs = filters.clone();
            pairs.push(("before", c.as_str()));
            format!("/logs{}", qs(pairs))
        }),
        newest: paged.then(|| here.clone()),
    }
    .render()?;
    Ok(Html(html))
}

#[cfg(test)]
mod tests;
