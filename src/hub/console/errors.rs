//! The console's refusals as pages: no session sends a page to sign-in,
//! anything else renders the error page with its status and one line.
//!
//! Invariant: another organization's resources and missing ones get the
//! same 404 page; internal causes are logged by the API layer and shown
//! only as its short message.

use askama::Template;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::super::error::ApiError;

#[derive(Debug)]
pub enum ConsoleError {
    /// No (or an expired) sign-in: pages redirect to the sign-in page.
    SignIn,
    /// No sign-in on a request that is not a page (a form post): refused.
    Forbidden(String),
    NotFound(String),
    BadRequest(String),
    Internal(String),
    /// Something this hub cannot do yet (503).
    Unavailable(String),
}

impl ConsoleError {
    pub fn forbidden(m: impl Into<String>) -> ConsoleError {
        ConsoleError::Forbidden(m.into())
    }
    pub fn not_found(m: impl Into<String>) -> ConsoleError {
        ConsoleError::NotFound(m.into())
    }
}

impl From<ApiError> for ConsoleError {
    fn from(e: ApiError) -> ConsoleError {
        match e.status {
            StatusCode::NOT_FOUND => ConsoleError::NotFound(e.message),
            StatusCode::FORBIDDEN | StatusCode::UNAUTHORIZED => ConsoleError::Forbidden(e.message),
            StatusCode::SERVICE_UNAVAILABLE => ConsoleError::Unavailable(e.message),
            s if s.is_client_error() => ConsoleError::BadRequest(e.message),
            _ => ConsoleError::Internal(e.message),
        }
    }
}

impl From<askama::Error> for ConsoleError {
    fn from(e: askama::Error) -> ConsoleError {
        tracing::error!(error = %e, "console template failed");
        ConsoleError::Internal("page rendering failed (see the hub's log)".into())
    }
}

#[derive(Template)]
#[template(path = "error.html")]
pub struct ErrorPage<'a> {
    pub layout: super::view::Layout,
    pub status: u16,
    pub title: &'a str,
    pub message: &'a str,
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let (status, title, message) = match &self {
            ConsoleError::SignIn => {
                let mut r = StatusCode::SEE_OTHER.into_response();
                r.headers_mut()
                    .insert(header::LOCATION, HeaderValue::from_static("/"));
                return r;
            }
            ConsoleError::Forbidden(m) => (StatusCode::FORBIDDEN, "Refused", m.as_str()),
            ConsoleError::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m.as_str()),
            ConsoleError::BadRequest(m) => (StatusCode::BAD_REQUEST, "Cannot do that", m.as_str()),
            ConsoleError::Unavailable(m) => {
                (StatusCode::SERVICE_UNAVAILABLE, "Not available", m.as_str())
            }
            ConsoleError::Internal(m) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "Hub error", m.as_str())
            }
        };
        let page = ErrorPage {
            layout: super::view::Layout::signed_out(),
            status: status.as_u16(),
            title,
            message,
        };
        let body = page
            .render()
            .unwrap_or_else(|_| format!("{} {title}: {message}", status.as_u16()));
        (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response()
    }
}
