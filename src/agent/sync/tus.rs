//! The agent's tus 1.0 client (core + creation + checksum): create an upload,
//! ask its offset, append chunks, over a [`Link`]. Holds no state of its own: the caller
//! keeps the upload URL and acknowledged offset in SQLite, so an upload
//! resumes after a dropped connection or an agent restart without re-sending
//! acknowledged bytes.

use base64::Engine as _;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, LOCATION};
use reqwest::{Method, StatusCode};
use sha2::{Digest, Sha256};

use super::error::SyncError;
use super::link::Link;
use crate::wire::{upload_meta, UPLOADS_PATH};

pub const TUS_VERSION: &str = "1.0.0";

/// What the hub must know to create an upload.
#[derive(Debug, Clone)]
pub struct NewUpload<'a> {
    pub session_id: &'a str,
    /// Relative to the session's artifact directory, `/`-separated.
    pub path: &'a str,
    pub content_type: &'a str,
    /// Hex SHA-256 of the whole file.
    pub sha256: &'a str,
    pub length: u64,
}

/// The answer to an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The hub now holds this many bytes.
    Offset(u64),
    /// The hub's offset is not the one we sent (409): ask with HEAD.
    OffsetMismatch,
}

/// The tus requests of one [`Link`]: its client, its token and its hub.
pub struct TusClient<'a> {
    link: &'a Link,
    endpoint: String,
}

impl<'a> TusClient<'a> {
    pub fn new(link: &'a Link) -> TusClient<'a> {
        TusClient {
            endpoint: link.endpoint(UPLOADS_PATH),
            link,
        }
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        self.link
            .request(method, url)
            .header("Tus-Resumable", TUS_VERSION)
    }

    /// Creates an upload; returns its absolute URL and the offset the hub
    /// reports (0 for a new upload; more when the hub resumed an upload of
    /// the same file version whose creation answer was lost).
    pub async fn create(&self, upload: &NewUpload<'_>) -> Result<(String, u64), SyncError> {
        let meta = [
            (upload_meta::SESSION_ID, upload.session_id),
            (upload_meta::PATH, upload.path),
            (upload_meta::CONTENT_TYPE, upload.content_type),
            (upload_meta::SHA256, upload.sha256),
        ];
        let resp = self
            .request(Method::POST, &self.endpoint)
            .header("Upload-Length", upload.length.to_string())
            .header("Upload-Metadata", encode_metadata(&meta))
            .send()
            .await
            .map_err(SyncError::Transport)?;
        let status = resp.status();
        if status != StatusCode::CREATED {
            return Err(error_of(resp).await);
        }
        let location = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| SyncError::BadResponse("201 without a Location header".into()))?;
        let offset = match resp.headers().get("Upload-Offset") {
            Some(_) => upload_offset(resp.headers())?,
            None => 0,
        };
        absolute(&self.endpoint, location).map(|u| (u, offset))
    }

    /// The hub's offset for an upload; `Ok(None)` when the hub no longer
    /// knows it (404/410: create it again).
    pub async fn offset(&self, url: &str) -> Result<Option<u64>, SyncError> {
        let resp = self
            .request(Method::HEAD, url)
            .send()
            .await
            .map_err(SyncError::Transport)?;
        match resp.status() {
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(None),
            s if s.is_success() => upload_offset(resp.headers()).map(Some),
            _ => Err(error_of(resp).await),
        }
    }

    /// Deletes an unfinished upload (tus termination), e.g. of a file
    /// version that changed before it was complete.
    pub async fn terminate(&self, url: &str) -> Result<(), SyncError> {
        let resp = self
            .request(Method::DELETE, url)
            .send()
            .await
            .map_err(SyncError::Transport)?;
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(()),
            _ => Err(error_of(resp).await),
        }
    }

    /// Appends `chunk` at `offset`, with its SHA-256 for the hub to check.
    pub async fn append(
        &self,
        url: &str,
        offset: u64,
        chunk: bytes::Bytes,
    ) -> Result<Appended, SyncError> {
        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&chunk));
        let resp = self
            .request(Method::PATCH, url)
            .header(CONTENT_TYPE, "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .header("Upload-Checksum", format!("sha256 {digest}"))
            .body(chunk)
            .send()
            .await
            .map_err(SyncError::Transport)?;
        match resp.status() {
            StatusCode::CONFLICT => Ok(Appended::OffsetMismatch),
            s if s.is_success() => upload_offset(resp.headers()).map(Appended::Offset),
            _ => Err(error_of(resp).await),
        }
    }
}

/// The upload URL a `Location` names, relative to the creation endpoint.
fn absolute(endpoint: &str, location: &str) -> Result<String, SyncError> {
    reqwest::Url::parse(endpoint)
        .and_then(|u| u.join(location))
        .map(String::from)
        .map_err(|e| SyncError::BadResponse(format!("bad Location {location:?}: {e}")))
}

async fn error_of(resp: reqwest::Response) -> SyncError {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.bytes().await.unwrap_or_default();
    SyncError::from_response(status, &headers, &body)
}

fn upload_offset(headers: &HeaderMap) -> Result<u64, SyncError> {
    headers
        .get("Upload-Offset")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| SyncError::BadResponse("answer without a valid Upload-Offset".into()))
}

/// `key base64(value),key base64(value)` as tus's `Upload-Metadata` wants.
pub fn encode_metadata(pairs: &[(&str, &str)]) -> HeaderValue {
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = pairs
        .iter()
        .map(|(k, v)| format!("{k} {}", b64.encode(v.as_bytes())))
        .collect::<Vec<_>>()
        .join(",");
    HeaderValue::from_str(&text).expect("base64 and key names are valid header text")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_is_base64_pairs() {
        let v = encode_metadata(&[("path", "bags/run 1.mcap"), ("sha256", "ab")]);
        assert_eq!(v.to_str().unwrap(), "path YmFncy9ydW4gMS5tY2Fw,sha256 YWI=");
    }

    #[test]
    fn locations_resolve_against_the_endpoint() {
        let check = |location: &str, want: &str| {
            let got = absolute("http://hub:8080/api/v1/ingest/uploads", location).unwrap();
            assert_eq!(got, want, "{location}");
        };
        check(
            "/api/v1/ingest/uploads/abc",
            "http://hub:8080/api/v1/ingest/uploads/abc",
        );
        check("uploads/abc", "http://hub:8080/api/v1/ingest/uploads/abc");
        check("https://other/u/1", "https://other/u/1");
        assert!(absolute("http://hub:8080/x", "http://[bad").is_err());
    }
}
