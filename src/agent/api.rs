//! The local API on `api.sock`: sessions, log queries and live follows
//! (chunked JSON lines), flush, status and Prometheus metrics, HTTP/1.1
//! with JSON bodies and `{"error":{"code","message"}}` errors.
//!
//! Invariant: handlers never run SQL themselves: reads go to the store's
//! [`Reader`] on a blocking thread, changes go to the writer as messages.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use tokio::sync::oneshot;
use uuid::Uuid;

use crate::agent::ingest::json::BadRecord;
use crate::agent::ingest::Pipeline;
use crate::agent::marks::{MarkSpec, Priority};
use crate::agent::store::marks::MarkQuery;
use crate::agent::store::read::{LogQuery, Reader};
use crate::agent::store::writer::{Msg, SessionCmd};
use crate::agent::store::{Stats, StoreError};
use crate::agent::types::{
    AddTag, BufferStatus, Flushed, GapItem, IngestCounts, MarkView, NewMark, OpenSession, Page,
    RecordCounts, SessionError, Status, StopSession, Target, FOLLOW_END_SESSION,
};
use crate::prom::{self, Kind, Text};
use crate::wire::{ErrorBody, ErrorDetail, Level, SessionStatus};

/// Largest request body the local API reads.
const MAX_BODY: usize = 256 << 10;
/// Largest page a query returns.
const MAX_LIMIT: usize = 1000;

pub struct ApiState {
    pub reader: Reader,
    pub pipeline: Pipeline,
    pub started: Instant,
    pub max_bytes: u64,
    pub device_id: String,
    pub device_name: String,
    /// The uploader's link state and counters.
    pub sync: Arc<crate::agent::sync::status::SyncShared>,
    /// Live counters of the artifact tasks.
    pub artifacts: Arc<crate::agent::sync::artifacts::ArtifactStats>,
    /// Cancelled when the agent stops: live follows end then.
    pub shutdown: tokio_util::sync::CancellationToken,
}

type St = State<Arc<ApiState>>;

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/sessions", post(open_session).get(list_sessions))
        .route("/v1/sessions/{id}", get(get_session))
        .route("/v1/sessions/{id}/stop", post(stop_session))
        .route("/v1/sessions/{id}/tags", post(add_tag))
        .route("/v1/sessions/{id}/tags/{tag}", delete(remove_tag))
        .route("/v1/sessions/{id}/artifacts", get(session_artifacts))
        .route("/v1/logs", get(logs))
        .route("/v1/logs/follow", get(follow_logs))
        .route("/v1/marks", post(new_mark).get(list_marks))
        .route("/v1/flush", post(flush))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(|| async { ApiError::new(404, "not_found", "no such route".into()) })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// An error response.
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    fn new(status: u16, code: &str, message: String) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: ErrorBody {
                error: ErrorDetail {
                    code: code.into(),
                    message,
                },
            },
        }
    }

    pub(crate) fn bad(message: String) -> ApiError {
        ApiError::new(400, "invalid", message)
    }

    pub(crate) fn internal(message: &str) -> ApiError {
        ApiError::new(500, "internal", message.into())
    }

    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    pub(crate) fn message(&self) -> &str {
        &self.body.error.message
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> ApiError {
        ApiError::new(e.status(), e.code(), e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        tracing::error!("query failed: {e}");
        ApiError::new(500, "internal", e.to_string())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> ApiError {
        ApiError::new(e.status().as_u16(), "invalid", e.body_text())
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(e: axum::extract::rejection::QueryRejection) -> ApiError {
        ApiError::bad(e.body_text())
    }
}

type Body<T> = Result<Json<T>, axum::extract::rejection::JsonRejection>;
type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

pub(crate) async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, StoreError> + Send + 'static,
) -> Result<R, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::new(500, "internal", e.to_string()))?
        .map_err(ApiError::from)
}

