//! The organization's projects (`/o/{org}`): where an organization-wide
//! key lands after signing in, and how it moves between projects. A
//! project-scoped key sees its own project only.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::response::Html;

use super::errors::ConsoleError;
use super::signins::Operator;
use super::view::{project_base, Layout};
use super::{data, Console};

#[derive(Template)]
#[template(path = "projects.html")]
pub struct ProjectsPage {
    pub layout: Layout,
    /// `(name, /o/{org}/{project})`.
    pub projects: Vec<(String, String)>,
}

pub async fn page(
    State(c): State<Arc<Console>>,
    op: Operator,
    Path(org): Path<String>,
) -> Result<Html<String>, ConsoleError> {
    let projects = data::projects(&c.hub, &op.principal, &org)
        .await?
        .into_iter()
        .map(|p| {
            let base = project_base(&org, &p);
            (p, base)
        })
        .collect();
    let html = ProjectsPage {
        layout: Layout::signed_in(&op, ""),
        projects,
    }
    .render()?;
    Ok(Html(html))
}
