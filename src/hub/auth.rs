//! Tokens: made at random (256 bits), shown once, stored as their SHA-256;
//! and the checks every route makes (operator of this org, or device).
//!
//! Invariant: a token's text is never stored or logged; an operator of
//! another organization gets the same 404 as for a missing resource, so
//! org names cannot be probed.

use std::sync::Arc;

use axum::http::HeaderMap;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::error::ApiError;
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

/// An operator key of `org`. Device tokens are refused (403); another
/// organization's key sees nothing (404).
pub async fn operator(
    hub: &Arc<Hub>,
    headers: &HeaderMap,
    query_token: Option<&str>,
    org: &str,
) -> Result<Principal, ApiError> {
    let p = authenticate(hub, headers, query_token).await?;
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
    Ok(p)
}

/// A device token; operator keys are refused (403).
pub async fn device(hub: &Arc<Hub>, headers: &HeaderMap) -> Result<DeviceScope, ApiError> {
    let p = authenticate(hub, headers, None).await?;
    match (p.kind, p.device_id) {
        (TokenKind::Device, Some(device_id)) => Ok(DeviceScope {
            org: p.org,
            project: p.project,
            device_id,
        }),
        _ => {
            hub.metrics.reject("forbidden");
            Err(ApiError::forbidden(
                "ingest needs a device token (logbook-hub token create --device ID)",
            ))
        }
    }
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
