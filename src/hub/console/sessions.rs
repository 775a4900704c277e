//! The sessions screen (`/o/{org}/{project}/sessions`): the API's session
//! filters as a form, sort, cursor pages and the count of matches.
//!
//! Invariant: the form's fields are the API's query parameters, parsed by
//! the API's own `session_query`, so a console URL and an API URL with
//! the same query select the same sessions.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::response::Html;

use super::super::api::{self, Params};
use super::super::store::SessionRow;
use super::errors::ConsoleError;
use super::signins::Operator;
use super::view::{self, enc, options, qs, value, Layout, Opt};
use super::{data, Console};
use crate::wire::Level;

/// The filter fields, echoed into the form and into page links.
const FIELDS: [&str; 12] = [
    "search",
    "device_id",
    "status",
    "has_errors",
    "tag",
    "package",
    "metadata",
    "since",
    "until",
    "sort",
    "direction",
    "page_size",
];

pub struct Line {
    pub href: String,
    pub id: String,
    pub device: String,
    pub status: String,
    pub started: String,
    pub duration: String,
    pub logs: u64,
    pub errors: u64,
    pub tags: Vec<String>,
}

#[derive(Template)]
#[template(path = "sessions.html")]
pub struct SessionsPage {
    pub layout: Layout,
    pub action: String,
    pub search: String,
    pub tag: String,
    pub package: String,
    pub metadata: String,
    pub since: String,
    pub until: String,
    pub devices: Vec<Opt>,
    pub statuses: Vec<Opt>,
    pub errors: Vec<Opt>,
    pub sorts: Vec<Opt>,
    pub directions: Vec<Opt>,
    pub lines: Vec<Line>,
    pub total: u64,
    /// The next page (older, or onward in the chosen order).
    pub next: Option<String>,
    /// The first page, when this is not it.
    pub first: Option<String>,
    /// Where the first page reloads its rows from every few seconds, so
    /// new sessions appear and running ones' counts move (later pages
    /// stay still: rows shifting under a reader's cursor would lose it).
    pub refresh: Option<String>,
}

pub fn line(base: &str, s: SessionRow) -> Line {
    let errors =
        s.level_counts[Level::Error.code() as usize] + s.level_counts[Level::Fatal.code() as usize];
    Line {
        href: format!("{base}/sessions/{}", enc(&s.id)),
        device: if s.device_name.is_empty() || s.device_name == s.device_id {
            s.device_id
        } else {
            format!("{} ({})", s.device_name, s.device_id)
        },
        status: s.status,
        started: view::time(s.started_at_ns),
        duration: s.duration_ns.map(view::duration).unwrap_or_default(),
        logs: s.level_counts.iter().sum(),
        errors,
        tags: s.tags,
        id: s.id,
    }
}

pub async fn page(
    State(c): State<Arc<Console>>,
    op: Operator,
    Path((org, project)): Path<(String, String)>,
    Query(p): Params,
) -> Result<Html<String>, ConsoleError> {
    let q = api::session_query(&p)?;
    let first_page = q.cursor.is_none() && q.offset == 0;
    let (page, devices) = tokio::try_join!(
        data::sessions(&c.hub, &org, &project, q),
        data::devices(&c.hub, &org, &project)
    )?;
    let base = view::project_base(&org, &project);
    let action = format!("{base}/sessions");
    let filters: Vec<(&str, &str)> = FIELDS.iter().map(|f| (*f, value(&p, f))).collect();
    let next = page.next_cursor.map(|cur| {
        let cursor = format!("{}:{}", cur.value, cur.pk);
        let mut pairs = filters.clone();
        pairs.push(("before", &cursor));
        format!("{action}{}", qs(pairs))
    });
    let this = format!("{action}{}", qs(filters.iter().copied()));
    let refresh = first_page.then(|| this.clone());
    let first = (!first_page).then_some(this);
    let device_id = value(&p, "device_id");
    let mut device_opts = vec![Opt {
        value: String::new(),
        label: "any device".into(),
        selected: device_id.is_empty(),
    }];
    device_opts.extend(devices.into_iter().map(|d| Opt {
        selected: d.device_id == device_id,
        label: if d.name.is_empty() || d.name == d.device_id {
            d.device_id.clone()
        } else {
            format!("{} ({})", d.name, d.device_id)
        },
        value: d.device_id,
    }));
    let html = SessionsPage {
        layout: Layout::signed_in(&op, &project),
        search: value(&p, "search").to_owned(),
        tag: value(&p, "tag").to_owned(),
        package: value(&p, "package").to_owned(),
        metadata: value(&p, "metadata").to_owned(),
        since: value(&p, "since").to_owned(),
        until: value(&p, "until").to_owned(),
        devices: device_opts,
        statuses: options(
            value(&p, "status"),
            &[
                ("", "any status"),
                ("active", "active"),
                ("completed", "completed"),
                ("failed", "failed"),
            ],
        ),
        errors: options(
            value(&p, "has_errors"),
            &[
                ("", "errors or not"),
                ("true", "has errors"),
                ("false", "no errors"),
            ],
        ),
        sorts: options(
            value(&p, "sort"),
            &[
                ("started_at", "start"),
                ("duration", "duration"),
                ("ended_at", "end"),
            ],
        ),
        directions: options(
            value(&p, "direction"),
            &[
                ("desc", "newest / longest first"),
                ("asc", "oldest / shortest first"),
            ],
        ),
        lines: page.items.into_iter().map(|s| line(&base, s)).collect(),
        total: page.total,
        next,
        first,
        refresh,
        action,
    }
    .render()?;
    Ok(Html(html))
}
