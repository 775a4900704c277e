//! Console sign-ins: a cookie's random id stands for the operator key it
//! signed in with and that sign-in's CSRF token, kept in the hub's store
//! (so every replica knows every sign-in, and a hub restart signs nobody
//! out); and the request extractor [`Operator`] every signed-in route
//! takes.
//!
//! Invariant: the store holds the cookie id only as SHA-256 and the key
//! only as the hash its token row has, never either itself; deleting the
//! key's token ends its sign-ins at the next request; sign-ins expire
//! after [`cookies::MAX_AGE_SECS`]; a route with an `{org}` in its path
//! refuses (404) an operator of another organization before its handler
//! runs.

use std::sync::Arc;

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::Method;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::super::error::ApiError;
use super::super::store::{Principal, SignInRow, TokenKind};
use super::super::Hub;
use super::errors::ConsoleError;
use super::{cookies, csrf, data, Console};

/// Most live sign-ins kept; past it, those closest to expiry go.
const MAX_SIGNINS: u32 = 10_000;

fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

fn now_ns() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

/// Signs in with the key whose token hash is `token_hash`; returns the
/// cookie's id.
pub async fn create(hub: &Arc<Hub>, token_hash: String) -> Result<String, ApiError> {
    let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
    let row = SignInRow {
        hash: id_hash(&id),
        token_hash,
        csrf: csrf::token(),
        expires_at_ns: now_ns() + cookies::MAX_AGE_SECS as i64 * 1_000_000_000,
    };
    data::create_signin(hub, &row, MAX_SIGNINS).await?;
    Ok(id)
}

/// The live sign-in of cookie id `id`.
pub async fn get(hub: &Arc<Hub>, id: &str) -> Result<Option<Operator>, ApiError> {
    Ok(data::find_signin(hub, &id_hash(id), now_ns())
        .await?
        .filter(|(principal, _)| principal.kind == TokenKind::Operator)
        .map(|(principal, csrf)| Operator {
            principal,
            csrf,
            id: id.to_owned(),
        }))
}

/// Signs out (nothing when `id` is unknown).
pub async fn remove(hub: &Arc<Hub>, id: &str) -> Result<(), ApiError> {
    data::delete_signin(hub, &id_hash(id)).await
}

/// A signed-in operator, extracted from the request's cookie.
#[derive(Debug, Clone)]
pub struct Operator {
    pub principal: Principal,
    /// The token every form of this sign-in carries.
    pub csrf: String,
    /// The cookie's id (for sign-out).
    pub id: String,
}

impl FromRequestParts<Arc<Console>> for Operator {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        console: &Arc<Console>,
    ) -> Result<Operator, ConsoleError> {
        let op = match cookies::session_id(&parts.headers) {
            Some(id) => get(&console.hub, id).await?,
            None => None,
        };
        let Some(op) = op else {
            return Err(
                if parts.method == Method::GET || parts.method == Method::HEAD {
                    ConsoleError::SignIn
                } else {
                    ConsoleError::forbidden("sign in first")
                },
            );
        };
        let params = RawPathParams::from_request_parts(parts, console)
            .await
            .map_err(|_| ConsoleError::not_found("no such page"))?;
        let param = |name: &str| params.iter().find(|(k, _)| *k == name).map(|(_, v)| v);
        if let Some(org) = param("org") {
            if org != op.principal.org {
                console.hub.metrics.reject("other_org");
                return Err(ConsoleError::not_found(format!(
                    "no organization {org:?} for this sign-in"
                )));
            }
            if let Some(project) = param("project") {
                if !op.principal.reads(org, project) {
                    console.hub.metrics.reject("other_project");
                    return Err(ConsoleError::not_found(format!(
                        "no project {project:?} for this sign-in"
                    )));
                }
            }
        }
        Ok(op)
    }
}
