//! Artifact uploads over tus 1.0.0: core (HEAD, PATCH), creation, checksum
//! (sha256 per PATCH), termination and expiration, on
//! `/api/v1/ingest/uploads[/{id}]`. A finished upload is checked against
//! the whole file's SHA-256 from `Upload-Metadata` and becomes the
//! session's artifact at its path. An unfinished upload with no write for
//! `uploads.expire_after` is deleted (its part too): by
//! [`sweep_expired`], which the hub runs periodically, or when it is next
//! asked for (410 Gone); a device that comes back then creates it again.
//!
//! Invariant: upload bytes live in the upload's part in [`Blobs`] (the
//! offset is its length, its last write when it was last written) and
//! finished artifacts in blobs the hub names; no blob or part name is ever
//! derived from a device-supplied path; an upload with a PATCH in progress
//! never expires.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::auth;
use super::error::ApiError;
use super::listen::PeerCert;
use super::metrics::Metrics;
use super::paths::validate_artifact_path;
use super::store::{DeviceScope, UploadRow};
use super::Hub;
use crate::wire::upload_meta;

const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str = "creation,checksum,termination,expiration";
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";
/// Unfinished uploads one device may hold at once.
pub const MAX_UNFINISHED_UPLOADS: u64 = 64;

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

/// Parses `Upload-Metadata`: `key base64,key2 base64,flag`.
pub fn parse_metadata(value: &str) -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    for pair in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, val) = match pair.split_once(' ') {
            Some((k, v)) => (k, v.trim()),
            None => (pair, ""),
        };
        let decoded = b64()
            .decode(val)
            .map_err(|_| format!("Upload-Metadata: value of {key:?} is not base64"))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| format!("Upload-Metadata: value of {key:?} is not UTF-8"))?;
        out.insert(key.to_owned(), text);
    }
    Ok(out)
}

/// The fuzz entry point of the tus header decoding (fuzz target `tus`):
/// `data` as `Upload-Metadata`, whose pairs encode back to a header that
/// parses to the same map, and as an artifact path the metadata names.
/// Never panics.
pub fn fuzz_one(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(map) = parse_metadata(text) {
        let again: Vec<String> = map
            .iter()
            .map(|(k, v)| format!("{k} {}", b64().encode(v)))
            .collect();
        // A key with a space or comma cannot round-trip; tus keys have
        // neither (the first space ends the key).
        if map.keys().all(|k| !k.contains([',', ' ']) && !k.is_empty()) {
            assert_eq!(
                parse_metadata(&again.join(",")).as_ref(),
                Ok(&map),
                "{text:?}"
            );
        }
        for v in map.values() {
            let _ = validate_artifact_path(v);
        }
    }
    let _ = validate_artifact_path(text);
}

fn with_tus(mut resp: Response) -> Response {
    resp.headers_mut()
        .insert("tus-resumable", HeaderValue::from_static(TUS_VERSION));
    resp
}

fn err(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(status, code, message)
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn check_version(h: &HeaderMap) -> Result<(), ApiError> {
    match header_str(h, "tus-resumable") {
        Some(TUS_VERSION) => Ok(()),
        Some(other) => Err(err(
            StatusCode::PRECONDITION_FAILED,
            "tus_version",
            format!("Tus-Resumable {other:?} is not supported; this hub speaks {TUS_VERSION}"),
        )),
        None => Err(err(
            StatusCode::PRECONDITION_FAILED,
            "tus_version",
            format!("Tus-Resumable: {TUS_VERSION} header is required"),
        )),
    }
}

fn options(hub: &Hub) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(EXTENSIONS));
    h.insert("tus-checksum-algorithm", HeaderValue::from_static("sha256"));
    h.insert(
        "tus-max-size",
        HeaderValue::from(hub.config.limits.max_upload_bytes),
    );
    with_tus(resp)
}

/// `POST` (creation) and `OPTIONS` on the upload collection.
pub async fn collection(
    State(hub): State<Arc<Hub>>,
    peer: Option<axum::Extension<PeerCert>>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    tus_response(collection_inner(&hub, peer.as_deref(), method, &headers).await)
}

/// Every tus answer, errors too, carries `Tus-Resumable`; errors keep the
/// JSON body.
fn tus_response(r: Result<Response, ApiError>) -> Response {
    with_tus(r.unwrap_or_else(IntoResponse::into_response))
}

async fn collection_inner(
    hub: &Arc<Hub>,
    peer: Option<&PeerCert>,
    method: Method,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let (scope, _slot) = auth::device(hub, headers, peer).await?;
    match method {
        Method::OPTIONS => Ok(options(hub)),
        Method::POST => create(hub, scope, headers).await,
        _ => Err(err(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "uploads: use POST to create or OPTIONS to discover",
        )),
    }
}

