//! Live log streams over WebSocket: an operator watching a session (or the
//! records a device sends outside sessions) gets its last `tail` records
//! first (optional), or every record committed after hub row id `after_id`
//! (a reconnecting client's resume point), then every record as its batch
//! is committed, one JSON log item per text message; a session's stream
//! ends with a close frame when the session leaves `active`, every stream
//! when the hub shuts down.
//!
//! Each message carries the record's hub row `id` (the order the hub
//! committed records in, which a device's `seq` is not: errors and
//! set-asides arrive out of it) and, for the records of a `tail`,
//! `"tail": true`. Once the tail or the records after `after_id` are out,
//! `{"event":"caught_up","id":N}` says every record up to id N was sent or
//! left out on purpose. A client that reconnects with `after_id` set to the
//! larger of that N and the last non-tail `id` it got misses nothing and
//! gets nothing twice.
//!
//! On a store several replicas write (PostgreSQL), the broadcast carries
//! no records, only which streams a commit changed (`LiveEvent::Changed`,
//! from this replica's ingest or another's, heard through
//! `Store::follow_commits`) or that any may be behind (`LiveEvent::Resync`):
//! a stream so woken reads the store after the id it covered, once for all
//! the wakes queued behind it (README "Running the hub for a fleet").
//!
//! Invariant: a stream subscribes before it reads the database, and skips
//! live records up to the id it has covered, so
//! nothing committed during connection setup is lost or repeated. A
//! session's stream closes only after reading the database past the last id
//! it covered, once it has seen the session's end (from the database or
//! the broadcast): every record committed with or before the end (the
//! closing batch's own included) is sent before the close frame. A client
//! too slow for the live feed is not dropped and does not slow ingest: when
//! it falls behind the broadcast, what it missed is read back from the
//! database, page by page, at the pace it reads; one that takes no message
//! for `server.stream_send_timeout` is closed (1008, with the reason) and
//! resumes with `after_id`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};

use super::api::{self, log_item, param, Params};
use super::auth;
use super::error::ApiError;
use super::store::{LogQuery, LogRow, LogScope};
use super::{Hub, LiveEvent};

/// Most records a client may ask to replay before the live stream.
pub const MAX_TAIL: u64 = 1000;
/// Records read from the database at once when catching up after an id.
const CATCH_UP_PAGE: u64 = 500;

/// `GET …/sessions/{id}/logs` upgraded: a session's live logs.
pub async fn ws_logs(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, param(&p, "access_token"), &org, &project).await?;
    session_stream(hub, &org, &project, &id, &p, ws).await
}

/// A session's live logs for a caller already allowed to see the project
/// (the API's route above and the console's log viewer).
pub async fn session_stream(
    hub: Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
    p: &[(String, String)],
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let start = Start::of(p)?;
    let pk = api::session_pk(&hub, org, project, id).await?;
    upgrade(hub, ws, LogScope::Session(pk), start)
}

/// `GET …/devices/{device_id}/logs` upgraded: the live logs a device sends
/// outside any session. The stream ends only with the hub.
pub async fn ws_device_logs(
    State(hub): State<Arc<Hub>>,
    Path((org, project, device_id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, param(&p, "access_token"), &org, &project).await?;
    let start = Start::of(&p)?;
    let device = api::device_pk(&hub, &org, &project, &device_id).await?;
    upgrade(hub, ws, LogScope::Device(device), start)
}

/// What a stream sends before the live records: the filters, and the tail
/// or the id to resume after.
struct Start {
    q: LogQuery,
    after_id: Option<i64>,
}

impl Start {
    fn of(p: &[(String, String)]) -> Result<Start, ApiError> {
        let mut q = api::log_filters(p)?;
        let tail = param(p, "tail")
            .map(|v| v.parse::<u64>())
            .transpose()
            .map_err(|_| ApiError::bad_request("tail: expected a non-negative integer"))?
            .unwrap_or(0);
        if tail > MAX_TAIL {
            return Err(ApiError::bad_request(format!("tail: at most {MAX_TAIL}")));
        }
        let after_id = param(p, "after_id")
            .map(|v| v.parse::<i64>())
            .transpose()
            .ok()
            .flatten()
            .filter(|id| *id >= 0);
        if param(p, "after_id").is_some() && after_id.is_none() {
            return Err(ApiError::bad_request(
                "after_id: expected the non-negative id of a record this stream sent",
            ));
        }
        if after_id.is_some() && tail > 0 {
            return Err(ApiError::bad_request(
                "give tail (the newest records first) or after_id (resume after a record), not both",
            ));
        }
        q.limit = tail;
        q.ascending = false;
        q.cursor = None;
        q.want_total = false;
        Ok(Start { q, after_id })
    }
}

fn upgrade(
    hub: Arc<Hub>,
    ws: WebSocketUpgrade,
    scope: LogScope,
    start: Start,
) -> Result<Response, ApiError> {
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
        if let Err(e) = run(&hub, socket, scope, start.q, start.after_id).await {
            tracing::debug!(error = %e, "log stream ended");
        }
        hub.metrics.active_streams.fetch_sub(1, Relaxed);
        drop(permit);
    }))
}