async fn command(st: &ApiState, cmd: SessionCmd) -> Result<Response, ApiError> {
    let (tx, rx) = oneshot::channel();
    let gone = || ApiError::new(503, "unavailable", "the agent is shutting down".into());
    if matches!(cmd, SessionCmd::Open(_) | SessionCmd::Stop { .. }) {
        // Records a client sent before the session changed belong to the
        // state before the change: get them queued ahead of the command.
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), st.pipeline.handover()).await;
    }
    st.pipeline
        .writer()
        .send(Msg::Session(cmd, tx))
        .await
        .map_err(|_| gone())?;
    let view = rx.await.map_err(|_| gone())??;
    Ok(Json(view).into_response())
}

fn target(id: &str) -> Result<Target, ApiError> {
    id.parse().map_err(ApiError::bad)
}

async fn open_session(State(st): St, body: Body<OpenSession>) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let resp = command(&st, SessionCmd::Open(req)).await?;
    Ok((StatusCode::CREATED, resp).into_response())
}

async fn stop_session(
    State(st): St,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // An empty body is a plain stop.
    let req: StopSession = if body.iter().all(u8::is_ascii_whitespace) {
        StopSession::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("invalid stop body: {e}")))?
    };
    command(
        &st,
        SessionCmd::Stop {
            target: target(&id)?,
            failed: req.failed,
            error: req.error,
        },
    )
    .await
}

async fn add_tag(
    State(st): St,
    Path(id): Path<String>,
    body: Body<AddTag>,
) -> Result<Response, ApiError> {
    let Json(req) = body?;
    command(
        &st,
        SessionCmd::Tag {
            target: target(&id)?,
            tag: req.tag,
        },
    )
    .await
}

async fn remove_tag(
    State(st): St,
    Path((id, tag)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    command(
        &st,
        SessionCmd::Untag {
            target: target(&id)?,
            tag,
        },
    )
    .await
}

async fn get_session(State(st): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    let t = target(&id)?;
    let st2 = st.clone();
    let found = blocking(move || match t {
        Target::Current => st2.reader.current_session(),
        Target::Id(id) => st2.reader.session(id),
    })
    .await?;
    match found {
        Some(s) => Ok(Json(s).into_response()),
        None if t == Target::Current => Err(SessionError::NoActive.into()),
        None => Err(ApiError::new(404, "not_found", format!("no session {id}"))),
    }
}

/// `GET /v1/sessions/{id}/artifacts`: the files the watcher found and
/// their upload state (`current` names the active session).
async fn session_artifacts(State(st): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    let t = target(&id)?;
    let st2 = st.clone();
    let found = blocking(move || {
        let session = match t {
            Target::Current => st2.reader.current_session()?,
            Target::Id(id) => st2.reader.session(id)?,
        };
        match session {
            Some(s) => Ok(Some(st2.reader.artifacts(s.id)?)),
            None => Ok(None),
        }
    })
    .await?;
    match found {
        Some(items) => Ok(Json(serde_json::json!({ "items": items })).into_response()),
        None if t == Target::Current => Err(SessionError::NoActive.into()),
        None => Err(ApiError::new(404, "not_found", format!("no session {id}"))),
    }
}

#[derive(Debug, Deserialize)]
struct SessionsQuery {
    status: Option<String>,
    limit: Option<usize>,
    before: Option<String>,
}

async fn list_sessions(State(st): St, q: Q<SessionsQuery>) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(s) => Some(SessionStatus::parse(s).ok_or_else(|| {
            ApiError::bad(format!(
                "status {s:?} is not one of active, completed, failed"
            ))
        })?),
    };
    let before = match q.before.as_deref() {
        None | Some("") => None,
        Some(b) => Some(
            Uuid::parse_str(b)
                .map_err(|_| ApiError::bad(format!("before {b:?} is not a session id")))?,
        ),
    };
    let limit = q.limit.unwrap_or(50).clamp(1, MAX_LIMIT);
    let page = blocking(move || st.reader.sessions(status, limit, before)).await?;
    Ok(Json(page).into_response())
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct LogsQuery {
    pub(crate) session: Option<String>,
    pub(crate) level: Option<String>,
    pub(crate) module: Option<String>,
    pub(crate) search: Option<String>,
    pub(crate) since: Option<String>,
    pub(crate) until: Option<String>,
    pub(crate) limit: Option<usize>,
    pub(crate) before: Option<u64>,
    pub(crate) after: Option<u64>,
    pub(crate) order: Option<String>,
    /// Narrow to the window of the newest mark of this name (in `session`
    /// when given).
    pub(crate) mark: Option<String>,
    /// Only for a follow: start with the newest N.
    pub(crate) tail: Option<usize>,
}

