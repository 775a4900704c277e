//! Marks at the hub (README "Marks"): a session's marks, marks of a name
//! across the project's sessions, a session's marks as Foxglove events, and
//! the window a log query narrows to with `?mark=NAME`.
//!
//! Invariant: the same operator check as the session routes before any
//! store call; every list is bounded by `limit` (at most 1000).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::api::{param, parse_time, rfc3339, session_pk, Params};
use super::auth;
use super::error::ApiError;
use super::store::{MarkQuery, MarkRow};
use super::Hub;

/// Most marks a session holds on the device (`agent::marks`), so an
/// export or a window lookup reads every one.
const MAX_PER_SESSION: u64 = 10_000;
/// Most marks one answer holds.
const MAX_LIMIT: u64 = 1000;

fn limit(p: &[(String, String)]) -> Result<u64, ApiError> {
    match param(p, "limit") {
        None => Ok(MAX_LIMIT),
        Some(v) => v
            .parse::<u64>()
            .ok()
            .filter(|n| *n > 0)
            .map(|n| n.min(MAX_LIMIT))
            .ok_or_else(|| {
                ApiError::bad_request(format!("limit: expected a positive number, found {v:?}"))
            }),
    }
}

fn metadata(m: &MarkRow) -> Map<String, Value> {
    serde_json::from_str(&m.metadata).unwrap_or_default()
}

/// A mark as the API shows it.
pub fn mark_json(m: &MarkRow) -> Value {
    json!({
        "session_id": m.session_id,
        "device_id": m.device_id,
        "id": m.mark_id,
        "name": m.name,
        "timestamp": rfc3339(m.timestamp_ns),
        "start": rfc3339(m.timestamp_ns - m.before_ns),
        "end": rfc3339(m.timestamp_ns + m.after_ns),
        "before_seconds": m.before_ns as f64 / 1e9,
        "after_seconds": m.after_ns as f64 / 1e9,
        "priority": m.priority,
        "metadata": metadata(m),
        "released": m.released,
    })
}

fn query(p: &[(String, String)], session_pk: Option<i64>) -> Result<MarkQuery, ApiError> {
    Ok(MarkQuery {
        session_pk,
        name: param(p, "name").map(str::to_owned),
        since_ns: param(p, "since")
            .map(|v| parse_time("since", v))
            .transpose()?,
        until_ns: param(p, "until")
            .map(|v| parse_time("until", v))
            .transpose()?,
        limit: limit(p)?,
    })
}

/// `GET /sessions/{id}/marks`: the session's marks, oldest first (`name`,
/// `since`, `until`, `limit`).
pub async fn session_marks(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let pk = session_pk(&hub, &org, &project, &id).await?;
    let rows = hub
        .store
        .list_marks(&org, &project, &query(&p, Some(pk))?)
        .await?;
    let items: Vec<Value> = rows.iter().map(mark_json).collect();
    Ok(Json(json!({ "items": items })).into_response())
}

/// `GET /marks`: marks across the project's sessions, oldest first
/// (`name`, `since`, `until`, `limit`).
pub async fn project_marks(
    State(hub): State<Arc<Hub>>,
    Path((org, project)): Path<(String, String)>,
    Query(p): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let rows = hub
        .store
        .list_marks(&org, &project, &query(&p, None)?)
        .await?;
    let items: Vec<Value> = rows.iter().map(mark_json).collect();
    Ok(Json(json!({ "items": items })).into_response())
}

/// `GET /sessions/{id}/marks/export`: the session's marks as Foxglove
/// events (`name`, `start`, `end` in RFC 3339, `metadata` as text values),
/// to open beside the session's MCAP files.
pub async fn export_marks(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    let pk = session_pk(&hub, &org, &project, &id).await?;
    let q = MarkQuery {
        session_pk: Some(pk),
        limit: MAX_PER_SESSION,
        ..Default::default()
    };
    let rows = hub.store.list_marks(&org, &project, &q).await?;
    let events: Vec<Value> = rows
        .iter()
        .map(|m| {
            let mut meta: Map<String, Value> = metadata(m)
                .into_iter()
                .map(|(k, v)| {
                    let text = match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, Value::String(text))
                })
                .collect();
            meta.insert("priority".into(), Value::String(m.priority.clone()));
            meta.insert("device_id".into(), Value::String(m.device_id.clone()));
            json!({
                "name": m.name,
                "start": rfc3339(m.timestamp_ns - m.before_ns),
                "end": rfc3339(m.timestamp_ns + m.after_ns),
                "timestamp": rfc3339(m.timestamp_ns),
                "metadata": meta,
            })
        })
        .collect();
    Ok(Json(json!({ "session_id": id, "events": events })).into_response())
}

/// The window of the last mark named `name` in session `pk`, for a log
/// query's `?mark=NAME`: (since, until) with `until` exclusive.
pub async fn window(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    pk: i64,
    name: &str,
) -> Result<(i64, i64), ApiError> {
    let q = MarkQuery {
        session_pk: Some(pk),
        name: Some(name.to_owned()),
        limit: MAX_PER_SESSION,
        ..Default::default()
    };
    let rows = hub.store.list_marks(org, project, &q).await?;
    let m = rows
        .last()
        .ok_or_else(|| ApiError::not_found(format!("no mark named {name:?} in this session")))?;
    Ok((
        m.timestamp_ns - m.before_ns,
        m.timestamp_ns + m.after_ns + 1,
    ))
}
