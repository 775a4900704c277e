//! Integration tests of the syslog and Fluent Forward listeners and the
//! Rust client against a real `logbookd` (the `agent` area's [`Agent`]):
//! records sent as real programs send them, read back through `GET
//! /v1/logs` with their level, module, message, metadata and trusted fields.

mod client;
mod docker;
mod forward;
pub(crate) mod journal;
mod jsonlines;
mod listeners;
mod syslog;

use std::process::Command;

use serde_json::Value;

use crate::agent::Agent;
use crate::util::interop_client;

/// The record whose message is `message`, after a flush.
pub fn record(agent: &Agent, message: &str) -> Value {
    agent.flush();
    let all = agent.logs("");
    all.into_iter()
        .find(|r| r["message"] == message)
        .unwrap_or_else(|| panic!("no record {message:?}\nlog:\n{}", agent.log_text()))
}

/// A status counter of bad input by reason.
pub fn bad(agent: &Agent, reason: &str) -> u64 {
    agent.status()["ingest"]["bad"][reason].as_u64().unwrap()
}

/// The trusted process name of a sender that may have exited before the
/// agent read its datagram (or accepted its connection): the name comes
/// from `/proc/<pid>/comm`, gone with the process, so it is that program's
/// name or absent, never anything else. pid and uid come from the kernel
/// with the message and are always there.
pub fn short_lived(r: &Value, program: &str) {
    assert!(
        r["process"] == program || r["process"].is_null(),
        "process of {r}"
    );
    assert!(r["pid"].as_u64().is_some_and(|p| p > 0), "{r}");
}

/// The uid of this test process (trusted fields must match it).
pub fn my_uid() -> u32 {
    rustix::process::getuid().as_raw()
}

/// True when python3 is installed and can import `modules` (skips, or
/// fails under CI, like [`interop_client`]).
pub fn python_with(modules: &[&str]) -> bool {
    if !interop_client("python3") {
        return false;
    }
    let ok = Command::new("python3")
        .arg("-c")
        .arg(format!("import {}", modules.join(", ")))
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("python3 cannot import {modules:?}; .ci/run must install them");
        }
        eprintln!("SKIPPED: python3 cannot import {modules:?}");
    }
    ok
}

/// Runs a python script with arguments; its stdout.
pub fn python(script: &str, args: &[&str]) -> String {
    let out = crate::util::run_ok(Command::new("python3").arg("-c").arg(script).args(args));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
