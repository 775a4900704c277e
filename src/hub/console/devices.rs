//! The devices screen (`/o/{org}/{project}/devices`): each device with its
//! last batch, clock skew, running session, what its agent last reported
//! (version, ring buffer fill against its bound, records dropped since it
//! started, by reason: README "Devices") and a link to its sessions.
//!
//! Invariant: two store reads whatever the fleet's size (the devices with
//! their reports, and one page of active sessions).

use std::collections::HashMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Html;

use super::super::api::MAX_LIMIT;
use super::super::store::{DeviceReport, SessionQuery};
use super::errors::ConsoleError;
use super::session::percent;
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
    /// What its agent last reported; `None` for an agent too old to say.
    pub agent: Option<AgentLine>,
}

/// A device's latest agent report, formatted.
pub struct AgentLine {
    pub version: String,
    /// "48.0 MiB of 256.0 MiB".
    pub buffer: String,
    /// Fill in whole percent (0-100).
    pub fill: u64,
    /// `(reason, count)`, by reason.
    pub dropped: Vec<(String, u64)>,
    pub reported: String,
}

impl AgentLine {
    pub fn new(r: DeviceReport) -> AgentLine {
        let a = r.agent;
        AgentLine {
            buffer: format!(
                "{} of {}",
                view::bytes(a.buffer_bytes),
                view::bytes(a.buffer_max_bytes)
            ),
            fill: percent(a.buffer_bytes, a.buffer_max_bytes.max(1)),
            dropped: a.dropped,
            reported: view::time(r.reported_at_ns),
            version: a.version,
        }
    }
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
            agent: d.report.map(AgentLine::new),
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
