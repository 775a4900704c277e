//! The operator web console, served at `/` on the hub's listener:
//! server-rendered pages (askama templates compiled into the binary) for
//! signing in with an operator key, the organization's projects, the
//! sessions list, one session (with
//! its timeline), its logs, and the devices; htmx (embedded) boosts links and forms when scripts run.
//!
//! Invariant: every page and form reads the hub through [`data`] (the
//! API's store queries, no SQL of its own); every route but the sign-in
//! page, sign-in and the assets takes a [`signins::Operator`]; every
//! mutation passes [`csrf::check`]; every response carries the
//! [`crate::console::headers`] policy.

mod assets;
mod cookies;
mod csrf;
mod data;
mod devices;
mod errors;
mod logs;
mod projects;
mod session;
mod sessions;
mod signin;
mod signins;
mod view;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;

use super::Hub;

/// The console's state: the hub (whose store keeps the sign-ins).
pub(crate) struct Console {
    hub: Arc<Hub>,
}

/// The console's routes, with their state, to merge into the hub's router.
/// ARCHITECTURE.md's route table mirrors this.
pub(crate) fn router<S: Clone + Send + Sync + 'static>(hub: Arc<Hub>) -> Router<S> {
    let console = Arc::new(Console { hub });
    let session = "/o/{org}/{project}/sessions/{id}";
    Router::new()
        .route("/", get(signin::page))
        .route("/sign-in", post(signin::sign_in))
        .route("/sign-out", post(signin::sign_out))
        .route("/assets/{version}/{name}", get(assets::serve))
        .route("/o/{org}", get(projects::page))
        .route("/o/{org}/{project}/sessions", get(sessions::page))
        .route("/o/{org}/{project}/devices", get(devices::page))
        .route(session, get(session::page))
        .route(&format!("{session}/tags"), post(session::add_tag))
        .route(&format!("{session}/tags/remove"), post(session::remove_tag))
        .route(&format!("{session}/files.zip"), get(session::zip))
        .route(&format!("{session}/files/{{*path}}"), get(session::file))
        .route(&format!("{session}/timeline"), get(session::timeline))
        .route(&format!("{session}/artifacts"), get(session::artifacts))
        .route(&format!("{session}/logs"), get(logs::page))
        .route(&format!("{session}/logs/export"), get(logs::export))
        .route(&format!("{session}/logs/live"), get(logs::live))
        .layer(axum::middleware::from_fn(crate::console::headers::secure))
        .with_state(console)
}

#[cfg(test)]
mod tests;
