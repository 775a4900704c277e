//! `POST /api/v1/ingest/batches`: a device's msgpack+gzip `Batch`, bounded
//! at every step (body, decompressed size, record count, field sizes, and
//! the bytes all requests hold together: [`InFlight`]), stored in one
//! transaction, answered with a `BatchAck`.
//!
//! Invariant: a batch is checked completely before the store sees it, so a
//! refused batch leaves nothing behind; the answer's status tells the
//! agent what to do (413 split, 400 set aside, 401/403 stop), and a batch
//! version this hub does not read is a 400 with the stable code
//! `unsupported_batch_version` (re-encode, never set aside).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::api::read_body;
use super::auth;
use super::config::Limits;
use super::error::ApiError;
use super::metrics::Metrics;
use super::{Hub, LiveEvent};
use crate::wire::{
    error_code, Batch, Coding, Record, WireError, ACCEPT_ENCODING, CONTENT_TYPE_MSGPACK,
};
use tokio::sync::OwnedSemaphorePermit;

/// One request's share of the hub's in-flight budget
/// (`ingest.max_inflight_bytes`), shown in `logbook_hub_inflight_bytes`
/// while held. A share is at most the whole budget, so a batch larger
/// than it still goes, alone.
struct InFlight {
    permit: OwnedSemaphorePermit,
    hub: Arc<Hub>,
}

/// Counts a waiting request in `logbook_hub_inflight_waiting` while it
/// lives, also when its client goes away while it waits.
struct Waiting<'a>(&'a AtomicU64);

