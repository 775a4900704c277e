//! What the hub's operator console (`hub::console`) and the agent's
//! read-only console (`agent::console`) share: the stylesheet, the
//! security headers, URL building, the human forms of times and sizes,
//! search-hit marking, and the log table's lines and level chips (the
//! template `log_table.html` both log viewers include).
//!
//! Invariant: nothing here knows either side's store or types; it takes
//! plain values and gives values the templates escape.

pub mod headers;
pub mod view;

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The console's one stylesheet (both consoles link it).
pub const STYLE: &[u8] = include_bytes!("console.css");

/// A short digest of the stylesheet, in the agent console's asset URL
/// (the hub's covers all of its assets).
pub static STYLE_VERSION: LazyLock<String> =
    LazyLock::new(|| hex::encode(&Sha256::digest(STYLE)[..6]));

/// An embedded file whose URL carries its digest: served as immutable for
/// a year (a new build has a new URL, so it is never stale).
pub fn immutable(content_type: &'static str, bytes: &'static [u8]) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        bytes,
    )
        .into_response()
}
