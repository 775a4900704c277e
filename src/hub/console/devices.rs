//! The devices screen (`/o/{org}/{project}/devices`): each device with its
//! last batch, clock skew, running session and a link to its sessions.
//!
//! Invariant: two store reads whatever the fleet's size (the devices, and
//! one page of active sessions); agent version, buffer fill and drops are
//! not shown because the batch does not carry them yet.

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Html;

use super::super::api::MAX_LIMIT;
use super::super::store::SessionQuery;
use super::errors::ConsoleError;
use super::signins::Operator;
use super::view::{self, enc, Layout};
use super::{data, Console};

pub struct DeviceLine {
    pub id: String,
    pub name: String,
    pub last_seen: String,
    pub skew: String,
    pub sessions_href: String,
    /// `(id, link)` of its running session.
    pub active: Option<(String, String)>,
}

#[derive(Template)]
#[template(path = "devices.html")]
pub struct DevicesPage {
    pub layout: Layout,
    pub devices: Vec<DeviceLine>,
}

pub async fn page(
    State(c): State<Arc<Console>>,
    op: Operator,
    Path((org, project)): Path<(String, String)>,
) -> Result<Html<String>, ConsoleError> {
    let active = SessionQuery {
        status: Some("active".into()),
        limit: MAX_LIMIT,
        descending: true,
        ..SessionQuery::default()
    };
    let (devices, running) = tokio::try_join!(
        data::devices(&c.hub, &org, &project),
        data::sessions(&c.hub, &org, &project, active)
    )?;
    let base = view::project_base(&org, &project);
    // Newest first: the first one seen per device is its current session.
    let mut current: HashMap<String, String> = HashMap::new();
    for s in running.items {
        current.entry(s.device_id).or_insert(s.id);
    }
    let devices = devices
        .into_iter()
        .map(|d| DeviceLine {
            sessions_href: format!("{base}/sessions?device_id={}", enc(&d.device_id)),
            active: current
                .get(&d.device_id)
                .map(|id| (id.clone(), format!("{base}/sessions/{}", enc(id)))),
            last_seen: view::time(d.last_seen_ns),
            skew: format!(
                "{}{}",
                if d.skew_ns < 0 { "-" } else { "+" },
                view::duration(d.skew_ns.abs())
            ),
            name: d.name,
            id: d.device_id,
        })
        .collect();
    let html = DevicesPage {
        layout: Layout::signed_in(&op, &project),
        devices,
    }
    .render()?;
    Ok(Html(html))
}
