//! `logbook::client` against a real `logbookd`: session control from Rust,
//! and the tracing layer across an agent stop and restart (the program
//! never blocks, and what it dropped arrives as a `client_dropped` gap).

use std::time::{Duration, Instant};

use logbook::client::{Api, ApiError, LogbookLayer, NewSession};
use serde_json::json;
use tracing_subscriber::prelude::*;

use super::record;
use crate::agent::Agent;
use crate::util::{wait_for, TestDir};

#[test]
fn session_control_from_rust() {
    let dir = TestDir::new("client_sessions");
    let agent = Agent::start(&dir, &[]);
    let api = Api::new().socket(agent.api_socket());
    assert!(api.current().unwrap().is_none());

    let mut s = api
        .open(
            &NewSession::new()
                .tag("field-test")
                .package("nav", Some("1.4.2"))
                .meta("site", "hall-b")
                .meta("battery", 97),
        )
        .unwrap();
    assert!(s.artifact_dir().is_dir(), "{:?}", s.artifact_dir());
    match api.open(&NewSession::new()) {
        Err(ApiError::Refused {
            status: 409,
            message,
            ..
        }) => {
            assert!(message.contains(&s.id().to_string()), "{message}")
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    s.tag("docked").unwrap();
    assert_eq!(s.view().tags, ["field-test", "docked"]);
    let current = api.current().unwrap().expect("a current session");
    assert_eq!(current.id(), s.id());
    let v = agent.ok("GET", &format!("/v1/sessions/{}", s.id()), None);
    assert_eq!(v["package"], json!({"name": "nav", "version": "1.4.2"}));
    assert_eq!(v["metadata"], json!({"site": "hall-b", "battery": 97}));
    let closed = s.close().unwrap();
    assert_eq!(
        serde_json::to_value(closed.status).unwrap(),
        json!("completed")
    );
    assert!(api.current().unwrap().is_none());

    let failed = api
        .open(&NewSession::new())
        .unwrap()
        .fail("lost localization")
        .unwrap();
    assert_eq!(
        serde_json::to_value(failed.status).unwrap(),
        json!("failed")
    );
    assert_eq!(failed.error.as_deref(), Some("lost localization"));

    let missing = dir.join("nowhere.sock");
    let e = Api::new().socket(&missing).current().unwrap_err();
    assert!(matches!(e, ApiError::NotRunning(_)), "{e:?}");
    assert!(e.to_string().contains("nowhere.sock"), "{e}");
}

#[test]
fn tracing_layer_never_blocks_across_an_agent_restart_and_reports_its_drops() {
    let dir = TestDir::new("client_restart");
    let mut agent = Agent::start(&dir, &[]);
    let layer = LogbookLayer::builder()
        .socket(agent.runtime.join("ingest.sock"))
        .queue_capacity(64)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .build();
    let handle = layer.handle();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let span = tracing::info_span!("mission", id = "m-17");
        let _in = span.enter();
        for i in 0..20 {
            tracing::info!(i, "before {i}");
        }
        assert!(handle.flush(Duration::from_secs(10)));

        agent.terminate();
        // The agent is away: every call returns at once, whatever happens
        // to the event.
        let mut slowest = Duration::ZERO;
        for i in 0..2000 {
            let t = Instant::now();
            tracing::warn!(i, "during {i}");
            slowest = slowest.max(t.elapsed());
        }
        assert!(slowest < Duration::from_millis(100), "{slowest:?}");
        assert!(handle.dropped() > 0);

        agent = Agent::start(&dir, &[]);
        // Keep logging until the client is back, as a program would.
        let mut i = 0;
        wait_for("the client to reconnect", Duration::from_secs(20), || {
            i += 1;
            tracing::info!(i, "after {i}");
            std::thread::sleep(Duration::from_millis(5));
            handle.connected().then_some(())
        });
        tracing::error!("final");
        assert!(handle.flush(Duration::from_secs(10)));
    });

    let r = record(&agent, "before 0");
    assert_eq!(r["module"], module_path!());
    assert_eq!(r["metadata"]["i"], 0);
    assert_eq!(r["pid"], std::process::id());
    assert_eq!(record(&agent, "final")["level"], "ERROR");
    let dropped = handle.dropped();
    let status = agent.status();
    let gap: u64 = status["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["reason"] == "client_dropped")
        .map(|g| g["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(gap, dropped, "{status}");
}
