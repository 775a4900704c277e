//! Issue 18's search bound: a record the hub has stored is searchable at
//! once, also while a backlog drains and fresh records keep coming. On
//! SQLite the full-text index is written after the acknowledging
//! transaction, by a thread of its own, and a search reads the records
//! past its watermark one by one; on PostgreSQL the index is the table's.
//! Either way the bound stated in ARCHITECTURE.md is zero: no query can
//! see a record that a search would miss.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use super::faultproxy::Fault;
use super::{bring_online, hub_get, hub_session, offline_hub, start_agent, sync_env, wait_synced};
use crate::agent::send_lines;
use crate::hub::HubProc;
use crate::util::{wait_for, TestDir};

/// Each record holds the word every record shares (`drain`) and one of
/// its own (`k<i>`).
fn line(i: u64) -> String {
    format!(r#"{{"level":"info","module":"nav::planner","msg":"drain step k{i} of the backlog"}}"#)
}

/// A page of the session's logs; an empty one until the hub has the
/// session.
fn page(hub: &HubProc, session: &str, query: &str) -> Value {
    let (status, page) = hub_get(hub, &hub.api(&format!("/sessions/{session}/logs?{query}")));
    match status {
        200 => page,
        404 => serde_json::json!({"items": [], "total": 0}),
        _ => panic!("{query}: {status} {page}"),
    }
}

/// Stops the robot's writer however the checks end, so a failed check
/// fails the test instead of leaving it waiting on the writer.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn what_the_hub_stores_is_searchable_at_once_during_a_sustained_drain() {
    const BACKLOG: u64 = 20_000;
    let (proxy, hub) = offline_hub("sync_search_bound");
    let dir = TestDir::new("sync_search_bound");
    let mut env = sync_env(&proxy.url(), &hub.device);
    // Small batches held up on the link: the drain is many commits long,
    // however fast the machine, so the checks below land between them.
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "500".into()));
    // Each batch's timings, as an operator would ask for them.
    env.push((
        "LOGBOOK_LOG_LEVEL".into(),
        "info,logbook::agent::sync::uploader=debug".into(),
    ));
    let agent = start_agent(&dir, &env);
    let open = agent.ok("POST", "/v1/sessions", Some(r#"{"tags":["search-bound"]}"#));
    let id = open["id"].as_str().unwrap().to_owned();
    let backlog: Vec<String> = (1..=BACKLOG).map(line).collect();
    for chunk in backlog.chunks(2_000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        send_lines(&agent, &refs);
    }
    agent.flush();
    wait_for(
        "the backlog behind a closed link",
        Duration::from_secs(30),
        || (agent.status()["sync"]["backlog_records"].as_u64() >= Some(BACKLOG)).then_some(()),
    );

    // The link comes up slow, and the robot keeps logging while it drains.
    bring_online(&proxy, &hub, Fault::Delay(Duration::from_millis(50)));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(BACKLOG));
    let (checks, seen) = std::thread::scope(|scope| {
        let writer = {
            let (stop, sent, agent) = (stop.clone(), sent.clone(), &agent);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = sent.load(Ordering::Relaxed) + 1;
                    send_lines(agent, &[&line(i)]);
                    sent.store(i, Ordering::Relaxed);
                    agent.flush();
                }
            })
        };
        let stop_writer = StopOnDrop(stop.clone());
        let mut checks = 0u64;
        let mut seen = Vec::new();
        loop {
            // Stored first, searched second: whatever the first query saw
            // is committed, so the search must find it (and maybe more).
            let all = page(&hub, &id, "limit=1");
            let stored = all["total"].as_u64().unwrap_or(0);
            let found = page(&hub, &id, "search=drain&limit=1")["total"]
                .as_u64()
                .unwrap_or(0);
            assert!(
                found >= stored,
                "{stored} stored but a search finds {found}"
            );
            if let Some(newest) = all["items"].as_array().and_then(|a| a.first()) {
                let msg = newest["message"].as_str().unwrap();
                let word = msg.split_whitespace().find(|w| w.starts_with('k')).unwrap();
                let hit = page(&hub, &id, &format!("search={word}"));
                let items = hit["items"].as_array().unwrap();
                assert!(
                    items.iter().any(|r| r["seq"] == newest["seq"]),
                    "the newest stored record ({msg}) is not found by {word}: {hit}"
                );
                checks += 1;
                if seen.last() != Some(&stored) {
                    seen.push(stored);
                }
            }
            if stored > BACKLOG {
                // More stored than the backlog held: watched to (about)
                // its end, fresh records arriving beside it.
                break;
            }
        }
        drop(stop_writer);
        writer.join().unwrap();
        (checks, seen)
    });
    // The checks saw the drain move, not only its end.
    assert!(
        seen.len() >= 3,
        "{checks} checks saw only {seen:?} stored: the drain was not watched"
    );

    let total = sent.load(Ordering::Relaxed);
    wait_synced(&agent, Duration::from_secs(60));
    wait_for("every record at the hub", Duration::from_secs(30), || {
        hub_session(&hub, &id).filter(|s| s["log_count"].as_u64() == Some(total))
    });
    let log = agent.log_text();
    assert!(
        log.contains("DEBUG") && log.contains("batch acknowledged"),
        "{log}"
    );
    // Never a miss: every record is found by the shared word, and a spread
    // of them by their own.
    assert_eq!(page(&hub, &id, "search=drain&limit=1")["total"], total);
    for i in (1..=total).step_by(997).chain([total]) {
        let hit = page(&hub, &id, &format!("search=k{i}"));
        assert_eq!(hit["total"], 1, "k{i}: {hit}");
        assert_eq!(
            hit["items"][0]["message"],
            format!("drain step k{i} of the backlog")
        );
    }
}