fn parse_time(name: &str, s: &str) -> Result<i64, ApiError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .and_then(|t| i64::try_from(t.unix_timestamp_nanos()).ok())
        .ok_or_else(|| ApiError::bad(format!("{name} {s:?} is not an RFC 3339 time")))
}

/// The filters and cursor of a logs query; `session=current` names the
/// active session.
pub(crate) async fn log_query(st: &Arc<ApiState>, q: LogsQuery) -> Result<LogQuery, ApiError> {
    let nonempty = |o: Option<String>| o.filter(|s| !s.is_empty());
    let session = match nonempty(q.session) {
        None => None,
        Some(s) if s == "current" => {
            let st2 = st.clone();
            let cur = blocking(move || st2.reader.current_session()).await?;
            Some(cur.ok_or(SessionError::NoActive)?.id)
        }
        Some(s) => Some(
            Uuid::parse_str(&s)
                .map_err(|_| ApiError::bad(format!("session {s:?} is not a session id")))?,
        ),
    };
    let mut since_ns = nonempty(q.since)
        .map(|s| parse_time("since", &s))
        .transpose()?;
    let mut until_ns = nonempty(q.until)
        .map(|s| parse_time("until", &s))
        .transpose()?;
    let mut session = session;
    if let Some(name) = nonempty(q.mark) {
        let m = newest_mark(st, session, name).await?;
        session = m.session_id;
        let window = |t: &str| parse_time("mark", t);
        since_ns = Some(since_ns.unwrap_or(i64::MIN).max(window(&m.start)?));
        // `until` is exclusive; a window's end is in it.
        until_ns = Some(until_ns.unwrap_or(i64::MAX).min(window(&m.end)? + 1));
    }
    let level = match nonempty(q.level) {
        None => None,
        Some(l) => Some(l.parse::<Level>().map_err(ApiError::bad)?),
    };
    let ascending = match q.order.as_deref() {
        None | Some("") | Some("desc") => false,
        Some("asc") => true,
        Some(o) => return Err(ApiError::bad(format!("order {o:?} is not asc or desc"))),
    };
    Ok(LogQuery {
        session,
        level,
        module: nonempty(q.module),
        search: nonempty(q.search),
        since_ns,
        until_ns,
        limit: q.limit.unwrap_or(100).clamp(1, MAX_LIMIT),
        before: q.before,
        after: q.after,
        ascending,
    })
}

async fn logs(State(st): St, q: Q<LogsQuery>) -> Result<Response, ApiError> {
    let Query(q) = q?;
    if q.tail.is_some() {
        return Err(ApiError::bad(
            "tail goes with /v1/logs/follow; here use limit".into(),
        ));
    }
    let query = log_query(&st, q).await?;
    let page = blocking(move || st.reader.logs(&query)).await?;
    Ok(Json(page).into_response())
}

