//! Every store call the console makes, in one place: the same `Store`
//! methods (and filter types) the API's routes use, never SQL of its own.
//!
//! Invariant: the console reads and changes hub data only through this
//! module, and this module only through [`Store`](super::super::store::Store)
//! methods and `hub::api` helpers the API routes share.

use std::sync::Arc;

use super::super::api;
use super::super::auth;
use super::super::error::ApiError;
use super::super::store::{
    ArtifactRow, DeviceRow, Histogram, LogPage, LogQuery, LogScope, Principal, SessionPage,
    SessionQuery, SessionRow, SignInRow, UploadRow,
};
use super::super::Hub;

/// The principal of a key, as the API's bearer check finds it, and the
/// key's hash (what a sign-in refers to).
pub async fn principal(hub: &Arc<Hub>, key: &str) -> Result<(Option<Principal>, String), ApiError> {
    let hash = auth::hash_token(key.trim());
    Ok((hub.store.find_token(&hash).await?, hash))
}

/// Stores a sign-in, keeping at most `max` live ones.
pub async fn create_signin(hub: &Arc<Hub>, row: &SignInRow, max: u32) -> Result<(), ApiError> {
    Ok(hub.store.create_signin(row, max).await?)
}

/// The live sign-in with this id hash: its token's principal and its CSRF
/// token.
pub async fn find_signin(
    hub: &Arc<Hub>,
    hash: &str,
    now_ns: i64,
) -> Result<Option<(Principal, String)>, ApiError> {
    Ok(hub.store.find_signin(hash, now_ns).await?)
}

pub async fn delete_signin(hub: &Arc<Hub>, hash: &str) -> Result<(), ApiError> {
    Ok(hub.store.delete_signin(hash).await?)
}

/// One page of the session list (the API's `GET …/sessions`).
pub async fn sessions(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    q: SessionQuery,
) -> Result<SessionPage, ApiError> {
    Ok(hub.store.list_sessions(org, project, &q).await?)
}

/// A session with its metrics, or `None` (the API's `GET …/sessions/{id}`).
pub async fn session(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
) -> Result<Option<SessionRow>, ApiError> {
    Ok(hub.store.get_session(org, project, id).await?)
}

/// The devices of a project (the API's `GET …/devices`).
pub async fn devices(hub: &Arc<Hub>, org: &str, project: &str) -> Result<Vec<DeviceRow>, ApiError> {
    Ok(hub.store.list_devices(org, project).await?)
}

/// The projects of `org` that `key` reads (the projects route's query).
pub async fn projects(hub: &Arc<Hub>, key: &Principal, org: &str) -> Result<Vec<String>, ApiError> {
    let mut all = hub.store.list_projects(org).await?;
    all.retain(|p| key.reads(org, p));
    Ok(all)
}

/// One device of a project, or `None`.
pub async fn device(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    device_id: &str,
) -> Result<Option<DeviceRow>, ApiError> {
    Ok(hub.store.find_device(org, project, device_id).await?)
}

/// Adds a tag; false when the session does not exist.
pub async fn add_tag(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
    tag: String,
) -> Result<bool, ApiError> {
    Ok(hub.store.add_tag(org, project, id, &tag).await?)
}

/// Removes a tag: `None` without the session, `Some(false)` without the tag.
pub async fn remove_tag(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
    tag: String,
) -> Result<Option<bool>, ApiError> {
    Ok(hub.store.remove_tag(org, project, id, &tag).await?)
}

/// One page of a session's logs (the API's `GET …/sessions/{id}/logs`);
/// 404 when the project has no such session.
pub async fn logs(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
    q: LogQuery,
) -> Result<LogPage, ApiError> {
    let pk = api::session_pk(hub, org, project, id).await?;
    Ok(hub.store.logs(LogScope::Session(pk), &q).await?)
}

/// The complete artifacts of a session (the API's `GET …/files`).
pub async fn artifacts(hub: &Arc<Hub>, session_pk: i64) -> Result<Vec<ArtifactRow>, ApiError> {
    Ok(hub.store.list_artifacts(session_pk).await?)
}

/// Most uploads in progress the session screen shows (and asks the blob
/// store about) per render.
pub const MAX_UPLOADS_SHOWN: u32 = 100;

/// A session's uploads in progress (the store's tus rows) with the bytes
/// the blob store holds of each (its part's length: the tus offset), or
/// `None` for one it could not read. An upload whose bytes all arrived is
/// still listed until the hub has finished it (checked and moved it into
/// an artifact), so the console keeps polling until the artifact shows.
pub async fn uploads(
    hub: &Arc<Hub>,
    session_pk: i64,
) -> Result<Vec<(UploadRow, Option<u64>)>, ApiError> {
    let rows = hub
        .store
        .session_uploads(session_pk, MAX_UPLOADS_SHOWN)
        .await?;
    let offsets = futures_util::future::join_all(
        rows.iter()
            .map(|u| async move { hub.blobs.part(&u.id).await.ok().map(|p| p.len) }),
    )
    .await;
    Ok(rows.into_iter().zip(offsets).collect())
}

/// Records per level in the slices of a session's time (the store's
/// grouped count: one pass over the session's rows).
pub async fn level_histogram(
    hub: &Arc<Hub>,
    session_pk: i64,
    slices: Histogram,
) -> Result<Vec<[u64; 6]>, ApiError> {
    Ok(hub.store.level_histogram(session_pk, slices).await?)
}