async fn create(hub: &Arc<Hub>, scope: DeviceScope, h: &HeaderMap) -> Result<Response, ApiError> {
    check_version(h)?;
    let reject = |reason: &'static str, e: ApiError| {
        hub.metrics.reject(reason);
        e
    };
    if h.contains_key("upload-defer-length") {
        return Err(ApiError::bad_request(
            "Upload-Defer-Length is not supported; send Upload-Length",
        ));
    }
    let length: u64 = header_str(h, "upload-length")
        .ok_or_else(|| ApiError::bad_request("Upload-Length header is required"))?
        .parse()
        .map_err(|_| ApiError::bad_request("Upload-Length must be a non-negative integer"))?;
    let max = hub.config.limits.max_upload_bytes;
    if length > max {
        return Err(reject(
            "upload_too_large",
            ApiError::too_large(format!(
                "upload of {length} bytes is larger than {max} bytes"
            )),
        ));
    }
    let raw_meta = header_str(h, "upload-metadata").unwrap_or("").to_owned();
    if raw_meta.len() > 8 << 10 {
        return Err(ApiError::bad_request(
            "Upload-Metadata is longer than 8 KiB",
        ));
    }
    let meta = parse_metadata(&raw_meta).map_err(ApiError::bad_request)?;
    let session_id = meta
        .get(upload_meta::SESSION_ID)
        .ok_or_else(|| ApiError::bad_request("Upload-Metadata needs session_id"))?;
    let session_uuid: uuid::Uuid = session_id
        .parse()
        .map_err(|_| ApiError::bad_request(format!("session_id {session_id:?} is not a UUID")))?;
    let path = meta
        .get(upload_meta::PATH)
        .or_else(|| meta.get("filename"))
        .ok_or_else(|| ApiError::bad_request("Upload-Metadata needs path"))?
        .clone();
    validate_artifact_path(&path).map_err(|m| reject("bad_path", ApiError::bad_request(m)))?;
    let sha256 = match meta.get(upload_meta::SHA256) {
        Some(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            s.to_ascii_lowercase()
        }
        Some(s) => {
            return Err(ApiError::bad_request(format!(
                "sha256 {s:?} is not 64 hex digits"
            )))
        }
        None => String::new(),
    };
    let content_type = meta
        .get(upload_meta::CONTENT_TYPE)
        .or_else(|| meta.get("filetype"))
        .filter(|c| c.len() <= 255 && HeaderValue::from_str(c).is_ok())
        .cloned()
        .unwrap_or_else(|| "application/octet-stream".into());
    let (session_pk, device_pk) = hub
        .store
        .session_for_device(&scope, session_uuid)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("session {session_uuid} was deleted")))?;
    if !sha256.is_empty() {
        let held = hub
            .store
            .get_artifact(session_pk, &path)
            .await?
            .filter(|a| a.sha256 == sha256 && a.size == length);
        if let Some(held) = held {
            // The hub already holds this very file (the answer to its last
            // PATCH was lost, or the device forgot it uploaded it): the
            // upload is complete at once, nothing needs sending again. Its
            // Location is the upload it was finished from, which a HEAD
            // answers whole (a fresh id for an artifact from before that
            // was kept: a HEAD there is a 404).
            tracing::info!(device = %scope.device_id, path = %path, "upload of a file the hub holds; complete at once");
            let id = held
                .upload_id
                .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
            return Ok(created(&id, length));
        }
        let same = hub
            .store
            .find_unfinished_upload(device_pk, session_pk, &path, &sha256, length)
            .await?;
        if let Some(up) = same {
            // Creation is idempotent per file version: answer with the
            // upload already under way and its offset (or, when its bytes
            // are gone, create it anew).
            if let Some(offset) = current_offset(hub, &up).await? {
                tracing::info!(device = %scope.device_id, upload = %up.id, offset, "upload creation repeated; resuming");
                return Ok(with_expiry(hub, &up, created(&up.id, offset)).await);
            }
        }
    }
    // Each unfinished upload holds a partial file: bound how many a device
    // may leave lying around.
    if hub.store.unfinished_uploads(device_pk).await? >= MAX_UNFINISHED_UPLOADS {
        return Err(reject(
            "too_many_uploads",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_uploads",
                format!(
                    "this device has {MAX_UNFINISHED_UPLOADS} unfinished uploads; finish or DELETE some first"
                ),
            ),
        ));
    }
    let id = uuid::Uuid::now_v7().simple().to_string();
    let upload = UploadRow {
        id: id.clone(),
        device_pk,
        session_pk,
        path,
        content_type,
        sha256,
        length,
        metadata: raw_meta,
        created_at_ns: time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64,
    };
    hub.blobs
        .create_part(&id)
        .await
        .map_err(|e| ApiError::internal(format!("cannot create upload file: {e}")))?;
    hub.store.create_upload(&upload).await?;
    Metrics::add(&hub.metrics.uploads_created, 1);
    tracing::info!(device = %scope.device_id, upload = %id, path = %upload.path, length, "upload created");
    if length == 0 {
        finish(hub, &upload).await?;
        return Ok(created(&id, 0));
    }
    Ok(with_expiry(hub, &upload, created(&id, 0)).await)
}

/// When upload `up` expires: `uploads.expire_after` past its part's last
/// write or its creation, the later.
async fn expires_at(hub: &Hub, up: &UploadRow) -> SystemTime {
    let created = SystemTime::UNIX_EPOCH + Duration::from_nanos(up.created_at_ns.max(0) as u64);
    let written = hub.blobs.part(&up.id).await.ok().map(|p| p.modified);
    written.map_or(created, |w| w.max(created)) + hub.config.upload_expire_after
}

