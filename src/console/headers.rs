//! Security headers on every console response: a Content-Security-Policy
//! that allows scripts and styles from the hub only (no inline script),
//! no framing, no sniffing, no referrer outside the hub, and no caching
//! of pages.
//!
//! Invariant: applied as a layer to the console's whole router, so no
//! console route can forget it; a response that set its own
//! `Cache-Control` (the embedded assets) keeps it.

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; form-action 'self'; \
    frame-ancestors 'none'; base-uri 'none'";

pub async fn secure(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    set(resp.headers_mut());
    resp
}

/// Puts the policy on a response's headers (for a middleware of its own).
pub fn set(h: &mut HeaderMap) {
    // A download keeps the stricter policy it set (`sandbox`).
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
}
