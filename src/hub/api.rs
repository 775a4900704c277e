//! The operator Sessions API (seed 000's routes and shapes, plus cursors,
//! sorting and filters from seeds 001 and 002), device listings, artifact
//! downloads with Range, and `/metrics`.
//!
//! Invariant: every handler here checks an operator key of the path's
//! organization before touching the store, and the JSON shapes defined
//! here are the only ones the operator API emits (exports and streams
//! reuse [`LogItem`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use super::auth;
use super::error::ApiError;
use super::store::{
    ArtifactRow, LogQuery, LogRow, LogScope, SessionCursor, SessionQuery, SessionRow, SessionSort,
};
use super::Hub;
use crate::wire::{Level, SessionStatus};

/// Most items one page may hold (seed 001).
pub const MAX_LIMIT: u64 = 500;
pub const DEFAULT_LIMIT: u64 = 100;

type Hs = State<Arc<Hub>>;

/// Query parameters as pairs, so repeated keys (`tag=a&tag=b`) survive and
/// every value error is ours to word.
pub type Params = Query<Vec<(String, String)>>;

pub fn param<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

// ----- time -----

/// `2025-01-10T10:23:45.123Z`.
pub fn rfc3339(ns: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(ns as i128)
        .ok()
        .and_then(|t| t.format(crate::console::view::MILLIS).ok())
        .unwrap_or_else(|| ns.to_string())
}

/// RFC 3339 / ISO 8601 (`2025-01-01T00:00:00Z`), or a date alone.
pub fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(t) = time::OffsetDateTime::parse(v, &Rfc3339) {
        return Ok(t.unix_timestamp_nanos() as i64);
    }
    let date_fmt = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = time::Date::parse(v, date_fmt) {
        return Ok(d.midnight().assume_utc().unix_timestamp_nanos() as i64);
    }
    Err(ApiError::bad_request(format!(
        "{name}: expected an RFC 3339 time like 2025-01-10T08:00:00Z, found {v:?}"
    )))
}

fn parse_u64(name: &str, v: &str) -> Result<u64, ApiError> {
    v.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{name}: expected a non-negative integer, found {v:?}"
        ))
    })
}

fn parse_bool(name: &str, v: &str) -> Result<bool, ApiError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(ApiError::bad_request(format!(
            "{name}: expected true or false, found {v:?}"
        ))),
    }
}

fn limit_of(p: &[(String, String)], names: &[&str]) -> Result<u64, ApiError> {
    for name in names {
        if let Some(v) = param(p, name) {
            let n = parse_u64(name, v)?;
            if n == 0 || n > MAX_LIMIT {
                return Err(ApiError::bad_request(format!(
                    "{name}: must be between 1 and {MAX_LIMIT}, found {n}"
                )));
            }
            return Ok(n);
        }
    }
    Ok(DEFAULT_LIMIT)
}

// ----- JSON shapes -----

#[derive(Debug, Serialize)]
pub struct LogItem<'a> {
    pub seq: u64,
    pub session_id: Option<&'a str>,
    pub device_id: &'a str,
    pub timestamp: String,
    pub level: Level,
    pub module: &'a str,
    pub message: &'a str,
    pub metadata: serde_json::Value,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub process: Option<&'a str>,
}

pub fn log_item(r: &LogRow) -> LogItem<'_> {
    LogItem {
        seq: r.seq,
        session_id: r.session_id.as_deref(),
        device_id: &r.device_id,
        timestamp: rfc3339(r.timestamp_ns),
        level: r.level,
        module: &r.module,
        message: &r.message,
        metadata: metadata_value(&r.metadata),
        pid: r.pid,
        uid: r.uid,
        gid: r.gid,
        process: r.process.as_deref(),
    }
}