/// A follow stream's idle line: it keeps a client's read timeout from
/// firing while nothing matches, and shows the agent is alive.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// `GET /v1/logs/follow`: chunked JSON lines. The newest `tail` records
/// matching the filters (oldest first), or those after `after`, then each
/// new one once as the writer commits it. A stream with a session filter
/// ends with `{"event":"end","reason":"session ended","seq":N}` once that
/// session is closed and every record of it was sent; `"agent stopping"`
/// ends any stream at shutdown (resume with `after=N`). Each turn reads at most one page from the database,
/// only when the client has taken the last one: a slow reader costs one
/// page of memory and never slows the writer.
async fn follow_logs(State(st): St, q: Q<LogsQuery>) -> Result<Response, ApiError> {
    let Query(mut logs) = q?;
    let tail = logs.tail.take();
    if logs.before.is_some() || logs.limit.is_some() || logs.order.is_some() {
        return Err(ApiError::bad(
            "a follow takes `after` or `tail`, not before, limit or order".into(),
        ));
    }
    let mut query = log_query(&st, logs).await?;
    if let Some(id) = query.session {
        // A follow of no session would end at once: say why instead.
        let st2 = st.clone();
        if blocking(move || st2.reader.session(id)).await?.is_none() {
            return Err(ApiError::new(404, "not_found", format!("no session {id}")));
        }
    }
    // Subscribed before the first read: no commit after it goes unseen.
    let commits = st.pipeline.stats.committed_seq.subscribe();
    let (first, cursor) = match query.after {
        Some(after) => (Vec::new(), after),
        None => {
            let mut q = query.clone();
            q.limit = tail.unwrap_or(0).min(MAX_LIMIT);
            let st2 = st.clone();
            blocking(move || st2.reader.tail(&q)).await?
        }
    };
    query.limit = MAX_LIMIT;
    query.before = None;
    query.ascending = true;
    let follow = Follow {
        st,
        query,
        cursor,
        commits,
        first: Some(first),
        last_sent: tokio::time::Instant::now(),
        done: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut f| async move {
        let chunk = f.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), f))
    });
    let mut resp = Response::new(axum::body::Body::from_stream(stream));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

/// The state of one follow stream.
struct Follow {
    st: Arc<ApiState>,
    /// The filters, ascending above `cursor`.
    query: LogQuery,
    /// Every matching record up to here was sent.
    cursor: u64,
    commits: tokio::sync::watch::Receiver<u64>,
    /// The tail, sent first.
    first: Option<Vec<crate::agent::types::LogItem>>,
    /// When the client was last sent anything: commits that match nothing
    /// (a busy robot, a `level=error` follow) must not hold back the
    /// heartbeat.
    last_sent: tokio::time::Instant,
    done: bool,
}

impl Follow {
    /// The next piece of the body: records, a heartbeat, the end event, or
    /// `None` once that was sent (or the database failed).
    async fn next_chunk(&mut self) -> Option<axum::body::Bytes> {
        let chunk = self.next_inner().await;
        self.last_sent = tokio::time::Instant::now();
        chunk
    }

    async fn next_inner(&mut self) -> Option<axum::body::Bytes> {
        if self.done {
            return None;
        }
        if let Some(first) = self.first.take().filter(|f| !f.is_empty()) {
            return Some(lines(&first));
        }
        loop {
            let mut q = self.query.clone();
            q.after = Some(self.cursor);
            let st = self.st.clone();
            // The session's state is read before its records: once it is
            // closed, every record of it is committed, so the read after
            // it is the last one that can find any.
            let read = blocking(move || {
                let ended = match q.session {
                    Some(id) => st
                        .reader
                        .session(id)?
                        .is_none_or(|s| s.status != SessionStatus::Active),
                    None => false,
                };
                Ok((ended, st.reader.logs(&q)?))
            })
            .await;
            let (ended, page) = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("a live follow stopped: {}", e.body.error.message);
                    return self.end("the agent could not read its buffer");
                }
            };
            if let Some(last) = page.items.last() {
                self.cursor = last.seq;
                return Some(lines(&page.items));
            }
            if ended {
                return self.end(FOLLOW_END_SESSION);
            }
            tokio::select! {
                changed = self.commits.changed() => {
                    if changed.is_err() {
                        return self.end("agent stopping");
                    }
                }
                () = tokio::time::sleep_until(self.last_sent + HEARTBEAT) => {
                    return Some(axum::body::Bytes::from_static(b"\n"));
                }
                () = self.st.shutdown.cancelled() => return self.end("agent stopping"),
            }
        }
    }

    fn end(&mut self, reason: &str) -> Option<axum::body::Bytes> {
        self.done = true;
        // `seq`: everything matching up to it was sent, so a client that
        // reconnects resumes after it.
        let end = serde_json::json!({ "event": "end", "reason": reason, "seq": self.cursor });
        let mut line = serde_json::to_vec(&end).unwrap_or_default();
        line.push(b'\n');
        Some(line.into())
    }
}

