//! `syslog.sock`: RFC 5424 and 3164 datagrams from a raw socket, `logger`
//! and Python's `SysLogHandler`, with trusted fields from SCM_CREDENTIALS.

use std::os::unix::net::UnixDatagram;
use std::process::Command;

use serde_json::json;

use super::{bad, my_uid, python, python_with, record, short_lived};
use crate::agent::Agent;
use crate::util::{interop_client, run_ok, TestDir};

fn send(agent: &Agent, datagram: &[u8]) {
    let s = UnixDatagram::unbound().unwrap();
    s.send_to(datagram, agent.runtime.join("syslog.sock"))
        .unwrap();
}

#[test]
fn datagrams_become_records_with_trusted_fields() {
    let dir = TestDir::new("syslog_raw");
    let agent = Agent::start(&dir, &[("LOGBOOK_INGEST_MAX_RECORD_BYTES", "1024")]);
    for s in ["syslog.sock", "forward.sock"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(agent.runtime.join(s))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o660, "{s}");
    }
    send(
        &agent,
        b"<11>1 2026-11-26T01:02:03.5Z robot1 planner 42 PLAN7 [route@32473 waypoint=\"12\"] replanning failed",
    );
    send(&agent, b"<28>Nov 26 01:02:03 nav[77]: wheel slip\n");
    send(&agent, b"");
    send(&agent, b"<14>1 yesterday robot1 app - - - kept anyway");
    let long = format!("<14>big: {}", "x".repeat(8000));
    send(&agent, long.as_bytes());

    let r = record(&agent, "replanning failed");
    assert_eq!(r["level"], "ERROR");
    assert_eq!(r["module"], "planner");
    assert_eq!(r["timestamp"], "2026-11-26T01:02:03.5Z");
    assert_eq!(
        r["metadata"],
        json!({"syslog_facility": "user", "syslog_severity": 3, "hostname": "robot1",
               "procid": "42", "msgid": "PLAN7",
               "structured_data": {"route@32473": {"waypoint": "12"}}})
    );
    assert_eq!(r["pid"], std::process::id());
    assert_eq!(r["uid"], my_uid());
    assert!(r["process"].is_string(), "{r}");

    let r = record(&agent, "wheel slip");
    assert_eq!(r["level"], "WARN");
    assert_eq!(r["module"], "nav");
    assert_eq!(r["metadata"]["syslog_facility"], "daemon");
    assert_eq!(r["metadata"]["procid"], "77");
    assert_eq!(r["pid"], std::process::id());

    let kept = agent
        .logs("")
        .into_iter()
        .find(|r| r["metadata"]["syslog_error"].is_string())
        .expect("the malformed datagram is kept as text");
    assert!(kept["message"].as_str().unwrap().contains("kept anyway"));

    let cut = agent
        .logs("module=big")
        .pop()
        .expect("the over-long datagram is kept");
    let msg = cut["message"].as_str().unwrap();
    assert!(msg.ends_with("…[truncated]") && msg.len() <= 1024, "{msg}");
    assert_eq!(cut["metadata"]["logbook_original_bytes"], long.len());

    assert_eq!(bad(&agent, "syslog_empty"), 1);
    assert_eq!(bad(&agent, "syslog_malformed"), 1);
    let st = agent.status();
    assert!(st["ingest"]["truncated"].as_u64().unwrap() >= 1, "{st}");
    let (_, metrics) = agent.api("GET", "/metrics", None);
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("reason=\"syslog_empty\"} 1"),
        "{metrics}"
    );
}

