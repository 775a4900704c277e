//! Crash capture end to end (README "Crashes"): a real process killed by
//! SIGSEGV dumps a real core into `artifacts.core_dir` during a session
//! (its cwd is the directory and `ulimit -c` is raised in its shell, so
//! the default `kernel.core_pattern` of `core` lands there: no global
//! change), and a systemd-coredump entry is written into a real journal
//! file the agent follows; the hub ends up with the crash report and the
//! core as the session's artifacts, the `crash` mark and the error record.

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{hub_get, hub_logs, start_agent, sync_env};
use crate::hub::HubProc;
use crate::util::{wait_for, TestDir};

/// Whether a core of a process whose cwd is the core directory lands in
/// it: `kernel.core_pattern` must be a relative file name.
fn cores_land_in_cwd() -> Option<String> {
    let pattern = std::fs::read_to_string("/proc/sys/kernel/core_pattern")
        .unwrap_or_default()
        .trim()
        .to_owned();
    if !pattern.is_empty() && !pattern.starts_with('|') && !pattern.contains('/') {
        return Some(pattern);
    }
    let why = format!(
        "kernel.core_pattern is {pattern:?}, not a file name in the crashing process's cwd"
    );
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
    None
}

/// The hub's artifacts of a session, by path.
fn files(hub: &HubProc, session: &str) -> Vec<Value> {
    let (st, v) = hub_get(hub, &hub.api(&format!("/sessions/{session}/files")));
    if st != 200 {
        return Vec::new();
    }
    v["items"].as_array().cloned().unwrap_or_default()
}

/// Waits for the session's crash report and core at the hub; the report's
/// JSON and the core's path.
fn wait_report(hub: &HubProc, session: &str, core_ext: &str) -> (Value, String) {
    let (report, core) = wait_for(
        "the crash report and core at the hub",
        Duration::from_secs(60),
        || {
            let f = files(hub, session);
            let path = |end: &str| {
                f.iter()
                    .map(|a| a["path"].as_str().unwrap().to_owned())
                    .find(|p| p.starts_with("crash-") && p.ends_with(end))
            };
            Some((path(".json")?, path(core_ext)?))
        },
    );
    let (st, v) = hub_get(
        hub,
        &hub.api(&format!("/sessions/{session}/files/{report}")),
    );
    assert_eq!(st, 200, "{v}");
    (v, core)
}

/// The session's marks at the hub, once there is one.
fn wait_crash_mark(hub: &HubProc, session: &str) -> Value {
    wait_for("the crash mark at the hub", Duration::from_secs(60), || {
        let (st, v) = hub_get(hub, &hub.api(&format!("/sessions/{session}/marks")));
        assert_eq!(st, 200, "{v}");
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "crash")
            .cloned()
    })
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[test]
fn a_process_that_dumps_core_during_a_session_is_a_crash_at_the_hub() {
    let Some(pattern) = cores_land_in_cwd() else {
        return;
    };
    let hub = HubProc::start("sync_crash");
    let dir = TestDir::new("sync-crash");
    let cores = dir.join("cores");
    std::fs::create_dir_all(&cores).unwrap();
    // A core from before the agent started is not reported.
    std::fs::write(cores.join("core.old.1"), b"an old core").unwrap();
    let mut env = sync_env(&hub.url, &hub.device);
    for (k, v) in [
        ("LOGBOOK_ARTIFACTS_CORE_DIR", cores.to_str().unwrap()),
        ("LOGBOOK_ARTIFACTS_CORES", "true"),
        ("LOGBOOK_ARTIFACTS_SETTLE_SECS", "0.5"),
        ("LOGBOOK_ARTIFACTS_RESCAN_SECS", "1"),
    ] {
        env.push((k.into(), v.into()));
    }
    let agent = start_agent(&dir, &env);
    let session = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // The crashing process: `sleep`, its core limit raised by its shell.
    let mut child = Command::new("sh")
        .args(["-c", "ulimit -c unlimited && exec sleep 120"])
        .current_dir(&cores)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    wait_for("the child to be sleep", Duration::from_secs(10), || {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "sleep").then_some(())
    });
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::SEGV,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSEGV));
    if !status.core_dumped() {
        let why =
            format!("sleep was killed by SIGSEGV but dumped no core (core_pattern {pattern:?})");
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
        return;
    }
    let core_path = std::fs::read_dir(&cores)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().unwrap() != "core.old.1")
        .expect("the core file");
    let core_bytes = std::fs::read(&core_path).unwrap();

    let (report, core) = wait_report(&hub, &session, ".core.gz");
    assert_eq!(report["source"], "core_dir", "{report}");
    assert_eq!(report["command"], "sleep", "{report}");
    assert_eq!(report["pid"], pid, "{report}");
    assert_eq!(report["signal"], 11, "{report}");
    assert_eq!(report["signal_name"], "SIGSEGV", "{report}");
    assert_eq!(report["args"], "sleep 120", "{report}");
    assert_eq!(report["session_id"], session.as_str(), "{report}");
    assert_eq!(report["core"]["attached"], true, "{report}");
    assert_eq!(report["core"]["file"], core.as_str(), "{report}");
    assert_eq!(report["core_size"], core_bytes.len(), "{report}");
    // The core at the hub is the core the kernel wrote, gzipped.
    let (st, _) = hub_get(&hub, &hub.api(&format!("/sessions/{session}/files/{core}")));
    assert_eq!(st, 200);
    let local = Path::new(
        agent.ok("GET", "/v1/sessions/current", None)["artifact_dir"]
            .as_str()
            .unwrap(),
    )
    .join(&core);
    assert_eq!(gunzip(&std::fs::read(local).unwrap()), core_bytes);
    let at_hub = files(&hub, &session)
        .into_iter()
        .find(|f| f["path"] == core.as_str())
        .unwrap();
    assert_eq!(
        at_hub["size_bytes"].as_u64(),
        Some(
            std::fs::metadata(
                agent
                    .state
                    .join(format!("sessions/{session}/artifacts/{core}"))
            )
            .unwrap()
            .len()
        )
    );

    let mark = wait_crash_mark(&hub, &session);
    assert_eq!(mark["priority"], "high", "{mark}");
    assert_eq!(mark["metadata"]["command"], "sleep", "{mark}");
    assert_eq!(mark["metadata"]["signal"], "SIGSEGV", "{mark}");
    let logs = wait_for(
        "the crash record at the hub",
        Duration::from_secs(60),
        || {
            let logs = hub_logs(&hub, &format!("/sessions/{session}/logs"));
            logs.iter().any(|r| r["module"] == "crash").then_some(logs)
        },
    );
    let crashes: Vec<&Value> = logs.iter().filter(|r| r["module"] == "crash").collect();
    assert_eq!(
        crashes.len(),
        1,
        "one crash, the old core left alone: {logs:?}"
    );
    assert_eq!(crashes[0]["level"], "ERROR");
    assert_eq!(
        crashes[0]["message"],
        format!("crash: sleep (pid {pid}) dumped core on SIGSEGV")
    );
    assert_eq!(
        files(&hub, &session).len(),
        2,
        "only the new crash's report and core"
    );
}

