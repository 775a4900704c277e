//! Marks on the robot end to end (README "Marks"): made by the CLI, the
//! local API, a JSON line's `event` field and a syslog structured-data
//! element, listed and used to narrow a log query, and their windows kept
//! through a buffer filled far past its bound.

use std::io::Write;

use super::{disk_bytes, send_lines, Agent};
use crate::util::{run_ok, wait_for, TestDir};

/// RFC 3339 for `ms` milliseconds after 2026-01-01T00:00:00Z.
pub fn at(ms: u64) -> String {
    format!(
        "2026-01-01T{:02}:{:02}:{:02}.{:03}Z",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

fn line(level: &str, ms: u64) -> String {
    format!(
        r#"{{"timestamp":"{}","level":"{level}","module":"drive","msg":"wheel odometry tick {ms}: left 1.02 m/s right 1.01 m/s, imu yaw 0.3 deg","tick":{ms}}}"#,
        at(ms)
    )
}

#[test]
fn marks_from_the_cli_the_api_json_lines_and_syslog_are_listed_and_narrow_logs() {
    let dir = TestDir::new("marks-made");
    let agent = Agent::start(&dir, &[]);
    let session = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Records around 10 s, one of them a collision event.
    let mut lines: Vec<String> = (0..40).map(|i| line("info", 9_000 + i * 50)).collect();
    lines.push(format!(
        r#"{{"timestamp":"{}","level":"warn","msg":"bumper pressed","event":{{"name":"collision","before":"1s","after":"500ms","metadata":{{"bumper":"front"}}}}}}"#,
        at(10_000)
    ));
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    agent.flush();

    // From the CLI: now, with a window and metadata.
    let out = run_ok(agent.cli().args([
        "mark",
        "estop",
        "--before",
        "5s",
        "--after",
        "2s",
        "--priority",
        "high",
        "--meta",
        "by=operator",
        "--json",
    ]));
    let m: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            &m["name"],
            &m["priority"],
            &m["before_seconds"],
            &m["after_seconds"]
        ),
        (&"estop".into(), &"high".into(), &5.0.into(), &2.0.into())
    );
    assert_eq!(m["metadata"]["by"], "operator");
    assert_eq!(m["session_id"], session.as_str());

    // From syslog structured data.
    let syslog = std::os::unix::net::UnixDatagram::unbound().unwrap();
    syslog
        .send_to(
            format!(
                "<12>1 {} robot nav 7 - [event@32473 name=\"stuck\" after=\"3s\" zone=\"dock\"] wheels slipping",
                at(11_000)
            )
            .as_bytes(),
            agent.runtime.join("syslog.sock"),
        )
        .unwrap();
    let marks = wait_for("three marks", std::time::Duration::from_secs(20), || {
        let page = agent.ok("GET", "/v1/marks", None);
        let items = page["items"].as_array().unwrap().clone();
        (items.len() == 3).then_some(items)
    });
    // Newest first.
    let names: Vec<&str> = marks.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["stuck", "estop", "collision"]);
    let collision = &marks[2];
    let time = |k: &str| collision[k].as_str().unwrap().to_owned();
    assert!(
        time("timestamp").starts_with("2026-01-01T00:00:10"),
        "{collision}"
    );
    assert!(
        time("start").starts_with("2026-01-01T00:00:09"),
        "{collision}"
    );
    assert!(
        time("end").starts_with("2026-01-01T00:00:10.5"),
        "{collision}"
    );
    assert_eq!(collision["metadata"]["bumper"], "front");
    assert_eq!(marks[0]["metadata"]["zone"], "dock");
    assert_eq!(marks[0]["after_seconds"], 3.0);

    // A log query narrowed to the collision's window: 9.0 s ..= 10.5 s.
    let out = run_ok(agent.cli().args(["logs", "--mark", "collision", "--json"]));
    let ticks: Vec<u64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["metadata"]["tick"].as_u64()
        })
        .collect();
    assert_eq!(ticks, (0..=30).map(|i| 9_000 + i * 50).collect::<Vec<_>>());
    // `logbook marks` lists them all as rows.
    let out = run_ok(agent.cli().args(["marks", "--session", "current"]));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("high    estop"), "{text}");

    // What a user gets wrong is a clear 400, and the agent goes on.
    for (body, want) in [
        (r#"{"name":""}"#, "needs a name"),
        (r#"{"name":"a","before":"2h"}"#, "between 0 and 1h"),
        (r#"{"name":"a","priority":"urgent"}"#, "not high or normal"),
        (r#"{"name":"a","colour":1}"#, "unknown field"),
    ] {
        let (status, v) = agent.api("POST", "/v1/marks", Some(body));
        assert!(matches!(status, 400 | 422), "{body}: {status} {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{body}: {v}"
        );
    }
    let (status, v) = agent.api("GET", "/v1/logs?mark=nothing", None);
    assert_eq!(status, 404, "{v}");
    // A bad event in a record keeps the record and is counted.
    send_lines(&agent, &[r#"{"msg":"odd","event":42}"#]);
    agent.flush();
    assert_eq!(agent.logs("search=odd").len(), 1);
    assert_eq!(
        agent.ok("GET", "/v1/marks", None)["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_marked_window_survives_a_buffer_filled_far_past_its_bound() {
    let dir = TestDir::new("marks-pinned");
    let max = 1u64 << 20;
    let agent = Agent::start(
        &dir,
        &[
            ("LOGBOOK_BUFFER_MAX_BYTES", "1MiB"),
            ("LOGBOOK_BUFFER_MIN_FREE_BYTES", "0"),
        ],
    );
    agent.ok("POST", "/v1/sessions", Some("{}"));
    // 2,000 records a millisecond apart, a mark in the middle pinning
    // 101 of them (the lowest level, which eviction takes first), then
    // twelve times as much newer data.
    let mut s = agent.ingest();
    for ms in 0..2_000 {
        writeln!(s, "{}", line("debug", ms)).unwrap();
    }
    drop(s);
    agent.flush();
    agent.ok(
        "POST",
        "/v1/marks",
        Some(&format!(
            r#"{{"name":"collision","timestamp":"{}","before":"50ms","after":"50ms"}}"#,
            at(1_000)
        )),
    );
    let mut s = agent.ingest();
    for ms in 2_000..26_000 {
        writeln!(
            s,
            "{}",
            line(if ms % 2 == 0 { "debug" } else { "info" }, ms)
        )
        .unwrap();
    }
    drop(s);
    agent.flush();

    let on_disk = disk_bytes(&agent);
    assert!(
        on_disk <= max,
        "db + WAL is {on_disk} bytes, over {max}\n{}",
        dir.listing()
    );
    let window: Vec<u64> = agent
        .logs("mark=collision")
        .iter()
        .map(|r| r["metadata"]["tick"].as_u64().unwrap())
        .collect();
    assert_eq!(
        window,
        (950..=1_050).collect::<Vec<_>>(),
        "the window is all there"
    );
    let st = agent.status();
    let stored = st["records"]["stored"].as_u64().unwrap();
    assert!(stored < 26_000, "the bound forced eviction: {st}");
    // Everything dropped is a gap; no pin was released.
    let gaps = st["gaps"].as_array().unwrap();
    let dropped: u64 = gaps
        .iter()
        .filter(|g| g["reason"] == "evicted")
        .map(|g| g["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(dropped + stored, 26_000, "{st}");
    assert!(gaps.iter().all(|g| g["reason"] == "evicted"), "{st}");
    let mark = &agent.ok("GET", "/v1/marks", None)["items"][0];
    assert!(mark["released"].is_null(), "{mark}");
}

#[test]
fn pins_over_pinned_max_are_released_oldest_normal_first_and_reported() {
    let dir = TestDir::new("marks-over");
    let agent = Agent::start(
        &dir,
        &[
            ("LOGBOOK_BUFFER_MAX_BYTES", "1MiB"),
            ("LOGBOOK_BUFFER_MIN_FREE_BYTES", "0"),
            // About 1,200 of these records.
            ("LOGBOOK_BUFFER_PINNED_MAX", "256KiB"),
        ],
    );
    agent.ok("POST", "/v1/sessions", Some("{}"));
    let mut s = agent.ingest();
    for ms in 0..3_000 {
        writeln!(s, "{}", line("debug", ms)).unwrap();
    }
    drop(s);
    agent.flush();
    // Three windows of 1,001 records: high (oldest), normal, normal.
    for (name, ms, priority) in [
        ("a", 500, "high"),
        ("b", 1_500, "normal"),
        ("c", 2_500, "normal"),
    ] {
        agent.ok(
            "POST",
            "/v1/marks",
            Some(&format!(
                r#"{{"name":"{name}","timestamp":"{}","before":"500ms","after":"500ms","priority":"{priority}"}}"#,
                at(ms)
            )),
        );
    }
    let mut s = agent.ingest();
    for ms in 3_000..30_000 {
        writeln!(s, "{}", line("debug", ms)).unwrap();
    }
    drop(s);
    agent.flush();
    // Only one window fits: the normal ones went, oldest first... and the
    // newer normal one too, before the high one.
    let marks = agent.ok("GET", "/v1/marks", None)["items"]
        .as_array()
        .unwrap()
        .clone();
    let released: Vec<(&str, bool)> = marks
        .iter()
        .map(|m| (m["name"].as_str().unwrap(), m["released"].is_null()))
        .collect();
    assert_eq!(released, [("c", false), ("b", false), ("a", true)]);
    assert_eq!(agent.logs("mark=a").len(), 1_001);
    let st = agent.status();
    let pin_gaps: u64 = st["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["reason"] == "pin_released")
        .map(|g| g["dropped"].as_u64().unwrap())
        .sum();
    assert_eq!(pin_gaps, 2 * 1_001, "{st}");
    assert!(disk_bytes(&agent) <= 1 << 20);
}
