//! Streamed downloads: a session's logs as JSON or CSV, and all of its
//! artifacts as one ZIP. A task pages through the store (or the blob
//! files) and feeds a bounded channel that becomes the response body.
//!
//! Invariant: memory per download is one page of rows plus a few chunks in
//! the channel, whatever the session's size; a client that goes away stops
//! the producer at its next send.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::api::{self, log_item, param, Params};
use super::auth;
use super::blobs::Blobs;
use super::error::ApiError;
use super::store::{ArtifactRow, LogQuery, LogRow, LogScope, Store};
use super::Hub;

/// Bytes gathered before a chunk is handed to the response.
const CHUNK: usize = 64 << 10;
/// Chunks in flight between producer and response.
const IN_FLIGHT: usize = 4;
/// Rows read from the store per query.
const PAGE: u64 = 1000;

/// The sending end of a streamed response body: bytes gather into chunks
/// of [`CHUNK`], and a full chunk waits for room in a bounded channel; a
/// closed channel (client gone) is a broken pipe.
struct BodyWriter {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl BodyWriter {
    /// Appends `data`, sending a chunk when one is full.
    async fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send().await?;
        }
        Ok(())
    }

    async fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .send(Ok(chunk))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }

    /// Ends the body: sends what is left after a success; after a failure
    /// ends it with an error, so the client sees a cut transfer rather
    /// than a short file that looks complete.
    async fn finish(mut self, produced: std::io::Result<()>) {
        let sent = match produced {
            Ok(()) => self.send().await,
            Err(e) => Err(e),
        };
        match sent {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {
                tracing::debug!("download cancelled by the client");
            }
            Err(e) => {
                tracing::error!(error = %e, "download failed midway");
                let _ = self.tx.send(Err(e)).await;
            }
        }
    }
}

/// A response streaming what its [`BodyWriter`] is given.
fn body_channel(content_type: &'static str, filename: &str) -> (BodyWriter, Response) {
    let (tx, rx) = mpsc::channel(IN_FLIGHT);
    let w = BodyWriter {
        tx,
        buf: Vec::with_capacity(CHUNK),
    };
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{filename}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    (w, resp)
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
    auth::operator(&hub, &headers, None, &org, &project).await?;
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
    let (ctype, ext) = if csv {
        ("text/csv; charset=utf-8", "csv")
    } else {
        ("application/json", "json")
    };
    let (mut w, resp) = body_channel(ctype, &format!("session-{id}-logs.{ext}"));
    let h = hub.clone();
    // On `Hub::tasks`: a shutdown waits for the body being produced.
    hub.tasks.spawn(async move {
        let produced = write_logs(h.store.as_ref(), &mut w, pk, q, csv).await;
        w.finish(produced).await;
    });
    Ok(resp)
}

/// Writes every record of session `pk` matching `q`, a page at a time, as
/// CSV or as one JSON array.
async fn write_logs(
    store: &dyn Store,
    w: &mut BodyWriter,
    pk: i64,
    mut q: LogQuery,
    csv: bool,
) -> std::io::Result<()> {
    let mut line = Vec::with_capacity(1024);
    w.write(if csv { CSV_HEADER.as_bytes() } else { b"[" })
        .await?;
    let mut first = true;
    loop {
        let page = store
            .logs(LogScope::Session(pk), &q)
            .await
            .map_err(std::io::Error::other)?;
        for r in &page.items {
            line.clear();
            if csv {
                csv_row(&mut line, r);
            } else {
                line.extend_from_slice(if first { b"\n" } else { b",\n" });
                serde_json::to_writer(&mut line, &log_item(r)).map_err(std::io::Error::other)?;
            }
            first = false;
            w.write(&line).await?;
        }
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    if !csv {
        w.write(if first { b"]\n" } else { b"\n]\n" }).await?;
    }
    Ok(())
}

pub async fn download_zip(
    State(hub): State<Arc<Hub>>,
    Path((org, project, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    auth::operator(&hub, &headers, None, &org, &project).await?;
    zip(&hub, &org, &project, &id).await
}

/// Every artifact of a session the caller may see, as one streamed ZIP
/// (the API's route and the console's).
pub async fn zip(hub: &Arc<Hub>, org: &str, project: &str, id: &str) -> Result<Response, ApiError> {
    let pk = api::session_pk(hub, org, project, id).await?;
    let artifacts = hub.store.list_artifacts(pk).await?;
    let (mut w, resp) = body_channel("application/zip", &format!("session-{id}-artifacts.zip"));
    let h = hub.clone();
    hub.tasks.spawn(async move {
        let produced = write_zip(h.blobs.as_ref(), &mut w, &artifacts).await;
        w.finish(produced).await;
    });
    Ok(resp)
}

/// Writes `artifacts` as one ZIP, each blob read as a stream.
async fn write_zip(
    blobs: &dyn Blobs,
    w: &mut BodyWriter,
    artifacts: &[ArtifactRow],
) -> std::io::Result<()> {
    let mut zip = super::zip::ZipWriter::new(Vec::with_capacity(CHUNK));
    for a in artifacts {
        let mut bytes = blobs.read_range(&a.blob, 0, a.size).await?;
        zip.start_entry(&a.path, a.size, a.created_at_ns / 1_000_000_000)?;
        while let Some(chunk) = bytes.next().await {
            zip.write_data(&chunk?)?;
            let out = zip.get_mut();
            if out.len() >= CHUNK {
                w.write(out).await?;
                out.clear();
            }
        }
    }
    w.write(&zip.finish()?).await
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