/// Records as JSON lines.
fn lines(items: &[crate::agent::types::LogItem]) -> axum::body::Bytes {
    let mut out = Vec::with_capacity(items.len() * 256);
    for r in items {
        if serde_json::to_writer(&mut out, r).is_ok() {
            out.push(b'\n');
        }
    }
    out.into()
}

async fn flush(State(st): St) -> Result<Response, ApiError> {
    let last_seq = st
        .pipeline
        .flush()
        .await
        .map_err(|e| ApiError::new(503, "unavailable", e.to_string()))?;
    Ok(Json(Flushed { last_seq }).into_response())
}

pub(crate) async fn gather(st: Arc<ApiState>) -> Result<Status, ApiError> {
    let st2 = st.clone();
    let (gaps, current, artifact_counts) = blocking(move || {
        Ok((
            st2.reader.gaps()?,
            st2.reader.current_session()?,
            st2.reader.artifact_counts()?,
        ))
    })
    .await?;
    let s: &Stats = &st.pipeline.stats;
    let stored = s.records_stored.load(Ordering::Relaxed);
    let synced = s.records_synced.load(Ordering::Relaxed);
    let unsynced = (stored - synced).max(0) as u64;
    // The backlog's share of the buffer, by record count: exact enough for
    // an operator, and free (no scan of a million rows per status call).
    let backlog_bytes = if stored > 0 {
        (Stats::get(&s.disk_bytes) as f64 * unsynced as f64 / stored as f64) as u64
    } else {
        0
    };
    Ok(Status {
        sync: st.sync.view(unsynced, backlog_bytes),
        device_id: st.device_id.clone(),
        device_name: st.device_name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: st.started.elapsed().as_secs_f64(),
        current_session: current.map(|c| c.id),
        buffer: BufferStatus {
            bytes_used: Stats::get(&s.disk_bytes),
            bytes_limit: st.max_bytes,
            disk_full: s.disk_full.load(Ordering::Relaxed),
            quarantined: Stats::get(&s.quarantined),
            quarantined_to: s
                .quarantined_to
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|p| p.display().to_string()),
        },
        records: RecordCounts {
            stored,
            synced,
            unsynced: stored - synced,
            last_seq: s.last_seq.load(Ordering::Relaxed),
            evicted_synced: Stats::get(&s.evicted_synced),
            evicted_unsynced: Stats::get(&s.evicted_unsynced),
        },
        ingest: IngestCounts {
            accepted: Stats::get(&s.accepted),
            accepted_by_protocol: crate::agent::ingest::PROTOCOLS
                .iter()
                .zip(&s.accepted_by)
                .map(|(p, n)| (p.to_string(), Stats::get(n)))
                .collect(),
            truncated: Stats::get(&s.truncated),
            refused: Stats::get(&s.refused),
            bad: BadRecord::ALL
                .iter()
                .enumerate()
                .map(|(i, b)| (b.reason().to_owned(), Stats::get(&s.bad[i])))
                .chain(
                    crate::agent::ingest::FORMAT_BAD_REASONS
                        .iter()
                        .zip(&s.bad_formats)
                        .map(|(r, n)| (r.to_string(), Stats::get(n))),
                )
                .collect(),
            connections_total: Stats::get(&s.connections),
            connections_open: s.connections_open.load(Ordering::Relaxed),
            committed: Stats::get(&s.committed),
            write_failed: Stats::get(&s.write_failed),
            commits: Stats::get(&s.commits),
        },
        gaps: gaps
            .into_iter()
            .map(|g| GapItem {
                session_id: g.session_id,
                level: g.level,
                reason: g.reason,
                dropped: g.dropped,
            })
            .collect(),
        artifacts: st.artifacts.report(artifact_counts),
    })
}

