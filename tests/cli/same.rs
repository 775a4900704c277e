//! Scripts work against either side: a real `logbookd` synced to a real
//! hub, and the same `logbook` commands with and without `--hub` print the
//! same lines (and the hub's JSON lines carry every local field).

use std::time::Duration;

use super::*;
use crate::agent::send_lines;
use crate::sync::{start_agent, sync_env, wait_synced};
use crate::util::{wait_for, TestDir};

#[test]
fn the_same_commands_print_the_same_lines_locally_and_at_the_hub() {
    let hub = HubProc::start("cli_same");
    let dir = TestDir::new("cli_same");
    let agent = start_agent(&dir, &sync_env(&hub.url, &hub.device));
    let open = agent.ok(
        "POST",
        "/v1/sessions",
        Some(r#"{"tags":["field"],"package":{"name":"nav","version":"1.2.0"}}"#),
    );
    let id = open["id"].as_str().unwrap().to_owned();
    let lines: Vec<String> = (1..=1100)
        .map(|i| {
            let level = if i % 250 == 0 { "error" } else { "info" };
            format!(r#"{{"level":"{level}","module":"nav::planner","msg":"line {i}","step":{i}}}"#)
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    agent.ok("POST", "/v1/sessions/current/stop", Some("{}"));
    wait_synced(&agent, Duration::from_secs(20));
    wait_for(
        "the session closed at the hub",
        Duration::from_secs(10),
        || {
            let out = ok(cli(&hub), &["session", "status", &id, "--json"]);
            let v: Value = serde_json::from_str(&out).unwrap();
            (v["status"] == "completed" && v["log_count"] == 1100).then_some(())
        },
    );

    let local = |args: &[&str]| {
        let mut c = agent.cli();
        c.env_remove("LOGBOOK_HUB_URL");
        ok(c, args)
    };
    for args in [
        vec!["logs", "--session", &id],
        vec!["logs", "--session", &id, "--level", "error"],
        vec!["logs", "--session", &id, "--limit", "600"],
        vec![
            "logs",
            "--session",
            &id,
            "--module",
            "nav::planner",
            "--limit",
            "3",
        ],
    ] {
        let (l, h) = (local(&args), ok(cli(&hub), &args));
        assert!(!l.is_empty(), "{args:?}");
        assert_eq!(l, h, "{args:?}");
    }

    // JSON lines: the hub's carry every local field with the same value
    // (timestamps to the millisecond), plus device_id.
    let l = json_lines(&local(&["logs", "--session", &id, "--json"]));
    let h = json_lines(&ok(cli(&hub), &["logs", "--session", &id, "--json"]));
    assert_eq!(l.len(), 1100);
    assert_eq!(l.len(), h.len());
    for (a, b) in l.iter().zip(&h) {
        for (k, v) in a.as_object().unwrap() {
            if k == "timestamp" {
                assert_eq!(&v.as_str().unwrap()[..23], &b[k].as_str().unwrap()[..23]);
            } else {
                assert_eq!(v, &b[k], "{k}: {a} vs {b}");
            }
        }
        assert_eq!(b["device_id"], crate::hub::DEVICE);
    }

    // `sessions`: the same columns on both sides (the hub rounds durations
    // to the millisecond, so compare everything else).
    let cols = |text: &str| -> Vec<Vec<String>> {
        text.lines()
            .map(|l| {
                let f: Vec<String> = l.split_whitespace().map(str::to_owned).collect();
                vec![f[0].clone(), f[1].clone(), f[4].clone(), f[5].clone()]
            })
            .collect()
    };
    let (l, h) = (local(&["sessions"]), ok(cli(&hub), &["sessions"]));
    assert_eq!(cols(&l), cols(&h), "local:\n{l}\nhub:\n{h}");
    assert_eq!(
        cols(&h)[0],
        vec![
            id.clone(),
            "completed".into(),
            crate::hub::DEVICE.into(),
            "field".into()
        ]
    );
    let l: Vec<String> = local(&["sessions", "--status", "completed", "--json"])
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["id"].to_string())
        .collect();
    assert_eq!(l, vec![format!("\"{id}\"")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_page_past_the_hubs_page_size() {
    use logbook::wire::SessionStatus;
    let hub = HubProc::start("cli_many");
    let states = (0..520u128)
        .map(|i| crate::hub::state(crate::hub::session_id(i), 1, SessionStatus::Completed, &[]))
        .collect();
    let (st, body) = hub
        .post_batch(&crate::hub::batch(states, vec![], vec![]))
        .await;
    assert_eq!(st, 200, "{body}");
    let all = json_lines(&ok(cli(&hub), &["sessions", "--json"]));
    assert_eq!(all.len(), 520);
    let mut ids: Vec<&str> = all.iter().map(|v| v["id"].as_str().unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 520, "each session once");
    assert_eq!(
        ok(cli(&hub), &["sessions", "--limit", "510"])
            .lines()
            .count(),
        510
    );
}
