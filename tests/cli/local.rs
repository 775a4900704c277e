//! The `logbook` CLI against a real `logbookd` on this machine: `logs -f`
//! over the local API's streamed follow, and `logbook log`.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use super::{fails, ok, Running};
use crate::agent::{send_lines, Agent};
use crate::util::{wait_for, TestDir};

/// The seqs of the JSON records `run` printed, in order.
fn printed(run: &Running) -> Vec<(u64, String)> {
    run.lines()
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            (
                v["seq"].as_u64().unwrap(),
                v["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn logs_follow_streams_each_new_record_once_and_ends_with_the_session() {
    let dir = TestDir::new("local_logs_follow");
    let agent = Agent::start(&dir, &[]);
    let id = ok(agent.cli(), &["session", "start"]).trim().to_owned();
    let before: Vec<String> = (0..15)
        .map(|i| format!(r#"{{"msg":"before {i}"}}"#))
        .collect();
    send_lines(
        &agent,
        &before.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    agent.flush();

    let mut cmd = agent.cli();
    cmd.stdin(Stdio::null());
    let run = Running::spawn(
        cmd,
        &[
            "logs",
            "-f",
            "--json",
            "--session",
            "current",
            "--level",
            "info",
        ],
    );
    // The tail: the newest 10, oldest first.
    let tail = wait_for("the tail", Duration::from_secs(20), || {
        let p = printed(&run);
        (p.len() >= 10).then_some(p)
    });
    let want: Vec<String> = (5..15).map(|i| format!("before {i}")).collect();
    assert_eq!(
        tail.iter().map(|(_, m)| m.clone()).collect::<Vec<_>>(),
        want,
        "{}",
        run.stderr()
    );

    // Rounds of new records, each seen promptly; a debug one never.
    for round in 0..5 {
        let lines: Vec<String> = (0..40)
            .map(|i| format!(r#"{{"msg":"round {round} line {i}"}}"#))
            .chain([format!(r#"{{"msg":"quiet {round}","level":"debug"}}"#)])
            .collect();
        send_lines(
            &agent,
            &lines.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let last = format!("round {round} line 39");
        wait_for(&last, Duration::from_secs(10), || {
            printed(&run).iter().any(|(_, m)| *m == last).then_some(())
        });
    }

    // The session ends: the stream ends and the CLI exits 0.
    ok(agent.cli(), &["session", "stop"]);
    let mut run = run;
    let status = run.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "{status:?}: {}", run.stderr());

    // Every record of the session at info and above, each exactly once, in
    // seq order.
    let got = printed(&run);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, m) in &got {
        *counts.entry(m).or_default() += 1;
    }
    assert!(counts.values().all(|&n| n == 1), "{counts:?}");
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "{got:?}");
    assert!(!got.iter().any(|(_, m)| m.starts_with("quiet")));
    let stored = agent.logs(&format!("session={id}&level=info"));
    assert_eq!(got.len(), stored.len() - 5, "all but the 5 before the tail");
    assert_eq!(got.len(), 10 + 5 * 40);
}

#[test]
fn logs_follow_of_everything_starts_at_the_end_when_nothing_matches_yet() {
    let dir = TestDir::new("local_logs_follow_empty");
    let agent = Agent::start(&dir, &[]);
    send_lines(&agent, &[r#"{"msg":"old","module":"other"}"#]);
    agent.flush();
    let mut run = Running::spawn(agent.cli(), &["logs", "-f", "--json", "--module", "nav"]);
    // Whether it lands in the tail or in the stream, it is printed once.
    send_lines(&agent, &[r#"{"msg":"new","module":"nav::planner"}"#]);
    wait_for("the new record", Duration::from_secs(10), || {
        (!printed(&run).is_empty()).then_some(())
    });
    let got = printed(&run);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].1, "new");
    // Without a session there is no end: it follows until interrupted.
    assert!(run.child.try_wait().unwrap().is_none(), "{}", run.stderr());

    // A session that does not exist is an error, not an empty follow.
    let missing = "0190a8e2-0000-7000-8000-000000000000";
    let err = fails(agent.cli(), &["logs", "-f", "--session", missing]);
    assert_eq!(
        err,
        format!("logbook: no session {missing} (not_found)\n"),
        "{err}"
    );
}

#[test]
fn logs_follow_outlives_an_agent_restart_and_prints_each_record_once() {
    let dir = TestDir::new("local_logs_follow_restart");
    let mut agent = Agent::start(&dir, &[]);
    let run = Running::spawn(agent.cli(), &["logs", "-f", "--json"]);
    send_lines(&agent, &[r#"{"msg":"before"}"#]);
    wait_for("the record", Duration::from_secs(10), || {
        (printed(&run).len() == 1).then_some(())
    });
    assert!(agent.terminate().success());
    // The API's graceful stop waits on open requests, for at most 5 s: a
    // follow ends at once instead of holding it up.
    assert!(
        !agent.log_text().contains("local API did not stop in time"),
        "{}",
        agent.log_text()
    );
    wait_for("the notice", Duration::from_secs(10), || {
        run.stderr()
            .contains("(agent stopping); waiting for logbookd")
            .then_some(())
    });

    let agent = Agent::start(&dir, &[]);
    send_lines(&agent, &[r#"{"msg":"after"}"#]);
    wait_for(
        "the record after the restart",
        Duration::from_secs(20),
        || (printed(&run).len() >= 2).then_some(()),
    );
    agent.flush();
    let got: Vec<String> = printed(&run).into_iter().map(|(_, m)| m).collect();
    assert_eq!(got, ["before", "after"], "{}", run.stderr());
    assert!(run.stderr().contains("following again"), "{}", run.stderr());
}

/// Runs `logbook log …` with `stdin`; its pid and output.
fn log(agent: &Agent, args: &[&str], stdin: &str) -> (u32, std::process::Output) {
    let mut child = agent
        .cli()
        .arg("log")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start logbook log");
    let pid = child.id();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).unwrap();
    drop(input);
    (pid, child.wait_with_output().unwrap())
}

#[test]
fn log_sends_a_message_or_stdin_lines_with_trusted_fields() {
    let dir = TestDir::new("local_log");
    let agent = Agent::start(&dir, &[]);

    let (pid, out) = log(
        &agent,
        &["--level", "warn", "--module", "power", "battery", "low"],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (pid2, out) = log(&agent, &["-m", "shell"], "first line\n\nsecond line\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let records = wait_for("the three records", Duration::from_secs(10), || {
        agent.flush();
        let r = agent.logs("");
        (r.len() >= 3).then_some(r)
    });
    assert_eq!(records.len(), 3, "an empty stdin line is no record");
    let r = &records[0];
    assert_eq!(
        (&r["level"], &r["module"], &r["message"], &r["pid"]),
        (
            &Value::from("WARN"),
            &Value::from("power"),
            &Value::from("battery low"),
            &Value::from(pid)
        ),
        "{r}"
    );
    for (r, msg) in records[1..].iter().zip(["first line", "second line"]) {
        assert_eq!(r["level"], "INFO", "{r}");
        assert_eq!(r["module"], "shell", "{r}");
        assert_eq!(r["message"], msg, "{r}");
        assert_eq!(r["pid"], pid2, "{r}");
        assert_eq!(r["process"], "logbook", "{r}");
    }

    let err = fails(agent.cli(), &["log", "--level", "loud", "hello"]);
    assert!(err.contains("unknown level \"loud\""), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    agent.flush();
    assert_eq!(agent.logs("").len(), 3, "nothing sent with a bad level");
}

#[test]
fn log_says_when_the_agent_is_not_running() {
    let dir = TestDir::new("local_log_no_agent");
    let mut cmd = std::process::Command::new(crate::util::bin("logbook"));
    cmd.arg("--runtime-dir").arg(dir.join("run"));
    let err = fails(cmd, &["log", "hello"]);
    assert!(
        err.starts_with("logbook: is logbookd running? no socket at ")
            && err.contains("ingest.sock"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
