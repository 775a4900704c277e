//! One agent, one hub: logs and sessions arrive with the right fields, an
//! agent that starts offline catches up, a bad token stops the uploader
//! loudly, and a batch the hub refuses is set aside while the rest flows.

use std::io::Write;
use std::time::{Duration, Instant};

use super::faultproxy::Fault;
use super::{
    assert_exact_seqs, hub_get, hub_logs, hub_session, start_agent, sync_env, wait_synced,
};
use crate::agent::send_lines;
use crate::hub::{HubProc, DEVICE};
use crate::util::{wait_for, TestDir};

fn line(i: u64, level: &str) -> String {
    format!(r#"{{"level":"{level}","module":"nav::planner","msg":"line {i}","step":{i}}}"#)
}

#[test]
fn logs_and_sessions_reach_the_hub_within_seconds() {
    let hub = HubProc::start("sync_basic");
    let dir = TestDir::new("sync_basic");
    // Default linger: this is the idle-robot promise as shipped.
    let mut env = sync_env(&hub.url, &hub.device);
    env.retain(|(k, _)| k != "LOGBOOK_SYNC_LINGER");
    let agent = start_agent(&dir, &env);
    let (status, open) = agent.api(
        "POST",
        "/v1/sessions",
        Some(r#"{"tags":["field-test"],"package":{"name":"nav","version":"1.2.0"},"metadata":{"site":"lab"}}"#),
    );
    assert_eq!(status, 201, "{open}");
    let id = open["id"].as_str().unwrap().to_owned();
    let lines: Vec<String> = (1..=10)
        .map(|i| line(i, if i == 7 { "error" } else { "info" }))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    agent.flush();
    let committed = Instant::now();
    wait_for("10 records at the hub", Duration::from_secs(2), || {
        hub_session(&hub, &id).filter(|s| s["log_count"] == 10)
    });
    eprintln!(
        "records reached the hub {:?} after commit",
        committed.elapsed()
    );

    agent.ok("POST", "/v1/sessions/current/stop", Some("{}"));
    let s = wait_for(
        "the session closed at the hub",
        Duration::from_secs(10),
        || hub_session(&hub, &id).filter(|s| s["status"] == "completed"),
    );
    assert_eq!(s["tags"], serde_json::json!(["field-test"]));
    assert_eq!(s["package"]["name"], "nav");
    assert_eq!(s["metadata"]["site"], "lab");
    assert_eq!(s["device_id"], DEVICE);
    assert!(s["duration_seconds"].as_f64().unwrap() >= 0.0, "{s}");
    assert!(s["ended_at"].is_string(), "{s}");

    let logs = hub_logs(&hub, &format!("/sessions/{id}/logs"));
    assert_exact_seqs(&logs, 1..=10);
    for (i, r) in logs.iter().enumerate() {
        assert_eq!(r["message"], format!("line {}", i + 1));
        assert_eq!(r["module"], "nav::planner");
        assert_eq!(r["metadata"]["step"], i as u64 + 1);
        assert!(r["pid"].is_u64(), "trusted fields travel: {r}");
    }
    assert_eq!(logs[6]["level"], "ERROR");

    wait_synced(&agent, Duration::from_secs(10));
    let st = agent.status()["sync"].clone();
    assert_eq!(st["link"], "online", "{st}");
    assert!(st["last_success"].is_string(), "{st}");
    assert!(st["bytes_sent"].as_u64().unwrap() > 0, "{st}");
    assert!(st["compression_ratio"].as_f64().unwrap() > 1.0, "{st}");
    assert_eq!(st["set_aside_batches"], 0);
    assert_eq!(st["uploader_restarts"], 0);

    // The hub saw the robot's clock at send time.
    let (_, devices) = hub_get(&hub, &hub.api("/devices"));
    let dev = devices["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device_id"] == DEVICE)
        .cloned()
        .unwrap_or_else(|| panic!("{devices}"));
    assert!(
        dev["clock_skew_ms"].as_i64().unwrap().abs() < 60_000,
        "{dev}"
    );

    // So does /metrics.
    let (_, metrics) = agent.api("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap().to_owned();
    for want in [
        "logbook_sync_link{state=\"online\"} 1",
        "logbook_sync_backlog_records 0",
        "logbook_sync_uploader_restarts_total 0",
        "logbook_sync_compression_ratio ",
        "logbook_sync_records_total{outcome=\"acked\"} 10",
    ] {
        assert!(metrics.contains(want), "{want} in:\n{metrics}");
    }

    // The CLI shows the link.
    let out = crate::util::run_ok(agent.cli().arg("status"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("hub       online"), "{text}");
}

#[test]
fn an_agent_that_starts_offline_catches_up_once_and_in_order() {
    // The proxy stands in for a hub that does not exist yet: every
    // connection fails until the hub is there.
    let (proxy, hub) = super::offline_hub("sync_offline");
    let dir = TestDir::new("sync_offline");
    let agent = start_agent(&dir, &sync_env(&proxy.url(), &hub.device));
    send_lines(&agent, &[&line(1, "info")]); // a device log, no session
    let (_, open) = agent.api("POST", "/v1/sessions", Some(r#"{"tags":["offline"]}"#));
    let id = open["id"].as_str().unwrap().to_owned();
    let lines: Vec<String> = (2..=2001).map(|i| line(i, "debug")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    agent.flush();
    agent.ok(
        "POST",
        "/v1/sessions/current/stop",
        Some(r#"{"failed":true,"error":"battery low"}"#),
    );
    wait_for("the link to show offline", Duration::from_secs(10), || {
        let s = agent.status()["sync"].clone();
        (s["link"] == "offline" && s["failures"].as_u64() > Some(1)).then_some(s)
    });
    assert_eq!(agent.status()["sync"]["backlog_records"], 2001);
    assert!(hub_session(&hub, &id).is_none());

    super::bring_online(&proxy, &hub, Fault::Pass);
    let s = wait_for("the session at the hub", Duration::from_secs(20), || {
        hub_session(&hub, &id).filter(|s| s["log_count"] == 2000 && s["status"] == "failed")
    });
    assert_eq!(s["error"], "battery low");
    assert_eq!(s["tags"], serde_json::json!(["offline"]));
    let logs = hub_logs(&hub, &format!("/sessions/{id}/logs"));
    assert_exact_seqs(&logs, 2..=2001);
    assert_eq!(logs[0]["message"], "line 2");
    let device_logs = hub_logs(&hub, &format!("/devices/{DEVICE}/logs"));
    assert_exact_seqs(&device_logs, 1..=1);
    wait_synced(&agent, Duration::from_secs(10));
    assert_eq!(agent.status()["sync"]["link"], "online");
}

#[test]
fn a_refused_token_stops_the_uploader_and_shows_auth_failed() {
    let hub = HubProc::start("sync_auth");
    let dir = TestDir::new("sync_auth");
    let agent = start_agent(&dir, &sync_env(&hub.url, "lbd_not_a_real_token"));
    send_lines(&agent, &[&line(1, "info"), &line(2, "info")]);
    agent.flush();
    let st = wait_for("auth-failed", Duration::from_secs(10), || {
        let s = agent.status()["sync"].clone();
        (s["link"] == "auth-failed").then_some(s)
    });
    assert!(st["last_error"].as_str().unwrap().contains("401"), "{st}");
    let failures = st["failures"].as_u64().unwrap();
    // Two more seconds of the agent's own uptime (polled, not slept): no
    // retries in between.
    let t0 = agent.status()["uptime_seconds"].as_f64().unwrap();
    wait_for("two seconds of uptime", Duration::from_secs(10), || {
        (agent.status()["uptime_seconds"].as_f64().unwrap() > t0 + 2.0).then_some(())
    });
    let st = agent.status()["sync"].clone();
    assert_eq!(st["failures"].as_u64().unwrap(), failures, "{st}");
    assert_eq!(st["link"], "auth-failed");
    assert_eq!(st["backlog_records"], 2);
    let out = crate::util::run_ok(agent.cli().arg("status"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("auth-failed"), "{text}");
}

#[test]
fn a_poisoned_batch_is_set_aside_and_the_rest_flows() {
    // The hub takes messages up to 1 KiB; the agent up to 64 KiB.
    let hub = HubProc::start_with("sync_poison", &[("LOGBOOK_INGEST_MAX_FIELD_BYTES", "1024")]);
    let dir = TestDir::new("sync_poison");
    let agent = start_agent(&dir, &sync_env(&hub.url, &hub.device));
    let (_, open) = agent.api("POST", "/v1/sessions", Some("{}"));
    let id = open["id"].as_str().unwrap().to_owned();
    let big = "x".repeat(5000);
    let lines: Vec<String> = (1..=100)
        .map(|i| {
            if i == 37 {
                format!(r#"{{"level":"warn","msg":"{big}"}}"#)
            } else {
                line(i, "info")
            }
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    wait_synced(&agent, Duration::from_secs(20));
    let logs = hub_logs(&hub, &format!("/sessions/{id}/logs"));
    assert_exact_seqs(&logs, (1..=100).filter(|s| *s != 37));
    let st = agent.status();
    assert_eq!(st["sync"]["set_aside_batches"], 1, "{st}");
    assert_eq!(st["sync"]["set_aside_records"], 1, "{st}");
    let gaps = st["gaps"].as_array().unwrap();
    assert!(
        gaps.iter()
            .any(|g| g["reason"] == "rejected" && g["dropped"] == 1 && g["level"] == "WARN"),
        "{st}"
    );
    // The gap reaches the hub, so the operator sees the hole.
    let s = wait_for(
        "the rejected gap at the hub",
        Duration::from_secs(10),
        || hub_session(&hub, &id).filter(|s| s.to_string().contains("rejected")),
    );
    assert!(s.to_string().contains("rejected"), "{s}");
    // Later records still flow.
    send_lines(&agent, &[&line(101, "info")]);
    wait_for("record 101", Duration::from_secs(10), || {
        hub_session(&hub, &id).filter(|s| s["log_count"] == 100)
    });
}

#[test]
fn sync_resumes_within_seconds_when_the_hub_comes_back() {
    let mut hub = HubProc::start("sync_resume");
    let dir = TestDir::new("sync_resume");
    let mut env = sync_env(&hub.url, &hub.device);
    // A long backoff: without the reachability probe, the expected wait
    // after the first failure would be about 15 s.
    env.retain(|(k, _)| !k.starts_with("LOGBOOK_SYNC_RETRY"));
    env.push(("LOGBOOK_SYNC_RETRY_MIN".into(), "30".into()));
    env.push(("LOGBOOK_SYNC_RETRY_MAX".into(), "120".into()));
    let agent = start_agent(&dir, &env);
    send_lines(&agent, &[&line(1, "info")]);
    wait_synced(&agent, Duration::from_secs(10));
    assert!(hub.terminate().success());
    send_lines(&agent, &[&line(2, "info")]);
    let st = wait_for(
        "the agent to notice the outage",
        Duration::from_secs(20),
        || {
            let s = agent.status()["sync"].clone();
            (s["link"] == "offline").then_some(s)
        },
    );
    assert!(st["backoff_seconds"].as_f64().unwrap() >= 30.0, "{st}");
    hub.restart();
    let back = Instant::now();
    wait_synced(&agent, Duration::from_secs(6));
    eprintln!("resumed {:?} after the hub came back", back.elapsed());
    assert_exact_seqs(&hub_logs(&hub, &format!("/devices/{DEVICE}/logs")), 1..=2);
}

#[test]
fn a_batch_too_large_for_the_hub_is_split() {
    // The hub takes at most 100 records per batch; the agent starts at 1000.
    let hub = HubProc::start_with("sync_split", &[("LOGBOOK_INGEST_MAX_RECORDS", "100")]);
    let dir = TestDir::new("sync_split");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "1000".into()));
    let agent = start_agent(&dir, &env);
    let lines: Vec<String> = (1..=1000).map(|i| line(i, "info")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    wait_synced(&agent, Duration::from_secs(20));
    assert_exact_seqs(
        &hub_logs(&hub, &format!("/devices/{DEVICE}/logs")),
        1..=1000,
    );
    let st = agent.status()["sync"].clone();
    assert_eq!(st["set_aside_batches"], 0, "{st}");
    assert!(st["failures"].as_u64().unwrap() >= 1, "{st}");
}

#[test]
fn a_batch_held_back_by_the_bandwidth_cap_carries_the_clock_of_its_sending() {
    let hub = HubProc::start("sync_restamp");
    let dir = TestDir::new("sync_restamp");
    let mut env = sync_env(&hub.url, &hub.device);
    // 2,000 B/s. A body larger than the one-second burst goes at once and
    // is paid back by the next batch, which then waits seconds. A linger of
    // 1 s keeps the first write of lines in one batch.
    env.retain(|(k, _)| k != "LOGBOOK_SYNC_LINGER");
    env.push(("LOGBOOK_SYNC_LINGER".into(), "1".into()));
    env.push(("LOGBOOK_SYNC_MAX_BYTES_PER_SEC".into(), "2000".into()));
    let agent = start_agent(&dir, &env);
    // Text that gzip cannot shrink much, so the first body is ~10 KB.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut noise = || -> String {
        (0..4)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("{x:016x}")
            })
            .collect()
    };
    let big: String = (0..250)
        .map(|i| {
            format!(
                "{{\"level\":\"info\",\"msg\":\"big {i}\",\"noise\":\"{}\"}}\n",
                noise()
            )
        })
        .collect();
    let at_hub = |n: usize| {
        // 404 until the device's first batch has arrived.
        let url = hub.api(&format!("/devices/{DEVICE}/logs?limit=500"));
        let (status, page) = hub_get(&hub, &url);
        (status == 200 && page["items"].as_array().map(Vec::len) == Some(n)).then_some(())
    };
    // One write, one batch.
    agent.ingest().write_all(big.as_bytes()).unwrap();
    wait_for(
        "the first batch at the hub",
        Duration::from_secs(60),
        || at_hub(250),
    );
    let start = Instant::now();
    send_lines(&agent, &[r#"{"level":"warn","msg":"held back"}"#]);
    wait_for("the held-back batch", Duration::from_secs(60), || {
        at_hub(251)
    });
    // Its linger (1 s), then the wait behind the cap.
    let took = start.elapsed();
    assert!(
        took > Duration::from_millis(2500),
        "the cap held the batch back only {took:?}, so this test shows nothing"
    );
    // Agent and hub share this machine's clock: the skew the hub recorded
    // is the time between the batch's stamp and its arrival.
    let (_, devices) = hub_get(&hub, &hub.api("/devices"));
    let skew = devices["items"][0]["clock_skew_ms"].as_i64().unwrap();
    assert!(
        skew.abs() < 1000,
        "clock skew {skew} ms after {took:?}: the batch kept the stamp it was packed with"
    );
}
