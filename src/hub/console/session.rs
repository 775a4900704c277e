//! The session screen (`…/sessions/{id}`): state, timing, tags (add and
//! remove), metadata, the agent's gaps, level counts and artifacts with
//! their downloads (one file, or all as a ZIP) and upload state: complete,
//! or in progress with the share of bytes the hub holds. The artifacts
//! card is its own fragment (`…/artifacts`), which htmx polls while any
//! upload is in progress.
//!
//! Invariant: tag changes are POSTs that pass [`csrf::check`] first;
//! downloads go through the API's own `send_file` and `zip`, so Range,
//! ETag and the `sandbox` policy are the API's; at most
//! [`data::MAX_UPLOADS_SHOWN`] uploads in progress are read per render.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Form, Path, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::Json;

use super::super::store::{ArtifactRow, Histogram, UploadRow};
use super::super::{api, export};
use super::errors::ConsoleError;
use super::signins::Operator;
use super::view::{self, enc, enc_path, value, Layout};
use super::{csrf, data, Console};
use crate::wire::Level;

pub struct Artifact {
    pub href: String,
    pub path: String,
    pub size: String,
    pub content_type: String,
    pub sha256: String,
    pub created: String,
}

/// An upload in progress (a tus upload whose offset is below its length).
pub struct UploadLine {
    pub path: String,
    pub size: String,
    pub received: String,
    /// Share of the bytes the hub holds, 0-100; `None` when the blob
    /// store could not say.
    pub percent: Option<u64>,
    pub content_type: String,
    pub sha256: String,
    pub started: String,
}

/// Seconds between polls of the artifacts card while uploads run.
pub const POLL_SECS: u32 = 2;

/// The artifacts card: the session page embeds it, and `…/artifacts`
/// serves it alone for htmx to swap in while uploads are in progress.
#[derive(Template)]
#[template(path = "session_artifacts.html")]
pub struct ArtifactsCard {
    pub href: String,
    pub artifacts: Vec<Artifact>,
    pub artifact_bytes: String,
    pub uploads: Vec<UploadLine>,
    /// Poll again: some upload is still in progress.
    pub polling: bool,
    pub poll_secs: u32,
}

impl ArtifactsCard {
    /// The card from a session's complete artifacts (and their total
    /// bytes) and its uploads with the offsets the blobs hold.
    pub fn new(
        href: String,
        artifacts: Vec<ArtifactRow>,
        artifact_bytes: u64,
        uploads: Vec<(UploadRow, Option<u64>)>,
    ) -> ArtifactsCard {
        let uploads: Vec<UploadLine> = uploads
            .into_iter()
            .map(|(u, offset)| UploadLine {
                size: view::bytes(u.length),
                received: view::bytes(offset.unwrap_or(0).min(u.length)),
                percent: offset.map(|o| percent(o, u.length)),
                content_type: u.content_type,
                sha256: u.sha256,
                started: view::time(u.created_at_ns),
                path: u.path,
            })
            .collect();
        ArtifactsCard {
            artifacts: artifacts
                .into_iter()
                .map(|a| Artifact {
                    href: format!("{href}/files/{}", enc_path(&a.path)),
                    size: view::bytes(a.size),
                    content_type: a.content_type,
                    sha256: a.sha256,
                    created: view::time(a.created_at_ns),
                    path: a.path,
                })
                .collect(),
            artifact_bytes: view::bytes(artifact_bytes),
            polling: !uploads.is_empty(),
            uploads,
            poll_secs: POLL_SECS,
            href,
        }
    }
}

/// `offset` of `length` in whole percent, rounded down (99 until the last
/// byte arrived), 100 for an empty file.
pub fn percent(offset: u64, length: u64) -> u64 {
    if length == 0 {
        return 100;
    }
    (u128::from(offset.min(length)) * 100 / u128::from(length)) as u64
}

pub struct GapLine {
    pub level: &'static str,
    pub reason: String,
    pub dropped: u64,
}

