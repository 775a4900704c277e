//! Live log streams over WebSocket: an operator watching a session gets
//! its last `tail` records first (optional), then every record as its batch
//! is committed, one JSON log item per text message; the stream ends with
//! a close frame when the session leaves `active` or the hub shuts down.
//!
//! Invariant: a stream subscribes before it reads the tail, and skips live
//! records it already sent, so nothing committed during connection setup
//! is lost or repeated. A slow client is told how many records it missed
//! (`{"event":"lagged","missed_batches":N}`) instead of slowing ingest.

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use tokio::sync::broadcast::error::RecvError;

use super::api::{self, log_item, param, Params};
use super::auth;
use super::error::ApiError;
use super::store::{LogQuery, LogRow, LogScope};
use super::Hub;

/// Most records a client may ask to replay before the live stream.
pub const MAX_TAIL: u64 = 1000;

pub async fn ws_logs(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, param(&p, "access_token"), &org).await?;
    let mut q = api::log_query(
        &p.iter()
            .filter(|(k, _)| k != "limit")
            .cloned()
            .collect::<Vec<_>>(),
    )?;
    let tail = param(&p, "tail")
        .map(|v| v.parse::<u64>())
        .transpose()
        .map_err(|_| ApiError::bad_request("tail: expected a non-negative integer"))?
        .unwrap_or(0);
    if tail > MAX_TAIL {
        return Err(ApiError::bad_request(format!("tail: at most {MAX_TAIL}")));
    }
    q.limit = tail;
    q.ascending = false;
    q.cursor = None;
    q.want_total = false;
    let pk = api::session_pk(&hub, &org, &project, &id).await?;
    let permit = hub.streams.clone().try_acquire_owned().map_err(|_| {
        hub.metrics.reject("too_many_streams");
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_streams",
            "too many live streams on this hub; try again later",
        )
    })?;
    // Clients only send control frames and small notes: bound what one
    // message may make the hub buffer.
    let ws = ws.max_message_size(64 << 10).max_frame_size(64 << 10);
    Ok(ws.on_upgrade(move |socket| async move {
        hub.metrics.active_streams.fetch_add(1, Relaxed);
        if let Err(e) = run(&hub, socket, pk, q).await {
            tracing::debug!(error = %e, "log stream ended");
        }
        hub.metrics.active_streams.fetch_sub(1, Relaxed);
        drop(permit);
    }))
}

fn matches(q: &LogQuery, r: &LogRow) -> bool {
    q.min_level.is_none_or(|l| r.level >= l)
        && q.module
            .as_deref()
            .is_none_or(|m| match m.strip_suffix('*') {
                Some(prefix) => r.module.starts_with(prefix),
                None => r.module == m,
            })
        && q.since_ns.is_none_or(|t| r.timestamp_ns >= t)
        && q.until_ns.is_none_or(|t| r.timestamp_ns < t)
        && q.search
            .as_deref()
            .is_none_or(|s| r.message.to_lowercase().contains(&s.trim().to_lowercase()))
}

fn text(r: &LogRow) -> Message {
    Message::Text(
        serde_json::to_string(&log_item(r))
            .expect("a log item serializes")
            .into(),
    )
}

async fn run(
    hub: &Arc<Hub>,
    mut socket: WebSocket,
    pk: i64,
    q: LogQuery,
) -> Result<(), axum::Error> {
    let mut live = hub.live.subscribe();
    let mut sent = HashSet::new();
    if q.limit > 0 {
        let q2 = q.clone();
        let page = hub.db(move |s| s.logs(LogScope::Session(pk), &q2)).await;
        if let Ok(page) = page {
            for r in page.items.iter().rev() {
                sent.insert(r.seq);
                socket.send(text(r)).await?;
            }
        }
    }
    let status = hub.db(move |s| s.session_status(pk)).await.ok().flatten();
    if status.as_deref() != Some("active") {
        return close(socket, "session is not active").await;
    }
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => {
                return close(socket, "hub is shutting down").await;
            }
            event = live.recv() => match event {
                Ok(ev) => {
                    for r in ev.records.iter().filter(|r| r.session_pk == Some(pk)) {
                        if !sent.is_empty() && sent.remove(&r.seq) {
                            continue;
                        }
                        if matches(&q, r) {
                            socket.send(text(r)).await?;
                        }
                    }
                    if ev.ended.contains(&pk) {
                        return close(socket, "session ended").await;
                    }
                }
                Err(RecvError::Lagged(missed)) => {
                    let note = serde_json::json!({"event": "lagged", "missed_batches": missed});
                    socket.send(Message::Text(note.to_string().into())).await?;
                }
                Err(RecvError::Closed) => return close(socket, "hub is shutting down").await,
            },
            msg = socket.recv() => match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Ok(()),
                // Pings are answered by the socket itself; text is ignored.
                Some(Ok(_)) => {}
            },
        }
    }
}

async fn close(mut socket: WebSocket, reason: &str) -> Result<(), axum::Error> {
    socket
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason.into(),
        })))
        .await
}
