//! Unit tests of the console's templates: what each screen renders from
//! given rows, and that text from devices is always escaped.

use askama::Template;

use super::devices::{AgentLine, DeviceLine, DevicesPage};
use super::logs::{self, LogsPage};
use super::session::{percent, ArtifactsCard, SessionPage};
use super::view::{Layout, Nav};
use crate::hub::store::LogRow;
use crate::hub::store::{ArtifactRow, DeviceReport, UploadRow};
use crate::wire::AgentReport;
use crate::wire::Level;

fn layout() -> Layout {
    Layout {
        nav: Some(Nav {
            org: "acme".into(),
            project: "warehouse".into(),
            base: "/o/acme/warehouse".into(),
            projects: Some("/o/acme".into()),
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
        files: ArtifactsCard::new(
            "/o/acme/warehouse/sessions/s1".into(),
            Vec::new(),
            0,
            Vec::new(),
        ),
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

fn upload(id: &str, path: &str, length: u64) -> UploadRow {
    UploadRow {
        id: id.into(),
        device_pk: 1,
        session_pk: 1,
        path: path.into(),
        content_type: "video/mp4".into(),
        sha256: "ab".repeat(32),
        length,
        metadata: String::new(),
        created_at_ns: 1_736_496_000_000_000_000,
    }
}

#[test]
fn artifacts_show_upload_state_and_poll_only_while_uploading() {
    let href = "/o/acme/warehouse/sessions/s1";
    let done = ArtifactRow {
        path: "logs/<b>run</b>.txt".into(),
        size: 2048,
        content_type: "text/plain".into(),
        sha256: "cd".repeat(32),
        blob: "blob1".into(),
        created_at_ns: 1_736_496_000_000_000_000,
        upload_id: None,
    };
    let card = ArtifactsCard::new(
        href.into(),
        vec![done.clone()],
        2048,
        vec![
            (upload("u1", "cam/front.mp4", 4 << 20), Some(1 << 20)),
            (upload("u2", "cam/<rear>.mp4", 100), None),
            (upload("u3", "map.bin", 10), Some(10)),
        ],
    )
    .render()
    .unwrap();
    // Polls its own route while anything is in progress.
    assert!(
        card.contains(&format!(
            "hx-get=\"{href}/artifacts\" hx-trigger=\"every 2s\""
        )),
        "{card}"
    );
    assert!(
        card.contains("<progress max=\"100\" value=\"25\""),
        "{card}"
    );
    assert!(card.contains("uploading 25%"), "{card}");
    assert!(card.contains("1.0 MiB of 4.0 MiB"), "{card}");
    assert!(card.contains("offset unknown"), "{card}");
    assert!(card.contains("finishing"), "{card}");
    assert!(card.contains("<td class=\"state\">complete</td>"), "{card}");
    assert!(card.contains("3 uploading"), "{card}");
    // Device-sent paths are text.
    assert!(
        !card.contains("<rear>") && !card.contains("<b>run"),
        "{card}"
    );

    let idle = ArtifactsCard::new(href.into(), vec![done], 2048, Vec::new())
        .render()
        .unwrap();
    assert!(!idle.contains("hx-trigger"), "{idle}");
    assert!(!idle.contains("uploading"), "{idle}");
    assert!(idle.contains("Download all (ZIP)"), "{idle}");
    let empty = ArtifactsCard::new(href.into(), Vec::new(), 0, Vec::new())
        .render()
        .unwrap();
    assert!(empty.contains("No artifacts uploaded."), "{empty}");

    assert_eq!(
        [
            percent(0, 10),
            percent(9, 10),
            percent(10, 10),
            percent(0, 0),
            percent(u64::MAX, u64::MAX)
        ],
        [0, 90, 100, 100, 100]
    );
}

#[test]
fn devices_show_their_agents_report() {
    let line = |id: &str, report: Option<DeviceReport>| DeviceLine {
        id: id.into(),
        name: format!("{id}-name"),
        last_seen: "2025-01-10 08:00:00.000Z".into(),
        skew: "+0ms".into(),
        sessions_href: format!("/o/acme/warehouse/sessions?device_id={id}"),
        active: None,
        agent: report.map(AgentLine::new),
    };
    let html = DevicesPage {
        layout: layout(),
        devices: vec![
            line(
                "robot-1",
                Some(DeviceReport {
                    agent: AgentReport {
                        version: "1.4.0".into(),
                        buffer_bytes: 64 << 20,
                        buffer_max_bytes: 256 << 20,
                        dropped: vec![("<evicted>".into(), 4312), ("bad_json".into(), 2)],
                    },
                    reported_at_ns: 1_736_496_000_000_000_000,
                }),
            ),
            line("robot-2", None),
        ],
    }
    .render()
    .unwrap();
    assert!(html.contains(">1.4.0</td>"), "{html}");
    assert!(html.contains("value=\"25\""), "{html}");
    assert!(html.contains("64.0 MiB of 256.0 MiB"), "{html}");
    assert!(
        html.contains("bad_json: <span class=\"num\">2</span>"),
        "{html}"
    );
    assert!(!html.contains("<evicted>"), "{html}");
    assert!(html.contains("not reported"), "{html}");
}