/// Metadata text as JSON; empty is `{}`, and text that is not JSON (which
/// ingest refuses, but old rows could hold) is kept as a string.
pub fn metadata_value(text: &str) -> serde_json::Value {
    if text.is_empty() {
        return serde_json::Value::Object(Default::default());
    }
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_owned()))
}

#[derive(Debug, Serialize)]
struct Package {
    /// `name@version`: stable across sessions of the same build.
    id: String,
    name: String,
    version: Option<String>,
}

#[derive(Debug, Serialize)]
struct Gap {
    level: Level,
    reason: String,
    dropped: u64,
}

#[derive(Debug, Serialize)]
struct Metrics {
    log_count: u64,
    artifact_count: u64,
    artifact_size_bytes: u64,
    /// Stored records per level (lower-case names).
    levels: BTreeMap<&'static str, u64>,
    /// Records the device dropped, per level (all reasons).
    dropped: BTreeMap<&'static str, u64>,
    gaps: Vec<Gap>,
}

#[derive(Debug, Serialize)]
struct Session {
    id: String,
    device_id: String,
    device_name: String,
    status: String,
    started_at: String,
    ended_at: Option<String>,
    duration_seconds: Option<f64>,
    tags: Vec<String>,
    artifact_count: u64,
    log_count: u64,
    has_errors: bool,
    package: Option<Package>,
    metadata: serde_json::Value,
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    metrics: Option<Metrics>,
    /// Seed 002's `session.timeline` (README "Session timeline"): one
    /// session's answer only, lists leave it out (two more queries per
    /// session).
    #[serde(skip_serializing_if = "Option::is_none")]
    timeline: Option<serde_json::Value>,
}

fn session_json(s: SessionRow, with_metrics: bool) -> Session {
    let log_count = s.level_counts.iter().sum();
    let metrics = with_metrics.then(|| {
        let mut dropped = BTreeMap::new();
        for g in &s.gaps {
            *dropped.entry(g.level.as_str()).or_default() += g.dropped;
        }
        Metrics {
            log_count,
            artifact_count: s.artifact_count,
            artifact_size_bytes: s.artifact_bytes,
            levels: Level::ALL
                .iter()
                .map(|l| (l.as_str(), s.level_counts[l.code() as usize]))
                .collect(),
            dropped,
            gaps: s
                .gaps
                .iter()
                .map(|g| Gap {
                    level: g.level,
                    reason: g.reason.clone(),
                    dropped: g.dropped,
                })
                .collect(),
        }
    });
    Session {
        has_errors: s.level_counts[Level::Error.code() as usize]
            + s.level_counts[Level::Fatal.code() as usize]
            > 0,
        package: s.package_name.map(|name| Package {
            id: match &s.package_version {
                Some(v) => format!("{name}@{v}"),
                None => name.clone(),
            },
            name,
            version: s.package_version,
        }),
        id: s.id,
        device_id: s.device_id,
        device_name: s.device_name,
        status: s.status,
        started_at: rfc3339(s.started_at_ns),
        ended_at: s.ended_at_ns.map(rfc3339),
        duration_seconds: s.duration_ns.map(|d| (d as f64 / 1e6).round() / 1e3),
        tags: s.tags,
        artifact_count: s.artifact_count,
        log_count,
        metadata: metadata_value(&s.metadata),
        error: s.error,
        metrics,
        timeline: None,
    }
}

/// One session as `GET /sessions/{id}` answers it: with metrics and its
/// timeline tree.
async fn full_session_json(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    row: SessionRow,
) -> Result<Session, ApiError> {
    let tree = super::timeline::of_session(hub, org, project, &row).await?;
    let mut session = session_json(row, true);
    session.timeline = Some(tree.to_json());
    Ok(session)
}

#[derive(Debug, Serialize)]
struct Artifact {
    path: String,
    size_bytes: u64,
    content_type: String,
    sha256: String,
    created_at: String,
}

