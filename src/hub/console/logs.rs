//! The log viewer (`…/sessions/{id}/logs`): minimum-level chips, module,
//! full-text search with the matches marked, time range, one page at a
//! time (never the whole session), a permalink per line, and exports of
//! what is filtered.
//!
//! Invariant: filters are the API's logs-route parameters parsed by the
//! API's `log_query`; a message reaches the page only as
//! [`crate::console::view::Part`]s the template escapes, so log text can
//! never become markup.

use std::sync::Arc;

use askama::Template;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, Response};

use super::super::api::{self, Params};
use super::super::store::LogRow;
use super::super::{export, stream};
use super::errors::ConsoleError;
use super::signins::Operator;
use super::view::{self, enc, qs, value, Layout};
use super::{csrf, data, Console};
use crate::console::view::{level_chips, terms, Chip, Line, Record};

/// Filter fields echoed into links (paging keeps them).
const FIELDS: [&str; 6] = ["level", "module", "search", "since", "until", "limit"];

#[derive(Template)]
#[template(path = "logs.html")]
pub struct LogsPage<'a> {
    pub layout: Layout,
    pub id: String,
    pub session_href: String,
    pub action: String,
    pub level: String,
    pub module: String,
    pub search: String,
    pub since: String,
    pub until: String,
    pub chips: Vec<Chip>,
    pub lines: Vec<Line<'a>>,
    pub total: u64,
    pub older: Option<String>,
    pub newest: Option<String>,
    pub export_json: String,
    pub export_csv: String,
    /// The live stream's URL (with the filters), on the newest page only.
    pub live: Option<String>,
}

pub fn line<'a>(r: &'a LogRow, logs_href: &str, terms: &[String]) -> Line<'a> {
    Line::new(
        Record {
            seq: r.seq,
            time: view::time(r.timestamp_ns),
            level: r.level,
            module: &r.module,
            message: &r.message,
            metadata: std::borrow::Cow::Borrowed(&r.metadata),
            process: r.process.as_deref(),
            pid: r.pid,
        },
        logs_href,
        terms,
    )
}

pub async fn page(
    State(c): State<Arc<Console>>,
    op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
) -> Result<Html<String>, ConsoleError> {
    let q = api::log_query(&p)?;
    let ascending = q.ascending;
    let page = data::logs(&c.hub, &org, &project, &id, q).await?;
    let session_href = format!(
        "{}/sessions/{}",
        view::project_base(&org, &project),
        enc(&id)
    );
    let action = format!("{session_href}/logs");
    let filters: Vec<(&str, &str)> = FIELDS.iter().map(|f| (*f, value(&p, f))).collect();
    let keep = |extra: &[(&'static str, &str)]| {
        let mut pairs: Vec<(&str, &str)> = filters.clone();
        if ascending {
            pairs.push(("order", "asc"));
        }
        pairs.extend_from_slice(extra);
        qs(pairs)
    };
    let older = page.next_cursor.map(|cur| {
        let cur = cur.to_string();
        format!(
            "{action}{}",
            keep(&[(if ascending { "after" } else { "before" }, &cur)])
        )
    });
    let paged = ["before", "after"].iter().any(|k| !value(&p, k).is_empty());
    let newest = paged.then(|| format!("{action}{}", qs(filters.iter().copied())));
    let chips = level_chips(&action, &filters, value(&p, "level"));
    let export_base = format!("{action}/export");
    let with_format = |f: &'static str| {
        let mut pairs = no_limit(&filters);
        pairs.push(("format", f));
        format!("{export_base}{}", qs(pairs))
    };
    let search = value(&p, "search");
    let t = terms(search);
    let html = LogsPage {
        layout: Layout::signed_in(&op, &project),
        id: id.clone(),
        level: value(&p, "level").to_owned(),
        module: value(&p, "module").to_owned(),
        search: search.to_owned(),
        since: value(&p, "since").to_owned(),
        until: value(&p, "until").to_owned(),
        chips,
        lines: page.items.iter().map(|r| line(r, &action, &t)).collect(),
        total: page.total.unwrap_or(0),
        older,
        newest,
        live: (!paged && !ascending).then(|| {
            let pairs: Vec<(&str, &str)> = ["level", "module", "search"]
                .iter()
                .map(|f| (*f, value(&p, f)))
                .collect();
            format!("{action}/live{}", qs(pairs))
        }),
        export_json: with_format("json"),
        export_csv: with_format("csv"),
        session_href,
        action,
    }
    .render()?;
    Ok(Html(html))
}

fn no_limit<'a>(filters: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    filters
        .iter()
        .copied()
        .filter(|(k, _)| *k != "limit")
        .collect()
}

/// The API's export of the filtered logs, JSON or CSV.
pub async fn export(
    State(c): State<Arc<Console>>,
    _op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
) -> Result<Response, ConsoleError> {
    Ok(export::export(&c.hub, &org, &project, &id, &p).await?)
}

/// The session's live logs over WebSocket (the API's stream), for the
/// viewer's "follow" button. A browser always sends `Origin` with a
/// WebSocket handshake: one from another site is refused.
pub async fn live(
    State(c): State<Arc<Console>>,
    _op: Operator,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ConsoleError> {
    csrf::same_origin(&headers)?;
    Ok(stream::session_stream(c.hub.clone(), &org, &project, &id, &p, ws).await?)
}