async fn status(State(st): St) -> Result<Response, ApiError> {
    Ok(Json(gather(st).await?).into_response())
}

async fn metrics(State(st): St) -> Result<Response, ApiError> {
    let s = gather(st).await?;
    let mut t = Text::default();
    t.gauge(
        "logbook_uptime_seconds",
        "Seconds since logbookd started.",
        s.uptime_seconds,
    );
    t.gauge(
        "logbook_buffer_bytes",
        "Bytes of agent.db plus its WAL.",
        s.buffer.bytes_used,
    );
    t.gauge(
        "logbook_buffer_limit_bytes",
        "buffer.max_bytes.",
        s.buffer.bytes_limit,
    );
    t.family(
        "logbook_records",
        Kind::Gauge,
        "Records in the buffer by sync state.",
    )
    .sample(&[("state", "synced")], s.records.synced)
    .sample(&[("state", "unsynced")], s.records.unsynced);
    t.gauge(
        "logbook_last_seq",
        "Highest committed seq.",
        s.records.last_seq,
    );
    t.family(
        "logbook_evicted_records_total",
        Kind::Counter,
        "Records evicted to keep the size bound.",
    )
    .sample(&[("state", "synced")], s.records.evicted_synced)
    .sample(&[("state", "unsynced")], s.records.evicted_unsynced);
    // Accepted records by protocol: their sum is the total.
    let mut ingest = t.family(
        "logbook_ingest_records_total",
        Kind::Counter,
        "Records received by outcome.",
    );
    for (p, n) in &s.ingest.accepted_by_protocol {
        ingest.sample(&[("outcome", "accepted"), ("protocol", p)], n);
    }
    ingest
        .sample(&[("outcome", "truncated")], s.ingest.truncated)
        .sample(&[("outcome", "refused")], s.ingest.refused)
        .sample(&[("outcome", "write_failed")], s.ingest.write_failed);
    for (reason, n) in &s.ingest.bad {
        ingest.sample(&[("outcome", "bad"), ("reason", reason)], n);
    }
    t.counter(
        "logbook_committed_records_total",
        "Records committed to SQLite.",
        s.ingest.committed,
    );
    t.counter(
        "logbook_commits_total",
        "SQLite transactions committed.",
        s.ingest.commits,
    );
    t.gauge(
        "logbook_ingest_connections",
        "Open ingest connections.",
        s.ingest.connections_open,
    );
    let mut gaps = t.family(
        "logbook_gap_records_total",
        Kind::Counter,
        "Records that will never reach the hub.",
    );
    for g in &s.gaps {
        let session = g.session_id.map(|u| u.to_string()).unwrap_or_default();
        gaps.sample(
            &[
                ("session", &session),
                ("level", g.level.as_str()),
                ("reason", &g.reason),
            ],
            g.dropped,
        );
    }
    t.gauge(
        "logbook_session_active",
        "1 while a session is active.",
        u8::from(s.current_session.is_some()),
    );
    let y = &s.sync;
    let mut link = t.family(
        "logbook_sync_link",
        Kind::Gauge,
        "1 for the current state of the link to the hub.",
    );
    for l in ["disabled", "online", "offline", "auth-failed"] {
        link.sample(&[("state", l)], u8::from(y.link.as_str() == l));
    }
    t.gauge(
        "logbook_sync_last_success_timestamp_seconds",
        "Unix time of the last batch the hub acknowledged (0 = never).",
        y.last_success
            .as_deref()
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .map_or(0, |t| t.unix_timestamp()),
    );
    t.gauge(
        "logbook_sync_backlog_records",
        "Records the hub has not acknowledged.",
        y.backlog_records,
    );
    t.gauge(
        "logbook_sync_backlog_bytes",
        "Approximate buffer bytes of those records.",
        y.backlog_bytes,
    );
    t.gauge(
        "logbook_sync_backoff_seconds",
        "Upper bound of the current retry wait (0 when not backing off).",
        y.backoff_seconds.unwrap_or(0.0),
    );
    t.family(
        "logbook_sync_sent_bytes_total",
        Kind::Counter,
        "Bytes of acknowledged batches by encoding.",
    )
    .sample(&[("encoding", "gzip")], y.bytes_sent)
    .sample(&[("encoding", "identity")], y.bytes_uncompressed);
    t.gauge(
        "logbook_sync_compression_ratio",
        "Uncompressed over compressed bytes of acknowledged batches.",
        y.compression_ratio,
    );
    t.family(
        "logbook_sync_batches_total",
        Kind::Counter,
        "Batch requests by outcome.",
    )
    .sample(&[("outcome", "acked")], y.batches_sent)
    .sample(&[("outcome", "failed")], y.failures)
    .sample(&[("outcome", "set_aside")], y.set_aside_batches);
    t.family(
        "logbook_sync_records_total",
        Kind::Counter,
        "Records the hub acknowledged, and records set aside as rejected.",
    )
    .sample(&[("outcome", "acked")], y.records_sent)
    .sample(&[("outcome", "set_aside")], y.set_aside_records);
    t.counter(
        "logbook_sync_uploader_restarts_total",
        "Stalled or crashed uploaders the supervisor restarted.",
        y.uploader_restarts,
    );
    let a = &s.artifacts;
    t.family(
        "logbook_artifacts",
        Kind::Gauge,
        "Artifact files by upload state.",
    )
    .sample(&[("state", "pending")], a.pending)
    .sample(&[("state", "uploading")], a.uploading)
    .sample(&[("state", "uploaded")], a.uploaded)
    .sample(&[("state", "refused")], a.refused)
    .sample(&[("state", "failed")], a.failed);
    t.gauge(
        "logbook_artifact_pending_bytes",
        "Artifact bytes not yet acknowledged by the hub.",
        a.bytes_pending,
    );
    t.counter(
        "logbook_artifact_sent_bytes_total",
        "Artifact bytes acknowledged by the hub since start.",
        a.bytes_sent,
    );
    t.gauge(
        "logbook_artifact_backoff_seconds",
        "Current artifact retry wait (0 when not backing off).",
        a.backoff_seconds.unwrap_or(0.0),
    );
    t.gauge(
        "logbook_artifact_auth_failed",
        "1 when the hub refused the device token for uploads.",
        u8::from(a.auth_failed),
    );
    Ok(([(header::CONTENT_TYPE, prom::CONTENT_TYPE)], t.finish()).into_response())
}