fn artifact_json(a: ArtifactRow) -> Artifact {
    Artifact {
        path: a.path,
        size_bytes: a.size,
        content_type: a.content_type,
        sha256: a.sha256,
        created_at: rfc3339(a.created_at_ns),
    }
}

#[derive(Debug, Serialize)]
struct Device {
    device_id: String,
    name: String,
    last_seen_at: String,
    /// Hub clock minus device clock at the last batch, in milliseconds.
    clock_skew_ms: i64,
    /// What its agent last reported (README "Devices"); null until an
    /// agent that sends batch v4 or later has synced.
    agent: Option<AgentJson>,
}

/// A device's latest agent report, as `GET …/devices` shows it.
#[derive(Debug, Serialize)]
struct AgentJson {
    version: String,
    buffer_bytes: u64,
    buffer_max_bytes: u64,
    /// Records dropped since the agent started, by reason.
    dropped: std::collections::BTreeMap<String, u64>,
    reported_at: String,
}

#[derive(Debug, Deserialize)]
struct TagBody {
    tag: String,
}

// ----- helpers -----

/// The 404 of every route naming a session the project does not have.
fn no_session(id: &str) -> ApiError {
    ApiError::not_found(format!("no session {id}"))
}

/// The row id of a device of the project, or 404.
pub async fn device_pk(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    device_id: &str,
) -> Result<i64, ApiError> {
    hub.store
        .find_device(org, project, device_id)
        .await?
        .map(|d| d.pk)
        .ok_or_else(|| ApiError::not_found(format!("no device {device_id}")))
}

/// The row id of a session the operator may see, or 404.
pub async fn session_pk(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
) -> Result<i64, ApiError> {
    hub.store
        .find_session(org, project, id)
        .await?
        .ok_or_else(|| no_session(id))
}

/// The session as the API shows it, with metrics, or 404.
async fn session_row(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
) -> Result<SessionRow, ApiError> {
    hub.store
        .get_session(org, project, id)
        .await?
        .ok_or_else(|| no_session(id))
}

/// The logs route's filters from `p`, leaving out its `limit` (exports
/// and live streams page on their own).
pub fn log_filters(p: &[(String, String)]) -> Result<LogQuery, ApiError> {
    let without_limit: Vec<(String, String)> =
        p.iter().filter(|(k, _)| k != "limit").cloned().collect();
    log_query(&without_limit)
}

/// Log filters shared by the logs route, exports and live streams.
pub fn log_query(p: &[(String, String)]) -> Result<LogQuery, ApiError> {
    let min_level = param(p, "level")
        .map(|v| {
            Level::parse(v).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "level: unknown level {v:?} (expected trace, debug, info, warn, error or fatal)"
                ))
            })
        })
        .transpose()?;
    let since_ns = param(p, "since")
        .map(|v| parse_time("since", v))
        .transpose()?;
    let until_ns = param(p, "until")
        .map(|v| parse_time("until", v))
        .transpose()?;
    let before = param(p, "before")
        .map(|v| parse_u64("before", v))
        .transpose()?;
    let after = param(p, "after")
        .map(|v| parse_u64("after", v))
        .transpose()?;
    let ascending = match (param(p, "order"), after) {
        (Some("asc"), _) | (None, Some(_)) => true,
        (Some("desc") | None, None) => false,
        (Some("desc"), Some(_)) => {
            return Err(ApiError::bad_request("after: only with order=asc"));
        }
        (Some(o), _) => {
            return Err(ApiError::bad_request(format!(
                "order: expected asc or desc, found {o:?}"
            )))
        }
    };
    if before.is_some() && after.is_some() {
        return Err(ApiError::bad_request("give before or after, not both"));
    }
    if let Some(search) = param(p, "search") {
        if search.len() > 1024 {
            return Err(ApiError::bad_request("search: longer than 1024 bytes"));
        }
    }
    Ok(LogQuery {
        min_level,
        module: param(p, "module").map(str::to_owned),
        search: param(p, "search").map(str::to_owned),
        since_ns,
        until_ns,
        limit: limit_of(p, &["limit"])?,
        ascending,
        cursor: if ascending { after.or(before) } else { before },
        want_total: true,
    })
}

