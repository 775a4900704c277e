//! Marks from the robot to the hub (README "Marks"): synced in batch v3,
//! listed per session and across sessions, a session list filtered by a
//! mark, a log query narrowed to a mark's window, and the Foxglove events
//! export.

use std::time::Duration;

use super::{hub_get, hub_logs, start_agent, sync_env, wait_synced};
use crate::agent::send_lines;
use crate::hub::HubProc;
use crate::util::{run_ok, wait_for, TestDir};

#[test]
fn marks_reach_the_hub_and_narrow_its_queries() {
    let hub = HubProc::start("sync_marks");
    let dir = TestDir::new("sync-marks");
    let agent = start_agent(&dir, &sync_env(&hub.url, &hub.device));
    let session = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Ticks a second apart; a collision at tick 5 pinning 4..=6.
    let lines: Vec<String> = (0..10)
        .map(|i| {
            format!(r#"{{"timestamp":"2026-01-01T00:00:{i:02}Z","msg":"tick {i}","tick":{i}}}"#)
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    agent.flush();
    agent.ok(
        "POST",
        "/v1/marks",
        Some(
            r#"{"name":"collision","timestamp":"2026-01-01T00:00:05Z","before":"1s","after":1,"priority":"high","metadata":{"bumper":"front","speed":1.5}}"#,
        ),
    );
    run_ok(agent.cli().args(["mark", "checkpoint"]));
    agent.ok("POST", "/v1/sessions/current/stop", None);
    wait_synced(&agent, Duration::from_secs(30));

    let marks = wait_for("the marks at the hub", Duration::from_secs(30), || {
        let (st, v) = hub_get(&hub, &hub.api(&format!("/sessions/{session}/marks")));
        assert_eq!(st, 200, "{v}");
        let items = v["items"].as_array().unwrap().clone();
        (items.len() == 2).then_some(items)
    });
    assert_eq!(marks[0]["name"], "collision");
    assert_eq!(marks[0]["priority"], "high");
    assert_eq!(marks[0]["metadata"]["bumper"], "front");
    assert_eq!(marks[0]["start"], "2026-01-01T00:00:04.000Z");
    assert_eq!(marks[0]["end"], "2026-01-01T00:00:06.000Z");
    assert_eq!(marks[1]["name"], "checkpoint");

    // Across sessions, by name; and the sessions with a collision.
    let (st, v) = hub_get(&hub, &hub.api("/marks?name=collision"));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 1);
    assert_eq!(v["items"][0]["session_id"], session.as_str());
    let ids = |q: &str| -> Vec<String> {
        let (st, v) = hub_get(&hub, &hub.api(&format!("/sessions?mark={q}")));
        assert_eq!(st, 200, "{v}");
        let list = v["sessions"].as_array().or(v["items"].as_array()).cloned();
        list.unwrap_or_else(|| panic!("{v}"))
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(ids("collision"), vec![session.clone()]);
    assert!(ids("nothing").is_empty());

    // The log query narrowed to the collision's window.
    let ticks: Vec<u64> = hub_logs(&hub, &format!("/sessions/{session}/logs"))
        .iter()
        .filter_map(|r| r["metadata"]["tick"].as_u64())
        .collect();
    assert_eq!(ticks.len(), 10);
    let (st, v) = hub_get(
        &hub,
        &hub.api(&format!(
            "/sessions/{session}/logs?mark=collision&order=asc"
        )),
    );
    assert_eq!(st, 200, "{v}");
    let ticks: Vec<u64> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metadata"]["tick"].as_u64().unwrap())
        .collect();
    assert_eq!(ticks, [4, 5, 6]);
    let (st, v) = hub_get(
        &hub,
        &hub.api(&format!("/sessions/{session}/logs?mark=nothing")),
    );
    assert_eq!(st, 404, "{v}");

    // Foxglove events: name, start, end, metadata as text.
    let (st, v) = hub_get(&hub, &hub.api(&format!("/sessions/{session}/marks/export")));
    assert_eq!(st, 200, "{v}");
    let e = &v["events"][0];
    assert_eq!(
        (&e["name"], &e["start"], &e["end"]),
        (
            &"collision".into(),
            &"2026-01-01T00:00:04.000Z".into(),
            &"2026-01-01T00:00:06.000Z".into()
        )
    );
    assert_eq!(e["metadata"]["speed"], "1.5");
    assert_eq!(e["metadata"]["priority"], "high");
    // The CLI against the hub: marks of the session, across sessions, and
    // its logs narrowed to the collision's window.
    let marks = crate::cli::ok(
        crate::cli::cli(&hub),
        &["marks", "--session", &session, "--json"],
    );
    assert_eq!(marks.lines().count(), 2, "{marks}");
    let across = crate::cli::ok(crate::cli::cli(&hub), &["marks", "--name", "checkpoint"]);
    assert!(
        across.contains("checkpoint") && across.contains(&session),
        "{across}"
    );
    let window = crate::cli::ok(
        crate::cli::cli(&hub),
        &[
            "logs",
            "--session",
            &session,
            "--mark",
            "collision",
            "--json",
        ],
    );
    assert_eq!(window.lines().count(), 3, "{window}");
    // Without the operator's key: refused like every session route.
    let (st, v) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(hub.get_as(
            &hub.api(&format!("/sessions/{session}/marks")),
            "lbo_not_a_key",
        ));
    assert_eq!(st, 401, "{v}");
}
