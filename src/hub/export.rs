//! Streamed downloads: a session's logs as JSON or CSV, and all of its
//! artifacts as one ZIP. A blocking task pages through the store (or the
//! blob files) and feeds a bounded channel that becomes the response body.
//!
//! Invariant: memory per download is one page of rows plus a few chunks in
//! the channel, whatever the session's size; a client that goes away stops
//! the producer at its next send.

use std::io::Write;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::api::{self, log_item, param, Params};
use super::auth;
use super::error::ApiError;
use super::store::{LogRow, LogScope};
use super::Hub;

/// Bytes gathered before a chunk is handed to the response.
const CHUNK: usize = 64 << 10;
/// Chunks in flight between producer and response.
const IN_FLIGHT: usize = 4;
/// Rows read from the store per query.
const PAGE: u64 = 1000;

/// A `Write` that sends full chunks down a bounded channel; a closed
/// channel (client gone) is a broken pipe.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<Result<Bytes, std::io::Error>>) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Ends the body with an error, so the client sees a cut transfer
    /// rather than a short file that looks complete.
    fn fail(&self, e: std::io::Error) {
        let _ = self.tx.blocking_send(Err(e));
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// A response whose body is produced by `produce` on the blocking pool.
fn streamed(
    content_type: &'static str,
    filename: &str,
    produce: impl FnOnce(&mut ChannelWriter) -> std::io::Result<()> + Send + 'static,
) -> Response {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter::new(tx);
        match produce(&mut w).and_then(|()| w.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                tracing::debug!("download cancelled by the client");
            }
            Err(e) => {
                tracing::error!(error = %e, "download failed midway");
                w.fail(e);
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    resp
}

/// One CSV field, quoted when it must be (RFC 4180).
fn csv_field(out: &mut Vec<u8>, s: &str) {
    if s.contains([',', '"', '\n', '\r']) {
        out.push(b'"');
        out.extend_from_slice(s.replace('"', "\"\"").as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(s.as_bytes());
    }
}

pub const CSV_HEADER: &str =
    "seq,timestamp,level,module,message,metadata,session_id,device_id,pid,uid,gid,process\n";

pub fn csv_row(out: &mut Vec<u8>, r: &LogRow) {
    let opt = |v: Option<u32>| v.map(|n| n.to_string()).unwrap_or_default();
    let fields = [
        r.seq.to_string(),
        api::rfc3339(r.timestamp_ns),
        r.level.as_upper().to_owned(),
    ];
    for f in &fields {
        csv_field(out, f);
        out.push(b',');
    }
    for f in [
        r.module.as_str(),
        r.message.as_str(),
        r.metadata.as_str(),
        r.session_id.as_deref().unwrap_or(""),
        r.device_id.as_str(),
    ] {
        csv_field(out, f);
        out.push(b',');
    }
    for f in [opt(r.pid), opt(r.uid), opt(r.gid)] {
        out.extend_from_slice(f.as_bytes());
        out.push(b',');
    }
    csv_field(out, r.process.as_deref().unwrap_or(""));
    out.push(b'\n');
}

pub async fn export_logs(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    Query(p): Params,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org).await?;
    export(&hub, &org, &project, &id, &p).await
}

/// The filtered logs of a session the caller may see as a JSON or CSV
/// download (the API's export route and the console's).
pub async fn export(
    hub: &Arc<Hub>,
    org: &str,
    project: &str,
    id: &str,
    p: &[(String, String)],
) -> Result<Response, ApiError> {
    let csv = match param(p, "format") {
        None | Some("json") => false,
        Some("csv") => true,
        Some(o) => {
            return Err(ApiError::bad_request(format!(
                "format: expected json or csv, found {o:?}"
            )))
        }
    };
    // Same filters as the logs route; always oldest first, every page.
    let mut q = api::log_filters(p)?;
    q.ascending = true;
    q.cursor = None;
    q.limit = PAGE;
    q.want_total = false;
    let pk = api::session_pk(hub, org, project, id).await?;
    let store = hub.store.clone();
    let (ctype, ext) = if csv {
        ("text/csv; charset=utf-8", "csv")
    } else {
        ("application/json", "json")
    };
    Ok(streamed(
        ctype,
        &format!("session-{id}-logs.{ext}"),
        move |w| {
            let mut line = Vec::with_capacity(1024);
            w.write_all(if csv { CSV_HEADER.as_bytes() } else { b"[" })?;
            let mut first = true;
            loop {
                let page = store
                    .logs(LogScope::Session(pk), &q)
                    .map_err(std::io::Error::other)?;
                for r in &page.items {
                    line.clear();
                    if csv {
                        csv_row(&mut line, r);
                    } else {
                        line.extend_from_slice(if first { b"\n" } else { b",\n" });
                        serde_json::to_writer(&mut line, &log_item(r))
                            .map_err(std::io::Error::other)?;
                    }
                    first = false;
                    w.write_all(&line)?;
                }
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => break,
                }
            }
            if !csv {
                w.write_all(if first { b"]\n" } else { b"\n]\n" })?;
            }
            Ok(())
        },
    ))
}

pub async fn download_zip(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org).await?;
    zip(&hub, &org, &project, &id).await
}

/// Every artifact of a session the caller may see, as one streamed ZIP
/// (the API's route and the console's).
pub async fn zip(hub: &Arc<Hub>, org: &str, project: &str, id: &str) -> Result<Response, ApiError> {
    let pk = api::session_pk(hub, org, project, id).await?;
    let artifacts = hub.db(move |s| s.list_artifacts(pk)).await?;
    let h = hub.clone();
    Ok(streamed(
        "application/zip",
        &format!("session-{id}-artifacts.zip"),
        move |w| {
            let mut zip = super::zip::ZipWriter::new(w);
            let mut buf = vec![0u8; CHUNK];
            for a in &artifacts {
                let mut f = h.blobs.reader(&a.blob)?;
                zip.start_entry(&a.path, a.size, a.created_at_ns / 1_000_000_000)?;
                loop {
                    let n = std::io::Read::read(&mut f, &mut buf)?;
                    if n == 0 {
                        break;
                    }
                    zip.write_data(&buf[..n])?;
                }
            }
            zip.finish()?;
            Ok(())
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Level;

    #[test]
    fn csv_quotes_what_it_must() {
        let r = LogRow {
            id: 1,
            device_pk: 1,
            session_pk: Some(1),
            session_id: Some("s".into()),
            device_id: "d".into(),
            seq: 7,
            timestamp_ns: 0,
            level: Level::Warn,
            module: "nav".into(),
            message: "a, \"b\"\nc".into(),
            metadata: r#"{"k":1}"#.into(),
            pid: Some(3),
            uid: None,
            gid: None,
            process: Some("p".into()),
        };
        let mut out = Vec::new();
        csv_row(&mut out, &r);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "7,1970-01-01T00:00:00.000Z,WARN,nav,\"a, \"\"b\"\"\nc\",\"{\"\"k\"\":1}\",s,d,3,,,p\n"
        );
    }
}
