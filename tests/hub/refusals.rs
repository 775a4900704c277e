//! Everything the hub must refuse, with the status and JSON error a client
//! can act on: missing and wrong tokens, device tokens reading, operator
//! keys ingesting, other organizations, oversize and bomb bodies,
//! malformed and unknown-version batches, hostile artifact paths.

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
