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
            let tail: Vec<u64> = (0..3)
                .map(|_| c.json(Duration::from_secs(5))["seq"].as_u64().unwrap())
                .collect();
            assert_eq!(tail, vec![8, 9, 10], "oldest of the tail first");
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

/// A stand-in while a client is lent to a blocking task.
fn placeholder() -> WsClient {
    WsClient::dangling()
}