impl<'a> Waiting<'a> {
    fn count(gauge: &'a AtomicU64) -> Waiting<'a> {
        gauge.fetch_add(1, Relaxed);
        Waiting(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

impl InFlight {
    fn share(hub: &Hub, bytes: usize) -> u32 {
        let budget = hub.config.limits.inflight_permits();
        bytes.clamp(1, budget).min(u32::MAX as usize) as u32
    }

    /// Holds `bytes` of the budget, waiting in turn (first come, first
    /// served) while others hold it.
    async fn take(hub: &Arc<Hub>, bytes: usize) -> InFlight {
        let n = InFlight::share(hub, bytes);
        let permit = match hub.inflight.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                let _waiting = Waiting::count(&hub.metrics.inflight_waiting);
                hub.inflight
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        hub.metrics.inflight_bytes.fetch_add(n.into(), Relaxed);
        InFlight {
            permit,
            hub: hub.clone(),
        }
    }

    /// Holds `bytes` instead: gives back what is over, or takes more at
    /// once if it is free, else gives everything back and waits in turn
    /// for the whole (a request never waits while holding a share).
    async fn resize(mut self, bytes: usize) -> InFlight {
        let n = InFlight::share(&self.hub, bytes) as usize;
        let have = self.permit.num_permits();
        if n <= have {
            if let Some(over) = self.permit.split(have - n) {
                self.hub
                    .metrics
                    .inflight_bytes
                    .fetch_sub(over.num_permits() as u64, Relaxed);
            }
            return self;
        }
        let more = (n - have) as u32;
        match self.hub.inflight.clone().try_acquire_many_owned(more) {
            Ok(p) => {
                self.permit.merge(p);
                self.hub
                    .metrics
                    .inflight_bytes
                    .fetch_add(more.into(), Relaxed);
                self
            }
            Err(_) => {
                let hub = self.hub.clone();
                drop(self);
                InFlight::take(&hub, bytes).await
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.hub
            .metrics
            .inflight_bytes
            .fetch_sub(self.permit.num_permits() as u64, Relaxed);
    }
}

/// About how much memory a decoded batch holds: its records' structs and
/// text, and a little for each session, gap and mark.
fn decoded_bytes(batch: &Batch) -> usize {
    let records: usize = batch
        .records
        .iter()
        .map(|r| {
            std::mem::size_of::<Record>()
                + r.module.len()
                + r.message.len()
                + r.metadata.len()
                + r.process.as_ref().map_or(0, String::len)
        })
        .sum();
    records + (batch.sessions.len() + batch.gaps.len() + batch.marks.len()) * 1024
}

/// Longest device id, module, process name, tag, package name or reason.
pub const MAX_NAME_BYTES: usize = 256;
/// Most tags on one session.
pub const MAX_TAGS: usize = 64;

/// Checks everything about a decoded batch that does not need the store.
/// The error says which record or session broke which bound.
pub fn validate(batch: &Batch, device_id: &str, limits: &Limits) -> Result<(), ApiError> {
    if batch.device.id != device_id {
        return Err(ApiError::forbidden(format!(
            "batch is from device {:?} but the token belongs to device {device_id:?}",
            batch.device.id
        )));
    }
    if batch.records.len() > limits.max_records {
        return Err(ApiError::too_large(format!(
            "batch has {} records; at most {} per batch",
            batch.records.len(),
            limits.max_records
        )));
    }
    let bad = |what: String| Err(ApiError::bad_request(format!("malformed batch: {what}")));
    let name_ok = |s: &str| s.len() <= MAX_NAME_BYTES;
    if !name_ok(&batch.device.name) {
        return bad(format!("device name longer than {MAX_NAME_BYTES} bytes"));
    }
    for s in &batch.sessions {
        if s.tags.len() > MAX_TAGS || s.tags.iter().any(|t| !name_ok(t) || t.is_empty()) {
            return bad(format!(
                "session {}: at most {MAX_TAGS} tags of 1 to {MAX_NAME_BYTES} bytes",
                s.id
            ));
        }
        if s.package
            .as_ref()
            .is_some_and(|p| !name_ok(&p.name) || p.version.as_deref().is_some_and(|v| !name_ok(v)))
        {
            return bad(format!(
                "session {}: package name or version too long",
                s.id
            ));
        }
        let meta_len = serde_json::Value::Object(s.metadata.clone())
            .to_string()
            .len();
        if meta_len > limits.max_field_bytes
            || s.error
                .as_ref()
                .is_some_and(|e| e.len() > limits.max_field_bytes)
        {
            return bad(format!(
                "session {}: metadata or error longer than {} bytes",
                s.id, limits.max_field_bytes
            ));
        }
    }
    for r in &batch.records {
        if r.seq > i64::MAX as u64 {
            return bad(format!("record seq {} is out of range", r.seq));
        }
        if !name_ok(&r.module) || r.process.as_deref().is_some_and(|p| !name_ok(p)) {
            return bad(format!(
                "record {}: module or process longer than {MAX_NAME_BYTES} bytes",
                r.seq
            ));
        }
        if r.message.len() > limits.max_field_bytes || r.metadata.len() > limits.max_field_bytes {
            return bad(format!(
                "record {}: message or metadata longer than {} bytes",
                r.seq, limits.max_field_bytes
            ));
        }
        // Checked without building it: this runs for every record.
        if !r.metadata.is_empty()
            && (!r.metadata.trim_start().starts_with('{')
                || serde_json::from_str::<serde::de::IgnoredAny>(&r.metadata).is_err())
        {
            return bad(format!("record {}: metadata is not a JSON object", r.seq));
        }
    }
    for g in &batch.gaps {
        if !name_ok(&g.reason) || g.reason.is_empty() {
            return bad("gap reason empty or too long".into());
        }
    }
    if batch.marks.len() > MAX_MARKS {
        return bad(format!("more than {MAX_MARKS} marks in one batch"));
    }
    for m in &batch.marks {
        if m.id > i64::MAX as u64 || m.revision > i64::MAX as u64 {
            return bad(format!("mark {} is out of range", m.id));
        }
        if !name_ok(&m.name)
            || m.name.is_empty()
            || !["high", "normal"].contains(&m.priority.as_str())
            || m.released.as_deref().is_some_and(|r| !name_ok(r))
            || m.before_ns < 0
            || m.after_ns < 0
        {
            return bad(format!(
                "mark {}: bad name, priority, window or release",
                m.id
            ));
        }
        if m.metadata.len() > limits.max_field_bytes
            || (!m.metadata.is_empty()
                && serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(&m.metadata)
                    .is_err())
        {
            return bad(format!("mark {}: metadata is not a JSON object", m.id));
        }
    }
    Ok(())
}

/// What takes the place of a NUL in a stored text: U+FFFD, the
/// replacement character.
pub const NUL_REPLACEMENT: &str = "\u{FFFD}";

/// PostgreSQL's `text` cannot hold U+0000, and one NUL in a robot's log
/// line must not make its batch fail forever; so every backend stores a
/// NUL in a batch's texts as U+FFFD (the same bytes on SQLite and
/// PostgreSQL). Record metadata is JSON text, where a NUL is already the
/// escape `\u0000`; a session's metadata is JSON the hub reads as JSON,
/// so its keys and strings are replaced too.
pub fn replace_nul(batch: &mut Batch) {
    fn text(s: &mut String) {
        if s.contains('\0') {
            *s = s.replace('\0', NUL_REPLACEMENT);
        }
    }
    fn json(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::String(s) => text(s),
            serde_json::Value::Array(a) => a.iter_mut().for_each(json),
            serde_json::Value::Object(m) => object(m),
            _ => {}
        }
    }
    fn object(m: &mut serde_json::Map<String, serde_json::Value>) {
        if m.keys().any(|k| k.contains('\0')) {
            *m = std::mem::take(m)
                .into_iter()
                .map(|(k, v)| (k.replace('\0', NUL_REPLACEMENT), v))
                .collect();
        }
        m.values_mut().for_each(json);
    }
    text(&mut batch.device.name);
    for s in &mut batch.sessions {
        s.tags.iter_mut().for_each(text);
        if let Some(p) = &mut s.package {
            text(&mut p.name);
            p.version.as_mut().map(text);
        }
        object(&mut s.metadata);
        s.error.as_mut().map(text);
    }
    for r in &mut batch.records {
        text(&mut r.module);
        text(&mut r.message);
        r.process.as_mut().map(text);
    }
    for g in &mut batch.gaps {
        text(&mut g.reason);
    }
    for m in &mut batch.marks {
        text(&mut m.name);
        text(&mut m.priority);
        m.released.as_mut().map(text);
    }
    if let Some(a) = &mut batch.agent {
        text(&mut a.version);
        a.dropped.iter_mut().for_each(|(r, _)| text(r));
    }
}

/// Most marks one batch may carry.
pub const MAX_MARKS: usize = 10_000;

/// Decodes a body in its `Content-Encoding`, mapping wire errors to the
/// status the agent acts on.
pub fn decode(
    body: &[u8],
    coding: Coding,
    limits: &Limits,
) -> Result<Batch, (ApiError, &'static str)> {
    Batch::decode_as(body, coding, limits.max_decompressed_bytes).map_err(|e| match e {
        WireError::TooLarge { .. } => (
            ApiError::too_large(format!("batch {e}; split it")),
            "decompressed_too_large",
        ),
        // A stable code of its own: the agent re-encodes in an older
        // version on it, where any other 400 would set the batch aside.
        WireError::Version { .. } => (
            ApiError::new(
                StatusCode::BAD_REQUEST,
                error_code::UNSUPPORTED_BATCH_VERSION,
                e.to_string(),
            ),
            "unsupported_version",
        ),
        WireError::Gzip(_) => (ApiError::bad_request(e.to_string()), "bad_gzip"),
        WireError::Zstd(_) => (ApiError::bad_request(e.to_string()), "bad_zstd"),
        WireError::Malformed(_) => (ApiError::bad_request(e.to_string()), "malformed"),
    })
}

/// `POST /api/v1/ingest/batches`. Every answer, an acknowledgement or a
/// refusal, lists the codings this hub reads in `Accept-Encoding` (RFC
/// 7694): that is how an agent learns it may send zstd.
pub async fn post_batch(
    hub: State<Arc<Hub>>,
    peer: Option<axum::Extension<super::listen::PeerCert>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut response = store_batch(hub, peer, headers, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    response.headers_mut().insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static(ACCEPT_ENCODING),
    );
    response
}

async fn store_batch(
    State(hub): State<Arc<Hub>>,
    peer: Option<axum::Extension<super::listen::PeerCert>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (scope, _slot) = auth::device(&hub, &headers, peer.as_deref()).await?;
    let limits = hub.config.limits.clone();
    let reject = |reason: &'static str, e: ApiError| {
        hub.metrics.reject(reason);
        tracing::warn!(device = %scope.device_id, reason, message = %e.message, "batch refused");
        e
    };
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ctype.starts_with(CONTENT_TYPE_MSGPACK) {
        return Err(reject(
            "content_type",
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!("Content-Type must be {CONTENT_TYPE_MSGPACK}, found {ctype:?}"),
            ),
        ));
    }
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .map(|v| v.to_str().unwrap_or("(not text)"));
    let Some(coding) = Coding::from_header(encoding) else {
        return Err(reject(
            "content_encoding",
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "Content-Encoding must be zstd or gzip, found {:?}",
                    encoding.unwrap_or_default()
                ),
            ),
        ));
    };
    // Refuse a declared oversize body before reading any of it.
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limits.max_body_bytes as u64 {
            return Err(reject(
                "body_too_large",
                ApiError::too_large(format!(
                    "batch body of {len} bytes is larger than {} bytes; split it",
                    limits.max_body_bytes
                )),
            ));
        }
    }
    // The body's share of the in-flight budget before it is read (its
    // declared length, else the most it may be), then its decoded size.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let held = InFlight::take(&hub, declared.unwrap_or(limits.max_body_bytes)).await;
    let body = read_body(body, limits.max_body_bytes)
        .await
        .map_err(|e| reject("body_too_large", e))?;
    Metrics::add(&hub.metrics.bytes_in, body.len() as u64);
    let device_id = scope.device_id.clone();
    let decoder = hub
        .decoders
        .clone()
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let checked = tokio::task::spawn_blocking(move || {
        let _decoder = decoder;
        let mut batch = decode(&body, coding, &limits)?;
        validate(&batch, &device_id, &limits).map_err(|e| {
            let reason = match e.status {
                StatusCode::FORBIDDEN => "device_mismatch",
                StatusCode::PAYLOAD_TOO_LARGE => "too_many_records",
                _ => "invalid_field",
            };
            (e, reason)
        })?;
        replace_nul(&mut batch);
        Ok::<_, (ApiError, &'static str)>(batch)
    })
    .await?;
    let batch = checked.map_err(|(e, reason)| reject(reason, e))?;
    let _held = held.resize(decoded_bytes(&batch)).await;
    let streams = hub.live.receiver_count() > 0;
    // Copies of the records only for a store this process alone writes;
    // on a shared one, streams read them from the store (`LiveEvent`).
    let want_live = streams && !hub.shared;
    let batch = Arc::new(batch);
    let ingested = hub
        .store
        .ingest(&scope, batch.clone(), want_live)
        .await
        .map_err(ApiError::from)
        .map_err(|e| {
            if e.status == StatusCode::CONFLICT {
                reject("conflict", e)
            } else {
                e
            }
        })?;
    let m = &hub.metrics;
    Metrics::add(&m.batches, 1);
    Metrics::add(&m.records_stored, ingested.ack.stored);
    Metrics::add(&m.records_duplicate, ingested.ack.duplicates);
    // No receivers left is fine: nobody is watching.
    if hub.shared {
        // This replica's streams at once; the others through the store's
        // notification, which carries this process's origin so it is not
        // heard twice here. Asked after the commit: a stream that
        // subscribed meanwhile may have read the store before it.
        if !ingested.changed.is_empty() && hub.live.receiver_count() > 0 {
            let _ = hub
                .live
                .send(Arc::new(LiveEvent::Changed(ingested.changed)));
        }
    } else if want_live && (!ingested.live.is_empty() || !ingested.changed.ended.is_empty()) {
        let _ = hub.live.send(Arc::new(LiveEvent::Stored {
            records: ingested.live,
            ended: ingested.changed.ended,
        }));
    } else if !streams && !ingested.changed.is_empty() && hub.live.receiver_count() > 0 {
        // A stream subscribed while this batch was being stored, after it
        // was decided that nobody watched: its snapshot may predate the
        // commit, and no copies were made, so it reads them from the store.
        let _ = hub.live.send(Arc::new(LiveEvent::Resync));
    }
    tracing::debug!(
        device = %scope.device_id,
        stored = ingested.ack.stored,
        duplicates = ingested.ack.duplicates,
        "batch stored"
    );
    Ok((StatusCode::OK, Json(ingested.ack)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{Device, Level, Record, BATCH_VERSION};

    fn limits() -> Limits {
        super::super::HubConfig::default().limits
    }

    fn record(seq: u64) -> Record {
        Record {
            seq,
            session_id: None,
            timestamp_ns: 1,
            level: Level::Info,
            module: "m".into(),
            message: "hello".into(),
            metadata: String::new(),
            pid: None,
            uid: None,
            gid: None,
            process: None,
        }
    }

    fn batch(records: Vec<Record>) -> Batch {
        Batch {
            marks: Vec::new(),
            agent: None,
            version: BATCH_VERSION,
            device: Device {
                id: "robot-1".into(),
                name: "r1".into(),
            },
            sent_at_ns: 0,
            sessions: vec![],
            records,
            gaps: vec![],
        }
    }

    fn check(b: Batch, want: Result<(), (u16, &str)>) {
        let got = validate(&b, "robot-1", &limits()).map_err(|e| (e.status.as_u16(), e.message));
        assert_eq!(got, want.map_err(|(s, m)| (s, m.to_owned())));
    }

    #[test]
    fn validation() {
        check(batch(vec![record(1)]), Ok(()));
        let mut b = batch(vec![]);
        b.device.id = "robot-2".into();
        check(
            b,
            Err((
                403,
                "batch is from device \"robot-2\" but the token belongs to device \"robot-1\"",
            )),
        );
        let mut r = record(2);
        r.metadata = "[1]".into();
        check(
            batch(vec![r]),
            Err((
                400,
                "malformed batch: record 2: metadata is not a JSON object",
            )),
        );
        let mut r = record(3);
        r.message = "x".repeat(limits().max_field_bytes + 1);
        check(
            batch(vec![r]),
            Err((
                400,
                "malformed batch: record 3: message or metadata longer than 65536 bytes",
            )),
        );
        let mut r = record(4);
        r.module = "m".repeat(MAX_NAME_BYTES + 1);
        check(
            batch(vec![r]),
            Err((
                400,
                "malformed batch: record 4: module or process longer than 256 bytes",
            )),
        );
        let many = (0..limits().max_records as u64 + 1).map(record).collect();
        check(
            batch(many),
            Err((413, "batch has 100001 records; at most 100000 per batch")),
        );
    }

    /// A deterministic mutation test of decode + validate: flipping,
    /// truncating and inserting bytes of a real batch must give an error
    /// or a batch, never a panic, and never more than the limit in memory.
    #[test]
    fn mutated_bodies_never_panic() {
        let mut b = batch((0..20).map(record).collect());
        b.records[3].metadata = r#"{"k":1}"#.into();
        let raw = b.to_msgpack();
        let bodies = [Coding::Identity, Coding::Gzip, Coding::Zstd]
            .map(|c| (c.compress(&raw, if c == Coding::Zstd { 3 } else { 6 }), c));
        let lim = limits();
        let mut rng = crate::test_rng::Rng::new(0x9E37_79B9_7F4A_7C15);
        let mut next = || rng.next();
        for round in 0..4500 {
            let (src, coding) = &bodies[round % 3];
            let mut m = src.clone();
            match next() % 4 {
                0 => {
                    let i = (next() as usize) % m.len();
                    m[i] ^= 1 << (next() % 8);
                }
                1 => m.truncate((next() as usize) % m.len()),
                2 => {
                    let i = (next() as usize) % m.len();
                    m.insert(i, next() as u8);
                }
                _ => {
                    let i = (next() as usize) % m.len();
                    m[i] = [0xc1, 0xdd, 0xdf, 0xff, 0x00][(next() % 5) as usize];
                }
            }
            if let Ok(batch) = decode(&m, *coding, &lim) {
                let _ = validate(&batch, "robot-1", &lim);
            }
        }
    }
}
