//! What every screen's template shares: the page layout (asset URLs, the
//! signed-in operator's navigation), URL building with escaping, and the
//! human forms of times, durations and sizes.
//!
//! Invariant: every value put into a URL goes through [`enc`] or [`qs`];
//! values put into HTML are escaped by the templates, never here.

use super::super::api::rfc3339;
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

/// Percent-encodes everything but RFC 3986's unreserved characters, so
/// the text is safe as a path segment or a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Like [`enc`] but keeping `/`, for artifact paths.
pub fn enc_path(s: &str) -> String {
    s.split('/').map(enc).collect::<Vec<_>>().join("/")
}

/// A query string (`?a=1&b=2`, or empty) of the non-empty pairs.
pub fn qs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let parts: Vec<String> = pairs
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| format!("{}={}", enc(k), enc(v)))
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

/// The last value of query parameter `name`, or "".
pub fn value<'a>(p: &'a [(String, String)], name: &str) -> &'a str {
    p.iter()
        .rev()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

/// One `<option>` of a select.
pub struct Opt {
    pub value: String,
    pub label: String,
    pub selected: bool,
}

/// The options `(value, label)` of a select, the one equal to `current`
/// selected.
pub fn options(current: &str, choices: &[(&str, &str)]) -> Vec<Opt> {
    choices
        .iter()
        .map(|(v, l)| Opt {
            value: (*v).to_owned(),
            label: (*l).to_owned(),
            selected: *v == current,
        })
        .collect()
}

/// A time for people: `2025-01-10 10:23:45.123Z`.
pub fn time(ns: i64) -> String {
    rfc3339(ns).replacen('T', " ", 1)
}

/// `2h 05m 03s`, `4.2s`, `120ms`.
pub fn duration(ns: i64) -> String {
    let ms = ns / 1_000_000;
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let s = ms / 1_000;
    if s < 60 {
        return format!("{:.1}s", ms as f64 / 1_000.0);
    }
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}h {m:02}m {s:02}s")
    } else {
        format!("{m}m {s:02}s")
    }
}

/// `532 B`, `1.5 KiB`, `3.0 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_urls() {
        assert_eq!(enc("a b/c?d&e=\"<"), "a%20b%2Fc%3Fd%26e%3D%22%3C");
        assert_eq!(enc_path("logs/a b.txt"), "logs/a%20b.txt");
        assert_eq!(qs([("tag", "a&b"), ("status", "")]), "?tag=a%26b");
        assert_eq!(qs([("x", "")]), "");
        assert_eq!(project_base("ac me", "w/h"), "/o/ac%20me/w%2Fh");
    }

    #[test]
    fn human_forms() {
        let check = |ns: i64, want: &str| assert_eq!(duration(ns), want);
        check(120_000_000, "120ms");
        check(4_200_000_000, "4.2s");
        check(125_000_000_000, "2m 05s");
        check(9000 * 1_000_000_000, "2h 30m 00s");
        assert_eq!(bytes(532), "532 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(time(1_736_504_625_123_000_000), "2025-01-10 10:23:45.123Z");
    }
}