/// The session list's filters, sort and page (the console's sessions
/// screen parses its form with this too).
pub fn session_query(p: &[(String, String)]) -> Result<SessionQuery, ApiError> {
    let status = param(p, "status")
        .map(|v| {
            SessionStatus::parse(v)
                .map(|s| s.as_str().to_owned())
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "status: expected active, completed or failed, found {v:?}"
                    ))
                })
        })
        .transpose()?;
    let sort = match param(p, "sort") {
        None | Some("started_at") => SessionSort::StartedAt,
        Some("ended_at") => SessionSort::EndedAt,
        Some("duration") => SessionSort::Duration,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "sort: expected started_at, ended_at or duration, found {o:?}"
            )))
        }
    };
    let descending = match param(p, "direction") {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "direction: expected asc or desc, found {o:?}"
            )))
        }
    };
    let limit = limit_of(p, &["page_size", "limit"])?;
    let page = param(p, "page")
        .map(|v| parse_u64("page", v))
        .transpose()?
        .unwrap_or(1);
    if page == 0 {
        return Err(ApiError::bad_request("page: pages start at 1"));
    }
    // The rows skipped, bounded by what a store's OFFSET takes (i64).
    let offset = (page - 1)
        .checked_mul(limit)
        .filter(|o| i64::try_from(*o).is_ok())
        .ok_or_else(|| ApiError::bad_request(format!("page: {page} is past any list")))?;
    let cursor = param(p, "before")
        .map(|v| {
            if let Some((value, pk)) = v
                .split_once(':')
                .and_then(|(a, b)| Some((a.parse::<i64>().ok()?, b.parse::<i64>().ok()?)))
            {
                return Ok(SessionCursor { value, pk });
            }
            // Seed 001: a plain time means "strictly before/after it".
            let value = parse_time("before", v)?;
            Ok::<_, ApiError>(SessionCursor {
                value,
                pk: if descending { i64::MIN } else { i64::MAX },
            })
        })
        .transpose()?;
    let tags = p
        .iter()
        .filter(|(k, _)| k == "tag")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    let (package_name, package_version) = match param(p, "package") {
        Some(v) => match v.split_once('@') {
            Some((n, ver)) => (Some(n.to_owned()), Some(ver.to_owned())),
            None => (Some(v.to_owned()), None),
        },
        None => (None, None),
    };
    let metadata = match param(p, "metadata") {
        Some(v) => match serde_json::from_str::<serde_json::Value>(v) {
            Ok(serde_json::Value::Object(m)) => {
                if let Some(k) = m.keys().find(|k| k.contains('"') || k.contains('\\')) {
                    return Err(ApiError::bad_request(format!(
                        "metadata: key {k:?} may not contain quotes or backslashes"
                    )));
                }
                m.into_iter().collect()
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "metadata: expected a JSON object like {{\"site\":\"berlin\"}}, found {v:?}"
                )))
            }
        },
        None => Vec::new(),
    };
    Ok(SessionQuery {
        device_id: param(p, "device_id").map(str::to_owned),
        status,
        since_ns: param(p, "since")
            .map(|v| parse_time("since", v))
            .transpose()?,
        until_ns: param(p, "until")
            .map(|v| parse_time("until", v))
            .transpose()?,
        tags,
        package_name,
        package_version,
        mark: param(p, "mark").map(str::to_owned),
        has_errors: param(p, "has_errors")
            .map(|v| parse_bool("has_errors", v))
            .transpose()?,
        metadata,
        search: param(p, "search")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned),
        sort,
        descending,
        limit,
        offset,
        cursor,
    })
}