/// `t` as an HTTP date (`Upload-Expires`).
fn http_date(t: SystemTime) -> HeaderValue {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    let text = time::OffsetDateTime::from(t)
        .format(format)
        .unwrap_or_default();
    HeaderValue::from_str(&text).unwrap_or(HeaderValue::from_static(""))
}

/// Adds `Upload-Expires` for upload `up` to `resp`.
async fn with_expiry(hub: &Hub, up: &UploadRow, mut resp: Response) -> Response {
    let at = expires_at(hub, up).await;
    resp.headers_mut().insert("upload-expires", http_date(at));
    resp
}

/// Whether every byte of upload `up` has arrived.
async fn complete(hub: &Hub, up: &UploadRow) -> bool {
    hub.blobs.part(&up.id).await.ok().map(|p| p.len) == Some(up.length)
}

/// Deletes upload `up` (row and part) if it has expired, no PATCH is
/// writing to it and it is not complete (a complete one is finished, by
/// the next HEAD or the sweeper); returns whether it did.
async fn expire_if_due(hub: &Arc<Hub>, up: &UploadRow) -> Result<bool, ApiError> {
    if expires_at(hub, up).await > SystemTime::now() {
        return Ok(false);
    }
    let Some(busy) = Busy::take(hub, &up.id).await? else {
        return Ok(false);
    };
    if complete(hub, up).await {
        busy.release().await;
        return Ok(false);
    }
    let deleted = hub.store.delete_upload(&up.id).await;
    busy.release().await;
    deleted?;
    if let Err(e) = hub.blobs.remove_part(&up.id).await {
        tracing::warn!(upload = %up.id, error = %e, "cannot remove an expired upload's file");
    }
    Metrics::add(&hub.metrics.uploads_expired, 1);
    tracing::info!(upload = %up.id, path = %up.path, "unfinished upload expired; deleted");
    Ok(true)
}

/// Deletes every expired unfinished upload, and finishes every complete
/// one left unfinished, reading the candidates 500 at a time; returns how
/// many it deleted.
pub async fn sweep_expired(hub: &Arc<Hub>) -> usize {
    sweep(hub, 500).await
}

/// How long one sweep may hold the sweepers' lease: a replica that dies
/// mid-sweep delays the next sweep (on any replica) by at most this.
const SWEEP_LEASE: Duration = Duration::from_secs(600);

/// [`sweep_expired`], reading `page` candidates at a time, on one replica
/// at a time (the others skip their turn while one holds the lease).
async fn sweep(hub: &Arc<Hub>, page: u32) -> usize {
    let turn = Busy::take_named(hub, "sweep:uploads".into(), SWEEP_LEASE).await;
    let busy = match turn {
        Ok(Some(busy)) => busy,
        Ok(None) => {
            tracing::debug!("another replica is sweeping uploads");
            return 0;
        }
        Err(e) => {
            tracing::warn!(error = %e.message, "cannot take the upload sweepers' lease");
            return 0;
        }
    };
    let n = sweep_held(hub, page).await;
    busy.release().await;
    n
}

async fn sweep_held(hub: &Arc<Hub>, page: u32) -> usize {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64;
    let before = now.saturating_sub(hub.config.upload_expire_after.as_nanos() as i64);
    let mut after: Option<(i64, String)> = None;
    let mut n = 0;
    loop {
        let cursor = after.as_ref().map(|(at, id)| (*at, id.as_str()));
        let read = hub.store.uploads_created_before(before, cursor, page).await;
        let candidates = match read {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot look for expired uploads");
                return n;
            }
        };
        for up in &candidates {
            n += usize::from(sweep_one(hub, up).await);
        }
        match candidates.last() {
            Some(last) if candidates.len() as u32 == page => {
                after = Some((last.created_at_ns, last.id.clone()));
            }
            _ => return n,
        }
    }
}

/// Finishes candidate `up` if complete, else expires it if due; returns
/// whether it was deleted.
async fn sweep_one(hub: &Arc<Hub>, up: &UploadRow) -> bool {
    if complete(hub, up).await {
        // Every byte arrived but the hub stopped before finishing it and
        // nobody asked since: finish it rather than keep it.
        match Busy::take(hub, &up.id).await {
            Ok(Some(busy)) => {
                if let Err(e) = finish(hub, up).await {
                    tracing::warn!(upload = %up.id, error = %e.message, "cannot finish an upload");
                }
                busy.release().await;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(upload = %up.id, error = %e.message, "cannot finish an upload")
            }
        }
        return false;
    }
    match expire_if_due(hub, up).await {
        Ok(deleted) => deleted,
        Err(e) => {
            tracing::warn!(upload = %up.id, error = %e.message, "cannot expire an upload");
            false
        }
    }
}

