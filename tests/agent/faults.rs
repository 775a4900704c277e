//! Faults a robot's disk meets, made real: the state directory on a small
//! tmpfs that fills up under a running agent, and `agent.db` overwritten
//! while the agent writes to it. Every record received is stored or counted
//! in a gap, and the agent keeps serving.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use super::Agent;
use crate::util::{wait_for, TestDir};

/// A tmpfs of `size` mounted on `path`, unmounted on drop (lazily, so a
/// daemon still exiting never keeps it mounted), also when the test fails.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts it, or says why not: root is needed. Skips with a notice
    /// where mounting is refused, except under CI as root, where the test
    /// must run.
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(path.to_owned())),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_owned(),
                    Err(e) => e.to_string(),
                };
                let root = rustix::process::getuid().is_root();
                if std::env::var_os("CI").is_some() && root {
                    panic!("cannot mount a tmpfs as root under CI: {why}");
                }
                eprintln!("SKIPPED: cannot mount a tmpfs ({why}); run as root");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn line(level: &str, tag: &str, i: usize) -> String {
    format!(
        r#"{{"level":"{level}","module":"planner","msg":"{tag} {i}: replanned around 3 obstacles, cost 41.7, horizon 8 s","frame":{i}}}"#
    )
}

fn send(agent: &Agent, level: &str, tag: &str, n: usize) {
    let mut s = agent.ingest();
    let mut buf = String::new();
    for i in 0..n {
        buf.push_str(&line(level, tag, i));
        buf.push('\n');
    }
    s.write_all(buf.as_bytes()).unwrap();
}

fn gap_total(st: &Value, reason: &str) -> u64 {
    st["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["reason"] == reason)
        .map(|g| g["dropped"].as_u64().unwrap())
        .sum()
}

/// Fills the filesystem of `dir` with one file until the kernel says no.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![7u8; 64 << 10];
    let mut written = 0u64;
    for size in [64 << 10, 4 << 10, 512] {
        while f.write_all(&chunk[..size]).is_ok() {
            written += size as u64;
        }
    }
    let _ = f.sync_all();
    written
}

#[test]
fn a_full_disk_evicts_keeps_serving_and_every_record_is_stored_or_a_disk_full_gap() {
    let dir = TestDir::new("disk_full");
    let Some(_fs) = Tmpfs::mount(&dir.join("state"), "40m") else {
        return;
    };
    let mut agent = Agent::start(
        &dir,
        &[
            // Sized to the filesystem, which then fills with something else.
            ("LOGBOOK_BUFFER_MAX_BYTES", "32MiB"),
            ("LOGBOOK_BUFFER_MIN_FREE_BYTES", "0"),
        ],
    );
    let (before, during, after) = (30_000, 30_000, 5_000);
    send(&agent, "debug", "before", before);
    agent.flush();
    // Something else on the robot takes every byte left.
    let filler = agent.state.join("filler");
    let taken = fill(&filler);
    assert!(taken > 0);
    // The agent goes on taking records and answering.
    for chunk in 0..6 {
        send(&agent, "info", &format!("during{chunk}"), during / 6);
        agent.flush();
        let st = agent.status();
        assert!(st["records"]["stored"].as_i64().unwrap() > 0, "{st}");
    }
    assert!(
        agent.child_alive(),
        "logbookd died on a full disk:\n{}",
        agent.log_text()
    );
    assert!(
        agent.log_text().contains("is full: evicting to make room"),
        "the disk never filled:\n{}",
        agent.log_text()
    );
    let st = agent.status();
    assert!(
        st["records"]["evicted_unsynced"].as_u64().unwrap() > 0,
        "the full disk made room by evicting: {st}"
    );
    // Space comes back: normal work resumes.
    std::fs::remove_file(&filler).unwrap();
    send(&agent, "error", "after", after);
    agent.flush();
    let st = agent.status();
    assert_eq!(st["buffer"]["disk_full"], false, "{st}");
    assert_eq!(
        agent.logs("level=error").len(),
        after,
        "after space returned, nothing is lost"
    );
    // Every record received is stored, or counted in a gap with its reason.
    let total = (before + during + after) as u64;
    assert_eq!(st["ingest"]["accepted"].as_u64().unwrap(), total, "{st}");
    let stored = st["records"]["stored"].as_u64().unwrap();
    let evicted = gap_total(&st, "evicted");
    let disk_full = gap_total(&st, "disk_full");
    assert_eq!(
        evicted,
        st["records"]["evicted_unsynced"].as_u64().unwrap(),
        "{st}"
    );
    assert_eq!(
        stored + evicted + disk_full,
        total,
        "stored {stored} + evicted {evicted} + disk_full {disk_full}: {st}"
    );
    assert_eq!(gap_total(&st, "write_failed"), 0, "{st}");
    eprintln!(
        "disk full: {total} received, {stored} stored, {evicted} evicted (gaps), {disk_full} disk_full (gaps), 0 unaccounted"
    );
    assert_eq!(
        st["ingest"]["write_failed"].as_u64().unwrap(),
        disk_full,
        "{st}"
    );
}

#[test]
fn a_database_overwritten_under_the_agent_is_quarantined_and_a_fresh_one_continues() {
    let dir = TestDir::new("corrupt_running");
    let mut agent = Agent::start(&dir, &[]);
    let session = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    send(&agent, "info", "before", 500);
    agent.flush();
    // Pages overwritten under the running agent, header and all.
    let db = agent.state.join("agent.db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .unwrap()
        .write_all(&vec![0xa5; len])
        .unwrap();
    let st = wait_for(
        "the bad database moved aside",
        Duration::from_secs(30),
        || {
            agent
                .try_api("GET", "/v1/status", None)
                .ok()
                .filter(|(code, st)| *code == 200 && st["buffer"]["quarantined"] == 1)
                .map(|(_, st)| st)
        },
    );
    let aside = PathBuf::from(st["buffer"]["quarantined_to"].as_str().unwrap());
    assert!(aside.exists(), "{st}\n{}", dir.listing());
    // The loss is reported, in the session it happened in.
    let gaps = st["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{st}");
    assert_eq!(gaps[0]["reason"], "corrupt");
    assert_eq!(gaps[0]["session_id"], session.as_str());
    assert_eq!(gaps[0]["dropped"], 500);
    // A fresh buffer continues the same session, with seqs never reused.
    assert_eq!(st["current_session"], session.as_str(), "{st}");
    send(&agent, "warn", "after", 200);
    let last = agent.flush();
    assert_eq!(last, 700);
    let logs = agent.logs(&format!("session={session}"));
    assert_eq!(logs.len(), 200);
    assert_eq!(logs[0]["seq"], 501);
    assert!(agent.child_alive(), "{}", agent.log_text());
    // No crash loop: a restart opens the fresh file as it is.
    assert!(agent.terminate().success());
    let agent = Agent::start(&dir, &[]);
    let st = agent.status();
    assert_eq!(st["current_session"], session.as_str(), "{st}");
    assert_eq!(st["records"]["stored"], 200, "{st}");
    assert_eq!(st["buffer"]["quarantined"], 0, "{st}");
}
