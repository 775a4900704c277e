//! Interop: Python's `requests` runs seed 000's code example (only BASE,
//! API_KEY and the example's session id 456 substituted), after the stock
//! tus client `tuspy` uploaded the artifact the example downloads.
//! Needs python3 with `requests` and `tuspy` (installed by `.ci/run`).

use std::process::Command;

use logbook::wire::{Level, SessionStatus};

use super::*;

const EXAMPLE: &str = include_str!("py/seed000_example.py");

/// True when python3 can import `modules`; under CI a missing module
/// fails the test instead of skipping it.
fn python_with(modules: &str) -> bool {
    if !crate::util::interop_client("python3") {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("python3 modules {modules} are not installed; .ci/run must install them");
        }
        eprintln!("SKIPPED: python3 cannot import {modules} (pip install requests tuspy)");
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_000_example_and_tuspy() {
    if !python_with("requests, tusclient") {
        return;
    }
    let hub = HubProc::start("hub_interop_py");
    let s = session_id(456);
    let recs = (1..=120u64)
        .map(|i| {
            let level = if i % 10 == 0 {
                Level::Error
            } else {
                Level::Info
            };
            record(i, Some(s), level, "perception", &format!("frame {i}"))
        })
        .collect();
    let (st, _) = hub
        .post_batch(&batch(
            vec![state(s, 2, SessionStatus::Completed, &["production"])],
            recs,
            vec![],
        ))
        .await;
    assert_eq!(st, 200);

    // tuspy uploads logs/session.log in 64 KiB chunks.
    let artifact: String = (0..6000)
        .map(|i| format!("{i:05} navigation tick ok\n"))
        .collect();
    let file = hub.dir.join("session-upload.log");
    std::fs::write(&file, &artifact).unwrap();
    let py = |script: &str| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/hub/py")
            .join(script)
    };
    let out = crate::util::run_ok(
        Command::new("python3")
            .arg(py("tus_upload.py"))
            .args([&hub.url, &hub.device, &s.to_string()])
            .arg(&file)
            .arg("logs/session.log"),
    );
    let first = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(first.contains("/api/v1/ingest/uploads/"), "{first}");
    // The same file again (a robot that forgot it sent it): tuspy is told
    // at creation that every byte is in, asks the upload it is named, and
    // is done, nothing sent twice.
    let upload_bytes = hub.metric("logbook_hub_upload_bytes_total").await;
    let again = crate::util::run_ok(
        Command::new("python3")
            .arg(py("tus_upload.py"))
            .args([&hub.url, &hub.device, &s.to_string()])
            .arg(&file)
            .arg("logs/session.log"),
    );
    assert_eq!(String::from_utf8_lossy(&again.stdout).trim(), first);
    assert_eq!(
        hub.metric("logbook_hub_upload_bytes_total").await,
        upload_bytes,
        "no byte sent again"
    );

    // Seed 000's example, unchanged but for BASE, API_KEY and the session id.
    let script = EXAMPLE
        .replace("\"rbtk_xxx\"", &format!("{:?}", hub.operator))
        .replace(
            "\"https://api.roboticks.io/api/v1\"",
            &format!("{:?}", format!("{}/api/v1", hub.url)),
        )
        .replace("/sessions/456/", &format!("/sessions/{s}/"));
    assert_ne!(script, EXAMPLE);
    // Let the test see what the example got.
    let script = format!(
        "{script}\nimport json\nprint(json.dumps({{\"sessions\": [s[\"id\"] for s in sessions], \
         \"levels\": sorted(set(l[\"level\"] for l in logs)), \"logs\": len(logs)}}))\n"
    );
    let work = hub.dir.join("example");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("example.py"), script).unwrap();
    let out = crate::util::run_ok(Command::new("python3").arg("example.py").current_dir(&work));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["sessions"], serde_json::json!([s.to_string()]));
    assert_eq!(got["levels"], serde_json::json!(["ERROR"]));
    assert_eq!(got["logs"], 12);
    let downloaded = std::fs::read_to_string(work.join("session.log")).unwrap();
    assert!(
        downloaded == artifact,
        "downloaded session.log differs from the upload"
    );
}