/// Runs [`sweep_expired`] every quarter of `uploads.expire_after` (within
/// 100 ms and an hour) until the hub shuts down.
pub async fn expire_periodically(hub: Arc<Hub>) {
    let every = (hub.config.upload_expire_after / 4)
        .clamp(Duration::from_millis(100), Duration::from_secs(3600));
    loop {
        sweep_expired(&hub).await;
        tokio::select! {
            _ = hub.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// `201 Created` naming upload `id`, which holds `offset` bytes.
fn created(id: &str, offset: u64) -> Response {
    let mut resp = StatusCode::CREATED.into_response();
    let location = format!("{}/{id}", crate::wire::UPLOADS_PATH);
    resp.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("ascii"),
    );
    resp.headers_mut()
        .insert("upload-offset", HeaderValue::from(offset));
    resp
}

/// `HEAD`, `PATCH`, `DELETE` and `OPTIONS` on one upload.
pub async fn resource(
    State(hub): State<Arc<Hub>>,
    peer: Option<axum::Extension<PeerCert>>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    tus_response(resource_inner(&hub, peer.as_deref(), id, method, &headers, body).await)
}

async fn resource_inner(
    hub: &Arc<Hub>,
    peer: Option<&PeerCert>,
    id: String,
    method: Method,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (scope, _slot) = auth::device(hub, headers, peer).await?;
    if method == Method::OPTIONS {
        return Ok(options(hub));
    }
    // Ids are ours (hex); anything else cannot name an upload.
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::not_found(format!("no upload {id:?}")));
    }
    let upload = match find_upload(hub, &scope, &id).await {
        Ok(up) => up,
        // A finished upload answers HEAD and PATCH whole: a client whose
        // last PATCH answer was lost, asking where it stands or sending
        // again, is done; so is one (tuspy) that PATCHes from 0 after a
        // creation of a file the hub holds. No byte of the body is read.
        Err(e)
            if e.status == StatusCode::NOT_FOUND
                && (method == Method::HEAD || method == Method::PATCH) =>
        {
            let mut resp = finished(hub, &scope, &id).await?.ok_or(e)?;
            if method == Method::PATCH {
                check_version(headers)?;
                *resp.status_mut() = StatusCode::NO_CONTENT;
            }
            return Ok(resp);
        }
        Err(e) => return Err(e),
    };
    if method != Method::DELETE && expire_if_due(hub, &upload).await? {
        return Err(ApiError::new(
            StatusCode::GONE,
            "upload_expired",
            format!(
                "upload {id} had no write for {:?} and was deleted; create it again",
                hub.config.upload_expire_after
            ),
        ));
    }
    match method {
        Method::HEAD => head(hub, &upload).await,
        Method::PATCH => patch(hub, &upload, headers, body).await,
        Method::DELETE => {
            check_version(headers)?;
            hub.store.delete_upload(&upload.id).await?;
            if let Err(e) = hub.blobs.remove_part(&id).await {
                tracing::warn!(upload = %id, error = %e, "cannot remove upload file");
            }
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        _ => Err(err(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "an upload answers HEAD, PATCH, DELETE and OPTIONS",
        )),
    }
}

async fn find_upload(hub: &Arc<Hub>, scope: &DeviceScope, id: &str) -> Result<UploadRow, ApiError> {
    let missing = || ApiError::not_found(format!("no upload {id}"));
    let up = hub.store.get_upload(id).await?.ok_or_else(missing)?;
    if !is_device(hub, scope, up.device_pk).await? {
        return Err(missing());
    }
    Ok(up)
}

/// Whether `device_pk` is the device of the request's token: an upload of
/// another device is answered as if it did not exist.
async fn is_device(hub: &Hub, scope: &DeviceScope, device_pk: i64) -> Result<bool, ApiError> {
    let device = hub
        .store
        .find_device(&scope.org, &scope.project, &scope.device_id)
        .await?;
    Ok(device.is_some_and(|d| d.pk == device_pk))
}

/// The answer for upload `id` if it finished into an artifact of this
/// device that the hub still holds: every byte is in.
async fn finished(hub: &Hub, scope: &DeviceScope, id: &str) -> Result<Option<Response>, ApiError> {
    let Some(done) = hub.store.finished_upload(id).await? else {
        return Ok(None);
    };
    if !is_device(hub, scope, done.device_pk).await? {
        return Ok(None);
    }
    Ok(Some(at_offset(done.length, done.length)))
}

/// `200 OK` telling where an upload of `length` bytes stands.
fn at_offset(offset: u64, length: u64) -> Response {
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert("upload-offset", HeaderValue::from(offset));
    h.insert("upload-length", HeaderValue::from(length));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// How many bytes of upload `up` are here; `None` when its bytes are gone
/// (an older hub removed the part before the row and died in between, or
/// someone removed the file): the row is deleted, since nothing can
/// resume it, and the client creates the upload again.
async fn current_offset(hub: &Hub, up: &UploadRow) -> Result<Option<u64>, ApiError> {
    match hub.blobs.part(&up.id).await {
        Ok(p) => Ok(Some(p.len)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            hub.store.delete_upload(&up.id).await?;
            tracing::warn!(upload = %up.id, path = %up.path, "an upload whose file is gone was deleted; its client starts it again");
            Ok(None)
        }
        Err(e) => Err(ApiError::internal(format!("cannot read upload file: {e}"))),
    }
}

/// [`current_offset`], with an upload whose bytes are gone a 404.
async fn offset_or_gone(hub: &Hub, up: &UploadRow) -> Result<u64, ApiError> {
    current_offset(hub, up).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "upload {} lost its file and was deleted; create it again",
            up.id
        ))
    })
}

