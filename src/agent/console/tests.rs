//! Unit tests of the agent console's pages: text from robot software is
//! always escaped, links carry the filters, and the Host check.

use askama::Template;

use super::*;
use crate::wire::Level;

fn layout() -> Layout {
    Layout::new("robot <7>")
}

#[test]
fn hosts_that_name_loopback() {
    for ok in [
        "localhost",
        "localhost:8900",
        "LOCALHOST:1",
        "127.0.0.1:8900",
        "127.1.2.3",
        "[::1]:8900",
        "[::1]",
    ] {
        assert!(is_loopback_host(ok), "{ok}");
    }
    for no in [
        "",
        "evil.example:8900",
        "localhost.evil.example",
        "10.0.0.5:8900",
        "[::2]:8900",
        "127.0.0.1.nip.io",
        "0.0.0.0:8900",
    ] {
        assert!(!is_loopback_host(no), "{no}");
    }
}

#[test]
fn a_log_line_with_markup_renders_as_text() {
    let line = Line::new(
        Record {
            seq: 7,
            time: view::time(1_736_496_000_000_000_000),
            level: Level::Error,
            module: "nav<b>",
            message: "<script>alert(1)</script> stalled",
            metadata: r#"{"k":"<i>"}"#.into(),
            process: Some("navd"),
            pid: Some(42),
        },
        "/logs?session=s%201",
        &view::terms("stalled"),
    );
    let html = LogsPage {
        layout: layout(),
        session: Some(("s 1<".into(), "/sessions/s%201%3C".into())),
        action: "/logs",
        reset: "/logs?session=s%201%3C".into(),
        level: "",
        module: "<m>",
        search: "stalled",
        since: "",
        until: "",
        mark: "",
        chips: level_chips("/logs", &[("session", "s 1<")], ""),
        lines: vec![line],
        older: Some("/logs?before=7".into()),
        newest: None,
    }
    .render()
    .unwrap();
    assert!(!html.contains("<script"), "{html}");
    assert!(!html.contains("nav<b>") && !html.contains("<i>") && !html.contains("<m>"));
    assert!(!html.contains("robot <7>"));
    assert!(html.contains("<mark>stalled</mark>"), "{html}");
    assert!(html.contains("id=\"l7\""));
    assert!(
        html.contains("href=\"/logs?session=s%201&#38;before=8#l7\"")
            || html.contains("href=\"/logs?session=s%201&amp;before=8#l7\""),
        "{html}"
    );
    assert!(html.contains("navd[42]"));
}

#[test]
fn session_page_escapes_what_robots_sent() {
    let s = SessionView {
        id: Uuid::nil(),
        device_id: "d".into(),
        device_name: "d".into(),
        status: SessionStatus::Failed,
        started_at: "2025-01-10T10:00:00Z".into(),
        ended_at: Some("2025-01-10T10:02:05Z".into()),
        duration_seconds: 125.0,
        tags: vec!["<b>tag</b>".into()],
        package: None,
        metadata: serde_json::json!({"k": "<img src=x>"})
            .as_object()
            .unwrap()
            .clone(),
        error: Some("<motor> stalled".into()),
        artifact_dir: "/var/lib/logbook/sessions/x".into(),
        log_count: 3,
    };
    let html = SessionPage {
        layout: layout(),
        ended: "e".into(),
        error: s.error.clone().unwrap(),
        metadata: serde_json::to_string_pretty(&s.metadata).unwrap(),
        artifact_dir: s.artifact_dir.clone(),
        logs: "/logs".into(),
        errors: "/logs?level=error".into(),
        gaps: vec![GapLine {
            session: None,
            level: "info",
            reason: "<queue> full".into(),
            dropped: 12,
        }],
        marks: Vec::new(),
        artifacts: vec![artifact_line(&ArtifactItem {
            session_id: Uuid::nil(),
            path: "bags/<x>.mcap".into(),
            size: 1000,
            state: "uploading".into(),
            uploaded_bytes: 250,
            sha256: None,
            error: None,
        })],
        s: session_line(&s),
    }
    .render()
    .unwrap();
    for raw in ["<b>tag", "<img", "<motor>", "<queue>", "<x>"] {
        assert!(!html.contains(raw), "{raw} in {html}");
    }
    assert!(html.contains("2m 05s") && html.contains("(25 %)"), "{html}");
}
