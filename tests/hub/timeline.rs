//! The session timeline tree (README "Session timeline"): a session that
//! failed at a reboot, with marks, gaps and errors, read back node by node
//! through `GET /sessions/{id}` (seed 002's `timeline`) and
//! `GET /sessions/{id}/timeline`, on the suite's storage
//! (`LOGBOOK_TEST_HUB_STORAGE=postgres+s3` runs it on PostgreSQL).

use logbook::wire::{Gap, Level, Mark, SessionStatus};
use serde_json::{json, Value};

use super::{at, batch, record, session_id, state, HubProc};

fn mark(id: u64, name: &str, ts_secs: i64, before: i64, after: i64) -> Mark {
    Mark {
        id,
        revision: 1,
        session_id: Some(session_id(900)),
        timestamp_ns: at(ts_secs),
        before_ns: before * 1_000_000_000,
        after_ns: after * 1_000_000_000,
        name: name.into(),
        priority: "normal".into(),
        metadata: String::new(),
        released: None,
    }
}

fn t(secs: i64) -> Value {
    let ns = at(secs);
    let secs_of_day = (ns / 1_000_000_000).rem_euclid(86_400);
    Value::String(format!(
        "2025-01-10T{:02}:{:02}:{:02}.000Z",
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60
    ))
}

fn error_node(module: &str, seq: i64, level: &str, message: &str, children: Value) -> Value {
    json!({
        "kind": "error", "name": module, "start": t(seq), "end": t(seq),
        "metadata": {
            "seq": seq, "level": level, "message": message, "metadata": {"n": seq},
            "process": "perceptiond", "pid": 4242,
        },
        "children": children,
    })
}

fn mark_node(
    id: u64,
    name: &str,
    ts: i64,
    span: (i64, i64),
    priority: &str,
    released: Value,
    children: Value,
) -> Value {
    json!({
        "kind": "mark", "name": name, "start": t(span.0), "end": t(span.1),
        "metadata": {
            "id": id, "timestamp": t(ts), "priority": priority,
            "released": released, "metadata": {},
        },
        "children": children,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebooted_session_with_marks_gaps_and_errors_gives_the_documented_tree() {
    let hub = HubProc::start("timeline_tree");
    let sid = session_id(900);
    let s = Some(sid);

    // First the session opens and its records, marks and gaps arrive ...
    let mut first = batch(
        vec![state(sid, 1, SessionStatus::Active, &[])],
        vec![
            record(5, s, Level::Info, "nav", "planning"),
            record(10, s, Level::Error, "nav", "path blocked"),
            record(12, s, Level::Error, "nav", "path still blocked"),
            record(30, s, Level::Warn, "arm", "slow joint"),
            record(40, s, Level::Fatal, "arm", "joint 3 fault"),
            record(70, s, Level::Error, "planner", "no plan"),
            record(90, s, Level::Error, "arm", "joint 3 fault again"),
        ],
        vec![
            Gap {
                session_id: s,
                level: Level::Debug,
                reason: "evicted".into(),
                dropped: 300,
            },
            Gap {
                session_id: s,
                level: Level::Info,
                reason: "pin_released".into(),
                dropped: 12,
            },
        ],
    );
    let mut estop = mark(2, "estop", 95, 10, 10);
    estop.priority = "high".into();
    let mut dock = mark(4, "dock", 50, 1, 1);
    dock.released = Some("pin_released".into());
    dock.revision = 2;
    first.marks = vec![
        mark(1, "collision", 11, 5, 5),
        estop,
        mark(3, "startup", 1, 1, 14),
        dock,
    ];
    assert_eq!(hub.post_batch(&first).await.0, 200);
    // ... then the agent, starting after a reboot, closes it as failed.
    let mut failed = state(sid, 2, SessionStatus::Failed, &[]);
    failed.ended_at_ns = Some(at(100));
    failed.duration_ns = Some(100_000_000_000);
    failed.error = Some("device rebooted".into());
    assert_eq!(
        hub.post_batch(&batch(vec![failed], vec![], vec![])).await.0,
        200
    );

    // Root: the session. Its children by start: a mark holds the instants
    // inside its window (of overlapping ones, the mark that started last:
    // "collision" over "startup" for the error at 10 s); gaps close the list.
    let expected = json!({
        "kind": "session", "name": sid.to_string(), "start": t(0), "end": t(100),
        "metadata": {"device_id": "robot-1", "status": "failed", "error": "device rebooted"},
        "children": [
            mark_node(3, "startup", 1, (0, 15), "normal", Value::Null, json!([
                {"kind": "status", "name": "opened", "start": t(0), "end": t(0),
                 "metadata": {}, "children": []},
            ])),
            mark_node(1, "collision", 11, (6, 16), "normal", Value::Null, json!([
                error_node("nav", 10, "ERROR", "path blocked", json!([])),
            ])),
            error_node("arm", 40, "FATAL", "joint 3 fault", json!([])),
            mark_node(4, "dock", 50, (49, 51), "normal", json!("pin_released"), json!([])),
            error_node("planner", 70, "ERROR", "no plan", json!([])),
            mark_node(2, "estop", 95, (85, 105), "high", Value::Null, json!([
                {"kind": "status", "name": "failed", "start": t(100), "end": t(100),
                 "metadata": {"error": "device rebooted", "rebooted": true}, "children": []},
            ])),
            {"kind": "gap", "name": "evicted", "start": null, "end": null,
             "metadata": {"level": "DEBUG", "dropped": 300}, "children": []},
            {"kind": "gap", "name": "pin_released", "start": null, "end": null,
             "metadata": {"level": "INFO", "dropped": 12}, "children": []},
        ],
    });

    let (code, route) = hub
        .get(&hub.api(&format!("/sessions/{sid}/timeline")))
        .await;
    assert_eq!(code, 200, "{route}");
    assert_eq!(route["session_id"], sid.to_string());
    let tree = &route["timeline"];
    let (got, want) = (
        tree["children"].as_array().unwrap(),
        expected["children"].as_array().unwrap(),
    );
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g, w, "child {i} of the timeline route");
    }
    assert_eq!(got.len(), want.len(), "{tree:#}");
    assert_eq!(tree, &expected);

    let (code, session) = hub.get(&hub.api(&format!("/sessions/{sid}"))).await;
    assert_eq!(code, 200, "{session}");
    assert_eq!(session["status"], "failed");
    assert_eq!(session["timeline"], expected, "seed 002's session.timeline");

    // Lists leave it out; another organization's key and an unknown
    // session get the routes' usual 404.
    let (_, list) = hub.get(&hub.api("/sessions")).await;
    assert!(list["items"][0].get("timeline").is_none(), "{list}");
    let other = hub.token("umbrella", "warehouse", None);
    let url = format!(
        "{}/api/v1/organizations/umbrella/projects/warehouse/sessions/{sid}/timeline",
        hub.url
    );
    assert_eq!(hub.get_as(&url, &other).await.0, 404);
    let url = hub
        .api(&format!("/sessions/{sid}/timeline"))
        .replace("/acme/", "/umbrella/");
    let (code, body) = hub.get_as(&url, &hub.operator).await;
    assert_eq!(code, 404, "{body}");
    let (code, body) = hub
        .get(&hub.api(&format!("/sessions/{}/timeline", session_id(901))))
        .await;
    assert_eq!(code, 404);
    assert_eq!(body["error"]["code"], "not_found", "{body}");
}