async fn head(hub: &Arc<Hub>, up: &UploadRow) -> Result<Response, ApiError> {
    let offset = offset_or_gone(hub, up).await?;
    if offset == up.length {
        // All bytes are here but the upload was never finished (the hub
        // stopped between the last write and the finish): finish it now.
        // If another request holds it (a PATCH finishing it, or a replica
        // that died holding it, until its lease runs out), the offset is
        // no answer yet: a client told "every byte is here" would take the
        // upload as done while its artifact does not exist.
        let Some(busy) = Busy::take(hub, &up.id).await? else {
            return Err(ApiError::new(
                StatusCode::LOCKED,
                "upload_busy",
                "every byte of this upload is here and another request is finishing it; ask again",
            ));
        };
        let finished = finish(hub, up).await;
        busy.release().await;
        finished?;
    }
    let mut resp = at_offset(offset, up.length);
    if let Ok(v) = HeaderValue::from_str(&up.metadata) {
        if !up.metadata.is_empty() {
            resp.headers_mut().insert("upload-metadata", v);
        }
    }
    if offset < up.length {
        return Ok(with_expiry(hub, up, resp).await);
    }
    Ok(resp)
}

/// How long a hold on an upload lasts unless renewed: a replica that dies
/// mid-PATCH blocks its upload for at most this long.
const LEASE: Duration = Duration::from_secs(60);

fn now_ns() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

/// One PATCH's hold on an upload (including the keep and finish that run
/// on after a client went away), or the sweeper's or a HEAD's while it
/// finishes or expires one: a lease in the store, so one writer per
/// upload across every replica of the database. Renewed while a PATCH
/// streams; given back by [`Busy::release`] (or, as a fallback, on drop).
struct Busy {
    hub: Arc<Hub>,
    name: String,
    /// Unique per hold: two PATCHes on one replica are two holders.
    holder: String,
    renewed: std::time::Instant,
    released: bool,
}

impl Busy {
    /// Holds upload `id`, or `None` when someone (on any replica) does.
    /// Checks, once held, that the upload still exists (another replica
    /// may have finished or deleted it meanwhile): 404 when it is gone.
    async fn take(hub: &Arc<Hub>, id: &str) -> Result<Option<Busy>, ApiError> {
        let Some(busy) = Busy::take_named(hub, format!("upload:{id}"), LEASE).await? else {
            return Ok(None);
        };
        if hub.store.get_upload(id).await?.is_none() {
            busy.release().await;
            return Err(ApiError::not_found(format!("no upload {id}")));
        }
        Ok(Some(busy))
    }

    async fn take_named(
        hub: &Arc<Hub>,
        name: String,
        lease: Duration,
    ) -> Result<Option<Busy>, ApiError> {
        let holder = uuid::Uuid::now_v7().simple().to_string();
        let now = now_ns();
        let until = now.saturating_add(lease.as_nanos() as i64);
        let taken = hub.store.take_lease(&name, &holder, now, until).await?;
        Ok(taken.then(|| Busy {
            hub: hub.clone(),
            name,
            holder,
            renewed: std::time::Instant::now(),
            released: false,
        }))
    }

    /// Renews the hold once a third of it has passed; an error if it ran
    /// out meanwhile and another holder took it.
    async fn renew(&mut self) -> Result<(), ApiError> {
        if self.renewed.elapsed() < LEASE / 3 {
            return Ok(());
        }
        let now = now_ns();
        let until = now.saturating_add(LEASE.as_nanos() as i64);
        if !self
            .hub
            .store
            .take_lease(&self.name, &self.holder, now, until)
            .await?
        {
            return Err(ApiError::new(
                StatusCode::LOCKED,
                "upload_busy",
                "this PATCH lost its hold on the upload to another; resume after a HEAD",
            ));
        }
        self.renewed = std::time::Instant::now();
        Ok(())
    }