fn logs_response(page: super::store::LogPage) -> Response {
    let items: Vec<LogItem> = page.items.iter().map(log_item).collect();
    Json(serde_json::json!({
        "items": items,
        "total": page.total,
        "next_cursor": page.next_cursor.map(|c| c.to_string()),
    }))
    .into_response()
}

/// A tag as given, trimmed, or why it cannot be one (the API's tag route
/// and the console's).
pub fn clean_tag(tag: &str) -> Result<String, ApiError> {
    let tag = tag.trim();
    if tag.is_empty() || tag.len() > 128 || tag.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "tag: must be 1 to 128 bytes without control characters",
        ));
    }
    Ok(tag.to_owned())
}

// ----- handlers -----

pub async fn list_sessions(
    State(hub): Hs,
    Path((org, project)): Path<(String, String)>,
    Query(p): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let q = session_query(&p)?;
    let page_no = q.offset / q.limit + 1;
    let limit = q.limit;
    let has_cursor = q.cursor.is_some();
    let page = hub.store.list_sessions(&org, &project, &q).await?;
    let items: Vec<Session> = page
        .items
        .into_iter()
        .map(|s| session_json(s, false))
        .collect();
    Ok(Json(serde_json::json!({
        "items": items,
        "total": page.total,
        "page": if has_cursor { serde_json::Value::Null } else { page_no.into() },
        "page_size": limit,
        "next_cursor": page.next_cursor.map(|c| format!("{}:{}", c.value, c.pk)),
    }))
    .into_response())
}

pub async fn get_session(
    State(hub): Hs,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let row = session_row(&hub, &org, &project, &id).await?;
    Ok(Json(full_session_json(&hub, &org, &project, row).await?).into_response())
}

pub async fn delete_session(
    State(hub): Hs,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let deleted = hub
        .store
        .delete_session(&org, &project, &id)
        .await?
        .ok_or_else(|| no_session(&id))?;
    // The rows are gone; the files follow. A file that cannot be removed
    // is logged, not an error: nothing refers to it any more.
    for blob in &deleted.blobs {
        if let Err(e) = hub.blobs.remove(blob).await {
            tracing::warn!(blob = %blob, error = %e, "cannot remove deleted session's file");
        }
    }
    for upload in &deleted.uploads {
        if let Err(e) = hub.blobs.remove_part(upload).await {
            tracing::warn!(upload = %upload, error = %e, "cannot remove deleted session's file");
        }
    }
    tracing::info!(session = %id, "session deleted");
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub async fn add_tag(
    State(hub): Hs,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let bytes = read_body(body, 64 << 10).await?;
    let TagBody { tag } = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::bad_request(format!(
            "expected a JSON body like {{\"tag\": \"important\"}}: {e}"
        ))
    })?;
    let tag = clean_tag(&tag)?;
    if !hub.store.add_tag(&org, &project, &id, &tag).await? {
        return Err(no_session(&id));
    }
    let row = session_row(&hub, &org, &project, &id).await?;
    Ok(Json(full_session_json(&hub, &org, &project, row).await?).into_response())
}