/// Whether live record `r` belongs to `scope`.
fn in_scope(scope: LogScope, r: &LogRow) -> bool {
    match scope {
        LogScope::Session(pk) => r.session_pk == Some(pk),
        LogScope::Device(pk) => r.session_pk.is_none() && r.device_pk == pk,
    }
}

/// Whether the stream of `scope` should end: its session is not active
/// (a device's stream goes on).
async fn ended(hub: &Arc<Hub>, scope: LogScope) -> bool {
    let LogScope::Session(pk) = scope else {
        return false;
    };
    let status = hub.store.session_status(pk).await.ok().flatten();
    status.as_deref() != Some("active")
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

/// A record as one stream message: its log item, its hub row id, and
/// whether it is part of the tail asked for.
fn text(r: &LogRow, tail: bool) -> Message {
    #[derive(serde::Serialize)]
    struct Item<'a> {
        #[serde(flatten)]
        item: api::LogItem<'a>,
        id: i64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        tail: bool,
    }
    let item = Item {
        item: log_item(r),
        id: r.id,
        tail,
    };
    Message::Text(
        serde_json::to_string(&item)
            .expect("a log item serializes")
            .into(),
    )
}

/// Sends every record of `scope` matching `q` committed after hub row id
/// `after`, page by page from the database; returns the id it covered
/// through (every matching record up to it was sent).
async fn catch_up(
    hub: &Arc<Hub>,
    socket: &mut WebSocket,
    scope: LogScope,
    q: &LogQuery,
    mut after: i64,
) -> Result<i64, axum::Error> {
    loop {
        let page = hub.store.logs_after(scope, after, q, CATCH_UP_PAGE).await;
        // A failed read ends the stream; the client reconnects after the
        // last id it got.
        let (rows, next) = page.map_err(|e| {
            tracing::warn!(error = %e, "a live stream could not read the logs it missed");
            axum::Error::new(e)
        })?;
        for r in &rows {
            send(hub, socket, text(r, false)).await?;
        }
        let done = (rows.len() as u64) < CATCH_UP_PAGE;
        after = next;
        if done {
            return Ok(after);
        }
    }
}

