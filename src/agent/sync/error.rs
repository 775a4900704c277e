//! Errors of talking to the hub, each classifying itself: retry (with an
//! optional server-given delay), stop and report (auth), split the batch
//! (too large), set the batch aside (the hub says it is invalid), or
//! encode it in an older version (the hub is older than this agent) —
//! and the batch version this process sends, lowered once for good when
//! the hub asks for it, and the body coding (gzip, or zstd once the hub
//! says it reads it).
//!
//! Invariant: a refusal of the batch *version* or of its *coding* never
//! sets a batch aside: the records are resent in an older encoding or in
//! gzip, or retried until a hub that reads them answers.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::StatusCode;

use crate::wire::{error_code, Coding, BATCH_VERSION, SUPPORTED_BATCH_VERSIONS};

/// What the uploader must do after a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Transient: connection errors, timeouts, 5xx, 408, 429. Retry forever
    /// with backoff; `after` is the hub's `Retry-After` (on 429 and 503),
    /// which replaces the backoff's wait.
    Retry { after: Option<Duration> },
    /// 401/403: the token is wrong or revoked. Retrying cannot help; stop,
    /// show `auth-failed`, and wait for a new token (or a restart).
    Stop,
    /// 413: the body is too large for the hub; send it in halves.
    Split,
    /// 400/422 and other 4xx: the hub will never take this body. Set it
    /// aside, count its records as a gap, and go on with the next.
    SetAside,
    /// 400 `unsupported_batch_version`: an older hub that cannot read this
    /// batch encoding. Send the same records again in an older one.
    OlderVersion,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Shown with its causes (a TLS refusal says why: an unknown issuer,
    /// an expired certificate, another name).
    #[error("cannot reach the hub: {}", causes(.0))]
    Transport(#[source] reqwest::Error),
    #[error("hub answered {status}: {message}")]
    Status {
        status: StatusCode,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("hub answered {status}: {message}")]
    Version { status: StatusCode, message: String },
    #[error("hub sent an answer this agent cannot read: {0}")]
    BadResponse(String),
    #[error("{0}")]
    Local(String),
}

/// `e` and its sources, `: `-separated, each once (reqwest and hyper
/// repeat a cause in their own message sometimes).
fn causes(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out
}

/// Whether a TLS handshake failed on the way to `e`: tokio-rustls reports
/// rustls' refusals as `InvalidData` I/O errors.
fn tls_refused(e: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::InvalidData)
        {
            return true;
        }
        source = s.source();
    }
    false
}

impl SyncError {
    /// Builds a status error from a response's parts: `body` is the hub's
    /// JSON error (`{"error":{"code","message"}}`) when it sent one.
    pub fn from_response(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> SyncError {
        let parsed = serde_json::from_slice::<crate::wire::ErrorBody>(body);
        let version_code = parsed.as_ref().is_ok_and(|b| {
            [
                error_code::UNSUPPORTED_BATCH_VERSION,
                error_code::UNSUPPORTED_VERSION_OLD,
            ]
            .contains(&b.error.code.as_str())
        });
        let message = parsed
            .map(|b| format!("{} ({})", b.error.message, b.error.code))
            .unwrap_or_else(|_| {
                let text = String::from_utf8_lossy(body);
                let text = text.trim();
                if text.is_empty() {
                    status.canonical_reason().unwrap_or("no reason").to_owned()
                } else {
                    text.chars().take(200).collect()
                }
            });
        if status == StatusCode::BAD_REQUEST && version_code {
            return SyncError::Version { status, message };
        }
        SyncError::Status {
            status,
            message,
            retry_after: retry_after(headers, SystemTime::now()),
        }
    }

    pub fn action(&self) -> Action {
        match self {
            // A reply we cannot parse is most likely a proxy or a hub being
            // upgraded: transient.
            SyncError::Transport(_) | SyncError::BadResponse(_) => Action::Retry { after: None },
            SyncError::Local(_) => Action::Retry { after: None },
            SyncError::Version { .. } => Action::OlderVersion,
            SyncError::Status {
                status,
                retry_after,
                ..
            } => classify(*status, *retry_after),
        }
    }

    /// True for errors where the hub could not be reached at all (as
    /// opposed to answering with an error): the link is down.
    pub fn is_offline(&self) -> bool {
        matches!(self, SyncError::Transport(_))
    }

    /// True when not even a TCP connection to the hub could be made (as
    /// opposed to a connection that broke): a later connect that works is
    /// evidence that the link came back.
    /// A TLS handshake that failed (the certificate of either side refused)
    /// is not one: TCP connects worked, so a probe's connect proves nothing.
    pub fn is_connect(&self) -> bool {
        matches!(self, SyncError::Transport(e) if e.is_connect() && !tls_refused(e))
    }
}

/// The batch version this process sends. Starts at [`BATCH_VERSION`];
/// lowered (for the process lifetime, logged once) when a hub refuses a
/// version, so an agent newer than its hub keeps syncing.
pub static BATCH_ENCODING: Encoding = Encoding::new(BATCH_VERSION);

/// A batch version that only ever goes down.
#[derive(Debug)]
pub struct Encoding(AtomicU32);

impl Encoding {
    pub const fn new(version: u32) -> Encoding {
        Encoding(AtomicU32::new(version))
    }