#[test]
fn logger_rfc3164_and_rfc5424_with_structured_data() {
    if !interop_client("logger") {
        return;
    }
    let dir = TestDir::new("syslog_logger");
    let agent = Agent::start(&dir, &[]);
    let sock = agent.runtime.join("syslog.sock");
    run_ok(
        Command::new("logger")
            .arg("-u")
            .arg(&sock)
            .args(["--socket-errors=on", "--rfc3164", "-t", "drive", "-p"])
            .args(["local0.warning", "motor hot"]),
    );
    run_ok(
        Command::new("logger")
            .arg("-u")
            .arg(&sock)
            .args([
                "--socket-errors=on",
                "--rfc5424",
                "-t",
                "arm",
                "-p",
                "user.err",
            ])
            .args(["--msgid", "J3", "--sd-id", "joint@32473"])
            .args(["--sd-param", "id=\"3\"", "--sd-param", "temp=\"81.5\""])
            .arg("joint over temperature"),
    );

    let r = record(&agent, "motor hot");
    assert_eq!(r["level"], "WARN");
    assert_eq!(r["module"], "drive");
    assert_eq!(r["metadata"]["syslog_facility"], "local0");
    assert_eq!(r["metadata"]["syslog_severity"], 4);
    short_lived(&r, "logger");
    assert_eq!(r["uid"], my_uid());
    assert!(r["pid"].as_u64().unwrap() > 0);

    let r = record(&agent, "joint over temperature");
    assert_eq!(r["level"], "ERROR");
    assert_eq!(r["module"], "arm");
    assert_eq!(r["metadata"]["msgid"], "J3");
    assert_eq!(
        r["metadata"]["structured_data"]["joint@32473"],
        json!({"id": "3", "temp": "81.5"})
    );
    short_lived(&r, "logger");
    assert_eq!(r["uid"], my_uid());
}

#[test]
fn python_syslog_handler() {
    if !python_with(&["logging.handlers"]) {
        return;
    }
    let dir = TestDir::new("syslog_python");
    let agent = Agent::start(&dir, &[]);
    let pid = python(
        r#"
import logging, logging.handlers, os, sys
h = logging.handlers.SysLogHandler(address=sys.argv[1])
h.setFormatter(logging.Formatter("%(name)s[%(process)d]: %(message)s"))
log = logging.getLogger("perception")
log.addHandler(h)
log.setLevel(logging.DEBUG)
log.warning("lidar dropout %d frames", 3)
log.debug("tick")
print(os.getpid())
"#,
        &[agent.runtime.join("syslog.sock").to_str().unwrap()],
    );
    let r = record(&agent, "lidar dropout 3 frames");
    assert_eq!(r["level"], "WARN");
    assert_eq!(r["module"], "perception");
    assert_eq!(r["metadata"]["syslog_facility"], "user");
    assert_eq!(r["metadata"]["procid"], pid.trim());
    assert_eq!(r["pid"].to_string(), pid.trim(), "trusted pid is python's");
    assert_eq!(r["uid"], my_uid());
    let r = record(&agent, "tick");
    assert_eq!(r["level"], "DEBUG");
}

