//! Marks from the robot to the hub (README "Marks"): synced in batch v3,
//! listed per session and across sessions, a session list filtered by a
//! mark, a log query narrowed to a mark's window, and the Foxglove events
//! export; and an agent whose hub reads only batch v2 (marks stay pending
//! on the robot, records arrive once, the marks follow once the hub is
//! upgraded).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{
    assert_exact_seqs, forward, hub_get, hub_logs, start_agent, sync_env, wait_synced, BatchFront,
};
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

/// Batches an [`OlderHub`] saw, by what it did with them.
#[derive(Default)]
struct Seen {
    refused_v3: AtomicU64,
    forwarded_v2: AtomicU64,
    forwarded_other: AtomicU64,
}

/// A hub as one built before batch v3 answers: in front of a real hub,
/// it refuses a v3 batch with 400 `unsupported_batch_version` (the body an
/// older hub sends) and passes every other batch through unchanged.
struct OlderHub {
    front: BatchFront,
    seen: Arc<Seen>,
}

impl OlderHub {
    fn start(upstream: &str) -> OlderHub {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode};
        let seen = Arc::new(Seen::default());
        let (upstream, counts) = (upstream.to_owned(), seen.clone());
        let client = reqwest::Client::new();
        let post = move |headers: HeaderMap, body: Bytes| {
            let (upstream, counts, client) = (upstream.clone(), counts.clone(), client.clone());
            async move {
                let version = logbook::wire::Batch::decode(&body, 64 << 20)
                    .map(|b| b.version)
                    .unwrap_or(0);
                if version >= 3 {
                    counts.refused_v3.fetch_add(1, Ordering::SeqCst);
                    let body = r#"{"error":{"code":"unsupported_batch_version","message":"unsupported batch version 3 (this hub understands [1, 2])"}}"#;
                    return (StatusCode::BAD_REQUEST, body.to_owned());
                }
                let n = if version == 2 {
                    &counts.forwarded_v2
                } else {
                    &counts.forwarded_other
                };
                n.fetch_add(1, Ordering::SeqCst);
                match forward(&client, &upstream, &headers, body).await {
                    Ok(r) => {
                        let status = StatusCode::from_u16(r.status().as_u16()).unwrap();
                        (status, r.text().await.unwrap_or_default())
                    }
                    Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
                }
            }
        };
        OlderHub {
            front: BatchFront::start(post),
            seen,
        }
    }
}

