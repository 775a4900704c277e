//! `forward.sock`: every Forward mode from a raw Rust sender (acks read
//! back, a broken stream closing only its own connection), Python's
//! `fluent-logger`, and a raw Python msgpack sender asking for acks.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use super::{bad, my_uid, python, python_with, record};
use crate::agent::Agent;
use crate::util::TestDir;

const T: u64 = 1_764_119_000;

fn connect(agent: &Agent) -> UnixStream {
    let s = UnixStream::connect(agent.runtime.join("forward.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn entry(buf: &mut Vec<u8>, time: u64, record: Value) {
    buf.extend(rmp_serde::to_vec(&(time, record)).unwrap());
}

/// `[tag, <bin payload>, options]`: PackedForward.
fn packed(tag: &str, payload: &[u8], options: Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmp::encode::write_array_len(&mut out, 3).unwrap();
    rmp::encode::write_str(&mut out, tag).unwrap();
    rmp::encode::write_bin(&mut out, payload).unwrap();
    out.extend(rmp_serde::to_vec(&options).unwrap());
    out
}

fn read_ack(s: &mut UnixStream) -> Value {
    rmp_serde::from_read(s).expect("an ack")
}

#[test]
fn every_mode_with_acks_and_a_broken_stream_closes_only_its_connection() {
    let dir = TestDir::new("forward_raw");
    let agent = Agent::start(&dir, &[]);
    let mut s = connect(&agent);

    // Message mode: [tag, time, record]
    let msg = rmp_serde::to_vec(&(
        "robot.nav",
        T,
        json!({"level": "warn", "msg": "wheel slip", "wheel": 2}),
    ))
    .unwrap();
    s.write_all(&msg).unwrap();

    // Forward mode with a chunk: acked.
    let fwd = rmp_serde::to_vec(&(
        "robot.arm",
        vec![
            (T, json!({"message": "arm a1"})),
            (T + 1, json!({"message": "arm a2", "module": "arm::grip"})),
        ],
        json!({"chunk": "c1"}),
    ))
    .unwrap();
    s.write_all(&fwd).unwrap();
    assert_eq!(read_ack(&mut s), json!({"ack": "c1"}));

    // PackedForward, then CompressedPackedForward, each acked.
    let mut payload = Vec::new();
    entry(
        &mut payload,
        T,
        json!({"log": "packed one\n", "source": "stdout"}),
    );
    entry(
        &mut payload,
        T,
        json!({"log": "packed two\n", "level": "error"}),
    );
    s.write_all(&packed(
        "docker.cam",
        &payload,
        json!({"chunk": "c2", "size": 2}),
    ))
    .unwrap();
    assert_eq!(read_ack(&mut s), json!({"ack": "c2"}));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut plain = Vec::new();
    entry(&mut plain, T, json!({"msg": "compressed", "level": 50}));
    gz.write_all(&plain).unwrap();
    s.write_all(&packed(
        "robot.gz",
        &gz.finish().unwrap(),
        json!({"chunk": "c3", "compressed": "gzip"}),
    ))
    .unwrap();
    assert_eq!(read_ack(&mut s), json!({"ack": "c3"}));

    // Docker's fluentd driver (fluent-logger-golang): Message mode with an
    // EventTime and, with fluentd-async off and acks on, a chunk.
    let mut docker = Vec::new();
    rmp::encode::write_array_len(&mut docker, 4).unwrap();
    rmp::encode::write_str(&mut docker, "docker.3f2a9c").unwrap();
    rmp::encode::write_ext_meta(&mut docker, 8, 0).unwrap();
    docker.extend((T as u32).to_be_bytes());
    docker.extend(250_000_000u32.to_be_bytes());
    docker.extend(
        rmp_serde::to_vec(
            &json!({"container_id": "3f2a9c", "container_name": "/camera",
                                   "source": "stderr", "log": "E frame lost\n"}),
        )
        .unwrap(),
    );
    docker.extend(rmp_serde::to_vec(&json!({"chunk": "d1"})).unwrap());
    s.write_all(&docker).unwrap();
    assert_eq!(read_ack(&mut s), json!({"ack": "d1"}));

    // A msgpack value that is no Forward message: skipped, connection open.
    s.write_all(&rmp_serde::to_vec(&(1, 2)).unwrap()).unwrap();

    // Another client breaks its framing: only it is closed.
    let mut broken = connect(&agent);
    broken.write_all(&[0xc1, 0xc1, 0xc1]).unwrap();
    let mut rest = Vec::new();
    assert_eq!(
        broken.read_to_end(&mut rest).unwrap(),
        0,
        "closed by the agent"
    );

    let after = rmp_serde::to_vec(&(
        "robot.nav",
        vec![(T, json!({"msg": "still open"}))],
        json!({"chunk": "c4"}),
    ))
    .unwrap();
    s.write_all(&after).unwrap();
    assert_eq!(read_ack(&mut s), json!({"ack": "c4"}));

    let r = record(&agent, "wheel slip");
    assert_eq!(r["level"], "WARN");
    assert_eq!(r["module"], "robot.nav");
    assert_eq!(r["metadata"], json!({"wheel": 2}));
    assert_eq!(r["timestamp"], "2025-11-26T01:03:20Z");
    assert_eq!(r["pid"], std::process::id());
    assert_eq!(r["uid"], my_uid());
    assert_eq!(record(&agent, "arm a1")["module"], "robot.arm");
    assert_eq!(record(&agent, "arm a2")["module"], "arm::grip");
    let r = record(&agent, "packed one");
    assert_eq!(r["module"], "docker.cam");
    assert_eq!(r["metadata"], json!({"source": "stdout"}));
    assert_eq!(record(&agent, "packed two")["level"], "ERROR");
    let r = record(&agent, "E frame lost");
    assert_eq!(r["module"], "docker.3f2a9c");
    assert_eq!(r["timestamp"], "2025-11-26T01:03:20.25Z");
    assert_eq!(
        r["metadata"],
        json!({"container_id": "3f2a9c", "container_name": "/camera", "source": "stderr"})
    );
    assert_eq!(record(&agent, "compressed")["level"], "ERROR");
    assert_eq!(record(&agent, "still open")["pid"], std::process::id());

    assert_eq!(bad(&agent, "forward_bad_frame"), 1);
    assert_eq!(bad(&agent, "forward_broken_stream"), 1);
}

#[test]
fn python_fluent_logger_and_a_raw_msgpack_sender_with_acks() {
    if !python_with(&["fluent.sender", "msgpack"]) {
        return;
    }
    let dir = TestDir::new("forward_python");
    let agent = Agent::start(&dir, &[]);
    let sock = agent.runtime.join("forward.sock");
    let sock = sock.to_str().unwrap();
    // fluent-logger 0.11 sends Message mode and reads no acks.
    let pid = python(
        r#"
import os, sys
from fluent import sender
s = sender.FluentSender("robot", host="unix://" + sys.argv[1], nanosecond_precision=True)
assert s.emit("perception", {"level": "warning", "msg": "lidar dropout", "frames": 3}), s.last_error
assert s.emit("perception", {"message": "plain", "logger": "perception.cam"}), s.last_error
s.close()
print(os.getpid())
"#,
        &[sock],
    );
    let r = record(&agent, "lidar dropout");
    assert_eq!(r["level"], "WARN");
    assert_eq!(r["module"], "robot.perception");
    assert_eq!(r["metadata"], json!({"frames": 3}));
    assert_eq!(r["pid"].to_string(), pid.trim());
    assert_eq!(r["uid"], my_uid());
    assert_eq!(record(&agent, "plain")["module"], "perception.cam");

    // A raw sender in Forward mode asking for an ack.
    let out = python(
        r#"
import socket, sys, time, msgpack
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.sendall(msgpack.packb(["robot.py", [[int(time.time()), {"msg": "acked", "level": "error", "n": 1}]], {"chunk": "py-1"}]))
u = msgpack.Unpacker(raw=False)
while True:
    data = s.recv(4096)
    if not data:
        sys.exit("closed without an ack")
    u.feed(data)
    for o in u:
        print(o["ack"])
        sys.exit(0)
"#,
        &[sock],
    );
    assert_eq!(out.trim(), "py-1");
    let r = record(&agent, "acked");
    assert_eq!(r["level"], "ERROR");
    assert_eq!(r["module"], "robot.py");
    assert_eq!(r["metadata"], json!({"n": 1}));
}

/// Many clients each holding a huge unfinished frame: past the shared
/// budget of partial frames a connection is closed (and counted), and the
/// agent goes on serving others.
#[test]
fn partial_frames_across_connections_are_bounded() {
    let dir = TestDir::new("forward_budget");
    let agent = Agent::start(&dir, &[]);
    const FRAME: usize = 7 << 20;
    let mut head = Vec::new();
    rmp::encode::write_array_len(&mut head, 2).unwrap();
    rmp::encode::write_str(&mut head, "big").unwrap();
    rmp::encode::write_bin_len(&mut head, FRAME as u32).unwrap();
    let body = vec![0u8; FRAME - 1]; // one byte short: never complete
    let conns: Vec<UnixStream> = (0..11).map(|_| connect(&agent)).collect();
    std::thread::scope(|s| {
        for c in &conns {
            let (head, body) = (&head, &body);
            s.spawn(move || {
                let mut c = c;
                // A closed connection fails the write: that is the point.
                let _ = c.write_all(head).and_then(|()| c.write_all(body));
            });
        }
    });
    crate::util::wait_for(
        "a connection closed for the budget",
        Duration::from_secs(30),
        || {
            (bad(&agent, "forward_broken_stream") >= 1
                && agent
                    .log_text()
                    .contains("of partial frames across connections"))
            .then_some(())
        },
    );
    drop(conns);
    let mut s = connect(&agent);
    let msg = rmp_serde::to_vec(&(
        "after",
        vec![(T, json!({"msg": "still served"}))],
        json!({"chunk": "z"}),
    ))
    .unwrap();
    s.write_all(&msg).unwrap();
    assert_eq!(read_ack(&mut s), json!({"ack": "z"}));
    assert_eq!(record(&agent, "still served")["module"], "after");
}
