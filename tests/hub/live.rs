//! Live log streams: an operator connected over WebSocket sees records
//! within a second of their batch, can ask for the last N first, and the
//! stream closes when the session ends.

use std::time::{Duration, Instant};

use logbook::wire::{Level, SessionStatus};

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_streams_records_while_batches_arrive() {
    let hub = HubProc::start("hub_ws");
    let s = session_id(1);
    let early: Vec<_> = (1..=10u64)
        .map(|i| record(i, Some(s), Level::Info, "nav", &format!("early {i}")))
        .collect();
    hub.post_batch(&batch(
        vec![state(s, 1, SessionStatus::Active, &[])],
        early,
        vec![],
    ))
    .await;

    // Refused without an operator key of the org.
    let path = format!("/ws/organizations/{ORG}/projects/{PROJECT}/sessions/{s}/logs?tail=3");
    let (addr, device) = (hub.addr.clone(), hub.device.clone());
    let p = path.clone();
    let refused = tokio::task::spawn_blocking(move || WsClient::connect(&addr, &p, &device).err())
        .await
        .unwrap();
    assert!(refused.unwrap().starts_with("HTTP/1.1 403"));

    // Connect mid-session asking for the last 3, under both URL forms.
    let (addr, op) = (hub.addr.clone(), hub.operator.clone());
    let mut clients = Vec::new();
    for prefix in ["", "/api/v1"] {
        let (addr, op, p) = (addr.clone(), op.clone(), format!("{prefix}{path}"));
        let c = tokio::task::spawn_blocking(move || {
            let mut c = WsClient::connect(&addr, &p, &op).unwrap();
            let tail: Vec<Value> = (0..3).map(|_| c.json(Duration::from_secs(5))).collect();
            let seqs: Vec<u64> = tail.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
            assert_eq!(seqs, vec![8, 9, 10], "oldest of the tail first");
            assert!(tail.iter().all(|v| v["tail"] == true && v["id"].is_i64()));
            // Then where a reconnect would resume: past every record so far.
            let mark = c.json(Duration::from_secs(5));
            assert_eq!(mark["event"], "caught_up", "{mark}");
            assert_eq!(mark["id"], tail[2]["id"], "{mark}");
            c
        })
        .await
        .unwrap();
        clients.push(c);
    }

    // Batches keep arriving; each record reaches both streams quickly.
    for b in 0..5u64 {
        let recs: Vec<_> = (0..4u64)
            .map(|i| {
                let seq = 11 + b * 4 + i;
                record(
                    seq,
                    Some(s),
                    Level::Warn,
                    "perception",
                    &format!("live {seq}"),
                )
            })
            .collect();
        let sent = Instant::now();
        let (st, _) = hub.post_batch(&batch(vec![], recs, vec![])).await;
        assert_eq!(st, 200);
        for c in clients.iter_mut() {
            let mut client = std::mem::replace(c, placeholder());
            let (client, got) = tokio::task::spawn_blocking(move || {
                let got: Vec<serde_json::Value> = (0..4)
                    .map(|_| client.json(Duration::from_secs(5)))
                    .collect();
                (client, got)
            })
            .await
            .unwrap();
            *c = client;
            assert!(
                sent.elapsed() < Duration::from_secs(1),
                "records took {:?}",
                sent.elapsed()
            );
            let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
            assert_eq!(seqs, (11 + b * 4..15 + b * 4).collect::<Vec<_>>());
            assert!(got.iter().all(|v| v.get("tail").is_none()), "{got:?}");
            assert_eq!(got[0]["level"], "WARN");
            assert_eq!(got[0]["session_id"], s.to_string());
        }
    }

    // The session ends: streams get their close frame.
    hub.post_batch(&batch(
        vec![state(s, 2, SessionStatus::Completed, &[])],
        vec![],
        vec![],
    ))
    .await;
    for mut c in clients {
        let closed = tokio::task::spawn_blocking(move || c.next(Duration::from_secs(5)))
            .await
            .unwrap();
        match closed {
            Some(WsMessage::Close(why)) => assert_eq!(why, "session ended"),
            Some(WsMessage::Text(t)) => panic!("expected close, got {t}"),
            None => panic!("expected close, got nothing"),
        }
    }
}