    /// The version to encode the next batch in.
    pub fn version(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Turns the action for `err`, the answer to a batch encoded as
    /// `sent`, into what the uploader does: a version refusal lowers the
    /// version and resends ([`Action::OlderVersion`]) while this build can
    /// write an older one, and otherwise waits and retries (a hub upgrade
    /// will take the batch) — it never sets the batch aside.
    pub fn decide(&self, err: &SyncError, sent: u32) -> Action {
        let action = err.action();
        if action != Action::OlderVersion {
            return action;
        }
        let Some(older) = SUPPORTED_BATCH_VERSIONS
            .iter()
            .copied()
            .filter(|v| *v < sent)
            .max()
        else {
            tracing::error!(
                "the hub does not read batch v{sent}, the oldest this agent writes ({err}); \
                 retrying until the hub is upgraded"
            );
            return Action::Retry { after: None };
        };
        // `fetch_min`: a batch already sent in an older version must not
        // raise it again.
        if self.0.fetch_min(older, Ordering::Relaxed) > older {
            tracing::warn!(
                "the hub does not read batch v{sent} ({err}); sending v{older} to it from now \
                 until logbookd restarts"
            );
        }
        Action::OlderVersion
    }
}

/// The coding of the batch bodies this process sends.
pub static BODY_CODING: BodyCoding = BodyCoding::new();

/// gzip until a hub's answer lists zstd in its `Accept-Encoding`, then
/// zstd; back to gzip for [`BodyCoding::HOLD`] when a hub refuses a zstd
/// body with 415 (one not yet upgraded, say a replica behind the same
/// address), so a mixed fleet of hubs costs one refused request an hour.
#[derive(Debug)]
pub struct BodyCoding {
    zstd: AtomicBool,
    refused_at: Mutex<Option<Instant>>,
}

impl BodyCoding {
    /// How long a refusal keeps zstd off.
    pub const HOLD: Duration = Duration::from_secs(3600);

    pub const fn new() -> BodyCoding {
        BodyCoding {
            zstd: AtomicBool::new(false),
            refused_at: Mutex::new(None),
        }
    }

    /// The coding to compress the next batch with.
    pub fn current(&self) -> Coding {
        if self.zstd.load(Ordering::Relaxed) {
            Coding::Zstd
        } else {
            Coding::Gzip
        }
    }

    /// Reads a hub answer's `Accept-Encoding`: one listing zstd turns it
    /// on, unless a refusal holds it off.
    pub fn offered(&self, accept: Option<&str>) {
        if !accept.is_some_and(|a| Coding::Zstd.listed_in(a)) || self.zstd.load(Ordering::Relaxed) {
            return;
        }
        let mut refused = self.refused_at.lock().expect("coding lock");
        if refused.is_some_and(|at| at.elapsed() < Self::HOLD) {
            return;
        }
        *refused = None;
        if !self.zstd.swap(true, Ordering::Relaxed) {
            tracing::info!("the hub reads zstd: sending batches in zstd from now");
        }
    }

