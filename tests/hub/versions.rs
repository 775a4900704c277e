//! Batch encodings at the hub: v1 (rows) and v2 (columns) bodies of the
//! same records store and read back the same, a retry in the other
//! version is a duplicate, and a version the hub does not read is refused
//! with the stable code the agent falls back on.

use logbook::wire::{error_code, Level, Record, SessionStatus};
use serde_json::Value;

use super::*;

/// Records 1..=6 of session `s`, the second half differing from the first
/// only by seq: missing credentials and process, a device log, and text
/// that is not ASCII, so every v2 column is exercised.
fn records(s: Uuid) -> Vec<Record> {
    (1..=6u64)
        .map(|seq| {
            let i = (seq - 1) % 3;
            let mut r = record(seq, Some(s), Level::ALL[i as usize], "nav::planner", "");
            r.message = ["plan ok", "größe 5 µm 🤖", ""][i as usize].into();
            if i == 1 {
                r.pid = None;
                r.process = None;
                r.metadata.clear();
            }
            if i == 2 {
                r.session_id = None;
                r.module = "battery".into();
            }
            r
        })
        .collect()
}

/// The log items as the API shows them, without what differs by seq.
fn items(v: &Value) -> Vec<Value> {
    v["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items: {v}"))
        .iter()
        .map(|item| {
            let mut item = item.clone();
            let obj = item.as_object_mut().unwrap();
            for key in ["seq", "timestamp", "timestamp_ns", "metadata", "id"] {
                obj.remove(key);
            }
            item
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_and_v2_bodies_store_the_same() {
    let hub = HubProc::start("hub_versions");
    let s = session_id(7);
    let recs = records(s);
    let mut v1 = batch(
        vec![state(s, 1, SessionStatus::Active, &["v1"])],
        recs[..3].to_vec(),
        vec![],
    );
    v1.version = 1;
    let (st, ack) = hub.post_batch(&v1).await;
    assert_eq!((st, ack["stored"].as_u64()), (200, Some(3)), "{ack}");
    let mut v2 = batch(vec![], recs[3..].to_vec(), vec![]);
    v2.version = 2;
    let (st, ack) = hub.post_batch(&v2).await;
    assert_eq!((st, ack["stored"].as_u64()), (200, Some(3)), "{ack}");

    // A retry of the v1 records as v2 is a duplicate, not new records.
    let mut retry = batch(vec![], recs[..3].to_vec(), vec![]);
    retry.version = 2;
    let (st, ack) = hub.post_batch(&retry).await;
    assert_eq!(st, 200, "{ack}");
    assert_eq!(
        (ack["stored"].as_u64(), ack["duplicates"].as_u64()),
        (Some(0), Some(3))
    );

    let (st, logs) = hub
        .get(&hub.api(&format!("/sessions/{s}/logs?order=asc")))
        .await;
    assert_eq!(st, 200, "{logs}");
    let got = items(&logs);
    assert_eq!(got.len(), 4, "{logs}");
    assert_eq!(
        got[..2],
        got[2..],
        "v1 and v2 records read back differently"
    );
    assert_eq!(logs["items"][1]["message"], "größe 5 µm 🤖");
    assert_eq!(logs["items"][1]["pid"], Value::Null);
    assert_eq!(logs["items"][2]["pid"], 4242);
    let (st, dev) = hub
        .get(&hub.api(&format!("/devices/{DEVICE}/logs?order=asc")))
        .await;
    assert_eq!(st, 200, "{dev}");
    let got = items(&dev);
    assert_eq!(got.len(), 2, "{dev}");
    assert_eq!(got[0], got[1]);
    assert_eq!(dev["items"][0]["module"], "battery");
}

/// What an older hub says to a newer agent, seen from this hub with a
/// version it does not know: 400 with the stable code and the versions it
/// reads, and nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_version_has_its_own_code() {
    let hub = HubProc::start("hub_unknown_version");
    let mut future = batch(vec![], vec![record(1, None, Level::Info, "m", "x")], vec![]);
    future.version = 5;
    let (st, v) = hub.post_batch(&future).await;
    assert_eq!(st, 400, "{v}");
    assert_eq!(v["error"]["code"], error_code::UNSUPPORTED_BATCH_VERSION);
    assert_eq!(
        v["error"]["message"],
        "unsupported batch version 5 (this hub understands [1, 2, 3, 4])"
    );
    // Not even the device was recorded.
    let (st, dev) = hub.get(&hub.api(&format!("/devices/{DEVICE}/logs"))).await;
    assert_eq!(
        (st, &dev["error"]["code"]),
        (404, &Value::from("not_found")),
        "{dev}"
    );
}