pub async fn remove_tag(
    State(hub): Hs,
    Path((org, project, id, tag)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    match hub.store.remove_tag(&org, &project, &id, &tag).await? {
        None => Err(no_session(&id)),
        Some(false) => Err(ApiError::not_found(format!(
            "session {id} has no tag {tag:?}"
        ))),
        Some(true) => Ok(StatusCode::NO_CONTENT.into_response()),
    }
}

pub async fn session_logs(
    State(hub): Hs,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let mut q = log_query(&p)?;
    let pk = session_pk(&hub, &org, &project, &id).await?;
    if let Some(name) = param(&p, "mark") {
        // Narrowed to the window of the session's last mark of that name.
        let (since, until) = super::marks::window(&hub, &org, &project, pk, name).await?;
        q.since_ns = Some(q.since_ns.map_or(since, |s| s.max(since)));
        q.until_ns = Some(q.until_ns.map_or(until, |u| u.min(until)));
    }
    let page = hub.store.logs(LogScope::Session(pk), &q).await?;
    Ok(logs_response(page))
}

pub async fn device_logs(
    State(hub): Hs,
    Path((org, project, device_id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let q = log_query(&p)?;
    let device = device_pk(&hub, &org, &project, &device_id).await?;
    let page = hub.store.logs(LogScope::Device(device), &q).await?;
    Ok(logs_response(page))
}

/// The organization's projects this key reads: all of them for an
/// organization-wide key, its own for a project-scoped one.
pub async fn list_projects(
    State(hub): Hs,
    Path(org): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = auth::operator_of_org(&hub, &headers, &org).await?;
    let items: Vec<serde_json::Value> = hub
        .store
        .list_projects(&org)
        .await?
        .into_iter()
        .filter(|name| key.reads(&org, name))
        .map(|name| serde_json::json!({ "name": name }))
        .collect();
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

pub async fn list_devices(
    State(hub): Hs,
    Path((org, project)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let rows = hub.store.list_devices(&org, &project).await?;
    let items: Vec<Device> = rows
        .into_iter()
        .map(|d| Device {
            device_id: d.device_id,
            name: d.name,
            last_seen_at: rfc3339(d.last_seen_ns),
            clock_skew_ms: d.skew_ns / 1_000_000,
            agent: d.report.map(|r| AgentJson {
                version: r.agent.version,
                buffer_bytes: r.agent.buffer_bytes,
                buffer_max_bytes: r.agent.buffer_max_bytes,
                dropped: r.agent.dropped.into_iter().collect(),
                reported_at: rfc3339(r.reported_at_ns),
            }),
        })
        .collect();
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

pub async fn list_files(
    State(hub): Hs,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let pk = session_pk(&hub, &org, &project, &id).await?;
    let rows = hub.store.list_artifacts(pk).await?;
    let items: Vec<Artifact> = rows.into_iter().map(artifact_json).collect();
    Ok(Json(serde_json::json!({ "items": items })).into_response())
}

/// Parses a single `Range: bytes=…` against a file of `size` bytes:
/// `Ok(None)` for no (or an ignorable multi-) range, `Err` when
/// unsatisfiable.
pub fn parse_range(value: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        // Multipart ranges are optional (RFC 9110): send the whole file.
        return Ok(None);
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (a, b) = (a.trim(), b.trim());
    let range = if a.is_empty() {
        let n: u64 = b.parse().map_err(|_| ())?;
        if n == 0 || size == 0 {
            return Err(());
        }
        (size.saturating_sub(n), size - 1)
    } else {
        let start: u64 = a.parse().map_err(|_| ())?;
        let end: u64 = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            b.parse::<u64>()
                .map_err(|_| ())?
                .min(size.saturating_sub(1))
        };
        if start >= size || end < start {
            return Err(());
        }
        (start, end)
    };
    Ok(Some(range))
}

/// The fuzz entry point of the hub's query and header decoding (fuzz
/// target `query`): `data` as a request's query string through the
/// filters of the logs and sessions routes (as axum's `Query` hands them
/// over), each value as a tag and a time, and as a `Range` header. Never
/// panics; a refusal is a 400 with a one-line message; a range is inside
/// the file.
pub fn fuzz_one(data: &[u8]) {
    let refused = |e: ApiError| {
        assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
        assert!(!e.message.contains('\n'), "{:?}", e.message);
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(uri) = format!("/?{text}").parse::<axum::http::Uri>() {
        if let Ok(Query(p)) = Params::try_from_uri(&uri) {
            let p: Vec<(String, String)> = p;
            for out in [log_query(&p).err(), log_filters(&p).err()] {
                out.map(refused);
            }
            if let Err(e) = session_query(&p) {
                refused(e);
            }
            // Values only: the routes name the parameters they parse.
            for (_, v) in &p {
                clean_tag(v).err().map(refused);
                parse_time("since", v).err().map(refused);
            }
        }
    }
    for size in [0, 1, 1000, u64::MAX] {
        if let Ok(Some((a, b))) = parse_range(text, size) {
            assert!(a <= b && b < size, "{text:?} of {size}: {a}-{b}");
        }
    }
}

pub async fn download_file(
    State(hub): Hs,
    Path((org, project, id, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    send_file(&hub, &org, &project, &id, path, &headers).await
}

/// An artifact of a session the caller may see, honouring `Range` (the
/// API's download route and the console's).
pub async fn send_file(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
    path: String,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let pk = session_pk(hub, org, project, id).await?;
    let art = hub
        .store
        .get_artifact(pk, &path)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("session {id} has no artifact {path:?}")))?;
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(v) => parse_range(v, art.size).map_err(|()| {
            ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("range {v:?} is outside the artifact's {} bytes", art.size),
            )
        })?,
        None => None,
    };
    let (status, start, len) = match range {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b - a + 1),
        None => (StatusCode::OK, 0, art.size),
    };
    let stream = hub
        .blobs
        .read_range(&art.blob, start, len)
        .await
        .map_err(|e| {
            tracing::error!(blob = %art.blob, error = %e, "artifact blob missing");
            ApiError::internal("artifact file is missing on the hub")
        })?;
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    let ct = HeaderValue::from_str(&art.content_type)
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_TYPE, ct);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    // The type comes from a device: a browser must not run what it names
    // (an uploaded .html) with the hub's origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", art.sha256)) {
        h.insert(header::ETAG, v);
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let v = format!("bytes {}-{}/{}", start, start + len - 1, art.size);
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::from_str(&v).expect("ascii"),
        );
    }
    Ok(resp)
}

