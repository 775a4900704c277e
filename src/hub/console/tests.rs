//! Unit tests of the console's templates: what each screen renders from
//! given rows, and that text from devices is always escaped.

use askama::Template;

use super::logs::{self, LogsPage};
use super::session::SessionPage;
use super::view::{Layout, Nav};
use crate::hub::store::LogRow;
use crate::wire::Level;

fn layout() -> Layout {
    Layout {
        nav: Some(Nav {
            org: "acme".into(),
            project: "warehouse".into(),
            base: "/o/acme/warehouse".into(),
            csrf: "TOKEN".into(),
        }),
        ..Layout::signed_out()
    }
}

fn row(seq: u64, message: &str) -> LogRow {
    LogRow {
        id: seq as i64,
        device_pk: 1,
        session_pk: Some(1),
        session_id: Some("s1".into()),
        device_id: "robot-1".into(),
        seq,
        timestamp_ns: 1_736_496_000_000_000_000,
        level: Level::Error,
        module: "nav<b>".into(),
        message: message.into(),
        metadata: r#"{"k":"<i>"}"#.into(),
        pid: Some(42),
        uid: None,
        gid: None,
        process: Some("navd".into()),
    }
}

fn logs_page(rows: &[LogRow], search: &str) -> String {
    let terms: Vec<String> = search
        .split_whitespace()
        .map(str::to_ascii_lowercase)
        .collect();
    LogsPage {
        layout: layout(),
        id: "s1".into(),
        session_href: "/o/acme/warehouse/sessions/s1".into(),
        action: "/o/acme/warehouse/sessions/s1/logs".into(),
        level: String::new(),
        module: String::new(),
        search: search.into(),
        since: String::new(),
        until: String::new(),
        chips: Vec::new(),
        lines: rows
            .iter()
            .map(|r| logs::line(r, "/o/acme/warehouse/sessions/s1/logs", &terms))
            .collect(),
        total: rows.len() as u64,
        older: None,
        newest: None,
        export_json: "/x?format=json".into(),
        export_csv: "/x?format=csv".into(),
        live: None,
    }
    .render()
    .unwrap()
}

#[test]
fn a_log_line_with_markup_renders_as_text() {
    let html = logs_page(&[row(7, "<script>alert(1)</script> & \"quoted\"")], "");
    assert!(!html.contains("<script>alert"), "{html}");
    assert!(
        html.contains("&#60;script&#62;alert(1)&#60;/script&#62;")
            || html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{html}"
    );
    assert!(!html.contains("nav<b>"));
    assert!(!html.contains("\"<i>\""));
    // The only scripts are the embedded files.
    assert_eq!(html.matches("<script").count(), 3);
    assert!(html.contains("id=\"l7\""));
    assert!(html.contains("href=\"/o/acme/warehouse/sessions/s1/logs?before=8#l7\""));
}

#[test]
fn search_matches_are_marked_and_still_escaped() {
    let html = logs_page(&[row(1, "motor <stalled> twice")], "stalled");
    assert!(html.contains("<mark>stalled</mark>"), "{html}");
    assert!(!html.contains("<stalled>"));
    let html = logs_page(&[row(1, "a <script> b")], "script");
    assert!(html.contains("<mark>script</mark>"), "{html}");
    assert!(!html.contains("<script>"), "{html}");
}

#[test]
fn session_page_escapes_tags_and_metadata_and_carries_csrf() {
    let html = SessionPage {
        layout: layout(),
        csrf: "TOKEN".into(),
        id: "s1".into(),
        href: "/o/acme/warehouse/sessions/s1".into(),
        device: "robot-1".into(),
        status: "completed".into(),
        started: "2025-01-10 08:00:00.000Z".into(),
        ended: None,
        duration: Some("1m 00s".into()),
        skew: None,
        package: None,
        error: Some("<img src=x onerror=alert(1)>".into()),
        tags: vec!["\"><script>x</script>".into()],
        metadata: vec![("site".into(), "<b>berlin</b>".into())],
        levels: Vec::new(),
        log_count: 0,
        gaps: Vec::new(),
        artifacts: Vec::new(),
        artifact_bytes: "0 B".into(),
    }
    .render()
    .unwrap();
    assert!(!html.contains("<img"), "{html}");
    assert!(!html.contains("<script>x"), "{html}");
    assert!(!html.contains("<b>berlin"), "{html}");
    // Every form posts its CSRF token: sign-out, add and remove tag.
    assert_eq!(
        html.matches("name=\"csrf\" value=\"TOKEN\"").count(),
        3,
        "{html}"
    );
}
