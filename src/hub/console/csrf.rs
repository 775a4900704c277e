//! Cross-site request refusal for every console mutation: the request must
//! come from the console's own origin (`Origin`, `Sec-Fetch-Site`) and
//! carry the sign-in's CSRF token in its form.
//!
//! Invariant: a mutation handler calls [`check`] (or [`same_origin`] for
//! sign-in, which has no token yet) before it changes anything; tokens are
//! compared in constant time.

use axum::http::{header, HeaderMap};
use base64::Engine;

use super::errors::ConsoleError;

/// Name of the hidden form field that carries the token.
pub const FIELD: &str = "csrf";

/// A new random token (256 bits).
pub fn token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Refuses a request a browser says came from another site, or whose
/// `Origin` is not this hub's (`Host`).
pub fn same_origin(headers: &HeaderMap) -> Result<(), ConsoleError> {
    let refuse = || Err(ConsoleError::forbidden("cross-site request refused"));
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return refuse();
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
        let origin_host = origin.to_str().ok().and_then(|o| {
            o.strip_prefix("http://")
                .or_else(|| o.strip_prefix("https://"))
        });
        if origin_host.is_none() || origin_host != host {
            return refuse();
        }
    }
    Ok(())
}

/// [`same_origin`], then the form's token against the sign-in's.
pub fn check(
    headers: &HeaderMap,
    form: &[(String, String)],
    expected: &str,
) -> Result<(), ConsoleError> {
    same_origin(headers)?;
    let given = form
        .iter()
        .find(|(k, _)| k == FIELD)
        .map(|(_, v)| v.as_bytes())
        .unwrap_or_default();
    if !constant_time_eq(given, expected.as_bytes()) {
        return Err(ConsoleError::forbidden(
            "the form's security token is missing or stale: reload the page and try again",
        ));
    }
    Ok(())
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins() {
        let check = |pairs: &[(&'static str, &'static str)], ok: bool| {
            assert_eq!(same_origin(&headers(pairs)).is_ok(), ok, "{pairs:?}");
        };
        check(&[], true);
        check(&[("host", "hub:8080"), ("origin", "http://hub:8080")], true);
        check(
            &[("host", "hub:8080"), ("origin", "https://hub:8080")],
            true,
        );
        check(
            &[("host", "hub:8080"), ("origin", "http://evil:8080")],
            false,
        );
        check(&[("host", "hub:8080"), ("origin", "null")], false);
        check(&[("origin", "http://hub:8080")], false);
        check(&[("sec-fetch-site", "same-origin")], true);
        check(&[("sec-fetch-site", "cross-site")], false);
        check(&[("sec-fetch-site", "same-site")], false);
    }

    #[test]
    fn tokens() {
        let t = token();
        assert_ne!(t, token());
        let form = |v: &str| vec![(FIELD.to_owned(), v.to_owned())];
        let h = HeaderMap::new();
        assert!(check(&h, &form(&t), &t).is_ok());
        assert!(check(&h, &form("nope"), &t).is_err());
        assert!(check(&h, &[], &t).is_err());
        assert!(check(&h, &form(""), &t).is_err());
    }
}
