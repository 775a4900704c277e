//! The hub under attack or overload, with a real agent beside it: a device
//! over its `[devices]` limits gets 429 with `Retry-After` and its agent
//! still delivers every record exactly once; a client that dribbles its
//! headers or stops inside a body is cut off while others are served;
//! connections past `server.max_connections` wait their turn, and batches
//! past `ingest.max_inflight_bytes` wait for room; a live-stream client
//! that takes nothing is closed with a reason.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::{assert_exact_seqs, hub_logs, start_agent, sync_env, wait_synced};
use crate::agent::send_lines;
use crate::hub::{
    batch, raw_request, record, session_id, state, HubProc, WsClient, WsMessage, DEVICE, ORG,
    PROJECT,
};
use crate::util::{wait_for, TestDir};
use logbook::wire::{Level, SessionStatus};

#[test]
fn a_rate_limited_agent_delivers_every_record_once() {
    let hub = HubProc::start_with(
        "limits_rate",
        &[
            ("LOGBOOK_DEVICES_REQUESTS_PER_SEC", "2"),
            ("LOGBOOK_DEVICES_BURST", "1"),
        ],
    );
    let dir = TestDir::new("limits_rate");
    let mut env = sync_env(&hub.url, &hub.device);
    env.push(("LOGBOOK_SYNC_BATCH_RECORDS".into(), "10".into()));
    let agent = start_agent(&dir, &env);
    let lines: Vec<String> = (1..=120)
        .map(|i| format!(r#"{{"level":"info","msg":"line {i}"}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    send_lines(&agent, &refs);
    wait_synced(&agent, Duration::from_secs(60));
    assert_exact_seqs(&hub_logs(&hub, &format!("/devices/{DEVICE}/logs")), 1..=120);
    // Twelve batches at two a second with a burst of one: the hub said
    // 429 on the way, and the agent waited.
    let log = agent.log_text();
    assert!(log.contains("429"), "no 429 in the agent's log");
    assert!(
        log.contains("rate_limited"),
        "no rate_limited in the agent's log"
    );
}

/// Headers of a batch POST with `token`, announcing `len` body bytes.
fn batch_head(hub: &HubProc, len: usize) -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Type: application/msgpack\r\nContent-Encoding: gzip\r\nConnection: close\r\nContent-Length: {len}\r\n\r\n",
        logbook::wire::BATCHES_PATH,
        hub.device
    )
}

#[test]
fn requests_in_progress_past_the_device_limit_get_429() {
    let hub = HubProc::start_with(
        "limits_concurrent",
        &[("LOGBOOK_DEVICES_MAX_CONCURRENT", "1")],
    );
    // One batch whose body never comes holds the device's only slot. The
    // hub may run its handler after a probe's (tasks are not served in
    // the order their connections came): then the held request is the
    // one refused, and a new one takes its place.
    let hold = || {
        let mut s = TcpStream::connect(&hub.addr).unwrap();
        s.write_all(batch_head(&hub, 1000).as_bytes()).unwrap();
        s.write_all(b"\x1f\x8b").unwrap();
        s.set_nonblocking(true).unwrap();
        s
    };
    let mut held = hold();
    let answer = wait_for(
        "a 429 for the second request",
        Duration::from_secs(20),
        || {
            let mut got = [0u8; 1024];
            match held.read(&mut got) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Ok(n) if got[..n].starts_with(b"HTTP/1.1 429") => {
                    held = hold();
                    return None;
                }
                Ok(n) => panic!(
                    "the held request ended early: {:?}",
                    String::from_utf8_lossy(&got[..n])
                ),
                Err(e) => panic!("the held request's connection failed: {e}"),
            }
            raw_request(&hub.addr, &(batch_head(&hub, 1) + "x"))
                .filter(|r| r.starts_with("HTTP/1.1 429"))
        },
    );
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("max_concurrent"), "{answer}");
    // The slot is free once that request ends.
    drop(held);
    let answer = wait_for("the slot back", Duration::from_secs(20), || {
        raw_request(&hub.addr, &(batch_head(&hub, 1) + "x"))
            .filter(|r| !r.starts_with("HTTP/1.1 429"))
    });
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

