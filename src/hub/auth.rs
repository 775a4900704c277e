//! Tokens: made at random (256 bits), shown once, stored as their SHA-256;
//! and the checks every route makes (operator of this org and project, or
//! device). A
//! device's requests also pass its [`DeviceGate`] (`[devices]` limits:
//! rate and requests in progress, 429 with `Retry-After` past them) and,
//! over mTLS, must come with a client certificate naming the device.
//!
//! Invariant: a token's text is never stored or logged; an operator of
//! another organization, or with a key scoped to another project, gets the
//! same 404 as for a missing resource, so names cannot be probed. Every request looks its token up in the
//! store (no cache), so a revoked token is refused from the next request
//! on, by every replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::config::DeviceLimits;
use super::error::ApiError;
use super::listen::PeerCert;
use super::store::{DeviceScope, Principal, TokenKind};
use super::Hub;

/// A new random token; the prefix says what kind it is.
pub fn new_token(kind: TokenKind) -> String {
    let bytes: [u8; 32] = rand::random();
    let prefix = match kind {
        TokenKind::Operator => "lbk_op_",
        TokenKind::Device => "lbk_dev_",
    };
    format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The bearer token of a request (`Authorization: Bearer …`), or the
/// `access_token` query value for WebSocket clients that cannot set headers.
fn bearer<'a>(headers: &'a HeaderMap, query_token: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .or(query_token)
}

pub async fn authenticate(
    hub: &Arc<Hub>,
    headers: &HeaderMap,
    query_token: Option<&str>,
) -> Result<Principal, ApiError> {
    let Some(token) = bearer(headers, query_token) else {
        hub.metrics.reject("unauthorized");
        return Err(ApiError::unauthorized(
            "missing token: send Authorization: Bearer <token>",
        ));
    };
    let hash = hash_token(token);
    match hub.store.find_token(&hash).await? {
        Some(p) => Ok(p),
        None => {
            hub.metrics.reject("unauthorized");
            Err(ApiError::unauthorized("unknown token"))
        }
    }
}

/// An operator key that reads `org`/`project`: one of the organization's
/// (organization-wide), or one scoped to that project. Device tokens are
/// refused (403); another organization's key, or a key scoped to another
/// project, sees nothing (404, as for a project that does not exist).
pub async fn operator(
    hub: &Arc<Hub>,
    headers: &HeaderMap,
    query_token: Option<&str>,
    org: &str,
    project: &str,
) -> Result<Principal, ApiError> {
    let p = authenticate(hub, headers, query_token).await?;
    check_operator(hub, p, org, Some(project))
}

/// An operator key of `org`, whatever its project scope (routes that list
/// the organization's projects narrow the list to the key's scope).
pub async fn operator_of_org(
    hub: &Arc<Hub>,
    headers: &HeaderMap,
    org: &str,
) -> Result<Principal, ApiError> {
    let p = authenticate(hub, headers, None).await?;
    check_operator(hub, p, org, None)
}

/// `p` may read `org` (and `project`, when given); else the refusal the
/// API and the console both give.
pub fn check_operator(
    hub: &Hub,
    p: Principal,
    org: &str,
    project: Option<&str>,
) -> Result<Principal, ApiError> {
    if p.kind != TokenKind::Operator {
        hub.metrics.reject("forbidden");
        return Err(ApiError::forbidden(
            "device tokens can only ingest; use an operator key",
        ));
    }
    if p.org != org {
        hub.metrics.reject("other_org");
        return Err(ApiError::not_found(format!(
            "no organization {org:?} for this key"
        )));
    }
    if let Some(project) = project {
        if !p.reads(org, project) {
            hub.metrics.reject("other_project");
            return Err(ApiError::not_found(format!(
                "no project {project:?} for this key (it reads project {:?} only)",
                p.project
            )));
        }
    }
    Ok(p)
}

/// A device token; operator keys are refused (403), as is a client
/// certificate (mTLS) that does not name the token's device. The device's
/// [`DeviceGate`] then lets the request in or answers 429; the returned
/// [`DeviceSlot`] counts it as in progress until dropped.
pub async fn device(
    hub: &Arc<Hub>,
    headers: &HeaderMap,
    peer: Option<&PeerCert>,
) -> Result<(DeviceScope, DeviceSlot), ApiError> {
    let p = authenticate(hub, headers, None).await?;
    let scope = match (p.kind, p.device_id) {
        (TokenKind::Device, Some(device_id)) => DeviceScope {
            org: p.org,
            project: p.project,
            device_id,
        },
        _ => {
            hub.metrics.reject("forbidden");
            return Err(ApiError::forbidden(
                "ingest needs a device token (logbook-hub token create --device ID)",
            ));
        }
    };
    if let Some(peer) = peer {
        if let Err(message) = peer.check_device(&scope.device_id) {
            hub.metrics.reject("certificate_mismatch");
            tracing::warn!(device = %scope.device_id, "{message}");
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "certificate_mismatch",
                message,
            ));
        }
    }
    let slot = hub.devices.enter(&scope).inspect_err(|e| {
        hub.metrics.reject(e.code);
    })?;
    Ok((scope, slot))
}

/// Per-device bounds on ingest (`[devices]`): a token bucket (rate and
/// burst) and a count of requests in progress. In this process's memory:
/// with several replicas behind a balancer each enforces them for what it
/// serves.
///
/// Invariant: one entry per device that made a request (devices are only
/// those with a token); entries idle long enough to be full again are
/// dropped when the map grows, so it stays bounded by the active devices.
pub struct DeviceGate {
    limits: DeviceLimits,
    devices: Mutex<HashMap<(String, String, String), DeviceState>>,
}

