//! systemd integration: READY/WATCHDOG/STOPPING on a NOTIFY_SOCKET the test
//! owns, socket activation through `systemd-socket-activate`, socket modes,
//! and `systemd-analyze verify` of the units.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{http, Agent};
use crate::util::{bin, interop_client, wait_for, TestDir};

#[test]
fn ready_watchdog_and_stopping_notifications() {
    let dir = TestDir::new("notify");
    let notify = dir.join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let notify_env = notify.display().to_string();
    let mut agent = Agent::spawn(
        &dir,
        &[
            ("NOTIFY_SOCKET", notify_env.as_str()),
            ("WATCHDOG_USEC", "200000"),
        ],
        &[],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    let mut recv = |want: &str, times: usize| {
        while seen.matches(want).count() < times {
            let n = match rx.recv(&mut buf) {
                Ok(n) => n,
                // A signal (the test harness's threads) may interrupt the
                // wait; that is not the agent's failure.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("waiting for {want}: {e}; got {seen:?}"),
            };
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            seen.push('\n');
        }
    };
    recv("READY=1", 1);
    // Ready means accepting logs: the ingest socket is there.
    assert!(agent.runtime.join("ingest.sock").exists());
    // Pinged on a timer, not once.
    recv("WATCHDOG=1", 3);
    recv("STATUS=", 2);
    let pid = rustix::process::Pid::from_raw(agent.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    recv("STOPPING=1", 1);
    let status = wait_for("exit", Duration::from_secs(10), || {
        agent.child.try_wait().unwrap()
    });
    assert!(status.success());
}

#[test]
fn sockets_are_0660() {
    let dir = TestDir::new("socket_mode");
    let agent = Agent::start(&dir, &[]);
    for s in ["ingest.sock", "api.sock"] {
        let mode = std::fs::metadata(agent.runtime.join(s))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o660, "{s}");
    }
}

#[test]
fn socket_activation_with_systemd_socket_activate() {
    if !interop_client("systemd-socket-activate") {
        return;
    }
    let dir = TestDir::new("socket_activation");
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let ingest = run.join("ingest.sock");
    let api = run.join("api.sock");
    let log = std::fs::File::create(dir.join("logbookd.log")).unwrap();
    let child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&ingest)
        .arg("-l")
        .arg(&api)
        .arg("--fdname=ingest:api")
        .arg("-E")
        .arg("LOGBOOK_DEVICE_ID=activated")
        .arg(bin("logbookd"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--runtime-dir")
        .arg(&run)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut child = crate::util::KillOnDrop(child);
    let status = wait_for("the activated API", Duration::from_secs(20), || {
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!(
                "exited early: {st:?}\n{}",
                std::fs::read_to_string(dir.join("logbookd.log")).unwrap_or_default()
            );
        }
        http(&api, "GET", "/v1/status", None)
            .ok()
            .filter(|(c, _)| *c == 200)
    });
    assert_eq!(status.1["device_id"], "activated");
    let mut s = std::os::unix::net::UnixStream::connect(&ingest).unwrap();
    std::io::Write::write_all(&mut s, b"{\"msg\":\"via activation\"}\n").unwrap();
    let (code, _) = http(&api, "POST", "/v1/flush", None).unwrap();
    assert_eq!(code, 200);
    let (_, logs) = http(&api, "GET", "/v1/logs", None).unwrap();
    assert_eq!(logs["items"][0]["message"], "via activation");
    let log = std::fs::read_to_string(dir.join("logbookd.log")).unwrap();
    assert!(
        log.contains("using the ingest socket passed by systemd"),
        "{log}"
    );
    assert!(
        log.contains("using the api socket passed by systemd"),
        "{log}"
    );
    let _ = child.0.kill();
}

#[test]
fn systemd_analyze_verify_passes_on_the_units() {
    if !interop_client("systemd-analyze") {
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = TestDir::new("analyze");
    // The unit names a binary path that does not exist here: verify against
    // a copy pointing at the built binary.
    for unit in ["logbookd.service", "logbookd.socket"] {
        let text = std::fs::read_to_string(root.join("systemd").join(unit)).unwrap();
        let text = text.replace("/usr/bin/logbookd", &bin("logbookd").display().to_string());
        std::fs::write(dir.join(unit), text).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.join("logbookd.socket"))
        .arg(dir.join("logbookd.service"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // Only complaints about our units count; the host's own units may warn.
    let ours: Vec<&str> = err.lines().filter(|l| l.contains("logbookd")).collect();
    assert!(out.status.success() && ours.is_empty(), "{err}");
}
