//! Server-side sign-ins: the table from a cookie's random id to the
//! operator it signed in and that sign-in's CSRF token, and the request
//! extractor [`Operator`] every signed-in route takes.
//!
//! Invariant: the table is in this process's memory (a hub restart signs
//! everyone out; replicas would need it in the store); it holds ids only
//! as SHA-256 and never an operator key; entries expire after
//! [`cookies::MAX_AGE_SECS`]; a route with an `{org}` in its path refuses
//! (404) an operator of another organization before its handler runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, RawPathParams};
use axum::http::request::Parts;
use axum::http::Method;
use base64::Engine;
use sha2::{Digest, Sha256};

use super::super::store::Principal;
use super::errors::ConsoleError;
use super::{cookies, csrf, Console};

/// Most sign-ins held at once; the oldest is dropped past it.
const MAX_SIGNINS: usize = 10_000;

struct Entry {
    principal: Principal,
    csrf: String,
    expires: Instant,
}

#[derive(Default)]
pub struct SignIns {
    by_hash: Mutex<HashMap<String, Entry>>,
}

fn id_hash(id: &str) -> String {
    hex::encode(Sha256::digest(id.as_bytes()))
}

impl SignIns {
    /// Signs `principal` in; returns the cookie's id.
    pub fn create(&self, principal: Principal) -> String {
        let id =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let now = Instant::now();
        let mut map = self.by_hash.lock().unwrap();
        map.retain(|_, e| e.expires > now);
        if map.len() >= MAX_SIGNINS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.expires)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id_hash(&id),
            Entry {
                principal,
                csrf: csrf::token(),
                expires: now + Duration::from_secs(cookies::MAX_AGE_SECS),
            },
        );
        id
    }

    /// The live sign-in of cookie id `id`.
    pub fn get(&self, id: &str) -> Option<Operator> {
        let map = self.by_hash.lock().unwrap();
        let e = map
            .get(&id_hash(id))
            .filter(|e| e.expires > Instant::now())?;
        Some(Operator {
            principal: e.principal.clone(),
            csrf: e.csrf.clone(),
            id: id.to_owned(),
        })
    }

    /// Signs out (nothing when `id` is unknown).
    pub fn remove(&self, id: &str) {
        self.by_hash.lock().unwrap().remove(&id_hash(id));
    }
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
        let op = cookies::session_id(&parts.headers).and_then(|id| console.signins.get(id));
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
        if let Some((_, org)) = params.iter().find(|(k, _)| *k == "org") {
            if org != op.principal.org {
                console.hub.metrics.reject("other_org");
                return Err(ConsoleError::not_found(format!(
                    "no organization {org:?} for this sign-in"
                )));
            }
        }
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::store::TokenKind;

    #[test]
    fn create_get_remove() {
        let t = SignIns::default();
        let p = Principal {
            kind: TokenKind::Operator,
            org: "acme".into(),
            project: "warehouse".into(),
            device_id: None,
        };
        let id = t.create(p.clone());
        let op = t.get(&id).unwrap();
        assert_eq!(op.principal.org, "acme");
        assert_eq!(op.csrf.len(), 43);
        assert!(t.get("other").is_none());
        let id2 = t.create(p);
        assert_ne!(id, id2);
        assert_ne!(t.get(&id2).unwrap().csrf, op.csrf);
        t.remove(&id);
        assert!(t.get(&id).is_none());
        assert!(t.get(&id2).is_some());
        // Only hashes are held.
        assert!(!t.by_hash.lock().unwrap().contains_key(&id2));
    }
}