#[test]
fn a_systemd_coredump_journal_entry_is_a_crash_at_the_hub() {
    if !crate::ingest::journal::have_journal_tools() {
        return;
    }
    let hub = HubProc::start("sync_coredump");
    let dir = TestDir::new("sync-coredump");
    let journal = dir.join("journal");
    std::fs::create_dir_all(&journal).unwrap();
    // Where systemd-coredump would have stored the (compressed) core.
    let stored = dir.join("core.planner.1000.abc.4242.1700000000000000.zst");
    std::fs::write(&stored, b"(\xb5/\xfd zstd bytes of a core").unwrap();
    let mut env = sync_env(&hub.url, &hub.device);
    for (k, v) in [
        ("LOGBOOK_INGEST_JOURNAL", "true"),
        (
            "LOGBOOK_INGEST_JOURNAL_DIRECTORY",
            journal.to_str().unwrap(),
        ),
        ("LOGBOOK_ARTIFACTS_CORES", "true"),
        ("LOGBOOK_ARTIFACTS_SETTLE_SECS", "0.5"),
        ("LOGBOOK_ARTIFACTS_RESCAN_SECS", "1"),
    ] {
        env.push((k.into(), v.into()));
    }
    let agent = start_agent(&dir, &env);
    let session = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .replace('-', "");
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let entry = format!(
        "__REALTIME_TIMESTAMP={now_us}\n__MONOTONIC_TIMESTAMP={now_us}\n_BOOT_ID={boot}\n\
         PRIORITY=2\nSYSLOG_IDENTIFIER=systemd-coredump\n_PID=5120\n_UID=0\n_GID=0\n\
         _COMM=systemd-coredum\nMESSAGE_ID=fc2e22bc6ee647b6b90729ab34a250b1\n\
         COREDUMP_PID=4242\nCOREDUMP_UID=1000\nCOREDUMP_SIGNAL=6\nCOREDUMP_SIGNAL_NAME=SIGABRT\n\
         COREDUMP_TIMESTAMP={now_us}\nCOREDUMP_COMM=planner\nCOREDUMP_EXE=/usr/bin/planner\n\
         COREDUMP_UNIT=planner.service\nCOREDUMP_CMDLINE=/usr/bin/planner --map warehouse\n\
         COREDUMP_FILENAME={}\nMESSAGE=Process 4242 (planner) of user 1000 dumped core.\n\n",
        stored.display()
    );
    crate::ingest::journal::append(&journal, &[entry]);

    let (report, core) = wait_report(&hub, &session, ".core.zst");
    assert_eq!(report["source"], "systemd-coredump", "{report}");
    assert_eq!(report["command"], "planner", "{report}");
    assert_eq!(report["executable"], "/usr/bin/planner", "{report}");
    assert_eq!(report["pid"], 4242, "{report}");
    assert_eq!(report["signal_name"], "SIGABRT", "{report}");
    assert_eq!(report["unit"], "planner.service", "{report}");
    assert_eq!(report["core"]["attached"], true, "{report}");
    let local = agent
        .state
        .join(format!("sessions/{session}/artifacts/{core}"));
    assert_eq!(
        std::fs::read(local).unwrap(),
        std::fs::read(&stored).unwrap()
    );

    let mark = wait_crash_mark(&hub, &session);
    assert_eq!(mark["priority"], "high", "{mark}");
    assert_eq!(mark["metadata"]["signal"], "SIGABRT", "{mark}");
    assert_eq!(mark["metadata"]["source"], "systemd-coredump", "{mark}");
    // The journal's own record is the error record (PRIORITY=2: fatal).
    let logs = wait_for(
        "the coredump record at the hub",
        Duration::from_secs(60),
        || {
            let logs = hub_logs(&hub, &format!("/sessions/{session}/logs"));
            logs.into_iter().find(|r| r["module"] == "systemd-coredump")
        },
    );
    assert_eq!(logs["level"], "FATAL", "{logs}");
    assert_eq!(
        logs["message"],
        "Process 4242 (planner) of user 1000 dumped core."
    );
}
