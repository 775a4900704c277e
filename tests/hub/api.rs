//! Batches in (duplicates, overlaps, gaps, session open/tag/close), read
//! back through every Sessions API route and filter; pagination under
//! concurrent ingest; token CLI; metrics; graceful shutdown.

use std::collections::HashSet;
use std::process::Command;

use logbook::wire::{Gap, Level, SessionStatus};
use serde_json::{json, Value};

use super::*;

fn seqs(v: &Value) -> Vec<u64> {
    v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["seq"].as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_read_back_through_every_route() {
    let hub = HubProc::start("hub_read_back");
    let s1 = session_id(1);
    let s2 = session_id(2);
    let levels = [Level::Debug, Level::Info, Level::Warn, Level::Error];
    let modules = ["nav", "perception", "perception.lidar"];
    let recs: Vec<_> = (1..=40u64)
        .map(|i| {
            record(
                i,
                Some(s1),
                levels[i as usize % 4],
                modules[i as usize % 3],
                &format!("Detected {i} obstacles near dock"),
            )
        })
        .collect();

    // Open s1 with the first half of its records and a gap.
    let (st, ack) = hub
        .post_batch(&batch(
            vec![state(s1, 1, SessionStatus::Active, &["production"])],
            recs[..25].to_vec(),
            vec![Gap {
                session_id: Some(s1),
                level: Level::Debug,
                reason: "evicted".into(),
                dropped: 4000,
            }],
        ))
        .await;
    assert_eq!(st, 200, "{ack}");
    assert_eq!(ack["stored"], 25);
    assert_eq!(ack["acked"], json!([[1, 25]]));
    // The same batch again (a retry) and an overlapping one.
    let (_, again) = hub
        .post_batch(&batch(vec![], recs[..25].to_vec(), vec![]))
        .await;
    assert_eq!(
        (again["stored"].as_u64(), again["duplicates"].as_u64()),
        (Some(0), Some(25))
    );
    let (_, overlap) = hub
        .post_batch(&batch(
            vec![state(
                s1,
                3,
                SessionStatus::Completed,
                &["production", "shift-1"],
            )],
            recs[20..].to_vec(),
            vec![Gap {
                session_id: Some(s1),
                level: Level::Debug,
                reason: "evicted".into(),
                dropped: 4312,
            }],
        ))
        .await;
    assert_eq!(
        (overlap["stored"].as_u64(), overlap["duplicates"].as_u64()),
        (Some(15), Some(5))
    );
    // A stale revision does not reopen the session.
    hub.post_batch(&batch(
        vec![state(s1, 2, SessionStatus::Active, &[])],
        vec![],
        vec![],
    ))
    .await;
    // A second session with one error, and device logs outside sessions.
    let mut s2_state = state(s2, 1, SessionStatus::Failed, &[]);
    s2_state.error = Some("device rebooted".into());
    s2_state.started_at_ns = at(20_000);
    hub.post_batch(&batch(
        vec![s2_state],
        vec![
            record(41, Some(s2), Level::Error, "nav", "motor stalled"),
            record(42, None, Level::Info, "system", "between sessions"),
        ],
        vec![],
    ))
    .await;

    // Session list, filters, sort.
    let (st, list) = hub.get(&hub.api("/sessions")).await;
    assert_eq!(st, 200, "{list}");
    assert_eq!(list["total"], 2);
    assert_eq!(list["page"], 1);
    assert_eq!(list["items"][0]["id"], s2.to_string(), "newest first");
    let ids = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let check = |query: &'static str, want: Vec<Uuid>| {
        let hub = &hub;
        async move {
            let (st, v) = hub.get(&hub.api(&format!("/sessions?{query}"))).await;
            assert_eq!(st, 200, "{query}: {v}");
            let want: Vec<String> = want.iter().map(|u| u.to_string()).collect();
            assert_eq!(ids(&v), want, "{query}");
        }
    };
    check("status=completed&since=2025-01-01T00:00:00Z", vec![s1]).await;
    check("status=failed", vec![s2]).await;
    check("device_id=robot-1&direction=asc", vec![s1, s2]).await;
    check("device_id=robot-9", vec![]).await;
    check("tag=shift-1", vec![s1]).await;
    check("has_errors=true&sort=ended_at", vec![s2, s1]).await;
    check(
        "package=perception@2.1.0&sort=duration&direction=asc",
        vec![s1, s2],
    )
    .await;
    check(
        "metadata=%7B%22site%22%3A%22berlin%22%7D&page_size=1",
        vec![s2],
    )
    .await;
    check("page=2&page_size=1", vec![s1]).await;
    check("until=2025-01-10T09:00:00Z", vec![s1]).await;
    let (_, p1) = hub.get(&hub.api("/sessions?limit=1")).await;
    let cursor = p1["next_cursor"].as_str().unwrap().to_owned();
    let (_, p2) = hub
        .get(&hub.api(&format!("/sessions?limit=1&before={cursor}")))
        .await;
    assert_eq!(ids(&p2), vec![s1.to_string()]);
    assert_eq!(p2["next_cursor"], Value::Null);

    // One session, with metrics, gaps and package.
    let (st, s) = hub.get(&hub.api(&format!("/sessions/{s1}"))).await;
    assert_eq!(st, 200, "{s}");
    assert_eq!(s["status"], "completed");
    assert_eq!(s["device_id"], DEVICE);
    assert_eq!(s["device_name"], "warehouse-robot-01");
    assert_eq!(s["started_at"], "2025-01-10T08:00:00.000Z");
    assert_eq!(s["ended_at"], "2025-01-10T10:30:00.000Z");
    assert_eq!(s["duration_seconds"], 9000.0);
    assert_eq!(s["tags"], json!(["production", "shift-1"]));
    assert_eq!(s["metrics"]["log_count"], 40);
    assert_eq!(s["metrics"]["levels"]["error"], 10);
    assert_eq!(s["metrics"]["dropped"]["debug"], 4312);
    assert_eq!(s["metrics"]["artifact_count"], 0);
    assert_eq!(s["package"]["name"], "perception");
    assert_eq!(s["metadata"]["site"], "berlin");
    let (_, s2v) = hub.get(&hub.api(&format!("/sessions/{s2}"))).await;
    assert_eq!(s2v["error"], "device rebooted");

    // Tags.
    let r = hub
        .http
        .post(hub.api(&format!("/sessions/{s1}/tags")))
        .bearer_auth(&hub.operator)
        .body(json!({"tag": "important"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    check("tag=important", vec![s1]).await;
    let del = |tag: &'static str| {
        let hub = &hub;
        async move {
            hub.http
                .delete(hub.api(&format!("/sessions/{s1}/tags/{tag}")))
                .bearer_auth(&hub.operator)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(del("important").await, 204);
    assert_eq!(del("important").await, 404);
    check("tag=important", vec![]).await;

    // Logs and their filters.
    let logs = |query: &'static str| {
        let hub = &hub;
        async move {
            let (st, v) = hub
                .get(&hub.api(&format!("/sessions/{s1}/logs?{query}")))
                .await;
            assert_eq!(st, 200, "{query}: {v}");
            v
        }
    };
    let all = logs("limit=500").await;
    assert_eq!(all["total"], 40);
    assert_eq!(seqs(&all), (1..=40).rev().collect::<Vec<_>>());
    let item = &all["items"][0];
    assert_eq!(item["level"], "DEBUG");
    assert_eq!(item["message"], "Detected 40 obstacles near dock");
    assert_eq!(item["metadata"], json!({"n": 40}));
    assert_eq!(item["session_id"], s1.to_string());
    assert_eq!(item["device_id"], DEVICE);
    assert_eq!(
        (item["pid"].as_u64(), item["process"].as_str()),
        (Some(4242), Some("perceptiond"))
    );
    assert_eq!(item["timestamp"], "2025-01-10T08:00:40.000Z");
    let errors = logs("level=error&limit=50").await;
    assert_eq!(errors["total"], 10);
    assert!(errors["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["level"] == "ERROR"));
    assert_eq!(logs("level=warn").await["total"], 20, "at or above");
    assert_eq!(logs("module=perception").await["total"], 14);
    assert_eq!(logs("module=perception*").await["total"], 27);
    assert_eq!(seqs(&logs("search=detected%2017").await), vec![17]);
    assert_eq!(logs("search=obstacles").await["total"], 40);
    assert_eq!(logs("search=nothing-like-this").await["total"], 0);
    assert_eq!(
        seqs(&logs("since=2025-01-10T08:00:10Z&until=2025-01-10T08:00:13Z").await),
        vec![12, 11, 10]
    );
    assert_eq!(seqs(&logs("after=37").await), vec![38, 39, 40]);
    let page = logs("limit=3&level=error").await;
    assert_eq!(seqs(&page), vec![39, 35, 31]);
    let next = page["next_cursor"].as_str().unwrap();
    assert_eq!(next, "31");
    assert_eq!(
        seqs(&logs("limit=3&level=error&before=31").await),
        vec![27, 23, 19]
    );

    // Device logs outside sessions, and the device list with its skew.
    let (st, dl) = hub.get(&hub.api(&format!("/devices/{DEVICE}/logs"))).await;
    assert_eq!(st, 200, "{dl}");
    assert_eq!(seqs(&dl), vec![42]);
    assert_eq!(dl["items"][0]["session_id"], Value::Null);
    let (_, devices) = hub.get(&hub.api("/devices")).await;
    assert_eq!(devices["items"][0]["device_id"], DEVICE);
    assert!(devices["items"][0]["clock_skew_ms"].as_i64().unwrap() > 0);

    // Small exports (the million-record one is in `export`).
    let r = hub
        .http
        .get(hub.api(&format!(
            "/sessions/{s1}/logs/export?format=csv&level=error"
        )))
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert!(r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment; filename=\"session-"));
    let csv = r.text().await.unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 11, "{csv}");
    assert!(lines[0].starts_with("seq,timestamp,level,module,message"));
    assert!(lines[1].starts_with("3,2025-01-10T08:00:03.000Z,ERROR,nav,Detected 3 obstacles"));
    let r = hub
        .http
        .get(hub.api(&format!("/sessions/{s1}/logs/export?format=json")))
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    let exported: Vec<Value> = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(exported.len(), 40);
    assert_eq!(exported[0]["seq"], 1);

    // Delete: gone with its logs, and a late retry does not revive it.
    let r = hub
        .http
        .delete(hub.api(&format!("/sessions/{s1}")))
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(hub.get(&hub.api(&format!("/sessions/{s1}"))).await.0, 404);
    assert_eq!(
        hub.get(&hub.api(&format!("/sessions/{s1}/logs"))).await.0,
        404
    );
    let (st, late) = hub
        .post_batch(&batch(vec![], recs[..3].to_vec(), vec![]))
        .await;
    assert_eq!(st, 200);
    assert_eq!(late["acked"], json!([[1, 3]]));
    assert_eq!(hub.get(&hub.api(&format!("/sessions/{s1}"))).await.0, 404);

    // Metrics count what happened.
    let m = hub.metrics().await;
    assert!(m.contains("logbook_hub_records_total 42\n"), "{m}");
    assert!(m.contains("logbook_hub_batches_total"));
}

/// Paging through a session's logs while the device keeps sending never
/// skips or repeats a record that existed when paging began.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_is_stable_under_concurrent_ingest() {
    let hub = HubProc::start("hub_pagination");
    let s = session_id(7);
    let first: Vec<_> = (1..=600u64)
        .map(|i| record(i, Some(s), Level::Info, "nav", "tick"))
        .collect();
    let (st, _) = hub
        .post_batch(&batch(
            vec![state(s, 1, SessionStatus::Active, &[])],
            first,
            vec![],
        ))
        .await;
    assert_eq!(st, 200);
    let writer = {
        let (url, token) = (hub.url.clone(), hub.device.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for b in 0..30u64 {
                let recs = (0..40u64)
                    .map(|i| record(601 + b * 40 + i, Some(s), Level::Info, "nav", "late tick"))
                    .collect();
                let r = http
                    .post(format!("{url}/api/v1/ingest/batches"))
                    .bearer_auth(&token)
                    .header("content-type", "application/msgpack")
                    .header("content-encoding", "gzip")
                    .body(batch(vec![], recs, vec![]).encode(1))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };
    for order in ["desc", "asc"] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut url = hub.api(&format!("/sessions/{s}/logs?limit=37&order={order}"));
            if let Some(c) = &cursor {
                let key = if order == "asc" { "after" } else { "before" };
                url.push_str(&format!("&{key}={c}"));
            }
            let (st, page) = hub.get(&url).await;
            assert_eq!(st, 200, "{page}");
            seen.extend(seqs(&page));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        let unique: HashSet<u64> = seen.iter().copied().collect();
        assert_eq!(unique.len(), seen.len(), "{order}: a record was repeated");
        for i in 1..=600 {
            assert!(unique.contains(&i), "{order}: record {i} was skipped");
        }
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        if order == "desc" {
            sorted.reverse();
        }
        assert_eq!(seen, sorted, "{order}: out of order");
    }
    writer.await.unwrap();
}

#[test]
fn token_create_prints_only_the_token() {
    let dir = crate::util::TestDir::new("hub_token_cli");
    let out = crate::util::run_ok(
        Command::new(crate::util::bin("logbook-hub"))
            .args(["token", "create", "--data-dir"])
            .arg(dir.join("data"))
            .args([
                "--org",
                "acme",
                "--project",
                "warehouse",
                "--device",
                "robot-1",
            ]),
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1);
    assert!(text.starts_with("lbk_dev_"), "{text}");
    // The hub keeps only a hash: the token text is nowhere in the data.
    let db = std::fs::read(dir.join("data/hub.db")).unwrap();
    let token = text.trim().as_bytes();
    assert!(!db.windows(token.len()).any(|w| w == token));
    // Neither or both kinds is refused with a reason.
    let out = Command::new(crate::util::bin("logbook-hub"))
        .args(["token", "create", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--org", "acme", "--project", "warehouse"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--operator"));
}

#[test]
fn bad_config_is_one_line_and_nonzero() {
    let dir = crate::util::TestDir::new("hub_bad_config");
    let cfg = dir.join("hub.toml");
    std::fs::write(&cfg, "[server]\nlisten = 8470\n").unwrap();
    let out = Command::new(crate::util::bin("logbook-hub"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("logbook-hub: "), "{err}");
    assert!(err.contains("server.listen"), "{err}");
}

#[test]
fn bad_storage_settings_are_refused_in_one_line() {
    let dir = crate::util::TestDir::new("hub_storage_not_yet");
    let cfg = dir.join("hub.toml");
    std::fs::write(&cfg, "[storage]\nblobs = \"s3://fleet-logs/hub\"\n").unwrap();
    let serve = |env: &[(&str, &str)]| {
        let out = Command::new(crate::util::bin("logbook-hub"))
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.join("data"))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8(out.stderr).unwrap()
    };
    // A bucket behind an endpoint nobody listens on: one line at start-up.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{closed}");
    let err = serve(&[
        ("AWS_ENDPOINT_URL", &endpoint),
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", "us-east-1"),
    ]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "logbook-hub: storage.blobs s3://fleet-logs/hub: the endpoint cannot be reached"
        ),
        "{err}"
    );
    let err = serve(&[("LOGBOOK_STORAGE_DATABASE", "postgres://hub@db:x/logbook")]);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("storage.database: postgres://hub@db:x/logbook: invalid connection string"),
        "{err}"
    );
}

#[test]
fn sigterm_stops_cleanly() {
    let mut hub = HubProc::start("hub_sigterm");
    let status = hub.terminate();
    assert!(status.success(), "{status}");
    assert!(!hub.data_dir().join("hub.addr").exists());
}
