//! Everything the hub must refuse, with the status and JSON error a client
//! can act on: missing and wrong tokens, device tokens reading, operator
//! keys ingesting, other organizations, oversize and bomb bodies,
//! malformed and unknown-version batches, zstd bombs and unknown codings,
//! hostile artifact paths.

use std::io::Write;

use logbook::wire::{Level, SessionStatus};
use serde_json::Value;

use super::*;

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<no JSON error>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_tenancy() {
    let hub = HubProc::start("hub_tenancy");
    let s = session_id(1);
    let (st, _) = hub
        .post_batch(&batch(
            vec![state(s, 1, SessionStatus::Active, &[])],
            vec![record(1, Some(s), Level::Info, "m", "secret")],
            vec![],
        ))
        .await;
    assert_eq!(st, 200);
    let session = hub.api(&format!("/sessions/{s}"));

    // No token, a wrong one: 401 with a JSON error.
    let r = hub.http.get(&session).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let v: Value = serde_json::from_str(&r.text().await.unwrap()).unwrap();
    assert_eq!(code(&v), "unauthorized");
    let (st, v) = hub.get_as(&session, "lbk_op_not-a-real-token").await;
    assert_eq!((st, code(&v)), (401, "unauthorized"));

    // A device token cannot read; an operator key cannot ingest.
    let (st, v) = hub.get_as(&session, &hub.device).await;
    assert_eq!((st, code(&v)), (403, "forbidden"));
    let body = batch(vec![], vec![], vec![]).encode(1);
    let (st, v) = hub.post_body(&body, &hub.operator).await;
    assert_eq!((st, code(&v)), (403, "forbidden"));

    // Another organization's operator sees nothing of acme: 404 everywhere.
    let other = hub.token("globex", "warehouse", None);
    for path in [
        "/sessions".to_owned(),
        format!("/sessions/{s}"),
        format!("/sessions/{s}/logs"),
        format!("/sessions/{s}/logs/export"),
        format!("/sessions/{s}/files"),
        format!("/sessions/{s}/files/download"),
        format!("/devices/{DEVICE}/logs"),
    ] {
        let (st, v) = hub.get_as(&hub.api(&path), &other).await;
        assert_eq!((st, code(&v)), (404, "not_found"), "{path}");
    }
    let r = hub
        .http
        .delete(&session)
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // ...and its own org is empty.
    let (st, v) = hub
        .get_as(
            &format!(
                "{}/api/v1/organizations/globex/projects/warehouse/sessions",
                hub.url
            ),
            &other,
        )
        .await;
    assert_eq!((st, v["total"].as_u64()), (200, Some(0)));
    // A device token of another device cannot send as robot-1.
    let robot2 = hub.token(ORG, PROJECT, Some("robot-2"));
    let (st, v) = hub.post_body(&body, &robot2).await;
    assert_eq!((st, code(&v)), (403, "forbidden"), "{v}");
    // The session is untouched.
    let (st, _) = hub.get(&session).await;
    assert_eq!(st, 200);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_bomb_and_malformed_bodies() {
    let hub = HubProc::start_with(
        "hub_bodies",
        &[
            ("LOGBOOK_INGEST_MAX_BODY_BYTES", "1MiB"),
            ("LOGBOOK_INGEST_MAX_DECOMPRESSED_BYTES", "4MiB"),
            ("LOGBOOK_INGEST_MAX_RECORDS", "1000"),
        ],
    );
    // Over the compressed limit: 413 before the body is read.
    let noise: Vec<u8> = (0..(2u32 << 20))
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let (st, v) = hub.post_body(&noise, &hub.device).await;
    assert_eq!((st, code(&v)), (413, "payload_too_large"), "{v}");
    // A gzip bomb: 100 KiB that would inflate to 100 MiB.
    let bomb = gzip(&vec![0u8; 100 << 20]);
    assert!(bomb.len() < 1 << 20);
    let (st, v) = hub.post_body(&bomb, &hub.device).await;
    assert_eq!((st, code(&v)), (413, "payload_too_large"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("4194304"));
    // Too many records: 413, so the agent splits.
    let recs = (1..=1001)
        .map(|i| record(i, None, Level::Info, "m", "x"))
        .collect();
    let (st, v) = hub.post_batch(&batch(vec![], recs, vec![])).await;
    assert_eq!((st, code(&v)), (413, "payload_too_large"), "{v}");
    // Not gzip, not msgpack: 400 with a reason.
    let (st, v) = hub.post_body(b"hello", &hub.device).await;
    assert_eq!((st, code(&v)), (400, "bad_request"));
    assert!(
        v["error"]["message"].as_str().unwrap().contains("gzip"),
        "{v}"
    );
    let (st, v) = hub.post_body(&gzip(b"\x93\x01\x02"), &hub.device).await;
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    // Unknown version: 400 naming the versions understood.
    let mut future = batch(vec![], vec![], vec![]);
    future.version = 7;
    let (st, v) = hub.post_batch(&future).await;
    assert_eq!((st, code(&v)), (400, "unsupported_batch_version"));
    assert_eq!(
        v["error"]["message"],
        "unsupported batch version 7 (this hub understands [1, 2, 3, 4])"
    );
    // A batch with one bad record stores none of its records.
    let s = session_id(3);
    let mut bad = record(3, Some(s), Level::Info, "m", "bad");
    bad.metadata = "not json".into();
    let (st, v) = hub
        .post_batch(&batch(
            vec![state(s, 1, SessionStatus::Active, &[])],
            vec![record(1, Some(s), Level::Info, "m", "good"), bad],
            vec![],
        ))
        .await;
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("record 3"));
    let (st, _) = hub.get(&hub.api(&format!("/sessions/{s}"))).await;
    assert_eq!(st, 404, "nothing of the refused batch was stored");
    // Wrong content type.
    let r = hub
        .http
        .post(format!("{}/api/v1/ingest/batches", hub.url))
        .bearer_auth(&hub.device)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // The hub is still serving, and counted the refusals.
    let m = hub.metrics().await;
    assert!(m.contains("reason=\"decompressed_too_large\"} 1"), "{m}");
    assert!(m.contains("reason=\"body_too_large\"} 1"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_artifact_paths_are_refused() {
    use base64::Engine;
    let hub = HubProc::start("hub_traversal");
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let s = session_id(5);
    for path in [
        "../../etc/passwd",
        "/etc/passwd",
        "logs/../../../x",
        "a/./b",
        "nul\0byte",
        "back\\..\\slash",
        "",
    ] {
        let meta = format!("session_id {},path {}", b64(&s.to_string()), b64(path));
        let r = hub
            .http
            .post(format!("{}/api/v1/ingest/uploads", hub.url))
            .bearer_auth(&hub.device)
            .header("tus-resumable", "1.0.0")
            .header("upload-length", "4")
            .header("upload-metadata", meta)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path:?}");
        assert_eq!(r.headers()["tus-resumable"], "1.0.0");
    }
    // Nothing was written anywhere: no uploads, no blobs.
    for what in ["uploads", "blobs"] {
        let names = hub.stored(what);
        assert!(names.is_empty(), "{what}: {names:?}");
    }
    // Too large for the hub.
    let meta = format!("session_id {},path {}", b64(&s.to_string()), b64("big.bin"));
    let r = hub
        .http
        .post(format!("{}/api/v1/ingest/uploads", hub.url))
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", (1u64 << 50).to_string())
        .header("upload-metadata", meta)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Operators cannot upload.
    let r = hub
        .http
        .post(format!("{}/api/v1/ingest/uploads", hub.url))
        .bearer_auth(&hub.operator)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

/// Posts `body` as the device with `Content-Encoding: coding`: the status,
/// the answer's `Accept-Encoding`, and its JSON.
async fn post_coded(hub: &HubProc, coding: &str, body: Vec<u8>) -> (u16, String, Value) {
    let r = hub
        .http
        .post(format!("{}{}", hub.url, logbook::wire::BATCHES_PATH))
        .bearer_auth(&hub.device)
        .header("content-type", "application/msgpack")
        .header("content-encoding", coding)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let accept = r
        .headers()
        .get("accept-encoding")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = r.text().await.unwrap();
    (
        status,
        accept,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// zstd bodies: stored as gzip ones are (a batch sent again in the other
/// coding is a duplicate), every answer names the codings the hub reads,
/// and a zstd bomb, a frame asking for a window past 8 MiB, a truncated
/// frame and an unknown coding are refused with a status the agent acts on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_bodies_and_the_codings_the_hub_names() {
    use logbook::wire::Coding;
    let hub = HubProc::start_with(
        "hub_zstd",
        &[("LOGBOOK_INGEST_MAX_DECOMPRESSED_BYTES", "4MiB")],
    );
    let s = session_id(5);
    let b = batch(
        vec![state(s, 1, SessionStatus::Active, &["zstd"])],
        (1..=50)
            .map(|i| record(i, Some(s), Level::Info, "nav", &format!("step {i}")))
            .collect(),
        vec![],
    );
    let raw = b.to_msgpack();
    let (st, accept, v) = post_coded(&hub, "zstd", Coding::Zstd.compress(&raw, 3)).await;
    assert_eq!((st, accept.as_str()), (200, "zstd, gzip"), "{v}");
    assert_eq!(
        (v["stored"].as_u64(), v["duplicates"].as_u64()),
        (Some(50), Some(0)),
        "{v}"
    );
    let (st, _, v) = post_coded(&hub, "gzip", Coding::Gzip.compress(&raw, 6)).await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["stored"].as_u64(), v["duplicates"].as_u64()),
        (Some(0), Some(50)),
        "{v}"
    );
    let (st, v) = hub
        .get(&hub.api(&format!("/sessions/{s}/logs?limit=100")))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["items"].as_array().unwrap().len(), 50, "{v}");
    assert_eq!(v["items"][0]["message"], "step 50");

    // A bomb: 100 MiB of zeros in a few KiB.
    let bomb = Coding::Zstd.compress(&vec![0u8; 100 << 20], 3);
    assert!(bomb.len() < 64 << 10, "{}", bomb.len());
    let (st, accept, v) = post_coded(&hub, "zstd", bomb).await;
    assert_eq!((st, code(&v)), (413, "payload_too_large"), "{v}");
    assert_eq!(accept, "zstd, gzip");
    // A frame that asks the decoder for a 16 MiB window.
    let wide = {
        let mut e = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        e.set_parameter(zstd::zstd_safe::CParameter::WindowLog(24))
            .unwrap();
        e.write_all(&raw).unwrap();
        e.finish().unwrap()
    };
    let (st, _, v) = post_coded(&hub, "zstd", wide).await;
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(message.contains("zstd"), "{message}");
    // Cut short, and gzip bytes labelled zstd.
    let whole = Coding::Zstd.compress(&raw, 3);
    let (st, _, v) = post_coded(&hub, "zstd", whole[..whole.len() / 2].to_vec()).await;
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    let (st, _, v) = post_coded(&hub, "zstd", Coding::Gzip.compress(&raw, 6)).await;
    assert_eq!((st, code(&v)), (400, "bad_request"), "{v}");
    // A coding the hub does not read: 415, naming the ones it does.
    let (st, accept, v) = post_coded(&hub, "br", raw.clone()).await;
    assert_eq!((st, code(&v)), (415, "unsupported_media_type"), "{v}");
    assert_eq!(accept, "zstd, gzip");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("zstd or gzip") && message.contains("br"),
        "{message}"
    );
    // Still serving, and the refusals counted by reason.
    let m = hub.metrics().await;
    assert!(m.contains("reason=\"bad_zstd\"} 3"), "{m}");
    assert!(m.contains("reason=\"decompressed_too_large\"} 1"), "{m}");
    assert!(m.contains("reason=\"content_encoding\"} 1"), "{m}");
}
