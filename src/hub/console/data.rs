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
    ArtifactRow, DeviceRow, LogPage, LogQuery, LogScope, Principal, SessionPage, SessionQuery,
    SessionRow,
};
use super::super::Hub;

/// The principal of a key, as the API's bearer check finds it.
pub async fn principal(hub: &Arc<Hub>, key: &str) -> Result<Option<Principal>, ApiError> {
    let hash = auth::hash_token(key.trim());
    Ok(hub.store.find_token(&hash).await?)
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

/// Records per level in `buckets` equal slices of `[from_ns, to_ns)` of a
/// session, for the timeline. There is no grouped count in the store
/// yet, so each slice is counted with the logs route's own query (at or
/// above a level, in the slice's time range) and levels are told apart by
/// difference; only the levels the session has (`level_counts`) are
/// counted, and an empty slice costs one count. Each count reads the
/// session's index, so the caller bounds the session's size; a `GROUP BY`
/// query in the store would do it in one pass.
pub async fn level_histogram(
    hub: &Arc<Hub>,
    session_pk: i64,
    level_counts: [u64; 6],
    from_ns: i64,
    to_ns: i64,
    buckets: usize,
) -> Result<Vec<[u64; 6]>, ApiError> {
    use crate::wire::Level;
    let present: Vec<Level> = Level::ALL
        .into_iter()
        .filter(|l| level_counts[l.code() as usize] > 0)
        .collect();
    let step = ((to_ns - from_ns) / buckets as i64).max(1);
    let store = hub.store.as_ref();
    let count = |min: Level, since: i64, until: i64| async move {
        let q = LogQuery {
            min_level: Some(min),
            since_ns: Some(since),
            until_ns: Some(until),
            limit: 1,
            want_total: true,
            ..LogQuery::default()
        };
        Ok::<_, ApiError>(
            store
                .logs(LogScope::Session(session_pk), &q)
                .await?
                .total
                .unwrap_or(0),
        )
    };
    let mut out = Vec::with_capacity(buckets);
    for b in 0..buckets as i64 {
        let since = from_ns + b * step;
        let until = if b + 1 == buckets as i64 {
            to_ns
        } else {
            since + step
        };
        let mut counts = [0u64; 6];
        // At or above each present level, lowest first; a level's own
        // count is the difference to the next one up.
        let mut at_or_above = Vec::with_capacity(present.len());
        for (i, l) in present.iter().enumerate() {
            let n = if i > 0 && at_or_above[i - 1] == 0 {
                0
            } else {
                count(*l, since, until).await?
            };
            at_or_above.push(n);
        }
        for (i, l) in present.iter().enumerate() {
            let above = at_or_above.get(i + 1).copied().unwrap_or(0);
            counts[l.code() as usize] = at_or_above[i].saturating_sub(above);
        }
        out.push(counts);
    }
    Ok(out)
}
