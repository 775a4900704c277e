//! The body coding of batches (README "Sync"): an agent sends gzip until
//! a hub's answer says `Accept-Encoding: zstd, gzip`, then zstd; a hub
//! from before zstd never says it and keeps getting gzip; and a zstd batch
//! refused with 415 (an old replica behind the same address as new ones)
//! goes again in gzip, never set aside, and zstd stays off after it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{assert_exact_seqs, forward, hub_logs, start_agent, sync_env, wait_synced, BatchFront};
use crate::agent::{send_lines, Agent};
use crate::hub::HubProc;
use crate::util::TestDir;

/// Which hub answers the `k`-th request.
#[derive(Clone, Copy)]
enum Replicas {
    /// Every one reads zstd.
    New,
    /// None does: hubs built before zstd.
    Old,
    /// Even requests reach a new hub, odd ones an old one.
    Mixed,
}

/// Requests the replicas saw, by coding, and the zstd ones an old hub
/// refused; `zstd_after_refusal` counts zstd bodies that arrived after the
/// first refusal.
#[derive(Default)]
struct Seen {
    requests: AtomicU64,
    gzip: AtomicU64,
    zstd: AtomicU64,
    refused: AtomicU64,
    zstd_after_refusal: AtomicU64,
}

/// Hubs in front of one real hub: a new one passes a request through and
/// its answer back, headers and all; an old one passes gzip through but
/// leaves `Accept-Encoding` out of the answer, and refuses zstd with the
/// 415 such a hub sends.
struct Front {
    front: BatchFront,
    seen: Arc<Seen>,
}

impl Front {
    fn start(upstream: &str, replicas: Replicas) -> Front {
        use axum::body::Bytes;
        use axum::http::{HeaderMap, StatusCode};
        use axum::response::{IntoResponse, Response};
        let seen = Arc::new(Seen::default());
        let (upstream, counts) = (upstream.to_owned(), seen.clone());
        let client = reqwest::Client::new();
        let post = move |headers: HeaderMap, body: Bytes| {
            let (upstream, seen, client) = (upstream.clone(), counts.clone(), client.clone());
            async move {
                let k = seen.requests.fetch_add(1, Ordering::SeqCst);
                let new = match replicas {
                    Replicas::New => true,
                    Replicas::Old => false,
                    Replicas::Mixed => k % 2 == 0,
                };
                let zstd = headers
                    .get("content-encoding")
                    .is_some_and(|v| v.as_bytes() == b"zstd");
                if zstd {
                    seen.zstd.fetch_add(1, Ordering::SeqCst);
                    if seen.refused.load(Ordering::SeqCst) > 0 {
                        seen.zstd_after_refusal.fetch_add(1, Ordering::SeqCst);
                    }
                } else {
                    seen.gzip.fetch_add(1, Ordering::SeqCst);
                }
                if zstd && !new {
                    seen.refused.fetch_add(1, Ordering::SeqCst);
                    let body = r#"{"error":{"code":"unsupported_media_type","message":"Content-Encoding must be gzip, found \"zstd\""}}"#;
                    return (StatusCode::UNSUPPORTED_MEDIA_TYPE, body).into_response();
                }
                let answer = match forward(&client, &upstream, &headers, body).await {
                    Ok(a) => a,
                    Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
                };
                let mut out = Response::builder().status(answer.status().as_u16());
                for (name, value) in answer.headers() {
                    if new || name.as_str() != "accept-encoding" {
                        out = out.header(name.as_str(), value.as_bytes());
                    }
                }
                let bytes = answer.bytes().await.unwrap_or_default();
                out.body(axum::body::Body::from(bytes)).unwrap()
            }
        };
        Front {
            front: BatchFront::start(post),
            seen,
        }
    }

    fn count(&self, of: impl Fn(&Seen) -> &AtomicU64) -> u64 {
        of(&self.seen).load(Ordering::SeqCst)
    }
}

/// Logs `rounds` rounds of 500 lines in one session through `front`, each
/// round synced before the next (so each is its own batches), and checks
/// that every record arrived once and nothing was set aside; the agent's
/// status at the end.
fn sync_rounds(name: &str, replicas: Replicas, rounds: u64) -> (Front, serde_json::Value) {
    let hub = HubProc::start(name);
    let front = Front::start(&hub.url, replicas);
    let dir = TestDir::new(name);
    let agent: Agent = start_agent(&dir, &sync_env(&front.front.url, &hub.device));
    let session = agent.ok("POST", "/v1/sessions", Some("{}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for round in 0..rounds {
        let lines: Vec<String> = (0..500)
            .map(|i| format!(r#"{{"msg":"round {round} line {i} pose x=1.{i}","i":{i}}}"#))
            .collect();
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        send_lines(&agent, &refs);
        wait_synced(&agent, Duration::from_secs(60));
    }
    let records = hub_logs(&hub, &format!("/sessions/{session}/logs"));
    assert_exact_seqs(&records, 1..=rounds * 500);
    let status = agent.status()["sync"].clone();
    assert_eq!(status["set_aside_batches"], 0, "{status}");
    (front, status)
}

#[test]
fn batches_go_in_zstd_once_the_hub_names_it() {
    let (front, status) = sync_rounds("sync-zstd", Replicas::New, 3);
    // The first request went before any answer named zstd.
    assert!(front.count(|s| &s.gzip) >= 1);
    assert!(
        front.count(|s| &s.zstd) >= 2,
        "zstd batches after the first answer"
    );
    assert_eq!(front.count(|s| &s.refused), 0);
    assert_eq!(status["content_encoding"], "zstd", "{status}");
    assert_eq!(status["failures"], 0, "{status}");
}

#[test]
fn an_older_hub_keeps_getting_gzip() {
    let (front, status) = sync_rounds("sync-zstd-old", Replicas::Old, 2);
    assert_eq!(front.count(|s| &s.zstd), 0);
    assert!(front.count(|s| &s.gzip) >= 2);
    assert_eq!(status["content_encoding"], "gzip", "{status}");
    assert_eq!(status["failures"], 0, "{status}");
}

#[test]
fn a_zstd_batch_an_old_replica_refuses_goes_again_in_gzip() {
    let (front, status) = sync_rounds("sync-zstd-mixed", Replicas::Mixed, 4);
    // A new replica named zstd, an old one refused it once; the same
    // records went again in gzip (every record arrived once, none set
    // aside), and zstd stayed off for the hold that follows a refusal.
    assert_eq!(front.count(|s| &s.refused), 1);
    assert_eq!(front.count(|s| &s.zstd_after_refusal), 0);
    assert_eq!(status["content_encoding"], "gzip", "{status}");
    assert_eq!(status["failures"], 1, "{status}");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.is_empty() || error.contains("415"), "{status}");
}