    /// Gives the hold back before the answer goes out, so the client's
    /// next request finds the upload free.
    async fn release(mut self) {
        self.released = true;
        if let Err(e) = self.hub.store.release_lease(&self.name, &self.holder).await {
            tracing::warn!(lease = %self.name, error = %e, "cannot release a lease; it runs out by itself");
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // A request that ended early: released in a task (Drop cannot
        // wait); the lease runs out by itself if even that fails.
        let (hub, name, holder) = (
            self.hub.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
        );
        self.hub.tasks.spawn(async move {
            if let Err(e) = hub.store.release_lease(&name, &holder).await {
                tracing::warn!(lease = %name, error = %e, "cannot release a lease; it runs out by itself");
            }
        });
    }
}

async fn patch(
    hub: &Arc<Hub>,
    up: &UploadRow,
    h: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_version(h)?;
    if header_str(h, "content-type") != Some(OFFSET_OCTET_STREAM) {
        return Err(err(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("PATCH needs Content-Type: {OFFSET_OCTET_STREAM}"),
        ));
    }
    let claimed: u64 = header_str(h, "upload-offset")
        .ok_or_else(|| ApiError::bad_request("Upload-Offset header is required"))?
        .parse()
        .map_err(|_| ApiError::bad_request("Upload-Offset must be a non-negative integer"))?;
    let checksum = match header_str(h, "upload-checksum") {
        None => None,
        Some(v) => {
            let (algo, sum) = v.split_once(' ').unwrap_or((v, ""));
            if algo != "sha256" {
                return Err(ApiError::bad_request(format!(
                    "checksum algorithm {algo:?} is not supported (use sha256)"
                )));
            }
            Some(
                b64()
                    .decode(sum.trim())
                    .map_err(|_| ApiError::bad_request("Upload-Checksum value is not base64"))?,
            )
        }
    };
    let Some(busy) = Busy::take(hub, &up.id).await? else {
        return Err(ApiError::new(
            StatusCode::LOCKED,
            "upload_busy",
            "another PATCH to this upload is in progress",
        ));
    };
    let mut held = Some(busy);
    let answer = append(hub, up, &mut held, claimed, checksum, body).await;
    // Given back before the answer, unless the keep's task took it.
    if let Some(busy) = held.take() {
        busy.release().await;
    }
    answer
}

/// The PATCH's bytes at the upload's offset, while `held` holds it; the
/// task that keeps them takes the hold and releases it when done.
async fn append(
    hub: &Arc<Hub>,
    up: &UploadRow,
    held: &mut Option<Busy>,
    claimed: u64,
    checksum: Option<Vec<u8>>,
    body: Body,
) -> Result<Response, ApiError> {
    let offset = offset_or_gone(hub, up).await?;
    if claimed != offset {
        // A PATCH below the upload's offset re-sends acknowledged bytes:
        // counted apart, since a well-behaved client never does it.
        hub.metrics.reject(if claimed < offset {
            "upload_stale_offset"
        } else {
            "upload_offset_ahead"
        });
        return Err(ApiError::conflict(format!(
            "Upload-Offset {claimed} does not match the upload's offset {offset}"
        )));
    }
    // A chunk with a checksum is stored whole or not at all: the append
    // is dropped unkept (and cut back) on any failure, or when the client
    // goes away and this future with it.
    let mut part = hub
        .blobs
        .append_part(&up.id, offset, checksum.is_some())
        .await
        .map_err(|e| ApiError::internal(format!("cannot open upload file: {e}")))?;
    let mut hasher = Sha256::new();
    let mut written = offset;
    let mut stream = body.into_data_stream();
    let mut interrupted = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                interrupted = Some(e.to_string());
                break;
            }
        };
        if written + chunk.len() as u64 > up.length {
            hub.metrics.reject("upload_overflow");
            return Err(ApiError::too_large(format!(
                "PATCH goes past the upload's length of {} bytes",
                up.length
            )));
        }
        if let Some(busy) = held.as_mut() {
            busy.renew().await?;
        }
        part.write(&chunk)
            .await
            .map_err(|e| ApiError::internal(format!("cannot write upload file: {e}")))?;
        if checksum.is_some() {
            hasher.update(&chunk);
        }
        written += chunk.len() as u64;
        Metrics::add(&hub.metrics.upload_bytes, chunk.len() as u64);
        Metrics::add(&hub.metrics.bytes_in, chunk.len() as u64);
    }
    if let Some(why) = interrupted {
        // Without a checksum the bytes that arrived stay: HEAD reports them
        // and the client resumes there (kept explicitly: in S3 an append
        // not kept leaves nothing). With one, the rollback drops them.
        tracing::info!(upload = %up.id, offset = written, error = %why, "PATCH interrupted");
        if checksum.is_none() && written > offset {
            let busy = held.take();
            let kept = hub.tasks.spawn(async move {
                let kept = part.keep().await;
                if let Some(busy) = busy {
                    busy.release().await;
                }
                kept
            });
            match kept.await {
                Ok(Ok(())) => Metrics::add(&hub.metrics.upload_acked_bytes, written - offset),
                Ok(Err(e)) => {
                    tracing::warn!(upload = %up.id, error = %e, "cannot keep a cut-off PATCH's bytes")
                }
                Err(e) => {
                    tracing::warn!(upload = %up.id, error = %e, "keeping a cut-off PATCH's bytes failed")
                }
            }
        }
        return Err(ApiError::bad_request(format!(
            "upload body interrupted: {why}"
        )));
    }
    if let Some(want) = checksum {
        if hasher.finalize().as_slice() != want.as_slice() {
            hub.metrics.reject("chunk_checksum");
            return Err(ApiError::new(
                StatusCode::from_u16(460).expect("valid status"),
                "checksum_mismatch",
                "the chunk's sha256 does not match Upload-Checksum; it was discarded",
            ));
        }
    }
    // Kept from here on, even if the client goes away during the sync
    // below (HEAD reports these bytes, so they are never needed again).
    Metrics::add(&hub.metrics.upload_acked_bytes, written - offset);
    // The offset HEAD reports must survive a crash: the append is kept
    // (made durable) before answering. The keep and the finish run in
    // their own task: a client that goes away now (its request future
    // dropped) must neither lose the chunk nor leave a complete upload
    // unfinished. On `hub.tasks`, so shutdown waits for it too.
    let (h, u) = (hub.clone(), up.clone());
    let busy = held.take();
    let tail = hub.tasks.spawn(async move {
        let done = async {
            part.keep()
                .await
                .map_err(|e| ApiError::internal(format!("cannot sync upload file: {e}")))?;
            if written == u.length {
                finish(&h, &u).await?;
            }
            Ok::<(), ApiError>(())
        }
        .await;
        if let Some(busy) = busy {
            busy.release().await;
        }
        done
    });
    tail.await
        .map_err(|e| ApiError::internal(format!("finishing the upload failed: {e}")))??;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert("upload-offset", HeaderValue::from(written));
    if written < up.length {
        return Ok(with_expiry(hub, up, resp).await);
    }
    Ok(resp)
}

