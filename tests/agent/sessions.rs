//! Sessions through the CLI and the API: open/close/tag, one active at a
//! time, logs attributed to the session, the boot-id rule on restart.

use std::process::Command;

use super::{send_lines, Agent};
use crate::util::{run_ok, TestDir};

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run_ok(cmd).stdout).unwrap()
}

#[test]
fn sessions_through_the_cli() {
    let dir = TestDir::new("sessions_cli");
    let agent = Agent::start(&dir, &[]);
    send_lines(&agent, &[r#"{"msg":"before any session"}"#]);

    let id = stdout(agent.cli().args([
        "session",
        "start",
        "--tag",
        "field-test",
        "--tag",
        "dock",
        "--package",
        "nav@1.4.2",
        "--meta",
        "site=lab",
    ]))
    .trim()
    .to_owned();
    assert_eq!(id.len(), 36, "only the id on stdout: {id:?}");
    let session = agent.ok("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(session["status"], "active");
    assert_eq!(session["device_id"], super::DEVICE);
    assert_eq!(session["tags"], serde_json::json!(["field-test", "dock"]));
    assert_eq!(
        session["package"],
        serde_json::json!({"name":"nav","version":"1.4.2"})
    );
    assert_eq!(session["metadata"]["site"], "lab");
    let artifacts = session["artifact_dir"].as_str().unwrap();
    assert!(std::path::Path::new(artifacts).is_dir(), "{artifacts}");
    assert!(artifacts.ends_with(&format!("sessions/{id}/artifacts")));

    // A second start is refused, naming the active session.
    let out = agent.cli().args(["session", "start"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&id) && err.contains("session_active"), "{err}");
    let (code, body) = agent.api("POST", "/v1/sessions", Some("{}"));
    assert_eq!(code, 409);
    assert_eq!(body["error"]["code"], "session_active");
    assert!(body["error"]["message"].as_str().unwrap().contains(&id));

    send_lines(
        &agent,
        &[
            r#"{"msg":"in session","level":"warn","module":"nav"}"#,
            r#"{"msg":"debug in session","level":"debug"}"#,
        ],
    );
    stdout(agent.cli().args(["session", "tag", "docked"]));
    let status = stdout(agent.cli().args(["session", "status"]));
    assert!(
        status.contains(&id) && status.contains("docked") && status.contains("nav@1.4.2"),
        "{status}"
    );
    agent.flush();

    let json = stdout(agent.cli().args(["logs", "--session", &id, "--json"]));
    let lines: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{json}");
    assert!(lines.iter().all(|l| l["session_id"] == id.as_str()));
    for key in [
        "seq",
        "timestamp",
        "level",
        "module",
        "message",
        "metadata",
        "pid",
        "uid",
        "gid",
        "process",
    ] {
        assert!(lines[0].get(key).is_some(), "{key} missing in {}", lines[0]);
    }
    let warn = stdout(
        agent
            .cli()
            .args(["logs", "--level", "warn", "--module", "nav"]),
    );
    assert_eq!(warn.lines().count(), 1, "{warn}");
    assert!(
        warn.contains("WARN") && warn.contains("nav: in session"),
        "{warn}"
    );
    let all = stdout(agent.cli().args(["logs"]));
    assert_eq!(all.lines().count(), 3, "{all}");
    // The design writes it under `session` too: the same command.
    let again = stdout(agent.cli().args(["session", "logs"]));
    assert_eq!(again, all);
    assert!(
        all.lines().next().unwrap().contains("before any session"),
        "oldest first: {all}"
    );
    let last = stdout(agent.cli().args(["logs", "--limit", "1"]));
    assert!(
        last.contains("debug in session") && last.lines().count() == 1,
        "{last}"
    );

    std::fs::write(std::path::Path::new(artifacts).join("map.pgm"), b"P5").unwrap();
    let listed = stdout(agent.cli().args(["artifacts"]));
    assert!(listed.contains("map.pgm"), "{listed}");

    let stopped =
        stdout(
            agent
                .cli()
                .args(["session", "stop", "--failed", "--error", "motor stall"]),
        );
    assert!(stopped.contains("failed"), "{stopped}");
    let session = agent.ok("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(session["status"], "failed");
    assert_eq!(session["error"], "motor stall");
    assert_eq!(session["log_count"], 2);
    assert!(session["ended_at"].is_string());
    assert!(session["duration_seconds"].as_f64().unwrap() > 0.0);
    let none = stdout(agent.cli().args(["session", "status"]));
    assert!(none.contains("no active session"), "{none}");
    // Stopping again: nothing active.
    let out = agent.cli().args(["session", "stop"]).output().unwrap();
    assert!(!out.status.success());

    // Tags on a closed session through the API; list with filters and cursor.
    agent.ok("DELETE", &format!("/v1/sessions/{id}/tags/dock"), None);
    let second = agent.ok("POST", "/v1/sessions", Some(r#"{"tags":["b"]}"#))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    agent.ok(
        "POST",
        "/v1/sessions/current/stop",
        Some(r#"{"failed":false,"error":null}"#),
    );
    let page = agent.ok("GET", "/v1/sessions?limit=1", None);
    assert_eq!(page["items"][0]["id"], second.as_str());
    let cursor = page["next_cursor"].as_str().unwrap().to_owned();
    let page = agent.ok(
        "GET",
        &format!("/v1/sessions?limit=1&before={cursor}"),
        None,
    );
    assert_eq!(page["items"][0]["id"], id.as_str());
    assert_eq!(
        page["items"][0]["tags"],
        serde_json::json!(["field-test", "docked"])
    );
    let failed = agent.ok("GET", "/v1/sessions?status=failed", None);
    assert_eq!(failed["items"].as_array().unwrap().len(), 1);
    assert_eq!(
        agent
            .api("GET", &format!("/v1/sessions/{}", uuid::Uuid::nil()), None)
            .0,
        404
    );
}

#[test]
fn cli_says_what_to_do_without_an_agent() {
    let dir = TestDir::new("cli_no_agent");
    let out = Command::new(crate::util::bin("logbook"))
        .arg("--runtime-dir")
        .arg(dir.join("nowhere"))
        .args(["session", "start"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("logbook: is logbookd running? no socket at"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn a_session_from_an_earlier_boot_is_failed_on_start() {
    let dir = TestDir::new("earlier_boot");
    let boot = dir.join("boot_id");
    std::fs::write(&boot, "boot-a\n").unwrap();
    let boot_env = boot.display().to_string();
    let env = [("LOGBOOK_PATHS_BOOT_ID_FILE", boot_env.as_str())];
    let mut agent = Agent::start(&dir, &env);
    let id = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    send_lines(&agent, &[r#"{"msg":"last words"}"#]);
    agent.flush();
    agent.kill9();

    // Same boot: the agent itself restarted, the session stays active.
    let mut agent = Agent::start(&dir, &env);
    assert_eq!(
        agent.ok("GET", "/v1/sessions/current", None)["id"],
        id.as_str()
    );
    agent.kill9();

    // A new boot: closed as failed.
    std::fs::write(&boot, "boot-b\n").unwrap();
    let agent = Agent::start(&dir, &env);
    let s = agent.ok("GET", &format!("/v1/sessions/{id}"), None);
    assert_eq!(s["status"], "failed");
    assert_eq!(s["error"], "device rebooted");
    assert!(s["ended_at"].is_string());
    assert_eq!(agent.api("GET", "/v1/sessions/current", None).0, 404);
    // And a new session can open.
    assert_eq!(agent.api("POST", "/v1/sessions", Some("{}")).0, 201);
}

#[test]
fn logs_follow_prints_new_records_and_a_closed_pipe_is_quiet() {
    use std::io::BufRead;
    let dir = TestDir::new("logs_follow");
    let agent = Agent::start(&dir, &[]);
    send_lines(&agent, &[r#"{"msg":"old one"}"#]);
    agent.flush();
    let mut child = agent
        .cli()
        .args(["logs", "--follow", "--json", "--level", "info"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _guard = crate::util::KillOnDrop(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_line = |want: &str| {
        crate::util::wait_for(want, std::time::Duration::from_secs(20), || {
            while let Ok(l) = rx.try_recv() {
                seen.push(l);
            }
            seen.iter().any(|l| l.contains(want)).then_some(())
        })
    };
    wait_line("old one");
    send_lines(
        &agent,
        &[
            r#"{"msg":"quiet","level":"debug"}"#,
            r#"{"msg":"new one","level":"warn"}"#,
        ],
    );
    agent.flush();
    wait_line("new one");
    assert!(!seen.iter().any(|l| l.contains("quiet")), "{seen:?}");

    // `logbook logs | head -1` on a long log: exit 0, nothing on stderr.
    if !crate::util::interop_client("bash") {
        return;
    }
    let lines: Vec<String> = (0..5000)
        .map(|i| format!(r#"{{"msg":"filler {i}"}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    agent.flush();
    let script = format!(
        "set -o pipefail; '{}' --runtime-dir '{}' logs | head -n 1 >/dev/null",
        crate::util::bin("logbook").display(),
        agent.runtime.display()
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