/// The newest mark named `name`, in `session` when given; 404 when none.
async fn newest_mark(
    st: &Arc<ApiState>,
    session: Option<Uuid>,
    name: String,
) -> Result<MarkView, ApiError> {
    let st2 = st.clone();
    let q = MarkQuery {
        session,
        name: Some(name.clone()),
        limit: 1,
        before: None,
    };
    let found = blocking(move || st2.reader.marks(&q)).await?;
    found
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::new(404, "not_found", format!("no mark named {name:?}")))
}

/// The mark a `POST /v1/marks` body asks for, checked.
fn mark_spec(req: NewMark) -> Result<MarkSpec, ApiError> {
    let window = |what: &str, v: &Option<serde_json::Value>| {
        v.as_ref()
            .map(crate::agent::marks::duration_ns)
            .transpose()
            .map_err(|e| ApiError::bad(format!("{what}: {e}")))
    };
    let priority = match req.priority.as_deref() {
        None | Some("") => Priority::Normal,
        Some(p) => p.parse().map_err(ApiError::bad)?,
    };
    let timestamp_ns = match req.timestamp.as_deref() {
        None | Some("") => None,
        Some(t) => Some(parse_time("timestamp", t)?),
    };
    MarkSpec::new(
        req.name,
        timestamp_ns,
        window("before", &req.before)?,
        window("after", &req.after)?,
        priority,
        &req.metadata,
    )
    .map_err(ApiError::bad)
}