/// (revision, synced revision) of each of the agent's marks, read from
/// its database beside the running agent.
fn agent_marks(agent: &crate::agent::Agent) -> Vec<(i64, i64)> {
    let conn = rusqlite::Connection::open_with_flags(
        agent.state.join("agent.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let mut stmt = conn
        .prepare("SELECT revision, synced_revision FROM marks ORDER BY id")
        .unwrap();
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
    rows.collect::<rusqlite::Result<_>>().unwrap()
}

#[test]
fn behind_a_v2_hub_marks_stay_pending_and_records_arrive_once() {
    let hub = HubProc::start("sync_marks_v2");
    let older = OlderHub::start(&hub.url);
    let dir = TestDir::new("sync-marks-v2");
    let mut agent = start_agent(&dir, &sync_env(&older.front.url, &hub.device));
    let session = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let lines: Vec<String> = (0..300)
        .map(|i| format!(r#"{{"msg":"tick {i}","tick":{i}}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    agent.ok(
        "POST",
        "/v1/marks",
        Some(r#"{"name":"collision","priority":"high"}"#),
    );
    // A mark from a record's `event` field too, and more records after it.
    send_lines(&agent, &[r#"{"msg":"bump","event":"bump"}"#]);
    send_lines(&agent, &refs);
    agent.ok("POST", "/v1/sessions/current/stop", None);
    wait_synced(&agent, Duration::from_secs(60));

    // Every record arrived once, in v2, after the v3 batch was refused.
    let records = hub_logs(&hub, &format!("/sessions/{session}/logs"));
    assert_exact_seqs(&records, 1..=601);
    let (st, v) = hub_get(&hub, &hub.api(&format!("/sessions/{session}")));
    assert_eq!((st, v["status"].as_str()), (200, Some("completed")), "{v}");
    assert!(older.seen.refused_v3.load(Ordering::SeqCst) >= 1);
    assert!(older.seen.forwarded_v2.load(Ordering::SeqCst) >= 1);
    assert_eq!(older.seen.forwarded_other.load(Ordering::SeqCst), 0);
    // The marks did not travel, and the robot still has them to send.
    let (st, v) = hub_get(&hub, &hub.api(&format!("/sessions/{session}/marks")));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["items"], serde_json::json!([]), "{v}");
    let pending = agent_marks(&agent);
    assert_eq!(pending.len(), 2, "{pending:?}");
    assert!(
        pending.iter().all(|(rev, synced)| synced < rev),
        "{pending:?}"
    );
    let refused = older.seen.refused_v3.load(Ordering::SeqCst);

    // The hub is upgraded (the agent restarts pointing at it): the marks
    // follow in v3, and no record arrives twice.
    agent.terminate();
    drop(agent);
    let agent = start_agent(&dir, &sync_env(&hub.url, &hub.device));
    let marks = wait_for(
        "the marks at the upgraded hub",
        Duration::from_secs(30),
        || {
            let (st, v) = hub_get(&hub, &hub.api(&format!("/sessions/{session}/marks")));
            assert_eq!(st, 200, "{v}");
            let items = v["items"].as_array().unwrap().clone();
            (items.len() == 2).then_some(items)
        },
    );
    assert_eq!(marks[0]["name"], "collision");
    assert_eq!(marks[1]["name"], "bump");
    wait_for("the agent's marks synced", Duration::from_secs(30), || {
        agent_marks(&agent)
            .iter()
            .all(|(rev, synced)| synced == rev)
            .then_some(())
    });
    let again = hub_logs(&hub, &format!("/sessions/{session}/logs"));
    assert_exact_seqs(&again, 1..=601);
    assert_eq!(older.seen.refused_v3.load(Ordering::SeqCst), refused);
}

/// Every record of a session at the hub as (hub row id, message), from a
/// live stream replaying from the start: the row ids are the hub's order
/// of arrival.
fn arrivals(hub: &HubProc, session: &str) -> Vec<(i64, String)> {
    use crate::hub::{WsClient, WsMessage, ORG, PROJECT};
    let path =
        format!("/ws/organizations/{ORG}/projects/{PROJECT}/sessions/{session}/logs?after_id=0");
    let mut ws = WsClient::connect(&hub.addr, &path, &hub.operator).unwrap();
    let mut out = Vec::new();
    loop {
        match ws.next(Duration::from_secs(30)) {
            Some(WsMessage::Text(t)) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if let Some(id) = v["id"].as_i64().filter(|_| v["event"].is_null()) {
                    out.push((id, v["message"].as_str().unwrap().to_owned()));
                }
            }
            Some(WsMessage::Close(_)) => return out,
            None => panic!("the stream of {session} neither ended nor sent within 30 s"),
        }
    }
}

/// Back from an outage with a backlog: a high mark's window arrives first,
/// then the errors, then the records of the failed session, then the
/// newest records, and the old backlog last; every record once.
#[test]
fn after_an_outage_marks_errors_failed_sessions_and_fresh_records_go_first() {
    use super::faultproxy::Fault;
    use crate::agent::marks::at;

    let (proxy, hub) = super::offline_hub("sync_sent_first");
    let dir = TestDir::new("sync-sent-first");
    let mut env = sync_env(&proxy.url(), &hub.device);
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "200".into()));
    let agent = start_agent(&dir, &env);
    let line = |ms: u64, level: &str, msg: String| {
        format!(
            r#"{{"timestamp":"{}","level":"{level}","msg":"{msg}"}}"#,
            at(ms)
        )
    };
    let send = |lines: Vec<String>| {
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        send_lines(&agent, &refs);
        agent.flush();
    };
    let open = || {
        agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
            .as_str()
            .unwrap()
            .to_owned()
    };

    // A session that fails: 300 records.
    let failed = open();
    send(
        (0..300)
            .map(|i| line(i * 10, "info", format!("a {i}")))
            .collect(),
    );
    agent.ok(
        "POST",
        "/v1/sessions/current/stop",
        Some(r#"{"failed":true,"error":"estop"}"#),
    );
    // A session that completes: 3,000 records 10 ms apart, an error every
    // 500, and a high collision mark at record 1,500 pinning 1,400..=1,600.
    let ok = open();
    let b0 = 1_000_000;
    send(
        (0..3000)
            .map(|i| {
                let level = if i % 500 == 250 { "error" } else { "info" };
                line(b0 + i * 10, level, format!("b {i}"))
            })
            .collect(),
    );
    let mark = format!(
        r#"{{"name":"collision","timestamp":"{}","before":"1s","after":"1s","priority":"high"}}"#,
        at(b0 + 15_000)
    );
    agent.ok("POST", "/v1/marks", Some(&mark));
    agent.ok("POST", "/v1/sessions/current/stop", None);
    wait_for("the link to show offline", Duration::from_secs(20), || {
        let s = agent.status()["sync"].clone();
        (s["link"] == "offline" && s["failures"].as_u64() > Some(1)).then_some(())
    });

    super::bring_online(&proxy, &hub, Fault::Pass);
    wait_synced(&agent, Duration::from_secs(60));

    // Every record once.
    assert_eq!(
        hub_logs(&hub, &format!("/sessions/{failed}/logs")).len(),
        300
    );
    let b = hub_logs(&hub, &format!("/sessions/{ok}/logs"));
    let first = b[0]["seq"].as_u64().unwrap();
    assert_exact_seqs(&b, first..first + 3000);

    // The order of arrival, by class.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
    enum Class {
        Window,
        Error,
        Failed,
        Fresh,
        Backlog,
    }
    let mut all: Vec<(i64, Class)> = arrivals(&hub, &failed)
        .into_iter()
        .map(|(id, _)| (id, Class::Failed))
        .collect();
    let b = arrivals(&hub, &ok);
    assert_eq!(b.len(), 3000);
    all.extend(b.into_iter().map(|(id, msg)| {
        let i: u64 = msg.strip_prefix("b ").unwrap().parse().unwrap();
        let class = match i {
            1400..=1600 => Class::Window,
            _ if i % 500 == 250 => Class::Error,
            // The newest half batch when the link came back.
            2900.. => Class::Fresh,
            _ => Class::Backlog,
        };
        (id, class)
    }));
    all.sort();
    let classes: Vec<Class> = all.iter().map(|(_, c)| *c).collect();
    let runs: Vec<(Class, usize)> = classes
        .chunk_by(|a, b| a == b)
        .map(|r| (r[0], r.len()))
        .collect();
    assert_eq!(
        runs,
        vec![
            (Class::Window, 201),
            (Class::Error, 6),
            (Class::Failed, 300),
            (Class::Fresh, 100),
            (Class::Backlog, 2693),
        ],
        "the hub's order of arrival, in runs"
    );
}
