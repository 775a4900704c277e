//! Listing, filtering, showing and tagging sessions, paging logs, and
//! listing and downloading artifacts at a hub with `logbook --hub`.

use logbook::wire::{Device, Level, SessionStatus};

use super::*;
use crate::hub::{batch, record, session_id, state};
use crate::util::TestDir;

/// Session 1 (completed, tags field+night): seqs 1..=1200, every 100th an
/// error, modules alternating `nav`/`perception`. Session 2 (active, tag
/// field): seqs 1201..=1210; then 1211..=1213 outside sessions. Session 3
/// on robot-2 (failed).
async fn fill(hub: &HubProc) {
    let (s1, s2, s3) = (session_id(1), session_id(2), session_id(3));
    let recs: Vec<_> = (1..=1200u64)
        .map(|i| {
            let (level, module) = match (i % 100, i % 2) {
                (0, _) => (Level::Error, "nav"),
                (_, 0) => (Level::Info, "nav"),
                _ => (Level::Debug, "perception"),
            };
            record(i, Some(s1), level, module, &format!("step {i}"))
        })
        .chain((1201..=1210u64).map(|i| record(i, Some(s2), Level::Warn, "arm", "grip")))
        .chain((1211..=1213u64).map(|i| record(i, None, Level::Info, "dock", "idle")))
        .collect();
    let (status, body) = hub
        .post_batch(&batch(
            vec![
                state(s1, 2, SessionStatus::Completed, &["field", "night"]),
                state(s2, 1, SessionStatus::Active, &["field"]),
            ],
            recs,
            vec![],
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let robot2 = hub.token(ORG, PROJECT, Some("robot-2"));
    let mut b = batch(
        vec![state(s3, 2, SessionStatus::Failed, &[])],
        vec![record(1, Some(s3), Level::Fatal, "main", "boom")],
        vec![],
    );
    b.device = Device {
        id: "robot-2".into(),
        name: "second".into(),
    };
    let (status, body) = hub.post_body(&b.encode(1), &robot2).await;
    assert_eq!(status, 200, "{body}");
}

fn seqs(lines: &[Value]) -> Vec<u64> {
    lines.iter().map(|v| v["seq"].as_u64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_logs_against_a_hub() {
    let hub = HubProc::start("cli_query");
    fill(&hub).await;
    let (s1, s2, s3) = (session_id(1), session_id(2), session_id(3));

    // The list: one line per session, the columns of the local listing.
    let text = ok(cli(&hub), &["sessions"]);
    assert_eq!(text.lines().count(), 3, "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with(&s1.to_string()))
        .unwrap();
    assert!(
        line.contains("completed") && line.contains("field,night") && line.contains("robot-1"),
        "{line}"
    );

    // Filters, alone and together, and --limit.
    let ids = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["sessions", "--json"];
        a.extend_from_slice(args);
        json_lines(&ok(cli(&hub), &a))
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids(&["--status", "active"]), vec![s2.to_string()]);
    assert_eq!(ids(&["--device", "robot-2"]), vec![s3.to_string()]);
    let mut field = ids(&["--tag", "field"]);
    field.sort();
    assert_eq!(field, vec![s1.to_string(), s2.to_string()]);
    assert_eq!(
        ids(&["--tag", "field", "--tag", "night"]),
        vec![s1.to_string()]
    );
    assert_eq!(
        ids(&["--tag", "field", "--status", "completed"]),
        vec![s1.to_string()]
    );
    assert_eq!(ids(&["--limit", "2"]).len(), 2);
    assert!(ids(&["--tag", "nowhere"]).is_empty());

    // --json: the hub's session objects, one per line.
    let all = json_lines(&ok(cli(&hub), &["sessions", "--json"]));
    for key in [
        "id",
        "device_id",
        "status",
        "started_at",
        "tags",
        "log_count",
        "package",
    ] {
        assert!(all[0].get(key).is_some(), "{key} in {}", all[0]);
    }

    // One session, as text and JSON, by `status ID` and `show ID`.
    let shown = ok(cli(&hub), &["session", "show", &s1.to_string()]);
    assert!(shown.contains(&format!("session   {s1}")), "{shown}");
    assert!(shown.contains("status    completed"), "{shown}");
    assert!(shown.contains("logs      1200 (with errors)"), "{shown}");
    assert!(shown.contains("package   perception@2.1.0"), "{shown}");
    let v: Value = serde_json::from_str(&ok(
        cli(&hub),
        &["session", "status", &s2.to_string(), "--json"],
    ))
    .unwrap();
    assert_eq!(v["status"], "active");
    assert_eq!(v["log_count"], 10);

    // Tagging at the hub.
    let tagged = ok(cli(&hub), &["session", "tag", &s2.to_string(), "reviewed"]);
    assert_eq!(tagged.trim(), format!("{s2} tags: field, reviewed"));
    assert_eq!(ids(&["--tag", "reviewed"]), vec![s2.to_string()]);

    // Every record, paging through three pages of 500, oldest first.
    let s1s = s1.to_string();
    let lines = json_lines(&ok(cli(&hub), &["logs", "--session", &s1s, "--json"]));
    assert_eq!(seqs(&lines), (1..=1200).collect::<Vec<_>>());
    for key in [
        "seq",
        "session_id",
        "device_id",
        "timestamp",
        "level",
        "module",
        "message",
        "metadata",
        "pid",
        "uid",
        "gid",
        "process",
    ] {
        assert!(lines[0].get(key).is_some(), "{key} in {}", lines[0]);
    }
    assert_eq!(lines[0]["metadata"], serde_json::json!({"n": 1}));
    assert_eq!(lines[0]["session_id"], s1s);
    // The same through `session logs`, as text.
    let text = ok(cli(&hub), &["session", "logs", "--session", &s1s]);
    assert_eq!(text.lines().count(), 1200);
    let first = text.lines().next().unwrap();
    assert!(
        first.starts_with(
            "2025-01-10T08:00:01.000Z DEBUG perception: step 1 {\"n\":1} [perceptiond 4242]"
        ),
        "{first}"
    );

    // Filters; --limit is the newest N, printed oldest first.
    let errors = json_lines(&ok(
        cli(&hub),
        &["logs", "--session", &s1s, "--level", "error", "--json"],
    ));
    assert_eq!(seqs(&errors), (1..=12).map(|i| i * 100).collect::<Vec<_>>());
    let tail = json_lines(&ok(
        cli(&hub),
        &["logs", "--session", &s1s, "--limit", "700", "--json"],
    ));
    assert_eq!(seqs(&tail), (501..=1200).collect::<Vec<_>>());
    let nav = json_lines(&ok(
        cli(&hub),
        &[
            "logs",
            "--session",
            &s1s,
            "--module",
            "perception",
            "--search",
            "step 11",
            "--json",
        ],
    ));
    // A device's logs outside sessions.
    let idle = json_lines(&ok(cli(&hub), &["logs", "--device", "robot-1", "--json"]));
    assert_eq!(seqs(&idle), vec![1211, 1212, 1213]);
    assert!(idle[0]["session_id"].is_null(), "{}", idle[0]);
    let last = json_lines(&ok(
        cli(&hub),
        &["logs", "--device", "robot-1", "--limit", "2", "--json"],
    ));
    assert_eq!(seqs(&last), vec![1212, 1213]);
    assert_eq!(ok(cli(&hub), &["logs", "--device", "robot-2"]), "");

    // The hub matches search words, not substrings: only "step 11" itself.
    assert_eq!(seqs(&nav), vec![11]);
    let window = json_lines(&ok(
        cli(&hub),
        &[
            "logs",
            "--session",
            &s1s,
            "--since",
            "2025-01-10T08:00:10Z",
            "--until",
            "2025-01-10T08:00:20Z",
            "--json",
        ],
    ));
    assert_eq!(seqs(&window), (10..20).collect::<Vec<_>>());
}

/// Uploads `data` as artifact `path` of `session` over tus, as an agent does.
async fn upload(hub: &HubProc, session: uuid::Uuid, path: &str, data: &[u8]) {
    let url = hub.create_upload(session, path, data, None).await;
    let r = hub
        .http
        .patch(url)
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "0")
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_list_and_download_byte_identical() {
    let hub = HubProc::start("cli_artifacts");
    let s = session_id(7);
    let (status, body) = hub
        .post_batch(&batch(
            vec![state(s, 1, SessionStatus::Active, &[])],
            vec![],
            vec![],
        ))
        .await;
    assert_eq!(status, 200, "{body}");
    let data: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    upload(&hub, s, "bags/run 1.bin", &data).await;
    upload(&hub, s, "notes.txt", b"hello\n").await;
    let session = s.to_string();

    let list = ok(cli(&hub), &["artifacts", "--session", &session]);
    let rows: Vec<&str> = list.lines().collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert!(
        rows.iter().any(|r| r
            .trim_start()
            .starts_with("3000000  uploaded    bags/run 1.bin")),
        "{list}"
    );

    let dir = TestDir::new("cli_download");
    // Default file name: the artifact's, in the current directory.
    ok(
        {
            let mut c = cli(&hub);
            c.current_dir(&dir.path);
            c
        },
        &[
            "artifacts",
            "--session",
            &session,
            "--download",
            "bags/run 1.bin",
        ],
    );
    assert!(
        std::fs::read(dir.join("run 1.bin")).unwrap() == data,
        "byte-identical"
    );

    // A partial file is resumed and ends identical; a complete one is kept.
    let download_to = |to: &std::path::Path| {
        let mut c = cli(&hub);
        c.args([
            "artifacts",
            "--session",
            &session,
            "--download",
            "bags/run 1.bin",
            "-o",
        ])
        .arg(to);
        c
    };
    let part = dir.join("part.bin");
    std::fs::write(&part, &data[..1_234_567]).unwrap();
    let out = download_to(&part).output().unwrap();
    assert!(out.status.success());
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(note.contains("resumed at byte 1234567"), "{note}");
    assert!(
        std::fs::read(&part).unwrap() == data,
        "resumed byte-identical"
    );
    let out = download_to(&part).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("already complete"));

    // A stale prefix is caught by the checksum, not kept silently.
    let stale = dir.join("stale.bin");
    std::fs::write(&stale, vec![0u8; 1000]).unwrap();
    let err = fails(download_to(&stale), &[]);
    assert!(
        err.contains("changed at the hub while downloading"),
        "{err}"
    );

    // To stdout.
    let out = ok(
        cli(&hub),
        &[
            "artifacts",
            "--session",
            &session,
            "--download",
            "notes.txt",
            "-o",
            "-",
        ],
    );
    assert_eq!(out, "hello\n");

    let err = fails(
        cli(&hub),
        &["artifacts", "--session", &session, "--download", "nope.txt"],
    );
    assert!(err.contains("has no artifact \"nope.txt\""), "{err}");
}
