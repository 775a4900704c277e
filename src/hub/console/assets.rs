//! The console's static files, embedded in the binary: its own stylesheet
//! and script, and the vendored htmx, htmx's WebSocket extension and uPlot
//! (`assets/VENDORED.md` records their versions and licences).
//!
//! Invariant: nothing is fetched from anywhere else (the console works
//! with no Internet); URLs carry a digest of the content, so the files are
//! served as immutable for a year and a new build is never stale.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::response::Response;
use sha2::{Digest, Sha256};

use super::errors::ConsoleError;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "console.css",
        content_type: "text/css; charset=utf-8",
        bytes: crate::console::STYLE,
    },
    Asset {
        name: "console.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/console.js"),
    },
    Asset {
        name: "htmx.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/htmx.min.js"),
    },
    Asset {
        name: "ws.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/ws.min.js"),
    },
    Asset {
        name: "uPlot.iife.min.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("assets/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("assets/uPlot.min.css"),
    },
];

/// A short digest of every asset together, in each asset URL.
static VERSION: LazyLock<String> = LazyLock::new(|| {
    let mut h = Sha256::new();
    for a in ASSETS {
        h.update(a.bytes);
    }
    hex::encode(&h.finalize()[..6])
});

/// The URL of an embedded asset, for templates.
pub fn url(name: &str) -> String {
    format!("/assets/{}/{name}", *VERSION)
}

pub async fn serve(
    Path((version, name)): Path<(String, String)>,
) -> Result<Response, ConsoleError> {
    let asset = ASSETS
        .iter()
        .find(|a| a.name == name)
        .filter(|_| version == *VERSION)
        .ok_or_else(|| ConsoleError::not_found(format!("no asset {name:?}")))?;
    Ok(crate::console::immutable(asset.content_type, asset.bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_carry_the_digest() {
        let u = url("console.css");
        assert!(u.starts_with("/assets/") && u.ends_with("/console.css"));
        assert_eq!(VERSION.len(), 12);
    }
}
