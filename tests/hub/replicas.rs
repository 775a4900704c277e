//! Hubs as replicas of one fleet (README "Running the hub for a fleet"):
//! two `logbook-hub` processes on one PostgreSQL database and one bucket,
//! a live stream on one seeing what devices post to the other, once each
//! and in order, also across the loss of the notification connection.
//! Skipped with a notice where PostgreSQL or moto is missing, never under
//! CI.

use std::time::Duration;

use logbook::wire::{Level, SessionStatus};

use super::*;

/// One fresh database and one fresh bucket that replicas share.
pub struct Shared {
    /// The database's URL.
    pub url: String,
    /// Kept for the test's life.
    pub _bucket: testbucket::TestBucket,
    /// The storage variables every replica starts with.
    pub env: Vec<(String, String)>,
}

/// Storage for replicas, or `None` (skipped with a notice) without the
/// servers.
pub fn shared_storage(test: &str) -> Option<Shared> {
    let url = testdb::fresh_database(test)?;
    let bucket = testbucket::fresh_bucket(test)?;
    let mut env = vec![
        ("LOGBOOK_STORAGE_DATABASE".to_owned(), url.clone()),
        ("LOGBOOK_STORAGE_BLOBS".to_owned(), bucket.url("fleet")),
    ];
    env.extend(bucket.env().into_iter().map(|(k, v)| (k.to_owned(), v)));
    Some(Shared {
        url,
        _bucket: bucket,
        env,
    })
}

/// A replica on the shared storage `env` (no database or bucket of its own).
pub fn replica(name: &str, env: &[(String, String)]) -> HubProc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let none = Storage {
        postgres: false,
        s3: false,
    };
    HubProc::start_on(name, none, &env)
}

/// Records `seqs` of session `s`, one batch.
fn records(s: Uuid, seqs: std::ops::RangeInclusive<u64>) -> Vec<Record> {
    seqs.map(|i| record(i, Some(s), Level::Info, "nav", &format!("line {i}")))
        .collect()
}

/// Reads the stream until it has records with every seq in `want` (each
/// once, in commit order: ids and seqs rising), failing on anything else.
async fn expect_records(c: &mut WsClient, want: std::ops::RangeInclusive<u64>, last_id: &mut i64) {
    let mut client = std::mem::replace(c, WsClient::dangling());
    let from = *last_id;
    let (client, got) = tokio::task::spawn_blocking(move || {
        let mut got = Vec::new();
        while got.len() < want.clone().count() {
            let v = client.json(Duration::from_secs(30));
            if v.get("event").is_some() {
                continue;
            }
            got.push((v["seq"].as_u64().unwrap(), v["id"].as_i64().unwrap()));
        }
        let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(seqs, want.collect::<Vec<_>>(), "each record once, in order");
        (client, got)
    })
    .await
    .unwrap();
    *c = client;
    let mut prev = from;
    for (_, id) in got {
        assert!(id > prev, "ids rise in commit order");
        prev = id;
    }
    *last_id = prev;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stream_on_one_replica_sees_what_another_stores() {
    let test = "hub::replicas::live_across_replicas";
    let Some(Shared { url, _bucket, env }) = shared_storage(test) else {
        return;
    };
    let a = replica("hub_replica_a", &env);
    let b = replica("hub_replica_b", &env);
    let s = session_id(1);
    let (st, ack) = a
        .post_batch(&batch(
            vec![state(s, 1, SessionStatus::Active, &["fleet"])],
            records(s, 1..=5),
            vec![],
        ))
        .await;
    assert_eq!(st, 200, "{ack}");

    // An operator watches on B, with the tail of what A stored.
    let path =
        format!("/api/v1/ws/organizations/{ORG}/projects/{PROJECT}/sessions/{s}/logs?tail=5");
    let (addr, op) = (b.addr.clone(), b.operator.clone());
    let (mut ws, mut last_id) = tokio::task::spawn_blocking(move || {
        let mut c = WsClient::connect(&addr, &path, &op).unwrap();
        let tail: Vec<Value> = (0..5).map(|_| c.json(Duration::from_secs(10))).collect();
        let seqs: Vec<u64> = tail.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
        let mark = c.json(Duration::from_secs(10));
        assert_eq!(mark["event"], "caught_up", "{mark}");
        (c, mark["id"].as_i64().unwrap())
    })
    .await
    .unwrap();

    // Batches to A, and some to B itself: every record once, in order.
    let mut next = 6u64;
    for round in 0..20u64 {
        let to = if round % 4 == 3 { &b } else { &a };
        let (st, ack) = to
            .post_batch(&batch(vec![], records(s, next..=next + 9), vec![]))
            .await;
        assert_eq!(st, 200, "{ack}");
        expect_records(&mut ws, next..=next + 9, &mut last_id).await;
        next += 10;
    }
    assert!(b.metric("logbook_hub_live_heard_total").await >= 15);

    // The notification connections are cut (as a failover or an
    // operator's pg_terminate_backend would): what A stores meanwhile
    // still reaches B's stream once B listens again.
    let resyncs = b.metric("logbook_hub_live_resyncs_total").await;
    let killed = testdb::psql(
        &url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE application_name = 'logbook-hub live' AND datname = current_database()",
    );
    assert_eq!(killed.trim(), "2", "one listener per replica");
    let (st, _) = a
        .post_batch(&batch(vec![], records(s, next..=next + 9), vec![]))
        .await;
    assert_eq!(st, 200);
    expect_records(&mut ws, next..=next + 9, &mut last_id).await;
    next += 10;
    crate::util::wait_for("B listening again", Duration::from_secs(30), || {
        let m = futures_executor_block(b.metric("logbook_hub_live_resyncs_total"));
        (m > resyncs).then_some(())
    });
    let (st, _) = a
        .post_batch(&batch(vec![], records(s, next..=next + 9), vec![]))
        .await;
    assert_eq!(st, 200);
    expect_records(&mut ws, next..=next + 9, &mut last_id).await;
    next += 10;

    // A closes the session with its last records: B's stream sends them,
    // then its close frame.
    let (st, _) = a
        .post_batch(&batch(
            vec![state(s, 2, SessionStatus::Completed, &["fleet"])],
            records(s, next..=next + 4),
            vec![],
        ))
        .await;
    assert_eq!(st, 200);
    expect_records(&mut ws, next..=next + 4, &mut last_id).await;
    let closed = tokio::task::spawn_blocking(move || ws.next(Duration::from_secs(30)))
        .await
        .unwrap();
    match closed {
        Some(WsMessage::Close(why)) => assert_eq!(why, "session ended"),
        Some(WsMessage::Text(t)) => panic!("expected the close frame, got {t}"),
        None => panic!("expected the close frame, got nothing"),
    }
}

/// Runs a future to its end from a blocking wait's closure (the test's
/// runtime has a worker to spare).
fn futures_executor_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