#[derive(Template)]
#[template(path = "session.html")]
pub struct SessionPage {
    pub layout: Layout,
    pub csrf: String,
    pub id: String,
    pub href: String,
    pub device: String,
    pub status: String,
    pub started: String,
    pub ended: Option<String>,
    pub duration: Option<String>,
    /// The device's clock skew at its last batch, when known.
    pub skew: Option<String>,
    pub package: Option<String>,
    pub error: Option<String>,
    pub tags: Vec<String>,
    pub metadata: Vec<(String, String)>,
    /// `(level, count, link to the logs at or above it)`.
    pub levels: Vec<(&'static str, u64, String)>,
    pub log_count: u64,
    pub gaps: Vec<GapLine>,
    pub files: ArtifactsCard,
}

fn metadata_pairs(text: &str) -> Vec<(String, String)> {
    match api::metadata_value(text) {
        serde_json::Value::Object(m) => m
            .into_iter()
            .map(|(k, v)| match v {
                serde_json::Value::String(s) => (k, s),
                other => (k, other.to_string()),
            })
            .collect(),
        other => vec![(String::new(), other.to_string())],
    }
}

pub async fn page(
    State(c): State<Arc<Console>>,
    op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
) -> Result<Html<String>, ConsoleError> {
    let s = data::session(&c.hub, &org, &project, &id)
        .await?
        .ok_or_else(|| ConsoleError::not_found(format!("no session {id}")))?;
    let (artifacts, uploads, device) = tokio::try_join!(
        data::artifacts(&c.hub, s.pk),
        data::uploads(&c.hub, s.pk),
        data::device(&c.hub, &org, &project, &s.device_id)
    )?;
    let href = format!(
        "{}/sessions/{}",
        view::project_base(&org, &project),
        enc(&s.id)
    );
    let html = SessionPage {
        layout: Layout::signed_in(&op, &project),
        csrf: op.csrf.clone(),
        device: if s.device_name.is_empty() || s.device_name == s.device_id {
            s.device_id.clone()
        } else {
            format!("{} ({})", s.device_name, s.device_id)
        },
        status: s.status.clone(),
        started: view::time(s.started_at_ns),
        ended: s.ended_at_ns.map(view::time),
        duration: s.duration_ns.map(view::duration),
        skew: device.map(|d| {
            let sign = if d.skew_ns < 0 { "-" } else { "+" };
            format!("{sign}{}", view::duration(d.skew_ns.abs()))
        }),
        package: s.package_name.as_ref().map(|n| match &s.package_version {
            Some(v) => format!("{n}@{v}"),
            None => n.clone(),
        }),
        error: s.error.clone(),
        tags: s.tags.clone(),
        metadata: metadata_pairs(&s.metadata),
        levels: Level::ALL
            .iter()
            .map(|l| {
                (
                    l.as_str(),
                    s.level_counts[l.code() as usize],
                    format!("{href}/logs?level={}", l.as_str()),
                )
            })
            .collect(),
        log_count: s.level_counts.iter().sum(),
        gaps: s
            .gaps
            .iter()
            .map(|g| GapLine {
                level: g.level.as_str(),
                reason: g.reason.clone(),
                dropped: g.dropped,
            })
            .collect(),
        files: ArtifactsCard::new(href.clone(), artifacts, s.artifact_bytes, uploads),
        id: s.id,
        href,
    }
    .render()?;
    Ok(Html(html))
}

/// The artifacts card alone (`…/artifacts`), for htmx to poll while
/// uploads are in progress.
pub async fn artifacts(
    State(c): State<Arc<Console>>,
    _op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
) -> Result<Html<String>, ConsoleError> {
    let s = data::session(&c.hub, &org, &project, &id)
        .await?
        .ok_or_else(|| ConsoleError::not_found(format!("no session {id}")))?;
    let (artifacts, uploads) =
        tokio::try_join!(data::artifacts(&c.hub, s.pk), data::uploads(&c.hub, s.pk))?;
    let href = format!(
        "{}/sessions/{}",
        view::project_base(&org, &project),
        enc(&s.id)
    );
    let html = ArtifactsCard::new(href, artifacts, s.artifact_bytes, uploads).render()?;
    Ok(Html(html))
}

/// Back to the session screen after a change.
fn back(org: &str, project: &str, id: &str) -> Response {
    Redirect::to(&format!(
        "{}/sessions/{}",
        view::project_base(org, project),
        enc(id)
    ))
    .into_response()
}

pub async fn add_tag(
    State(c): State<Arc<Console>>,
    op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, ConsoleError> {
    csrf::check(&headers, &form, &op.csrf)?;
    let tag = api::clean_tag(value(&form, "tag"))?;
    if !data::add_tag(&c.hub, &org, &project, &id, tag).await? {
        return Err(ConsoleError::not_found(format!("no session {id}")));
    }
    Ok(back(&org, &project, &id))
}

pub async fn remove_tag(
    State(c): State<Arc<Console>>,
    op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, ConsoleError> {
    csrf::check(&headers, &form, &op.csrf)?;
    let tag = value(&form, "tag").to_owned();
    match data::remove_tag(&c.hub, &org, &project, &id, tag).await? {
        None => Err(ConsoleError::not_found(format!("no session {id}"))),
        // Already gone (a second click): the screen shows the truth.
        Some(_) => Ok(back(&org, &project, &id)),
    }
}

pub async fn file(
    State(c): State<Arc<Console>>,
    _op: Operator,
    Path((org, project, id, path)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ConsoleError> {
    Ok(api::send_file(&c.hub, &org, &project, &id, path, &headers).await?)
}

pub async fn zip(
    State(c): State<Arc<Console>>,
    _op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
) -> Result<Response, ConsoleError> {
    Ok(export::zip(&c.hub, &org, &project, &id).await?)
}

/// Slices of the timeline chart.
const TIMELINE_BUCKETS: u32 = 60;

/// The timeline's data: records per level per slice of the session's time
/// (start to end, or to now while it runs), for `console.js` to draw.
pub async fn timeline(
    State(c): State<Arc<Console>>,
    _op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
) -> Result<Response, ConsoleError> {
    let s = data::session(&c.hub, &org, &project, &id)
        .await?
        .ok_or_else(|| ConsoleError::not_found(format!("no session {id}")))?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64;
    let from = s.started_at_ns;
    let to = s.ended_at_ns.unwrap_or(now).max(from + 1_000_000_000);
    let slices = Histogram::new(from, to, TIMELINE_BUCKETS);
    let counts = data::level_histogram(&c.hub, s.pk, slices).await?;
    let step = slices.step();
    let series: Vec<serde_json::Value> = Level::ALL
        .iter()
        .map(|l| {
            serde_json::json!({
                "level": l.as_str(),
                "counts": counts.iter().map(|c| c[l.code() as usize]).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "start_ns": from,
        "step_ns": step,
        "buckets": TIMELINE_BUCKETS,
        "series": series,
    }))
    .into_response())
}