/// Verifies a complete upload's SHA-256 and makes it the artifact.
async fn finish(hub: &Arc<Hub>, up: &UploadRow) -> Result<(), ApiError> {
    let actual = hub
        .blobs
        .part_sha256(&up.id)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read upload file: {e}")))?;
    if !up.sha256.is_empty() && actual != up.sha256 {
        hub.store.delete_upload(&up.id).await?;
        if let Err(e) = hub.blobs.remove_part(&up.id).await {
            tracing::warn!(upload = %up.id, error = %e, "cannot remove upload file");
        }
        hub.metrics.reject("file_checksum");
        tracing::warn!(upload = %up.id, path = %up.path, "upload discarded: sha256 mismatch");
        return Err(ApiError::new(
            StatusCode::from_u16(460).expect("valid status"),
            "checksum_mismatch",
            format!(
                "the uploaded file's sha256 is {actual} but Upload-Metadata said {}; the upload was discarded",
                up.sha256
            ),
        ));
    }
    let blob = hub
        .blobs
        .finish_upload(&up.id)
        .await
        .map_err(|e| ApiError::internal(format!("cannot store artifact: {e}")))?;
    let mut done = up.clone();
    done.sha256 = actual;
    // The part goes only once the store holds the artifact: a replica
    // that dies between leaves an upload that finishes again.
    let old = hub.store.complete_upload(&done, &blob).await?;
    if let Err(e) = hub.blobs.remove_part(&up.id).await {
        tracing::warn!(upload = %up.id, error = %e, "cannot remove a finished upload's file");
    }
    if let Some(old) = old {
        if let Err(e) = hub.blobs.remove(&old).await {
            tracing::warn!(blob = %old, error = %e, "cannot remove replaced artifact");
        }
    }
    Metrics::add(&hub.metrics.uploads_completed, 1);
    tracing::info!(upload = %up.id, path = %up.path, bytes = up.length, "artifact stored");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_headers_mutated_never_panic() {
        let samples: &[&[u8]] = &[
            b"filename cmVjb3JkLmJhZw==,session MDE5MzAwMDAtMDAwMC03MDAwLTgwMDAtMDAwMDAwMDAwMDAw,path bG9ncy9hLnR4dA==",
            b"flag,empty ,x eA==",
            b"path Li4vLi4vZXRjL3Bhc3N3ZA==",
        ];
        let mut rng = crate::test_rng::Rng::new(0x7a5);
        for _ in 0..20_000 {
            let s = samples[rng.below(samples.len())];
            fuzz_one(&crate::test_rng::mutate(&mut rng, s));
        }
    }
    use crate::hub::config::HubConfig;
    use crate::wire::{Batch, Device, SessionState, SessionStatus, BATCH_VERSION};

    /// A hub on `dir` whose uploads expire after a minute, with robot-1's
    /// session 1: its (device, session) keys.
    async fn hub_with_session(dir: &std::path::Path) -> (Arc<Hub>, i64, i64) {
        let config = HubConfig {
            data_dir: dir.to_owned(),
            upload_expire_after: Duration::from_secs(60),
            ..HubConfig::default()
        };
        let store = crate::hub::open_store(dir).unwrap();
        let scope = DeviceScope {
            org: "acme".into(),
            project: "warehouse".into(),
            device_id: "robot-1".into(),
        };
        let session = uuid::Uuid::from_u128(1);
        let state = SessionState {
            id: session,
            revision: 1,
            status: SessionStatus::Active,
            started_at_ns: 1,
            ended_at_ns: None,
            duration_ns: None,
            tags: vec![],
            package: None,
            metadata: Default::default(),
            error: None,
        };
        let batch = Batch {
            marks: Vec::new(),
            agent: None,
            version: BATCH_VERSION,
            device: Device {
                id: "robot-1".into(),
                name: "r1".into(),
            },
            sent_at_ns: 0,
            sessions: vec![state],
            records: vec![],
            gaps: vec![],
        };
        store.ingest(&scope, Arc::new(batch), false).await.unwrap();
        let device = store
            .find_device("acme", "warehouse", "robot-1")
            .await
            .unwrap()
            .unwrap();
        let session = store
            .find_session("acme", "warehouse", &session.to_string())
            .await
            .unwrap()
            .unwrap();
        let blobs = Arc::new(crate::hub::blobs::DirBlobs::open(dir).unwrap());
        (
            crate::hub::Hub::new(config, store, blobs),
            device.pk,
            session,
        )
    }

    /// The file of an upload's part (the hub's blobs are a directory).
    fn part_path(hub: &Hub, id: &str) -> std::path::PathBuf {
        crate::hub::blobs::DirBlobs::open(&hub.config.data_dir)
            .unwrap()
            .part_path(id)
            .unwrap()
    }

    /// An upload of `content` (a 100-byte file) holding `held` bytes,
    /// created and last written `idle` ago.
    async fn upload(
        hub: &Arc<Hub>,
        keys: (i64, i64),
        name: &str,
        held: usize,
        idle: Duration,
    ) -> UploadRow {
        let content = vec![7u8; 100];
        let then = SystemTime::now() - idle;
        let up = UploadRow {
            id: hex::encode(&Sha256::digest(name.as_bytes())[..16]),
            device_pk: keys.0,
            session_pk: keys.1,
            path: format!("{name}.bin"),
            content_type: "application/octet-stream".into(),
            sha256: hex::encode(Sha256::digest(&content)),
            length: content.len() as u64,
            metadata: String::new(),
            created_at_ns: then
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as i64,
        };
        hub.store.create_upload(&up).await.unwrap();
        let part = part_path(hub, &up.id);
        std::fs::write(&part, &content[..held]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&part)
            .unwrap()
            .set_modified(then)
            .unwrap();
        up
    }

    #[tokio::test]
    async fn only_an_idle_unfinished_upload_nobody_is_writing_to_expires() {
        let dir = tempfile::tempdir().unwrap();
        let (hub, device, session) = hub_with_session(dir.path()).await;
        let keys = (device, session);
        let hour = Duration::from_secs(3600);
        let gone = async |up: &UploadRow| {
            hub.store.get_upload(&up.id).await.unwrap().is_none()
                && !part_path(&hub, &up.id).exists()
        };

        // Idle an hour, half sent: expired, row and file.
        let idle = upload(&hub, keys, "idle", 50, hour).await;
        assert!(expire_if_due(&hub, &idle).await.unwrap());
        assert!(gone(&idle).await);
        assert_eq!(
            hub.metrics
                .uploads_expired
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );

        // Created an hour ago but written a moment ago: not yet.
        let written = upload(&hub, keys, "written", 50, hour).await;
        let part = part_path(&hub, &written.id);
        std::fs::File::options()
            .write(true)
            .open(&part)
            .unwrap()
            .set_modified(SystemTime::now())
            .unwrap();
        assert!(!expire_if_due(&hub, &written).await.unwrap());
        assert!(!gone(&written).await);
        let expires = expires_at(&hub, &written).await;
        assert!(expires > SystemTime::now() + Duration::from_secs(50));

        // Idle, but a PATCH holds it: left alone until the PATCH ends.
        let busy_one = upload(&hub, keys, "busy", 50, hour).await;
        let busy = Busy::take(&hub, &busy_one.id).await.unwrap().unwrap();
        assert!(Busy::take(&hub, &busy_one.id).await.unwrap().is_none());
        assert!(!expire_if_due(&hub, &busy_one).await.unwrap());
        assert!(!gone(&busy_one).await);
        busy.release().await;
        assert!(expire_if_due(&hub, &busy_one).await.unwrap());

        // Every byte arrived but it was never finished: not expired (a
        // HEAD would finish it)...
        let done = upload(&hub, keys, "complete", 100, hour).await;
        assert!(!expire_if_due(&hub, &done).await.unwrap());
        assert!(hub.store.get_upload(&done.id).await.unwrap().is_some());

        // ...and the sweeper finishes it, and deletes the idle ones it
        // finds by itself (reading one candidate at a time, so its cursor
        // must move past those it keeps); the live one stays.
        let a = upload(&hub, keys, "sweep-a", 10, hour).await;
        let b = upload(&hub, keys, "sweep-b", 0, hour).await;
        assert_eq!(sweep(&hub, 1).await, 2);
        assert!(gone(&a).await && gone(&b).await && !gone(&written).await);
        assert!(hub.store.get_upload(&done.id).await.unwrap().is_none());
        let artifact = hub
            .store
            .get_artifact(session, "complete.bin")
            .await
            .unwrap();
        assert_eq!(artifact.map(|a| a.size), Some(100));
    }

    #[test]
    fn upload_expires_is_an_http_date() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777);
        assert_eq!(http_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
    }

    #[test]
    fn metadata() {
        let check = |v: &str, want: Result<Vec<(&str, &str)>, &str>| {
            let got = parse_metadata(v).map(|m| {
                let mut v: Vec<(String, String)> = m.into_iter().collect();
                v.sort();
                v
            });
            let want = want.map(|v| {
                v.into_iter()
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, want.map_err(str::to_owned), "{v}");
        };
        check("", Ok(vec![]));
        check(
            "path bG9ncy9hLmxvZw==,session_id eA==",
            Ok(vec![("path", "logs/a.log"), ("session_id", "x")]),
        );
        check("flag", Ok(vec![("flag", "")]));
        check(
            "path !!!",
            Err("Upload-Metadata: value of \"path\" is not base64"),
        );
    }
}