    /// True when `err`, the answer to a body compressed as `sent`, refuses
    /// its coding: zstd is off for [`BodyCoding::HOLD`], and the same
    /// records go again in gzip (they are never set aside for it).
    pub fn refused(&self, err: &SyncError, sent: Coding) -> bool {
        let refusal = matches!(err, SyncError::Status { status, .. }
            if *status == StatusCode::UNSUPPORTED_MEDIA_TYPE);
        if sent != Coding::Zstd || !refusal {
            return false;
        }
        *self.refused_at.lock().expect("coding lock") = Some(Instant::now());
        if self.zstd.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                "the hub does not read zstd ({err}); sending gzip for the next {} minutes",
                Self::HOLD.as_secs() / 60
            );
        }
        true
    }
}

impl Default for BodyCoding {
    fn default() -> Self {
        BodyCoding::new()
    }
}

/// Maps an HTTP status to the action the design prescribes. `Retry-After`
/// is taken from 429 and 503 only, the answers that define it as a delay
/// (RFC 6585, RFC 9110); on any other status it is ignored.
pub fn classify(status: StatusCode, retry_after: Option<Duration>) -> Action {
    match status.as_u16() {
        401 | 403 => Action::Stop,
        413 => Action::Split,
        429 | 503 => Action::Retry { after: retry_after },
        // 408 Request Timeout is transient.
        408 => Action::Retry { after: None },
        400..=499 => Action::SetAside,
        _ => Action::Retry { after: None },
    }
}

