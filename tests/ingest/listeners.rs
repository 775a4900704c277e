//! The listeners as a whole: accepted records counted per protocol in
//! `/v1/status` and `/metrics`, and listeners switched off by config.

use std::io::Write;
use std::os::unix::net::{UnixDatagram, UnixStream};

use serde_json::json;

use crate::agent::{send_lines, Agent};
use crate::util::TestDir;

#[test]
fn accepted_records_are_counted_per_protocol() {
    let dir = TestDir::new("listeners_counts");
    let agent = Agent::start(&dir, &[]);
    send_lines(&agent, &[r#"{"msg":"by json"}"#]);
    let syslog = UnixDatagram::unbound().unwrap();
    for m in ["<14>a: by syslog 1", "<14>a: by syslog 2"] {
        syslog
            .send_to(m.as_bytes(), agent.runtime.join("syslog.sock"))
            .unwrap();
    }
    let mut forward = UnixStream::connect(agent.runtime.join("forward.sock")).unwrap();
    for i in 0..3 {
        let msg = rmp_serde::to_vec(&(
            "app",
            1_700_000_000u64,
            json!({"message": format!("by forward {i}")}),
        ));
        forward.write_all(&msg.unwrap()).unwrap();
    }
    agent.flush();
    let st = agent.status();
    assert_eq!(
        st["ingest"]["accepted_by_protocol"],
        json!({"json": 1, "syslog": 2, "forward": 3, "journal": 0}),
        "{st}"
    );
    assert_eq!(st["ingest"]["accepted"], 6, "{st}");
    let (_, metrics) = agent.api("GET", "/metrics", None);
    let text = metrics.as_str().unwrap();
    for line in [
        r#"logbook_ingest_records_total{outcome="accepted",protocol="json"} 1"#,
        r#"logbook_ingest_records_total{outcome="accepted",protocol="syslog"} 2"#,
        r#"logbook_ingest_records_total{outcome="accepted",protocol="forward"} 3"#,
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    let out = crate::util::run_ok(agent.cli().arg("status"));
    let out = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.contains("6 accepted (json 1, syslog 2, forward 3)"),
        "{out}"
    );
}

#[test]
fn switched_off_listeners_have_no_socket_and_the_others_work() {
    let dir = TestDir::new("listeners_off");
    // A socket file from an earlier run must not be left behind for
    // senders to fill.
    let runtime = dir.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    let stale = UnixDatagram::bind(runtime.join("syslog.sock")).unwrap();
    drop(stale);
    let config = dir.join("agent.toml");
    std::fs::write(&config, "[ingest]\nforward = false\n").unwrap();
    let agent = Agent::spawn(
        &dir,
        &[("LOGBOOK_INGEST_SYSLOG", "false")],
        &["--config", config.to_str().unwrap()],
    );
    agent.wait_ready();
    assert!(!agent.runtime.join("syslog.sock").exists());
    assert!(!agent.runtime.join("forward.sock").exists());
    assert!(UnixDatagram::unbound()
        .unwrap()
        .send_to(b"<14>a: lost", agent.runtime.join("syslog.sock"))
        .is_err());
    send_lines(&agent, &[r#"{"msg":"json still works"}"#]);
    agent.flush();
    assert_eq!(agent.logs("search=still").len(), 1);
    assert!(
        std::fs::read_to_string(&agent.log)
            .unwrap()
            .contains("syslog off, forward off"),
        "{}",
        agent.log_text()
    );
    drop(agent);

    // Only forward off: syslog is served again.
    let dir = TestDir::new("listeners_forward_off");
    let agent = Agent::start(&dir, &[("LOGBOOK_INGEST_FORWARD", "false")]);
    assert!(!agent.runtime.join("forward.sock").exists());
    UnixDatagram::unbound()
        .unwrap()
        .send_to(b"<14>a: syslog on", agent.runtime.join("syslog.sock"))
        .unwrap();
    agent.flush();
    assert_eq!(agent.logs("search=syslog%20on").len(), 1);
}
