//! Client library for programs on the robot: a `tracing` layer that logs to
//! `logbookd` without ever blocking, and the local API ([`Api`]: session
//! control, log queries and follows, status); [`hub`], the operator's client
//! for a hub's Sessions API (`logbook --hub URL …`); and what the `logbook`
//! CLI adds on top: [`print`] and [`logger`] (`logbook log`).
//!
//! ```no_run
//! use tracing_subscriber::prelude::*;
//!
//! let layer = logbook::client::LogbookLayer::builder().build();
//! let logbook = layer.handle();
//! tracing_subscriber::registry().with(layer).init();
//! tracing::info!(obstacles = 5, "perception up");
//! // Before exiting, give queued events a moment to reach the agent.
//! logbook.flush(std::time::Duration::from_secs(2));
//!
//! // Session control (blocking; each call is one request to `api.sock`).
//! use logbook::client::{Api, NewSession};
//! let mut session = Api::new().open(&NewSession::new().tag("field-test").meta("site", "hall-b"))?;
//! session.tag("docked")?;
//! session.close()?; // or session.fail("lost localization")?
//! # Ok::<(), logbook::client::ApiError>(())
//! ```
//!
//! Invariant: nothing here runs on the caller's thread except formatting one
//! JSON line and a non-blocking `try_send`; the socket lives on one plain
//! std thread (no async runtime needed in the host program), and every
//! event is either written or counted as dropped.

mod api;
pub mod hub;
mod layer;
pub mod logger;
pub mod print;
mod sender;

pub use api::{
    Api, ApiError, Cursor, Follow, FollowFrom, LogFilter, LogPages, NewSession, Resuming, Session,
    API_SOCKET_ENV, DEFAULT_API_SOCKET, END_SESSION, MAX_BODY,
};
pub use layer::{Builder, Handle, LogbookLayer};

/// Where `logbookd` listens for JSON lines unless told otherwise.
pub const DEFAULT_INGEST_SOCKET: &str = "/run/logbook/ingest.sock";
/// Environment variable naming the ingest socket (used when the program
/// does not set one with [`Builder::socket`]).
pub const INGEST_SOCKET_ENV: &str = "LOGBOOK_INGEST_SOCKET";
/// Module of the records the client itself writes (the drop count).
pub const CLIENT_MODULE: &str = "logbook::client";

/// Percent-encodes a query value or a path segment (RFC 3986 unreserved
/// characters pass), for the local API and the hub alike.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
