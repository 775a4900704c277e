//! SIGHUP makes `logbookd` re-read its configuration: a device token or a
//! hub URL fixed in the config file takes effect without a restart, for
//! logs and artifacts alike; a broken file changes nothing; other changed
//! keys are named as needing a restart. Checked at the hub with
//! `logbook --hub`.

use std::time::Duration;

use super::*;
use crate::agent::{send_lines, Agent};
use crate::util::{wait_for, TestDir};

fn config(hub: &str, token: &str, max_bytes: &str) -> String {
    format!(
        "[sync]\nhub = \"{hub}\"\ntoken = \"{token}\"\n\n[buffer]\nmax_bytes = \"{max_bytes}\"\n"
    )
}

fn hup(agent: &Agent) {
    let pid = rustix::process::Pid::from_raw(agent.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::HUP).unwrap();
}

#[test]
fn sighup_applies_a_fixed_device_token() {
    let hub = HubProc::start("cli_reload");
    let dir = TestDir::new("cli_reload");
    let file = dir.join("agent.toml");
    std::fs::write(&file, config(&hub.url, "lbd_wrong", "64MiB")).unwrap();
    let env = [
        ("LOGBOOK_DEVICE_ID", crate::hub::DEVICE),
        ("LOGBOOK_SYNC_LINGER", "0.05"),
        ("LOGBOOK_SYNC_RETRY_MIN", "0.05"),
        ("LOGBOOK_SYNC_RETRY_MAX", "0.5"),
        ("LOGBOOK_ARTIFACTS_SETTLE_SECS", "0.3"),
        ("LOGBOOK_ARTIFACTS_RESCAN_SECS", "1"),
    ];
    let agent = Agent::spawn(&dir, &env, &["--config", file.to_str().unwrap()]);
    agent.wait_ready();

    let s = agent.ok("POST", "/v1/sessions", Some("{}"));
    let id = s["id"].as_str().unwrap().to_owned();
    let artifacts = std::path::PathBuf::from(s["artifact_dir"].as_str().unwrap());
    send_lines(
        &agent,
        &[
            r#"{"level":"info","msg":"one"}"#,
            r#"{"level":"warn","msg":"two"}"#,
        ],
    );
    std::fs::write(artifacts.join("map.pgm"), b"P5 2 2 255 abcd").unwrap();
    agent.flush();
    wait_for("auth-failed", Duration::from_secs(10), || {
        let s = agent.status();
        (s["sync"]["link"] == "auth-failed" && s["artifacts"]["auth_failed"] == true).then_some(())
    });

    // A broken file on reload: one line in the log, the agent runs on.
    std::fs::write(&file, "[sync\nhub = ").unwrap();
    hup(&agent);
    wait_for("the refused reload", Duration::from_secs(10), || {
        agent.log_text().contains("reload refused").then_some(())
    });
    assert!(agent.child.id() > 0 && agent.status()["sync"]["link"] == "auth-failed");

    // The right token (and a changed buffer size, which needs a restart).
    std::fs::write(&file, config(&hub.url, &hub.device, "32MiB")).unwrap();
    hup(&agent);
    wait_for("the records at the hub", Duration::from_secs(20), || {
        let out = cli(&hub)
            .args(["logs", "--session", &id, "--json"])
            .output()
            .unwrap();
        (out.status.success() && json_lines(&String::from_utf8_lossy(&out.stdout)).len() == 2)
            .then_some(())
    });
    wait_for("the artifact at the hub", Duration::from_secs(20), || {
        let out = ok(cli(&hub), &["artifacts", "--session", &id]);
        out.contains("map.pgm").then_some(())
    });
    let st = agent.status();
    assert_eq!(st["sync"]["link"], "online", "{st}");
    assert_eq!(st["artifacts"]["auth_failed"], false, "{st}");
    let log = agent.log_text();
    assert!(
        log.contains("buffer.max_bytes changed and needs a restart"),
        "{log}"
    );
    assert!(!log.contains(&hub.device), "the token is never logged");
}

#[test]
fn sighup_moves_the_uploaders_to_a_fixed_hub_url() {
    let hub = HubProc::start("cli_reload_hub");
    let dir = TestDir::new("cli_reload_hub");
    // A port nothing listens on: the wrong hub.
    let wrong = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let file = dir.join("agent.toml");
    std::fs::write(&file, config(&wrong, &hub.device, "64MiB")).unwrap();
    let env = [
        ("LOGBOOK_DEVICE_ID", crate::hub::DEVICE),
        ("LOGBOOK_SYNC_LINGER", "0.05"),
        ("LOGBOOK_SYNC_RETRY_MIN", "0.05"),
        ("LOGBOOK_SYNC_RETRY_MAX", "0.5"),
        ("LOGBOOK_ARTIFACTS_SETTLE_SECS", "0.3"),
        ("LOGBOOK_ARTIFACTS_RESCAN_SECS", "1"),
    ];
    let agent = Agent::spawn(&dir, &env, &["--config", file.to_str().unwrap()]);
    agent.wait_ready();

    let s = agent.ok("POST", "/v1/sessions", Some("{}"));
    let id = s["id"].as_str().unwrap().to_owned();
    let artifacts = std::path::PathBuf::from(s["artifact_dir"].as_str().unwrap());
    send_lines(
        &agent,
        &[
            r#"{"level":"info","msg":"one"}"#,
            r#"{"level":"error","msg":"two"}"#,
        ],
    );
    std::fs::write(artifacts.join("map.pgm"), b"P5 2 2 255 abcd").unwrap();
    agent.flush();
    // Both uploaders fail against the wrong hub and keep retrying.
    wait_for("failed attempts", Duration::from_secs(10), || {
        let s = agent.status();
        (s["sync"]["link"] == "offline"
            && s["sync"]["failures"].as_u64() >= Some(2)
            && s["artifacts"]["backoff_seconds"].as_f64() > Some(0.0))
        .then_some(())
    });

    // The right hub URL, and SIGHUP: no restart.
    let pid = agent.child.id();
    std::fs::write(&file, config(&hub.url, &hub.device, "64MiB")).unwrap();
    hup(&agent);
    // Empty until the session reaches the hub.
    let logs = || {
        let out = cli(&hub)
            .args(["logs", "--session", &id, "--json"])
            .output()
            .unwrap();
        json_lines(&String::from_utf8_lossy(&out.stdout))
    };
    wait_for(
        "the records at the new hub",
        Duration::from_secs(20),
        || (logs().len() == 2).then_some(()),
    );
    wait_for(
        "the artifact at the new hub",
        Duration::from_secs(20),
        || {
            let out = ok(cli(&hub), &["artifacts", "--session", &id]);
            out.contains("map.pgm").then_some(())
        },
    );
    // More records go there too, and each record is there exactly once.
    send_lines(&agent, &[r#"{"level":"info","msg":"three"}"#]);
    crate::sync::wait_synced(&agent, Duration::from_secs(10));
    let got = logs();
    let messages: Vec<&str> = got.iter().map(|r| r["message"].as_str().unwrap()).collect();
    let mut sorted = messages.clone();
    sorted.sort();
    assert_eq!(sorted, ["one", "three", "two"], "{messages:?}");
    let st = agent.status();
    assert_eq!(st["sync"]["link"], "online", "{st}");
    assert_eq!(agent.child.id(), pid);
    let log = agent.log_text();
    assert!(log.contains("the uploaders send to"), "{log}");
    assert!(!log.contains("needs a restart"), "{log}");
}