/// Reads until the hub closes the connection (true) or 30 s passed.
fn closed_by_hub(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[test]
fn slowloris_headers_and_a_stalled_body_are_cut_off_while_others_are_served() {
    let hub = HubProc::start_with(
        "limits_slowloris",
        &[
            ("LOGBOOK_SERVER_HEADER_TIMEOUT", "1"),
            ("LOGBOOK_SERVER_BODY_TIMEOUT", "1"),
        ],
    );
    // Headers dribbled a byte at a time, never finished.
    let mut dribbler = TcpStream::connect(&hub.addr).unwrap();
    let mut writer = dribbler.try_clone().unwrap();
    let dribble = std::thread::spawn(move || {
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            // The pace of the attack, not a wait for a condition.
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    // A body that stops after its first bytes.
    let mut stalled = TcpStream::connect(&hub.addr).unwrap();
    stalled
        .write_all(batch_head(&hub, 100_000).as_bytes())
        .unwrap();
    stalled.write_all(&[0x1f, 0x8b, 8, 0]).unwrap();
    // Others are served meanwhile.
    let ok = raw_request(
        &hub.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.is_some_and(|r| r.starts_with("HTTP/1.1 200")));
    assert!(
        closed_by_hub(&mut dribbler),
        "the header dribbler was not cut off"
    );
    dribble.join().unwrap();
    assert!(
        closed_by_hub(&mut stalled),
        "the stalled body was not cut off"
    );
    let ok = raw_request(
        &hub.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert!(ok.is_some_and(|r| r.starts_with("HTTP/1.1 200")));
}

/// Past `server.max_connections`, a new connection waits in the backlog
/// (never refused, never served beside the others) and is served as soon
/// as one of them ends.
#[test]
fn connections_past_the_limit_wait_until_one_ends() {
    let hub = HubProc::start_with(
        "limits_connections",
        &[("LOGBOOK_SERVER_MAX_CONNECTIONS", "2")],
    );
    let healthz = |close: bool| {
        format!(
            "GET /healthz HTTP/1.1\r\nHost: x\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    // Two kept-alive connections, each answered once: both hold a slot.
    let mut open: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&hub.addr).unwrap();
            s.write_all(healthz(false).as_bytes()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut got = [0u8; 512];
            let n = s.read(&mut got).unwrap();
            assert!(got[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &got[..n]);
            s
        })
        .collect();
    // A third is not served while they are open (a second of silence: a
    // busy machine can only make the hub slower, never make it answer)...
    let mut third = TcpStream::connect(&hub.addr).unwrap();
    third.write_all(healthz(true).as_bytes()).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut got = Vec::new();
    let early = third.read_to_end(&mut got);
    assert!(
        early.is_err() && got.is_empty(),
        "served past max_connections: {:?}",
        String::from_utf8_lossy(&got)
    );
    // ...and is once one of them ends.
    drop(open.pop());
    third
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    third.read_to_end(&mut got).unwrap();
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
}

#[test]
fn a_live_stream_client_that_takes_nothing_is_closed_with_a_reason() {
    let hub = HubProc::start_with(
        "limits_slow_stream",
        &[("LOGBOOK_SERVER_STREAM_SEND_TIMEOUT", "1")],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = session_id(7);
    let active = || vec![state(s, 1, SessionStatus::Active, &[])];
    assert_eq!(
        rt.block_on(hub.post_batch(&batch(active(), vec![], vec![])))
            .0,
        200
    );
    let path = format!("/ws/organizations/{ORG}/projects/{PROJECT}/sessions/{s}/logs");
    let mut c = WsClient::connect(&hub.addr, &path, &hub.operator).unwrap();
    assert_eq!(c.json(Duration::from_secs(5))["event"], "caught_up");
    // Records of 16 KiB keep coming; the client takes none, so the hub's
    // send to it stops moving once the socket buffers are full.
    let pad = "x".repeat(16 << 10);
    let mut seq = 0;
    let sample = "logbook_hub_stream_slow_closes_total";
    while rt.block_on(hub.metric(sample)) == 0 {
        seq += 1;
        assert!(seq < 20_000, "the stalled stream was never closed");
        let r = record(seq, Some(s), Level::Info, "nav", &format!("r{seq} {pad}"));
        assert_eq!(
            rt.block_on(hub.post_batch(&batch(active(), vec![r], vec![])))
                .0,
            200
        );
    }
    // Reading now, it gets what was on the way, then the close and why.
    let why = loop {
        match c.next(Duration::from_secs(20)) {
            Some(WsMessage::Text(_)) => continue,
            Some(WsMessage::Close(why)) => break why,
            None => panic!("the stream ended without a close frame"),
        }
    };
    assert!(why.contains("too slow"), "{why}");
    wait_for("the stream slot back", Duration::from_secs(20), || {
        (rt.block_on(hub.metric("logbook_hub_active_streams")) == 0).then_some(())
    });
}

/// `ingest.max_inflight_bytes` bounds the batch bytes every request holds
/// together: a batch whose body is still arriving holds its declared
/// length, and the next one that does not fit beside it waits for room
/// (`logbook_hub_inflight_waiting`), never refused; when the first body
/// ends, both are stored once and the budget is empty again.
#[test]
fn batches_past_the_inflight_budget_wait_for_room() {
    let hub = HubProc::start_with(
        "limits_inflight",
        &[("LOGBOOK_INGEST_MAX_INFLIGHT_BYTES", "65536")],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let metric = |name: &str| rt.block_on(hub.metric(name));
    // Messages of hex noise: gzip keeps about half, so bodies are large.
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut noisy = |seqs: std::ops::RangeInclusive<u64>| {
        let records = seqs
            .map(|i| {
                let text: String = (0..20)
                    .map(|_| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        format!("{rng:016x}")
                    })
                    .collect();
                record(i, None, Level::Info, "nav", &text)
            })
            .collect();
        batch(vec![], records, vec![]).encode(1)
    };
    let first = noisy(1..=300);
    let second = noisy(301..=500);
    assert!(
        first.len() > 40_000 && first.len() < 65_536 && first.len() + second.len() > 65_536,
        "bodies of {} and {} bytes",
        first.len(),
        second.len()
    );

    // The first batch's headers and half its body: it holds its length.
    let mut slow = TcpStream::connect(&hub.addr).unwrap();
    let head = format!(
        "POST /api/v1/ingest/batches HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/msgpack\r\nContent-Encoding: gzip\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        hub.device,
        first.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    let half = first.len() / 2;
    slow.write_all(&first[..half]).unwrap();
    wait_for(
        "the first body's share held",
        Duration::from_secs(30),
        || (metric("logbook_hub_inflight_bytes") == first.len() as u64).then_some(()),
    );

    // The second waits for room rather than being refused...
    let posted = rt.spawn({
        let (url, token) = (hub.url.clone(), hub.device.clone());
        async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/api/v1/ingest/batches"))
                .bearer_auth(token)
                .header("content-type", "application/msgpack")
                .header("content-encoding", "gzip")
                .body(second)
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }
    });
    wait_for("the second batch waiting", Duration::from_secs(30), || {
        (metric("logbook_hub_inflight_waiting") == 1).then_some(())
    });
    assert_eq!(
        metric("logbook_hub_inflight_bytes"),
        first.len() as u64,
        "nothing of the second is held while it waits"
    );

    // ...and both go once the first body ends.
    slow.write_all(&first[half..]).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut answer = Vec::new();
    slow.read_to_end(&mut answer).unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    assert_eq!(rt.block_on(posted).unwrap(), 200);
    assert_exact_seqs(&hub_logs(&hub, &format!("/devices/{DEVICE}/logs")), 1..=500);
    assert_eq!(metric("logbook_hub_inflight_bytes"), 0);
    assert_eq!(metric("logbook_hub_inflight_waiting"), 0);
}