/// The fuzz entry point of the local API's request decoding (fuzz target
/// `api_body`): `data` as each JSON body (`POST /v1/sessions`, `.../stop`,
/// `.../tags`, `/v1/marks`) and as a session id of a path, through the
/// checks the handlers make. Never panics; a refusal is a 400 with a
/// one-line message.
pub fn fuzz_one(data: &[u8]) {
    let refused = |e: ApiError| {
        let m = &e.body.error.message;
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{m}");
        assert!(!m.contains('\n'), "{m:?}");
    };
    let _ = serde_json::from_slice::<OpenSession>(data);
    let _ = serde_json::from_slice::<StopSession>(data);
    let _ = serde_json::from_slice::<AddTag>(data);
    if let Ok(req) = serde_json::from_slice::<NewMark>(data) {
        if let Err(e) = mark_spec(req) {
            refused(e);
        }
    }
    if let Ok(id) = std::str::from_utf8(data) {
        if let Err(e) = target(id) {
            refused(e);
        }
    }
}

/// `POST /v1/marks`: a mark in the active session (README "Marks").
async fn new_mark(State(st): St, body: Body<NewMark>) -> Result<Response, ApiError> {
    let Json(req) = body?;
    let spec = mark_spec(req)?;
    // Records sent before the mark belong before it (and to its session).
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), st.pipeline.handover()).await;
    let (tx, rx) = oneshot::channel();
    let gone = || ApiError::new(503, "unavailable", "the agent is shutting down".into());
    st.pipeline
        .writer()
        .send(Msg::Mark(spec, tx))
        .await
        .map_err(|_| gone())?;
    let id = rx.await.map_err(|_| gone())??;
    let st2 = st.clone();
    let view = blocking(move || st2.reader.mark(id)).await?;
    let view = view.ok_or_else(|| ApiError::new(500, "internal", "the new mark is gone".into()))?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

#[derive(Debug, Deserialize)]
struct MarksQuery {
    session: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
    before: Option<i64>,
}

/// `GET /v1/marks`: marks, newest first (`session`, `name`, `limit`,
/// `before` an id).
async fn list_marks(State(st): St, q: Q<MarksQuery>) -> Result<Response, ApiError> {
    let Query(q) = q?;
    let session = match q.session.as_deref() {
        None | Some("") => None,
        Some("current") => {
            let st2 = st.clone();
            let cur = blocking(move || st2.reader.current_session()).await?;
            Some(cur.ok_or(SessionError::NoActive)?.id)
        }
        Some(s) => Some(
            Uuid::parse_str(s)
                .map_err(|_| ApiError::bad(format!("session {s:?} is not a session id")))?,
        ),
    };
    let limit = q.limit.unwrap_or(100).clamp(1, MAX_LIMIT);
    let query = MarkQuery {
        session,
        name: q.name.filter(|n| !n.is_empty()),
        limit,
        before: q.before,
    };
    let items = blocking(move || st.reader.marks(&query)).await?;
    let next_cursor = (items.len() == limit)
        .then(|| items.last().map(|m| m.id.to_string()))
        .flatten();
    Ok(Json(Page { items, next_cursor }).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_bodies_mutated_never_panic() {
        let samples: &[&[u8]] = &[
            br#"{"tags":["a","b"],"package":{"name":"nav","version":"1.2"},"metadata":{"k":1}}"#,
            br#"{"failed":true,"error":"motor stalled"}"#,
            br#"{"tag":"calibration"}"#,
            br#"{"name":"bump","before":"30s","after":5,"priority":"high","timestamp":"2026-12-05T08:00:00Z","metadata":{"x":[1,2]}}"#,
            b"01930000-0000-7000-8000-000000000000",
            b"current",
        ];
        let mut rng = crate::test_rng::Rng::new(0x0a91);
        for _ in 0..20_000 {
            let s = samples[rng.below(samples.len())];
            fuzz_one(&crate::test_rng::mutate(&mut rng, s));
        }
        for s in samples {
            fuzz_one(s);
        }
    }
}
