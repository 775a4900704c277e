//! JSON lines from the shell (`socat`) as Go's `log/slog` JSON handler
//! writes them, the README's "Go slog" and "shell" sections.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::json;

use super::{my_uid, record, short_lived};
use crate::agent::Agent;
use crate::util::{interop_client, TestDir};

#[test]
fn socat_sends_go_slog_lines() {
    if !interop_client("socat") {
        return;
    }
    let dir = TestDir::new("jsonlines_socat");
    let agent = Agent::start(&dir, &[]);
    let mut child = Command::new("socat")
        .arg("-")
        .arg(format!(
            "UNIX-CONNECT:{}",
            agent.runtime.join("ingest.sock").display()
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Exactly what slog.NewJSONHandler writes.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            br#"{"time":"2026-11-26T02:03:04.123456789+01:00","level":"WARN","msg":"battery low","module":"power","pct":14}
{"time":"2026-11-26T02:03:05+01:00","level":"ERROR","msg":"dock failed","attempt":3}
"#,
        )
        .unwrap();
    assert!(child.wait().unwrap().success());
    let r = record(&agent, "battery low");
    assert_eq!(r["level"], "WARN");
    assert_eq!(r["module"], "power");
    assert_eq!(r["timestamp"], "2026-11-26T01:03:04.123456789Z");
    assert_eq!(r["metadata"], json!({"pct": 14}));
    short_lived(&r, "socat");
    assert_eq!(r["uid"], my_uid());
    assert_eq!(
        record(&agent, "dock failed")["metadata"],
        json!({"attempt": 3})
    );
}
