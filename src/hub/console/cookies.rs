//! The console's sign-in cookie: its name, reading it from a request, and
//! the `Set-Cookie` values that set and clear it.
//!
//! Invariant: the cookie is always `HttpOnly; SameSite=Strict; Path=/`,
//! and `Secure` whenever the request reached the hub over TLS (directly or
//! through a proxy that says so); it holds a random id, never a key.

use axum::http::{header, HeaderMap, Uri};

pub const NAME: &str = "logbook_console";

/// Lifetime the browser is told (the server-side sign-in expires too).
pub const MAX_AGE_SECS: u64 = 12 * 3600;

/// The sign-in id the request carries, if any.
pub fn session_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == NAME)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// Whether the request came over TLS: an `https` URI (a TLS listener) or
/// a proxy's `X-Forwarded-Proto: https`. A client lying about it only
/// makes its own browser refuse the cookie on plain HTTP.
pub fn over_tls(uri: &Uri, headers: &HeaderMap) -> bool {
    uri.scheme_str() == Some("https")
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

fn attributes(secure: bool) -> &'static str {
    if secure {
        "; Path=/; HttpOnly; SameSite=Strict; Secure"
    } else {
        "; Path=/; HttpOnly; SameSite=Strict"
    }
}

/// `Set-Cookie` value for a new sign-in id.
pub fn set(id: &str, secure: bool) -> String {
    format!("{NAME}={id}; Max-Age={MAX_AGE_SECS}{}", attributes(secure))
}

/// `Set-Cookie` value that removes the cookie.
pub fn clear(secure: bool) -> String {
    format!("{NAME}=; Max-Age=0{}", attributes(secure))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_cookie_only() {
        let mut h = HeaderMap::new();
        assert_eq!(session_id(&h), None);
        h.insert(
            header::COOKIE,
            "a=1; logbook_console=abc; b=2".parse().unwrap(),
        );
        assert_eq!(session_id(&h), Some("abc"));
        h.insert(header::COOKIE, "xlogbook_console=abc".parse().unwrap());
        assert_eq!(session_id(&h), None);
        h.insert(header::COOKIE, "logbook_console=".parse().unwrap());
        assert_eq!(session_id(&h), None);
    }

    #[test]
    fn attributes_always_strict_and_secure_over_tls() {
        assert_eq!(
            set("x", false),
            "logbook_console=x; Max-Age=43200; Path=/; HttpOnly; SameSite=Strict"
        );
        assert!(set("x", true).ends_with("; Secure"));
        assert!(clear(true).contains("Max-Age=0"));
        let mut h = HeaderMap::new();
        let plain: Uri = "/".parse().unwrap();
        assert!(!over_tls(&plain, &h));
        assert!(over_tls(&"https://hub/".parse().unwrap(), &h));
        h.insert("x-forwarded-proto", "HTTPS".parse().unwrap());
        assert!(over_tls(&plain, &h));
    }
}