/// systemd passes `syslog.sock` (ListenDatagram=) and `forward.sock`
/// (ListenStream=) by name; the agent adopts them and binds the rest.
/// `systemd-socket-activate` passes one kind per run, so two runs.
#[test]
fn socket_activation_of_the_syslog_and_forward_sockets() {
    if !interop_client("systemd-socket-activate") {
        return;
    }
    for (kind, name) in [("--datagram", "syslog"), ("", "forward")] {
        let dir = TestDir::new(&format!("activate_{name}"));
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        let sock = run.join(format!("{name}.sock"));
        let log = std::fs::File::create(dir.join("logbookd.log")).unwrap();
        let mut cmd = Command::new("systemd-socket-activate");
        if !kind.is_empty() {
            cmd.arg(kind);
        }
        let child = cmd
            .arg("-l")
            .arg(&sock)
            .arg(format!("--fdname={name}"))
            .arg("-E")
            .arg("LOGBOOK_DEVICE_ID=activated")
            .arg(crate::util::bin("logbookd"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--runtime-dir")
            .arg(&run)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let _child = crate::util::KillOnDrop(child);
        // systemd-socket-activate binds, then starts the program on the
        // first message.
        crate::util::wait_for(
            "the activation socket",
            std::time::Duration::from_secs(10),
            || sock.exists().then_some(()),
        );
        if name == "syslog" {
            UnixDatagram::unbound()
                .unwrap()
                .send_to(b"<12>act: via activation", &sock)
                .unwrap();
        } else {
            use std::io::Write;
            // Bound is not yet listening for a moment: retry the connect.
            let mut s = crate::util::wait_for(
                "a connection to the activation socket",
                std::time::Duration::from_secs(10),
                || std::os::unix::net::UnixStream::connect(&sock).ok(),
            );
            s.write_all(
                &rmp_serde::to_vec(&("act", 1_764_119_000u64, json!({"msg": "via activation"})))
                    .unwrap(),
            )
            .unwrap();
        }
        let api = run.join("api.sock");
        let logs = crate::util::wait_for(
            "the record through the activated socket",
            std::time::Duration::from_secs(20),
            || {
                crate::agent::http(&api, "POST", "/v1/flush", None).ok()?;
                let (_, logs) = crate::agent::http(&api, "GET", "/v1/logs", None).ok()?;
                (logs["items"][0]["message"] == "via activation").then_some(logs)
            },
        );
        assert_eq!(logs["items"][0]["module"], "act", "{logs}");
        let text = std::fs::read_to_string(dir.join("logbookd.log")).unwrap();
        assert!(
            text.contains(&format!("using the {name} socket passed by systemd")),
            "{text}"
        );
    }
}

#[test]
fn rfc3164_times_are_read_in_the_agents_zone() {
    let dir = TestDir::new("syslog_zone");
    // A POSIX rule, so the test needs no tzdata: UTC+05:30 all year.
    let agent = Agent::start(&dir, &[("TZ", "<+0530>-5:30")]);
    let then = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let then = then.replace_nanosecond(0).unwrap();
    let local = then.to_offset(time::UtcOffset::from_hms(5, 30, 0).unwrap());
    let stamp = local
        .format(time::macros::format_description!(
            "[month repr:short] [day padding:space] [hour]:[minute]:[second]"
        ))
        .unwrap();
    send(
        &agent,
        format!("<14>{stamp} zoned: in local time").as_bytes(),
    );
    let r = record(&agent, "in local time");
    let expected = then
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    assert_eq!(r["timestamp"], expected.as_str(), "sent {stamp:?}: {r}");
}

/// A running `rsyslogd`, killed on drop.
struct Rsyslog(std::process::Child);

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn rsyslog_forwards_with_omuxsock() {
    if !interop_client("rsyslogd") || !interop_client("logger") {
        return;
    }
    let dir = TestDir::new("syslog_rsyslog");
    let agent = Agent::start(&dir, &[]);
    // rsyslog takes input on its own socket (as /dev/log would be) and
    // forwards everything with omuxsock, exactly as README's snippet says.
    let work = dir.join("rsyslog-work");
    std::fs::create_dir_all(&work).unwrap();
    let input = dir.join("rsyslog-in.sock");
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            "global(workDirectory=\"{}\")\n\
             module(load=\"imuxsock\" SysSock.Use=\"off\")\n\
             input(type=\"imuxsock\" Socket=\"{}\")\n\
             module(load=\"omuxsock\")\n\
             $OMUxSockSocket {}\n\
             *.* :omuxsock:\n",
            work.display(),
            input.display(),
            agent.runtime.join("syslog.sock").display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("rsyslogd.log")).unwrap();
    let child = Command::new("rsyslogd")
        .arg("-n")
        .arg("-f")
        .arg(&conf)
        .arg("-i")
        .arg(dir.join("rsyslogd.pid"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start rsyslogd");
    let rsyslog = Rsyslog(child);
    crate::util::wait_for(
        "rsyslogd's input socket",
        std::time::Duration::from_secs(20),
        || input.exists().then_some(()),
    );
    run_ok(
        Command::new("logger")
            .arg("-u")
            .arg(&input)
            .args(["--socket-errors=on", "-i", "-t", "drive", "-p"])
            .args(["local0.warning", "motor hot via rsyslog"]),
    );
    // rsyslog forwards on its own schedule: poll.
    let r = crate::util::wait_for(
        "the forwarded record",
        std::time::Duration::from_secs(20),
        || {
            agent.flush();
            agent
                .logs("")
                .into_iter()
                .find(|r| r["message"] == "motor hot via rsyslog")
        },
    );
    assert_eq!(r["level"], "WARN", "{r}");
    assert_eq!(r["module"], "drive", "{r}");
    let m = &r["metadata"];
    assert_eq!(m["syslog_facility"], "local0", "{r}");
    assert_eq!(m["syslog_severity"], 4, "{r}");
    // The original sender's pid travels in the tag; the trusted fields
    // are rsyslogd's, which sent the datagram.
    assert!(
        m["procid"]
            .as_str()
            .is_some_and(|p| p.parse::<u32>().is_ok()),
        "{r}"
    );
    assert!(m["hostname"].is_string(), "{r}");
    assert_eq!(r["pid"], rsyslog.0.id(), "{r}");
    assert_eq!(r["process"], "rsyslogd", "{r}");
    // Its time is the sender's, to the second, near now.
    let ts = time::OffsetDateTime::parse(
        r["timestamp"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    let skew = (time::OffsetDateTime::now_utc() - ts).abs();
    assert!(skew < time::Duration::minutes(2), "{r}");
}
