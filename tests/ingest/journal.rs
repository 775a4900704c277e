//! `ingest.journal = true` against a real systemd journal. This machine
//! (and CI) runs no journald, so the test writes a real journal file with
//! `systemd-journal-remote` (the journal's own writer, fed export-format
//! entries on stdin) into a directory the agent reads with
//! `ingest.journal_directory` (`journalctl --directory`); entries appended
//! while the agent runs reach it through `journalctl --follow`, exactly as
//! on a robot. Proves: the field mapping, the filters, following, and that
//! across a clean stop and a SIGKILL every entry is stored exactly once.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::agent::Agent;
use crate::util::{interop_client, wait_for, TestDir};

const JOURNAL_REMOTE: &str = "/lib/systemd/systemd-journal-remote";

pub(crate) fn have_journal_tools() -> bool {
    if !interop_client("journalctl") {
        return false;
    }
    if Path::new(JOURNAL_REMOTE).exists() {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{JOURNAL_REMOTE} is missing; .ci/run must install systemd-journal-remote");
    }
    eprintln!("SKIPPED: {JOURNAL_REMOTE} is missing (apt-get install systemd-journal-remote)");
    false
}

/// One journal entry in export format, as this boot's (the agent's first
/// run reads the current boot).
fn entry(message: &str, priority: u8, unit: &str, ident: &str, pid: u32) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .replace('-', "");
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!(
        "__REALTIME_TIMESTAMP={now_us}\n__MONOTONIC_TIMESTAMP={now_us}\n_BOOT_ID={boot}\n\
         MESSAGE={message}\nPRIORITY={priority}\nSYSLOG_IDENTIFIER={ident}\n_SYSTEMD_UNIT={unit}\n\
         _PID={pid}\n_UID=1000\n_GID=1001\n_COMM={ident}d\nCODE_FILE=src/{ident}.c\n\n"
    )
}

/// Appends entries to the journal file in `dir` with systemd-journal-remote.
pub(crate) fn append(dir: &Path, entries: &[String]) {
    let mut child = Command::new(JOURNAL_REMOTE)
        .arg(format!("--output={}", dir.join("remote.journal").display()))
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start systemd-journal-remote");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(entries.concat().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "systemd-journal-remote: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn start(dir: &TestDir, journal: &Path) -> Agent {
    Agent::start(
        dir,
        &[
            ("LOGBOOK_INGEST_JOURNAL", "true"),
            (
                "LOGBOOK_INGEST_JOURNAL_DIRECTORY",
                journal.to_str().unwrap(),
            ),
            ("LOGBOOK_INGEST_JOURNAL_UNITS", "nav.service,arm.service"),
            ("LOGBOOK_INGEST_JOURNAL_IDENTIFIERS", "kernel"),
            ("LOGBOOK_INGEST_JOURNAL_PRIORITY", "info"),
        ],
    )
}

/// Waits until the agent holds `want` journal records; returns them.
fn journal_records(agent: &Agent, want: usize) -> Vec<Value> {
    wait_for(
        &format!("{want} journal records"),
        Duration::from_secs(30),
        || {
            let all: Vec<Value> = agent
                .logs("")
                .into_iter()
                .filter(|r| r["metadata"]["_BOOT_ID"].is_string())
                .collect();
            (all.len() >= want).then_some(all)
        },
    )
}

fn messages(records: &[Value]) -> Vec<String> {
    let mut m: Vec<String> = records
        .iter()
        .map(|r| r["message"].as_str().unwrap().to_owned())
        .collect();
    m.sort();
    m
}

#[test]
fn journal_entries_are_read_once_across_restarts() {
    if !have_journal_tools() {
        return;
    }
    let dir = TestDir::new("journal_once");
    let journal: PathBuf = dir.join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    append(
        &journal,
        &[
            entry("a1 localization lost", 3, "nav.service", "nav", 42),
            entry(
                "skipped: debug is below the floor",
                7,
                "nav.service",
                "nav",
                42,
            ),
            entry(
                "skipped: unit not asked for",
                3,
                "other.service",
                "other",
                7,
            ),
            entry("a2 from the kernel identifier", 4, "", "kernel", 1),
        ],
    );
    let mut agent = start(&dir, &journal);
    let got = journal_records(&agent, 2);
    assert_eq!(
        messages(&got),
        ["a1 localization lost", "a2 from the kernel identifier"]
    );
    let a1 = got
        .iter()
        .find(|r| r["message"] == "a1 localization lost")
        .unwrap();
    assert_eq!(a1["level"], "ERROR");
    assert_eq!(a1["module"], "nav");
    assert_eq!(a1["pid"], 42);
    assert_eq!(a1["uid"], 1000);
    assert_eq!(a1["gid"], 1001);
    assert_eq!(a1["process"], "navd");
    assert_eq!(a1["metadata"]["_SYSTEMD_UNIT"], "nav.service");
    assert_eq!(a1["metadata"]["CODE_FILE"], "src/nav.c");
    assert!(a1["metadata"].get("__CURSOR").is_none(), "{a1}");

    // Followed while running.
    append(
        &journal,
        &[entry("b1 followed", 6, "arm.service", "arm", 43)],
    );
    journal_records(&agent, 3);

    // A clean stop, entries written while it is down, a start: each once.
    agent.terminate();
    append(
        &journal,
        &[
            entry("c1 while stopped", 5, "nav.service", "nav", 42),
            entry("c2 while stopped", 6, "nav.service", "nav", 42),
        ],
    );
    let mut agent = start(&dir, &journal);
    journal_records(&agent, 5);
    append(
        &journal,
        &[entry("d1 after restart", 6, "nav.service", "nav", 42)],
    );
    journal_records(&agent, 6);
    agent.flush();

    // A SIGKILL: what was committed is not read again.
    agent.kill9();
    append(
        &journal,
        &[entry("e1 after the kill", 6, "nav.service", "nav", 42)],
    );
    let agent = start(&dir, &journal);
    let all = journal_records(&agent, 7);
    assert_eq!(
        messages(&all),
        [
            "a1 localization lost",
            "a2 from the kernel identifier",
            "b1 followed",
            "c1 while stopped",
            "c2 while stopped",
            "d1 after restart",
            "e1 after the kill"
        ],
        "every entry once\nlog:\n{}",
        agent.log_text()
    );
    let status = agent.status();
    assert_eq!(
        status["ingest"]["accepted_by_protocol"]["journal"], 1,
        "this run read one entry: {status}"
    );
}

#[test]
fn a_missing_journalctl_is_reported_and_the_agent_goes_on() {
    let dir = TestDir::new("journal_missing");
    let agent = Agent::start(
        &dir,
        &[
            ("LOGBOOK_INGEST_JOURNAL", "true"),
            ("LOGBOOK_INGEST_JOURNAL_DIRECTORY", "/nonexistent-journal"),
            ("PATH", "/nonexistent-bin"),
        ],
    );
    wait_for("the journal error", Duration::from_secs(20), || {
        agent
            .log_text()
            .contains("reading the systemd journal: cannot start journalctl")
            .then_some(())
    });
    crate::agent::send_lines(&agent, &[r#"{"msg":"still here"}"#]);
    crate::ingest::record(&agent, "still here");
}
