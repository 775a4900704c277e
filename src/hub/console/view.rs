//! What every screen's template shares: the page layout (asset URLs, the
//! signed-in operator's navigation), project URLs, and (from
//! [`crate::console::view`], which the agent's console shares) URL
//! building with escaping and the human forms of times, durations and
//! sizes.
//!
//! Invariant: every value put into a URL goes through [`enc`] or [`qs`];
//! values put into HTML are escaped by the templates, never here.

pub use crate::console::view::{bytes, duration, enc, enc_path, options, qs, time, value, Opt};

use super::super::store::Principal;
use super::assets;
use super::signins::Operator;

/// The signed-in operator's navigation bar.
pub struct Nav {
    pub org: String,
    /// Empty on the organization's projects page.
    pub project: String,
    /// `/o/{org}/{project}`, escaped.
    pub base: String,
    /// `/o/{org}` (the projects page) for a key that reads every project
    /// of the organization; `None` for a project-scoped key.
    pub projects: Option<String>,
    pub csrf: String,
}

/// The parts of `base.html` every page fills.
pub struct Layout {
    pub css: String,
    pub htmx: String,
    pub js: String,
    /// The timeline's chart library (on every page: boosted navigation
    /// swaps the body only, so a page cannot add scripts of its own).
    pub uplot_js: String,
    pub uplot_css: String,
    pub nav: Option<Nav>,
}

impl Layout {
    pub fn signed_out() -> Layout {
        Layout {
            css: assets::url("console.css"),
            htmx: assets::url("htmx.min.js"),
            js: assets::url("console.js"),
            uplot_js: assets::url("uPlot.iife.min.js"),
            uplot_css: assets::url("uPlot.min.css"),
            nav: None,
        }
    }

    /// The layout of a page of project `project` for `op` (`""`: the
    /// organization's projects page).
    pub fn signed_in(op: &Operator, project: &str) -> Layout {
        let org = &op.principal.org;
        Layout {
            nav: Some(Nav {
                org: org.clone(),
                project: project.to_owned(),
                base: project_base(org, project),
                projects: op.principal.all_projects.then(|| org_base(org)),
                csrf: op.csrf.clone(),
            }),
            ..Layout::signed_out()
        }
    }
}

/// `/o/{org}`, escaped: the organization's projects.
pub fn org_base(org: &str) -> String {
    format!("/o/{}", enc(org))
}

/// Where a sign-in lands: its project's sessions for a project-scoped key,
/// the organization's projects for one that reads them all.
pub fn home(p: &Principal) -> String {
    if p.all_projects {
        org_base(&p.org)
    } else {
        format!("{}/sessions", project_base(&p.org, &p.project))
    }
}

/// `/o/{org}/{project}`, each part escaped.
pub fn project_base(org: &str, project: &str) -> String {
    format!("/o/{}/{}", enc(org), enc(project))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_urls_are_escaped() {
        assert_eq!(project_base("ac me", "w/h"), "/o/ac%20me/w%2Fh");
    }
}