/// Every text message until `n` records and then a `caught_up` mark came:
/// the records, and the mark's id.
fn records_then_mark(c: &mut WsClient, n: usize) -> (Vec<Value>, i64) {
    let got: Vec<Value> = (0..n).map(|_| c.json(Duration::from_secs(10))).collect();
    let mark = c.json(Duration::from_secs(10));
    assert_eq!(mark["event"], "caught_up", "{mark}");
    (got, mark["id"].as_i64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumed_after_an_id_gets_everything_since_once_in_commit_order() {
    let hub = HubProc::start("hub_ws_resume");
    let s = session_id(1);
    let post = |seqs: std::ops::RangeInclusive<u64>, level: Level| {
        let recs = seqs
            .map(|i| record(i, Some(s), level, "nav", &format!("r{i}")))
            .collect();
        batch(vec![state(s, 1, SessionStatus::Active, &[])], recs, vec![])
    };
    assert_eq!(hub.post_batch(&post(1..=10, Level::Info)).await.0, 200);
    let base = format!("/ws/organizations/{ORG}/projects/{PROJECT}/sessions/{s}/logs");
    let (addr, op) = (hub.addr.clone(), hub.operator.clone());
    let connect = move |query: String| {
        let (addr, op, path) = (addr.clone(), op.clone(), format!("{base}?{query}"));
        move || WsClient::connect(&addr, &path, &op)
    };

    // A client sees the last two, and where it would resume; then it is
    // gone while much more than a tail's worth arrives: errors first (as an
    // agent sends them after an outage), then the rest in 500-record
    // batches.
    let (_, resume) = tokio::task::spawn_blocking({
        let c = connect("tail=2".into());
        move || records_then_mark(&mut c().unwrap(), 2)
    })
    .await
    .unwrap();
    assert_eq!(
        hub.post_batch(&post(1601..=1610, Level::Error)).await.0,
        200
    );
    for from in [11, 511, 1011] {
        let (st, body) = hub.post_batch(&post(from..=from + 499, Level::Info)).await;
        assert_eq!(st, 200, "{body}");
    }

    // Resuming after that id: all 1,510 once, in the order the hub
    // committed them (not seq order), none marked as tail, then the mark.
    let c = tokio::task::spawn_blocking({
        let c = connect(format!("after_id={resume}"));
        move || {
            let mut c = c().unwrap();
            let (got, mark) = records_then_mark(&mut c, 1510);
            let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
            let want: Vec<u64> = (1601..=1610).chain(11..=1510).collect();
            assert_eq!(seqs, want);
            let ids: Vec<i64> = got.iter().map(|v| v["id"].as_i64().unwrap()).collect();
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids in commit order");
            assert!(ids[0] > resume);
            assert_eq!(mark, *ids.last().unwrap());
            assert!(got.iter().all(|v| v.get("tail").is_none()));
            assert_eq!(got[0]["level"], "ERROR");
            c
        }
    })
    .await
    .unwrap();
    // ...and then live, as any stream.
    assert_eq!(hub.post_batch(&post(1511..=1511, Level::Info)).await.0, 200);
    let live = tokio::task::spawn_blocking(move || {
        let mut c = c;
        c.json(Duration::from_secs(10))
    })
    .await
    .unwrap();
    assert_eq!(live["seq"], 1511);

    // Filters apply to what is read back: only the errors, then the mark
    // (past the newest record, so a reconnect does not read them again).
    let (errors, mark) = tokio::task::spawn_blocking({
        let c = connect(format!("after_id={resume}&level=error"));
        move || records_then_mark(&mut c().unwrap(), 10)
    })
    .await
    .unwrap();
    let seqs: Vec<u64> = errors.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1601..=1610).collect::<Vec<_>>());
    assert!(mark > errors[9]["id"].as_i64().unwrap(), "{mark}");

    // A bad resume point, or both starts at once, is a 400 with a reason.
    for query in ["after_id=-1", "after_id=x", "after_id=5&tail=3"] {
        let refused = tokio::task::spawn_blocking(connect(query.into()))
            .await
            .unwrap()
            .err()
            .unwrap_or_else(|| panic!("{query} was accepted"));
        assert!(refused.starts_with("HTTP/1.1 400"), "{query}: {refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_for_the_live_feed_still_gets_every_record_once() {
    let hub = HubProc::start("hub_ws_slow");
    let s = session_id(1);
    let opened = batch(
        vec![state(s, 1, SessionStatus::Active, &[])],
        vec![],
        vec![],
    );
    assert_eq!(hub.post_batch(&opened).await.0, 200);
    let path = format!("/ws/organizations/{ORG}/projects/{PROJECT}/sessions/{s}/logs");
    let (addr, op) = (hub.addr.clone(), hub.operator.clone());
    let mut c = tokio::task::spawn_blocking(move || {
        let mut c = WsClient::connect(&addr, &path, &op).unwrap();
        let mark = c.json(Duration::from_secs(5));
        assert_eq!(mark["event"], "caught_up", "{mark}");
        c
    })
    .await
    .unwrap();

    // The client reads nothing while batches keep coming, one record of
    // 16 KiB each: its socket buffers fill, the hub's sender for it waits,
    // and the live feed (1,024 batches deep) runs past it.
    const BATCHES: u64 = 2400;
    let pad = "x".repeat(16 << 10);
    for seq in 1..=BATCHES {
        let r = record(seq, Some(s), Level::Info, "nav", &format!("r{seq} {pad}"));
        let b = batch(
            vec![state(s, 1, SessionStatus::Active, &[])],
            vec![r],
            vec![],
        );
        assert_eq!(hub.post_batch(&b).await.0, 200);
    }

    let ended = batch(
        vec![state(s, 2, SessionStatus::Completed, &[])],
        vec![],
        vec![],
    );
    assert_eq!(hub.post_batch(&ended).await.0, 200);

    // It then reads at its own pace: every record once, in order, with no
    // "lagged" note, because what the feed dropped was read back; then the
    // stream closes, the session having ended.
    let seqs = tokio::task::spawn_blocking(move || {
        let seqs = (1..=BATCHES)
            .map(|_| {
                let v = c.json(Duration::from_secs(20));
                assert!(v.get("event").is_none(), "{v}");
                v["seq"].as_u64().unwrap()
            })
            .collect::<Vec<u64>>();
        match c.next(Duration::from_secs(20)) {
            Some(WsMessage::Close(why)) => assert_eq!(why, "session ended"),
            Some(WsMessage::Text(t)) => panic!("expected the close, got {t}"),
            None => panic!("expected the close, got nothing"),
        }
        seqs
    })
    .await
    .unwrap();
    let wrong = seqs.iter().zip(1..).position(|(got, want)| *got != want);
    assert!(
        wrong.is_none(),
        "out of order or repeated from position {wrong:?}: {:?}",
        &seqs[wrong.unwrap_or(0)..][..10]
    );
    let catch_ups = hub.metric("logbook_hub_stream_catch_ups_total").await;
    assert!(catch_ups >= 1, "the feed never ran past the client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_stream_carries_its_records_from_outside_sessions() {
    let hub = HubProc::start("hub_ws_device");
    let robot2 = hub.token(ORG, PROJECT, Some("robot-2"));
    let outside = |seqs: std::ops::RangeInclusive<u64>| {
        let recs = seqs
            .map(|i| record(i, None, Level::Info, "boot", &format!("out {i}")))
            .collect();
        batch(vec![], recs, vec![])
    };
    assert_eq!(hub.post_batch(&outside(1..=3)).await.0, 200);
    let path = |device: &str, query: &str| {
        format!("/ws/organizations/{ORG}/projects/{PROJECT}/devices/{device}/logs?{query}")
    };
    let (addr, op) = (hub.addr.clone(), hub.operator.clone());
    let connect = move |path: String| {
        let (addr, op) = (addr.clone(), op.clone());
        move || WsClient::connect(&addr, &path, &op)
    };
    let unknown = tokio::task::spawn_blocking(connect(path("robot-9", "tail=1")))
        .await
        .unwrap();
    assert!(unknown.err().unwrap().starts_with("HTTP/1.1 404"));

    let (tail, _) = tokio::task::spawn_blocking({
        let c = connect(path(DEVICE, "tail=2"));
        move || records_then_mark(&mut c().unwrap(), 2)
    })
    .await
    .unwrap();
    let seqs: Vec<u64> = tail.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [2, 3]);
    let resume = tail[1]["id"].as_i64().unwrap();

    // Live: robot-1's records outside sessions only, not those of its
    // session, nor robot-2's (same project) outside sessions.
    let c = tokio::task::spawn_blocking({
        let c = connect(path(DEVICE, ""));
        move || {
            let mut c = c().unwrap();
            assert_eq!(c.json(Duration::from_secs(5))["event"], "caught_up");
            c
        }
    })
    .await
    .unwrap();
    let s = session_id(9);
    let in_session = batch(
        vec![state(s, 1, SessionStatus::Active, &[])],
        vec![record(4, Some(s), Level::Info, "nav", "in the session")],
        vec![],
    );
    assert_eq!(hub.post_batch(&in_session).await.0, 200);
    let mut theirs = outside(1..=2);
    theirs.device.id = "robot-2".into();
    assert_eq!(hub.post_body(&theirs.encode(1), &robot2).await.0, 200);
    assert_eq!(hub.post_batch(&outside(5..=6)).await.0, 200);
    let got = tokio::task::spawn_blocking(move || {
        let mut c = c;
        (0..2)
            .map(|_| c.json(Duration::from_secs(5)))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    let seqs: Vec<u64> = got.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [5, 6], "{got:?}");
    assert!(got
        .iter()
        .all(|v| v["device_id"] == DEVICE && v["session_id"].is_null()));

    // Resuming after the tail's last record gives exactly what came since.
    let (since, _) = tokio::task::spawn_blocking({
        let c = connect(path(DEVICE, &format!("after_id={resume}")));
        move || records_then_mark(&mut c().unwrap(), 2)
    })
    .await
    .unwrap();
    let seqs: Vec<u64> = since.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [5, 6]);
}

/// A stand-in while a client is lent to a blocking task.
fn placeholder() -> WsClient {
    WsClient::dangling()
}

/// Issue 15: the batch that ends a session also carries its last records
/// (often the one that says why it ended). A stream that learns of the end
/// from the database, after the batch's broadcast reached it but before it
/// read that broadcast, must still send those records before it closes.
///
/// Made deterministic: the stream's start (a tail, or every record after
/// an id, each one read from the database at once) is far larger than the
/// socket buffers between hub and client, so while the client reads
/// nothing the hub is held sending it; the closing batch is committed in
/// that time, and only then does the client read on. The hub meets the
/// session's end only after the closing batch was committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batch_that_ends_a_session_reaches_a_stream_before_its_close() {
    let hub = HubProc::start("hub_ws_last_batch");
    // 400 records of 48 KiB: 19 MiB, well past loopback's socket buffers
    // while the client does not read (the kernel grows a receive buffer
    // only as its reader reads).
    const N: u64 = 400;
    let pad = "x".repeat(48 << 10);
    for (n, start) in ["tail=400", "after_id=0"].into_iter().enumerate() {
        let s = session_id(10 + n as u128);
        // Seqs are the device's: each session has its own range.
        let base = n as u64 * 1000;
        for from in (base + 1..=base + N).step_by(100) {
            let recs = (from..from + 100)
                .map(|i| record(i, Some(s), Level::Info, "nav", &format!("r{i} {pad}")))
                .collect();
            let b = batch(vec![state(s, 1, SessionStatus::Active, &[])], recs, vec![]);
            assert_eq!(hub.post_batch(&b).await.0, 200, "{start}");
        }
        let path = format!("/ws/organizations/{ORG}/projects/{PROJECT}/sessions/{s}/logs?{start}");
        let (addr, op) = (hub.addr.clone(), hub.operator.clone());
        // The first record proves the start was read from the database.
        let c = tokio::task::spawn_blocking(move || {
            let mut c = WsClient::connect(&addr, &path, &op).unwrap();
            assert_eq!(c.json(Duration::from_secs(10))["seq"], base + 1, "{start}");
            c
        })
        .await
        .unwrap();
        let last = (base + N + 1..=base + N + 3)
            .map(|i| {
                record(
                    i,
                    Some(s),
                    Level::Error,
                    "mission",
                    &format!("why it ended {i}"),
                )
            })
            .collect();
        let ending = batch(
            vec![state(s, 2, SessionStatus::Completed, &[])],
            last,
            vec![],
        );
        assert_eq!(hub.post_batch(&ending).await.0, 200, "{start}");

        let (seqs, closed) = tokio::task::spawn_blocking(move || {
            let mut c = c;
            let mut seqs = vec![base + 1];
            loop {
                match c.next(Duration::from_secs(20)) {
                    Some(WsMessage::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).unwrap();
                        if v.get("event").is_none() {
                            seqs.push(v["seq"].as_u64().unwrap());
                        }
                    }
                    Some(WsMessage::Close(why)) => return (seqs, why),
                    None => return (seqs, "no close frame".to_owned()),
                }
            }
        })
        .await
        .unwrap();
        let want: Vec<u64> = (base + 1..=base + N + 3).collect();
        assert!(
            seqs == want,
            "{start}: {} records before the close ({closed}), the last {:?}",
            seqs.len(),
            &seqs[seqs.len().saturating_sub(3)..]
        );
        assert!(
            closed == "session ended" || closed == "session is not active",
            "{start}: {closed}"
        );
    }
}