/// `/metrics` needs an operator key (of any organization): counters are
/// hub-wide and say nothing about one organization's data.
pub async fn metrics(State(hub): Hs, headers: HeaderMap) -> Result<Response, ApiError> {
    let p = auth::authenticate(&hub, &headers, None).await?;
    if p.kind != super::store::TokenKind::Operator {
        return Err(ApiError::forbidden("metrics need an operator key"));
    }
    Ok((
        [(header::CONTENT_TYPE, crate::prom::CONTENT_TYPE)],
        hub.metrics.render(),
    )
        .into_response())
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such route")
}

/// Reads a whole (small) request body, refusing more than `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(format!(
            "request body is larger than {limit} bytes"
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read request body: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_ranges_mutated_never_panic() {
        let samples: &[&[u8]] = &[
            b"level=warn&module=nav&q=stall&after=5&limit=100&session=01930000-0000-7000-8000-000000000000",
            b"status=failed&tag=a&tag=b&device=robot-1&since=2026-12-01T00:00:00Z&until=1700000000&sort=-started_at&cursor=abc",
            b"from=2026-12-01T00:00:00.5%2B01:00&to=now&has_errors=true&min_duration=5s",
            b"bytes=0-99",
            b"bytes=-5",
        ];
        let mut rng = crate::test_rng::Rng::new(0x9e7);
        for _ in 0..20_000 {
            let s = samples[rng.below(samples.len())];
            fuzz_one(&crate::test_rng::mutate(&mut rng, s));
        }
        // What the fuzzer found: a page whose offset overflowed.
        fuzz_one(b"page=08111111111111111111");
        fuzz_one(b"page=18446744073709551615&limit=500");
        let p = |q: &str| -> Vec<(String, String)> {
            let uri: axum::http::Uri = format!("/?{q}").parse().unwrap();
            Params::try_from_uri(&uri).unwrap().0
        };
        let e = session_query(&p("page=08111111111111111111"))
            .err()
            .unwrap();
        assert_eq!(e.message, "page: 8111111111111111111 is past any list");
        assert_eq!(session_query(&p("page=3&page_size=10")).unwrap().offset, 20);
    }

    #[test]
    fn ranges() {
        let check = |v: &str, size: u64, want: Result<Option<(u64, u64)>, ()>| {
            assert_eq!(parse_range(v, size), want, "{v}");
        };
        check("bytes=0-99", 1000, Ok(Some((0, 99))));
        check("bytes=100-", 1000, Ok(Some((100, 999))));
        check("bytes=-10", 1000, Ok(Some((990, 999))));
        check("bytes=990-5000", 1000, Ok(Some((990, 999))));
        check("bytes=1000-", 1000, Err(()));
        check("bytes=5-4", 1000, Err(()));
        check("bytes=0-1,5-6", 1000, Ok(None));
        check("items=0-1", 1000, Ok(None));
        check("bytes=x-1", 1000, Err(()));
    }

    #[test]
    fn times() {
        assert_eq!(
            rfc3339(1_736_504_625_123_000_000),
            "2025-01-10T10:23:45.123Z"
        );
        assert_eq!(
            parse_time("since", "2025-01-10T10:23:45.123Z").unwrap(),
            1_736_504_625_123_000_000
        );
        assert_eq!(
            parse_time("since", "2025-01-01").unwrap(),
            1_735_689_600_000_000_000
        );
        assert!(parse_time("since", "yesterday").is_err());
    }

    fn pairs(q: &str) -> Vec<(String, String)> {
        q.split('&')
            .filter(|s| !s.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// (min level, ascending, cursor, limit) of a parsed query.
    type Parsed = (Option<Level>, bool, Option<u64>, u64);

    #[test]
    fn log_filters() {
        let check = |q: &str, want: Result<Parsed, &str>| {
            let got = log_query(&pairs(q))
                .map(|q| (q.min_level, q.ascending, q.cursor, q.limit))
                .map_err(|e| e.message);
            assert_eq!(got, want.map_err(str::to_owned), "{q}");
        };
        check("", Ok((None, false, None, 100)));
        check(
            "level=error&limit=50",
            Ok((Some(Level::Error), false, None, 50)),
        );
        check("level=WARNING", Ok((Some(Level::Warn), false, None, 100)));
        check("before=10", Ok((None, false, Some(10), 100)));
        check("after=10", Ok((None, true, Some(10), 100)));
        check("order=asc", Ok((None, true, None, 100)));
        check(
            "limit=501",
            Err("limit: must be between 1 and 500, found 501"),
        );
        check(
            "level=loud",
            Err(
                "level: unknown level \"loud\" (expected trace, debug, info, warn, error or fatal)",
            ),
        );
        check("order=up", Err("order: expected asc or desc, found \"up\""));
    }

    #[test]
    fn session_filters() {
        let q = session_query(&pairs(
            "status=completed&tag=a,b&tag=c&package=perception@2.1.0&has_errors=true&page=3&page_size=10&sort=duration&direction=asc",
        ))
        .unwrap();
        assert_eq!(q.status.as_deref(), Some("completed"));
        assert_eq!(q.tags, vec!["a", "b", "c"]);
        assert_eq!(q.package_name.as_deref(), Some("perception"));
        assert_eq!(q.package_version.as_deref(), Some("2.1.0"));
        assert_eq!(q.has_errors, Some(true));
        assert_eq!((q.offset, q.limit), (20, 10));
        assert_eq!((q.sort, q.descending), (SessionSort::Duration, false));
        let q = session_query(&pairs("before=2025-01-01T00:00:00Z")).unwrap();
        assert_eq!(
            q.cursor,
            Some(SessionCursor {
                value: 1_735_689_600_000_000_000,
                pk: i64::MIN
            })
        );
        assert!(session_query(&pairs("status=done")).is_err());
        assert!(session_query(&pairs("metadata=[1]")).is_err());
        assert!(session_query(&pairs("page=0")).is_err());
    }
}