struct DeviceState {
    /// Requests the bucket holds now (at most `burst`).
    tokens: f64,
    refilled: Instant,
    in_progress: Arc<()>,
}

/// One device request in progress; dropping it ends it.
pub struct DeviceSlot(#[allow(dead_code)] Arc<()>);

/// Entries kept before idle ones are dropped.
const GATE_PRUNE_ABOVE: usize = 4096;

impl DeviceGate {
    pub fn new(limits: DeviceLimits) -> DeviceGate {
        DeviceGate {
            limits,
            devices: Mutex::new(HashMap::new()),
        }
    }

    /// Lets a request of `scope` in, or says when to come back (429).
    pub fn enter(&self, scope: &DeviceScope) -> Result<DeviceSlot, ApiError> {
        self.enter_at(scope, Instant::now())
    }

    fn enter_at(&self, scope: &DeviceScope, now: Instant) -> Result<DeviceSlot, ApiError> {
        let burst = f64::from(self.limits.burst);
        let mut devices = self.devices.lock().unwrap_or_else(|p| p.into_inner());
        if devices.len() >= GATE_PRUNE_ABOVE {
            let rate = self
                .limits
                .requests_per_sec
                .map_or(f64::INFINITY, f64::from);
            devices.retain(|_, d| {
                Arc::strong_count(&d.in_progress) > 1
                    || d.tokens + now.duration_since(d.refilled).as_secs_f64() * rate < burst
            });
        }
        let key = (
            scope.org.clone(),
            scope.project.clone(),
            scope.device_id.clone(),
        );
        let d = devices.entry(key).or_insert_with(|| DeviceState {
            tokens: burst,
            refilled: now,
            in_progress: Arc::new(()),
        });
        // Held by the entry itself, plus one per request in progress.
        if Arc::strong_count(&d.in_progress) > self.limits.max_concurrent {
            return Err(too_many(
                format!(
                    "device {} has {} requests in progress (devices.max_concurrent); try again later",
                    scope.device_id, self.limits.max_concurrent
                ),
                1,
            ));
        }
        if let Some(rate) = self.limits.requests_per_sec {
            let rate = f64::from(rate);
            let elapsed = now.duration_since(d.refilled).as_secs_f64();
            d.tokens = (d.tokens + elapsed * rate).min(burst);
            d.refilled = now;
            if d.tokens < 1.0 {
                let wait = Duration::from_secs_f64((1.0 - d.tokens) / rate);
                // Whole seconds (Retry-After's unit), never 0.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return Err(too_many(
                    format!(
                        "device {} is over {rate} requests per second (devices.requests_per_sec); try again in {secs} s",
                        scope.device_id
                    ),
                    secs.max(1),
                ));
            }
            d.tokens -= 1.0;
        }
        Ok(DeviceSlot(d.in_progress.clone()))
    }
}

fn too_many(message: String, retry_after: u64) -> ApiError {
    let mut e = ApiError::new(
        axum::http::StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
        message,
    );
    e.retry_after = Some(retry_after);
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_prefixed() {
        let a = new_token(TokenKind::Operator);
        let b = new_token(TokenKind::Operator);
        assert_ne!(a, b);
        assert!(a.starts_with("lbk_op_"));
        assert!(new_token(TokenKind::Device).starts_with("lbk_dev_"));
        // 32 random bytes = 43 base64 characters: 256 bits.
        assert_eq!(a.len(), "lbk_op_".len() + 43);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), hash_token(&b));
    }

    fn gate(rate: Option<u32>, burst: u32, concurrent: usize) -> DeviceGate {
        DeviceGate::new(DeviceLimits {
            requests_per_sec: rate,
            burst,
            max_concurrent: concurrent,
        })
    }

    fn scope(device: &str) -> DeviceScope {
        DeviceScope {
            org: "o".into(),
            project: "p".into(),
            device_id: device.into(),
        }
    }

    #[test]
    fn the_gate_bounds_each_device_rate_and_requests_in_progress() {
        let g = gate(Some(2), 3, 100);
        let t0 = Instant::now();
        let a = scope("a");
        for _ in 0..3 {
            g.enter_at(&a, t0).unwrap();
        }
        let e = g.enter_at(&a, t0).err().unwrap();
        assert_eq!(e.status, 429);
        assert_eq!(e.retry_after, Some(1));
        // Another device has its own bucket.
        g.enter_at(&scope("b"), t0).unwrap();
        // Half a second later, one request's worth came back.
        g.enter_at(&a, t0 + Duration::from_millis(500)).unwrap();
        assert!(g.enter_at(&a, t0 + Duration::from_millis(500)).is_err());

        let g = gate(None, 1, 2);
        let one = g.enter_at(&a, t0).unwrap();
        let two = g.enter_at(&a, t0).unwrap();
        let e = g.enter_at(&a, t0).err().unwrap();
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(1)));
        drop(one);
        let _three = g.enter_at(&a, t0).unwrap();
        drop(two);
    }

    #[test]
    fn bearer_header_or_query() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h, None), None);
        assert_eq!(bearer(&h, Some("q")), Some("q"));
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h, Some("q")), Some("abc"));
        h.insert("authorization", "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h, None), None);
    }
}