/// Parses `Retry-After` as delay-seconds or an HTTP date (RFC 9110), capped
/// at one hour so a broken header cannot park the uploader for days.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    const CAP: Duration = Duration::from_secs(3600);
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs).min(CAP));
    }
    let format = time::format_description::well_known::Rfc2822;
    // HTTP dates are RFC 1123 with "GMT", which RFC 2822 parsing accepts.
    let when = time::OffsetDateTime::parse(value, &format).ok()?;
    let when = SystemTime::from(when);
    Some(when.duration_since(now).unwrap_or(Duration::ZERO).min(CAP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zstd_once_offered_and_gzip_for_an_hour_after_a_refusal() {
        let coding = BodyCoding::new();
        assert_eq!(coding.current(), Coding::Gzip);
        coding.offered(None);
        coding.offered(Some("gzip"));
        coding.offered(Some("zstd;q=0, gzip"));
        assert_eq!(coding.current(), Coding::Gzip, "not offered");
        coding.offered(Some("zstd, gzip"));
        assert_eq!(coding.current(), Coding::Zstd);
        let status = |code: u16| SyncError::Status {
            status: StatusCode::from_u16(code).unwrap(),
            message: "no".into(),
            retry_after: None,
        };
        // Only a 415 to a zstd body is a refusal of the coding.
        assert!(!coding.refused(&status(400), Coding::Zstd));
        assert!(!coding.refused(&status(503), Coding::Zstd));
        assert!(!coding.refused(&status(415), Coding::Gzip));
        assert_eq!(coding.current(), Coding::Zstd);
        assert!(coding.refused(&status(415), Coding::Zstd));
        assert_eq!(coding.current(), Coding::Gzip);
        // Offered again within the hold: still gzip.
        coding.offered(Some("zstd, gzip"));
        assert_eq!(coding.current(), Coding::Gzip);
        // Once the hold is over, an offer turns it on again.
        *coding.refused_at.lock().unwrap() = Instant::now().checked_sub(BodyCoding::HOLD);
        coding.offered(Some("zstd, gzip"));
        assert_eq!(coding.current(), Coding::Zstd);
    }

    #[test]
    fn statuses_map_to_the_designed_actions() {
        let check = |code: u16, want: Action| {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(classify(status, None), want, "{code}");
        };
        check(401, Action::Stop);
        check(403, Action::Stop);
        check(413, Action::Split);
        check(400, Action::SetAside);
        check(422, Action::SetAside);
        check(404, Action::SetAside);
        check(408, Action::Retry { after: None });
        check(429, Action::Retry { after: None });
        check(500, Action::Retry { after: None });
        check(502, Action::Retry { after: None });
        check(503, Action::Retry { after: None });
        let after = Some(Duration::from_secs(5));
        let check = |code: u16, want: Option<Duration>| {
            let status = StatusCode::from_u16(code).unwrap();
            assert_eq!(
                classify(status, after),
                Action::Retry { after: want },
                "{code}"
            );
        };
        check(429, after);
        check(503, after);
        check(408, None);
        check(500, None);
        check(502, None);
    }

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, v.parse().unwrap());
        h
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480); // Wed, 21 Oct 2015 07:28:00 GMT
        assert_eq!(
            retry_after(&headers("7"), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 07:28:30 GMT"), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            retry_after(&headers("Wed, 21 Oct 2015 07:27:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(
            retry_after(&headers("999999"), now),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(retry_after(&headers("soon"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    fn refusal(status: u16, code: &str) -> SyncError {
        let body = format!(r#"{{"error":{{"code":"{code}","message":"no"}}}}"#);
        SyncError::from_response(
            StatusCode::from_u16(status).unwrap(),
            &HeaderMap::new(),
            body.as_bytes(),
        )
    }

    #[test]
    fn a_version_refusal_is_never_set_aside() {
        let check = |status: u16, code: &str, want: Action| {
            assert_eq!(refusal(status, code).action(), want, "{status} {code}");
        };
        // This hub's code, and the one hubs built before v2 send.
        check(400, "unsupported_batch_version", Action::OlderVersion);
        check(400, "unsupported_version", Action::OlderVersion);
        check(400, "bad_request", Action::SetAside);
        check(413, "unsupported_batch_version", Action::Split);
        check(503, "unsupported_version", Action::Retry { after: None });
        let plain = SyncError::from_response(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            b"unsupported_batch_version",
        );
        assert_eq!(plain.action(), Action::SetAside);
        assert_eq!(
            refusal(400, "unsupported_version").to_string(),
            "hub answered 400 Bad Request: no (unsupported_version)"
        );
    }

    /// The uploader's decision after each answer, in order, on one
    /// encoding: the first refusal lowers v2 to v1 (once), a v2 batch
    /// still in flight is resent as v1 too, a refusal of v1 is retried,
    /// and other answers pass through.
    #[test]
    fn the_encoding_falls_back_once_and_stays() {
        let enc = Encoding::new(2);
        let version = refusal(400, "unsupported_batch_version");
        let invalid = refusal(400, "bad_request");
        let steps = [
            (&invalid, 2, Action::SetAside, 2),
            (&version, 2, Action::OlderVersion, 1),
            (&version, 2, Action::OlderVersion, 1),
            (&version, 1, Action::Retry { after: None }, 1),
            (&invalid, 1, Action::SetAside, 1),
        ];
        for (i, (err, sent, action, after)) in steps.into_iter().enumerate() {
            assert_eq!(enc.decide(err, sent), action, "step {i}");
            assert_eq!(enc.version(), after, "step {i}");
        }
        assert_eq!(BATCH_ENCODING.version(), BATCH_VERSION);
    }

    #[test]
    fn error_body_becomes_the_message() {
        let body = br#"{"error":{"code":"invalid_batch","message":"record 3: module too long"}}"#;
        let e = SyncError::from_response(StatusCode::BAD_REQUEST, &headers("3"), body);
        assert_eq!(
            e.to_string(),
            "hub answered 400 Bad Request: record 3: module too long (invalid_batch)"
        );
        assert_eq!(e.action(), Action::SetAside);
        let e = SyncError::from_response(StatusCode::SERVICE_UNAVAILABLE, &headers("3"), b"");
        assert_eq!(
            e.action(),
            Action::Retry {
                after: Some(Duration::from_secs(3))
            }
        );
    }
}
