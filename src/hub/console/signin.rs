//! The sign-in screen (`GET /`), `POST /sign-in` with an operator key and
//! `POST /sign-out`.
//!
//! Invariant: the key is read once, checked against the API's token table
//! and forgotten; only the random sign-in id goes back, in the cookie.
//! Device tokens cannot sign in.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Form, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::super::store::TokenKind;
use super::errors::ConsoleError;
use super::signins::{self, Operator};
use super::view::{home, value, Layout};
use super::{cookies, csrf, data, Console};

#[derive(Template)]
#[template(path = "signin.html")]
pub struct SignInPage<'a> {
    pub layout: Layout,
    pub error: Option<&'a str>,
}

fn page_with(status: StatusCode, error: Option<&str>) -> Result<Response, ConsoleError> {
    let html = SignInPage {
        layout: Layout::signed_out(),
        error,
    }
    .render()?;
    Ok((status, Html(html)).into_response())
}

/// The sign-in form, or the sessions screen when already signed in.
pub async fn page(
    State(c): State<Arc<Console>>,
    headers: HeaderMap,
) -> Result<Response, ConsoleError> {
    let signed_in = match cookies::session_id(&headers) {
        Some(id) => signins::get(&c.hub, id).await?,
        None => None,
    };
    if let Some(op) = signed_in {
        return Ok(Redirect::to(&home(&op.principal)).into_response());
    }
    page_with(StatusCode::OK, None)
}

pub async fn sign_in(
    State(c): State<Arc<Console>>,
    uri: Uri,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, ConsoleError> {
    csrf::same_origin(&headers)?;
    let key = value(&form, "key").trim();
    if key.is_empty() {
        return page_with(StatusCode::BAD_REQUEST, Some("Enter an operator key."));
    }
    let (principal, token_hash) = data::principal(&c.hub, key).await?;
    let principal = match principal {
        Some(p) if p.kind == TokenKind::Operator => p,
        Some(_) => {
            c.hub.metrics.reject("forbidden");
            return page_with(
                StatusCode::FORBIDDEN,
                Some("That is a device token; sign in with an operator key."),
            );
        }
        None => {
            c.hub.metrics.reject("unauthorized");
            return page_with(StatusCode::UNAUTHORIZED, Some("Unknown key."));
        }
    };
    let to = home(&principal);
    // Signing in again replaces the sign-in this browser had.
    if let Some(old) = cookies::session_id(&headers) {
        signins::remove(&c.hub, old).await?;
    }
    let id = signins::create(&c.hub, token_hash).await?;
    let cookie = cookies::set(&id, cookies::over_tls(&uri, &headers));
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to(&to)).into_response())
}

pub async fn sign_out(
    State(c): State<Arc<Console>>,
    op: Operator,
    uri: Uri,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Result<Response, ConsoleError> {
    csrf::check(&headers, &form, &op.csrf)?;
    signins::remove(&c.hub, &op.id).await?;
    let cookie = cookies::clear(cookies::over_tls(&uri, &headers));
    Ok(([(header::SET_COOKIE, cookie)], Redirect::to("/")).into_response())
}
