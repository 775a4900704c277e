//! Integration tests of sync: real agent, real hub, real sockets, and a
//! fault-injecting proxy between them. The agent and hub handles are the
//! ones of `tests/agent` and `tests/hub`; this module only wires them.

mod artifacts;
mod chaos;
mod coding;
mod crash;
mod dev;
pub(crate) mod faultproxy;
mod limits;
mod links;
mod marks;
mod powercut;
mod search;
mod tls;

use std::time::Duration;

use serde_json::Value;

use crate::agent::Agent;
use crate::hub::{HubProc, DEVICE};
use crate::util::{wait_for, TestDir};

/// Environment that points an agent at `hub_url` as the hub's `robot-1`,
/// with short linger and retry delays so tests run quickly.
pub fn sync_env(hub_url: &str, token: &str) -> Vec<(String, String)> {
    [
        ("LOGBOOK_DEVICE_ID", DEVICE),
        ("LOGBOOK_DEVICE_NAME", "test-robot"),
        ("LOGBOOK_SYNC_HUB", hub_url),
        ("LOGBOOK_SYNC_TOKEN", token),
        ("LOGBOOK_SYNC_LINGER", "0.05"),
        ("LOGBOOK_SYNC_RETRY_MIN", "0.05"),
        ("LOGBOOK_SYNC_RETRY_MAX", "0.5"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A hub the agent cannot reach yet: a proxy in front of nothing that
/// refuses every connection, and the hub that [`bring_online`] puts
/// behind it. The agent goes at `proxy.url()`.
pub fn offline_hub(name: &str) -> (faultproxy::FaultProxy, HubProc) {
    let proxy = faultproxy::FaultProxy::start("127.0.0.1:9".parse().unwrap());
    proxy.set(faultproxy::Fault::Refuse);
    (proxy, HubProc::start(name))
}

/// The link of [`offline_hub`] comes up, with `fault` on it
/// (`Fault::Pass` for a plain one).
pub fn bring_online(proxy: &faultproxy::FaultProxy, hub: &HubProc, fault: faultproxy::Fault) {
    proxy.set_upstream(hub.addr.parse().unwrap());
    proxy.set(fault);
}

/// Starts an agent on `dir` with `env` (pairs of owned strings).
pub fn start_agent(dir: &TestDir, env: &[(String, String)]) -> Agent {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Agent::start(dir, &env)
}

/// GET with the hub's operator key, blocking.
pub fn hub_get(hub: &HubProc, url: &str) -> (u16, Value) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(hub.get(url))
}

/// Every record at the hub under `path` (`/sessions/{id}/logs` or
/// `/devices/robot-1/logs`), oldest first.
pub fn hub_logs(hub: &HubProc, path: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let (status, page) = hub_get(hub, &hub.api(&format!("{path}?after={after}&limit=500")));
        assert_eq!(status, 200, "{path}: {page}");
        let items = page["items"].as_array().cloned().unwrap_or_default();
        if let Some(last) = items.last() {
            after = last["seq"].as_u64().unwrap();
        }
        let done = items.is_empty() || page["next_cursor"].is_null();
        out.extend(items);
        if done {
            return out;
        }
    }
}

/// The hub's view of a session (404 as `None`).
pub fn hub_session(hub: &HubProc, id: &str) -> Option<Value> {
    let (status, v) = hub_get(hub, &hub.api(&format!("/sessions/{id}")));
    (status == 200).then_some(v)
}

/// Waits until the agent reports nothing left to sync.
pub fn wait_synced(agent: &Agent, timeout: Duration) {
    let last = agent.flush();
    wait_for("the agent's backlog to drain", timeout, || {
        let s = agent.status();
        (s["sync"]["backlog_records"] == 0 && s["records"]["last_seq"].as_u64() >= Some(last))
            .then_some(())
    });
}

/// Asserts that `records` hold exactly seqs `expect`, in order, each once.
pub fn assert_exact_seqs(records: &[Value], expect: impl Iterator<Item = u64>) {
    let got: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    let want: Vec<u64> = expect.collect();
    if got != want {
        let missing: Vec<_> = want.iter().filter(|s| !got.contains(s)).take(20).collect();
        panic!(
            "hub holds {} records, expected {}; first missing {:?}; first got {:?}",
            got.len(),
            want.len(),
            missing,
            &got[..got.len().min(20)]
        );
    }
}

/// A stand-in in front of a real hub's batch route (an older hub, a mixed
/// set of replicas): `post` answers every `POST` of a batch, usually by
/// passing it on with [`forward`]. It runs on its own runtime, which lives
/// as long as the returned value.
pub struct BatchFront {
    pub url: String,
    _runtime: tokio::runtime::Runtime,
}

impl BatchFront {
    pub fn start<H, T>(post: H) -> BatchFront
    where
        H: axum::handler::Handler<T, ()>,
        T: 'static,
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let app = axum::Router::new().route(logbook::wire::BATCHES_PATH, axum::routing::post(post));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        runtime.spawn(async move { axum::serve(listener, app).await });
        BatchFront {
            url,
            _runtime: runtime,
        }
    }
}

/// Passes a batch on to the hub at `upstream` as the agent sent it (its
/// token, type and coding).
pub async fn forward(
    client: &reqwest::Client,
    upstream: &str,
    headers: &axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> reqwest::Result<reqwest::Response> {
    let mut req = client
        .post(format!("{upstream}{}", logbook::wire::BATCHES_PATH))
        .body(body);
    for name in ["authorization", "content-type", "content-encoding"] {
        if let Some(v) = headers.get(name) {
            req = req.header(name, v.as_bytes());
        }
    }
    req.send().await
}