async fn run(
    hub: &Arc<Hub>,
    mut socket: WebSocket,
    scope: LogScope,
    q: LogQuery,
    after_id: Option<i64>,
) -> Result<(), axum::Error> {
    let mut live = hub.live.subscribe();
    // Every matching record with an id up to this one was sent, or was
    // older than the tail asked for; `None`: the tail was unreadable, so
    // nothing is known covered.
    let mut through: Option<i64> = None;
    match after_id {
        Some(after) => through = Some(catch_up(hub, &mut socket, scope, &q, after).await?),
        None => {
            if let Ok((page, last)) = hub.store.logs_tail(scope, &q).await {
                for r in page.items.iter().rev() {
                    send(hub, &mut socket, text(r, true)).await?;
                }
                through = Some(last.unwrap_or(0));
            }
        }
    }
    if let Some(id) = through {
        // Where a client that loses this stream resumes, whether or not a
        // record follows (tail records come in seq order, not id order).
        let mark = serde_json::json!({"event": "caught_up", "id": id});
        send(hub, &mut socket, Message::Text(mark.to_string().into())).await?;
    }
    if ended(hub, scope).await {
        return finish(hub, socket, scope, &q, through, "session is not active").await;
    }
    loop {
        tokio::select! {
            _ = hub.shutdown.cancelled() => {
                return close(socket, "hub is shutting down").await;
            }
            event = live.recv() => match event {
                Ok(ev) => {
                    let wake = match &*ev {
                        LiveEvent::Stored { records, ended } => {
                            for r in records.iter().filter(|r| in_scope(scope, r)) {
                                if through.is_some_and(|t| r.id <= t) {
                                    continue;
                                }
                                if matches(&q, r) {
                                    send(hub, &mut socket, text(r, false)).await?;
                                }
                                if let Some(t) = &mut through {
                                    *t = r.id;
                                }
                            }
                            if matches!(scope, LogScope::Session(pk) if ended.contains(&pk)) {
                                return finish(hub, socket, scope, &q, through, "session ended").await;
                            }
                            continue;
                        }
                        other => Wake::of(other, scope),
                    };
                    // A shared store: one read from the store covers this
                    // wake and every one already queued behind it.
                    let mut wake = wake;
                    loop {
                        match live.try_recv() {
                            Ok(ev) => wake.add(Wake::of(&ev, scope)),
                            Err(TryRecvError::Lagged(_)) => wake.add(Wake::of(&LiveEvent::Resync, scope)),
                            Err(TryRecvError::Empty | TryRecvError::Closed) => break,
                        }
                    }
                    if wake.is_none() {
                        continue;
                    }
                    let Some(t) = through else {
                        // The tail was unreadable: nothing to read after.
                        return close(socket, "the hub could not read this stream's logs; reconnect").await;
                    };
                    if wake.ends || (wake.maybe_ended && ended(hub, scope).await) {
                        return finish(hub, socket, scope, &q, through, "session ended").await;
                    }
                    through = Some(catch_up(hub, &mut socket, scope, &q, t).await?);
                }
                Err(RecvError::Lagged(missed)) => match through {
                    // Read back what the broadcast dropped, at this
                    // client's pace; later events it already covered are
                    // skipped by id.
                    Some(t) => {
                        hub.metrics.stream_catch_ups.fetch_add(1, Relaxed);
                        through = Some(catch_up(hub, &mut socket, scope, &q, t).await?);
                        // The event that ended the session may be among
                        // those dropped.
                        if ended(hub, scope).await {
                            return finish(hub, socket, scope, &q, through, "session ended").await;
                        }
                    }
                    None => {
                        let note = serde_json::json!({"event": "lagged", "missed_batches": missed});
                        send(hub, &mut socket, Message::Text(note.to_string().into())).await?;
                    }
                },
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

/// What wake-ups on a shared store ask of one stream.
#[derive(Default)]
struct Wake {
    /// It has new records to read.
    behind: bool,
    /// Its session ended.
    ends: bool,
    /// Its session may have ended unheard (after a resync).
    maybe_ended: bool,
}

impl Wake {
    fn of(ev: &LiveEvent, scope: LogScope) -> Wake {
        match ev {
            LiveEvent::Changed(c) => Wake {
                behind: c.touches(scope),
                ends: c.ends(scope),
                maybe_ended: false,
            },
            // Records of this process's own store are in the store too.
            LiveEvent::Stored { .. } | LiveEvent::Resync => Wake {
                behind: true,
                ends: false,
                maybe_ended: true,
            },
        }
    }

    fn add(&mut self, other: Wake) {
        self.behind |= other.behind;
        self.ends |= other.ends;
        self.maybe_ended |= other.maybe_ended;
    }

    fn is_none(&self) -> bool {
        !(self.behind || self.ends || self.maybe_ended)
    }
}

/// Ends a session's stream once its end was seen: first every record
/// committed after `through` (the id covered so far), read from the
/// database to exhaustion, then the close frame. The end was committed
/// with or after the session's last records, so this read sees them all,
/// whether or not their broadcast reached this stream yet (it may sit
/// unread in the receiver, behind a tail being sent, or be among the
/// events a lagging stream lost).
async fn finish(
    hub: &Arc<Hub>,
    mut socket: WebSocket,
    scope: LogScope,
    q: &LogQuery,
    through: Option<i64>,
    reason: &str,
) -> Result<(), axum::Error> {
    if let Some(t) = through {
        catch_up(hub, &mut socket, scope, q, t).await?;
    }
    close(socket, reason).await
}

/// Sends one message, or gives up on a client that has not taken it within
/// `server.stream_send_timeout` (a slow consumer, which would hold its
/// stream slot and connection forever): it gets a close frame (1008, the
/// reason) if it takes that within the same time, and the stream ends.
async fn send(hub: &Hub, socket: &mut WebSocket, msg: Message) -> Result<(), axum::Error> {
    let bound = hub.config.conn.stream_send_timeout;
    if let Ok(sent) = tokio::time::timeout(bound, socket.send(msg)).await {
        return sent;
    }
    hub.metrics.stream_slow_closes.fetch_add(1, Relaxed);
    let reason = format!(
        "too slow: a message waited over {bound:?} (server.stream_send_timeout); reconnect with after_id"
    );
    tracing::info!("closing a live stream: {reason}");
    let frame = Message::Close(Some(CloseFrame {
        code: axum::extract::ws::close_code::POLICY,
        reason: reason.clone().into(),
    }));
    let _ = tokio::time::timeout(bound, socket.send(frame)).await;
    Err(axum::Error::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        reason,
    )))
}

async fn close(mut socket: WebSocket, reason: &str) -> Result<(), axum::Error> {
    socket
        .send(Message::Close(Some(CloseFrame {
            code: axum::extract::ws::close_code::NORMAL,
            reason: reason.into(),
        })))
        .await
}
