//! The S3-compatible backend of [`Blobs`] (`storage.blobs =
//! "s3://bucket/prefix"`), through `object_store`: finished artifacts as
//! `<prefix>/blobs/<name>`, and each tus upload in progress as
//! `<prefix>/uploads/<id>/created` (an empty marker written at creation)
//! plus one object per kept append, `<prefix>/uploads/<id>/<offset>` (the
//! offset zero-padded to 20 digits, so names sort by offset). An upload's
//! offset is the length of the run of segments that follow each other
//! from 0, its last write the newest of them: every replica reads the same
//! answer from the bucket, none keeps it in memory. Finishing an upload
//! copies its one segment inside the bucket, or streams its segments into
//! one multipart object, then removes them.
//!
//! Invariant: a segment becomes visible only whole (a single PUT, or a
//! completed multipart upload), so an append not kept leaves nothing; no
//! whole object is held in memory: appends and finishes buffer at most
//! [`PART_BYTES`] times [`PART_CONCURRENCY`], reads stream what the
//! server sends. Two appends at one offset are kept out by the caller's
//! lease in the store (`hub::tus`), not here.

use std::io;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ClientConfigKey, GetOptions, GetRange, ObjectStore, RetryConfig};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::{Blobs, ByteStream, PartAppend, PartInfo};
use crate::hub::config::S3Config;

/// Bytes buffered before an append or a finish turns into a multipart
/// upload, and the size of each part: S3's smallest part.
pub const PART_BYTES: usize = 5 << 20;
/// Parts of one append or finish in flight at once.
pub const PART_CONCURRENCY: usize = 2;
/// Most segments one upload may have (one per PATCH); an upload past it
/// is refused more appends rather than listed without bound.
const MAX_SEGMENTS: usize = 100_000;

pub struct S3Blobs {
    store: Arc<dyn ObjectStore>,
    /// `s3://bucket/prefix`, for messages.
    url: String,
    prefix: String,
}

/// Why the bucket could not be used, for the one line `logbook-hub` prints.
#[derive(Debug, thiserror::Error)]
#[error("storage.blobs {url}: {why}")]
pub struct S3Error {
    url: String,
    why: String,
}

fn valid_name(name: &str) -> io::Result<&str> {
    if !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(name)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a blob or upload name: {name:?}"),
        ))
    }
}

/// An `object_store` error as an `io::Error` of one line.
fn io_err(e: object_store::Error) -> io::Error {
    let kind = match &e {
        object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, one_line(&e))
}

/// An error and its sources on one line, without repeats.
fn one_line(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out = format!("{out}: {text}");
        }
        source = s.source();
    }
    out.replace('\n', " ")
}

/// A builder for `config`'s bucket: the standard `AWS_*` variables
/// (credentials, region, endpoint), then the hub's own keys over them.
fn builder(config: &S3Config, env: &[(String, String)]) -> AmazonS3Builder {
    let mut b = AmazonS3Builder::from_env();
    for (name, value) in env {
        if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
            b = b.with_config(key, value);
        }
    }
    let mut b = b.with_bucket_name(&config.bucket);
    if let Some(endpoint) = &config.endpoint {
        b = b.with_endpoint(endpoint);
    }
    if let Some(region) = &config.region {
        b = b.with_region(region);
    }
    if let Some(v) = config.virtual_hosted {
        b = b.with_virtual_hosted_style_request(v);
    }
    if let Some(v) = config.allow_http {
        b = b.with_allow_http(v);
    }
    // A local endpoint over plain http works without a key of its own.
    let endpoint = config
        .endpoint
        .clone()
        .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
    if config.allow_http.is_none() && endpoint.is_some_and(|e| e.starts_with("http://")) {
        b = b.with_allow_http(true);
    }
    b
}

impl S3Blobs {
    /// Connects to `config`'s bucket and checks that it answers (one
    /// listing): a missing bucket, wrong credentials or an unreachable
    /// endpoint is one line naming the bucket, at start-up.
    pub async fn open(config: &S3Config) -> Result<S3Blobs, S3Error> {
        S3Blobs::open_with_env(config, &[]).await
    }

    /// [`S3Blobs::open`] with `AWS_*` variables `env` over the process's
    /// own (tests run many buckets in one process).
    pub async fn open_with_env(
        config: &S3Config,
        env: &[(String, String)],
    ) -> Result<S3Blobs, S3Error> {
        let url = config.url();
        let fail = |why: String| S3Error {
            url: url.clone(),
            why,
        };
        // Timeouts as keys, not `with_client_options`: that would replace
        // the client options the environment set (AWS_ALLOW_HTTP, proxies).
        let timeouts = |b: AmazonS3Builder, total: &str| {
            b.with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                "5s",
            )
            .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), total)
        };
        let store = timeouts(builder(config, env), "300s")
            .with_retry(RetryConfig {
                retry_timeout: Duration::from_secs(60),
                ..RetryConfig::default()
            })
            .build()
            .map_err(|e| fail(one_line(&e)))?;
        // The check fails at once rather than retrying for a minute.
        let probe = timeouts(builder(config, env), "15s")
            .with_retry(RetryConfig {
                max_retries: 0,
                retry_timeout: Duration::from_secs(15),
                ..RetryConfig::default()
            })
            .build()
            .map_err(|e| fail(one_line(&e)))?;
        let prefix = config.prefix.trim_matches('/').to_owned();
        let first = probe.list(Some(&Path::from(prefix.as_str()))).next().await;
        if let Some(Err(e)) = first {
            return Err(fail(explain(&e)));
        }
        Ok(S3Blobs {
            store: Arc::new(store),
            url,
            prefix,
        })
    }

    fn path(&self, rest: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{}/{rest}", self.prefix))
        }
    }

    fn blob_path(&self, blob: &str) -> io::Result<Path> {
        Ok(self.path(&format!("blobs/{}", valid_name(blob)?)))
    }

    fn upload_dir(&self, upload_id: &str) -> io::Result<Path> {
        Ok(self.path(&format!("uploads/{}", valid_name(upload_id)?)))
    }

    fn segment_path(&self, upload_id: &str, offset: u64) -> io::Result<Path> {
        Ok(self.path(&format!("uploads/{}/{offset:020}", valid_name(upload_id)?)))
    }

    /// Every object of an upload: the marker's time (if any), and the
    /// segments that follow each other from offset 0, in order.
    async fn segments(&self, upload_id: &str) -> io::Result<Upload> {
        let dir = self.upload_dir(upload_id)?;
        let mut listing = self.store.list(Some(&dir));
        let mut created = None;
        let mut found: Vec<(u64, u64, SystemTime)> = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(io_err)?;
            let name = meta.location.filename().unwrap_or_default();
            let modified = SystemTime::from(meta.last_modified);
            if name == "created" {
                created = Some(modified);
            } else if let Ok(offset) = name.parse::<u64>() {
                if found.len() >= MAX_SEGMENTS {
                    return Err(io::Error::other(format!(
                        "upload {upload_id} has more than {MAX_SEGMENTS} parts"
                    )));
                }
                found.push((offset, meta.size, modified));
            }
        }
        if created.is_none() && found.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no upload {upload_id} in {}", self.url),
            ));
        }
        found.sort_unstable_by_key(|s| s.0);
        let mut run = Vec::new();
        let mut len = 0;
        let mut modified = created.unwrap_or(SystemTime::UNIX_EPOCH);
        for (offset, size, at) in found {
            if offset == len && size > 0 {
                run.push((offset, size));
                len += size;
                modified = modified.max(at);
            }
        }
        Ok(Upload { run, len, modified })
    }

    /// The upload's bytes in order, as one stream.
    async fn upload_bytes(&self, upload_id: &str) -> io::Result<ByteStream> {
        let up = self.segments(upload_id).await?.run;
        let store = self.store.clone();
        let paths: Vec<Path> = up
            .iter()
            .map(|(offset, _)| self.segment_path(upload_id, *offset))
            .collect::<io::Result<_>>()?;
        let stream = futures_util::stream::iter(paths)
            .then(move |p| {
                let store = store.clone();
                async move {
                    let got = store.get(&p).await.map_err(io_err)?;
                    Ok::<_, io::Error>(got.into_stream().map_err(io_err))
                }
            })
            .try_flatten();
        Ok(Box::pin(stream))
    }
}

/// What a listing of an upload found.
struct Upload {
    /// The segments that follow each other from 0: (offset, size).
    run: Vec<(u64, u64)>,
    len: u64,
    modified: SystemTime,
}

/// The first request's failure, said the way an operator fixes it.
fn explain(e: &object_store::Error) -> String {
    let text = one_line(e);
    let hint = if text.contains("NoSuchBucket") {
        "the bucket does not exist (create it, or fix the name)"
    } else if text.contains("InvalidAccessKeyId")
        || text.contains("SignatureDoesNotMatch")
        || text.contains("AccessDenied")
        || text.contains("403")
    {
        "the credentials were refused (check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"
    } else if text.contains("error sending request")
        || text.contains("connect")
        || text.contains("timed out")
        || text.contains("dns")
    {
        "the endpoint cannot be reached (check storage.s3_endpoint or AWS_ENDPOINT_URL)"
    } else {
        "the bucket cannot be listed"
    };
    format!("{hint}: {text}")
}

#[async_trait::async_trait]
impl Blobs for S3Blobs {
    async fn create_part(&self, upload_id: &str) -> io::Result<()> {
        let marker = self.path(&format!("uploads/{}/created", valid_name(upload_id)?));
        self.store
            .put(&marker, Bytes::new().into())
            .await
            .map(drop)
            .map_err(io_err)
    }

    async fn part(&self, upload_id: &str) -> io::Result<PartInfo> {
        let up = self.segments(upload_id).await?;
        Ok(PartInfo {
            len: up.len,
            modified: up.modified,
        })
    }

    async fn append_part(
        &self,
        upload_id: &str,
        offset: u64,
        _all_or_nothing: bool,
    ) -> io::Result<Box<dyn PartAppend>> {
        let path = self.segment_path(upload_id, offset)?;
        let writer = BufWriter::with_capacity(self.store.clone(), path, PART_BYTES)
            .with_max_concurrency(PART_CONCURRENCY);
        Ok(Box::new(S3Append {
            writer: Some(writer),
            written: 0,
        }))
    }

    async fn part_sha256(&self, upload_id: &str) -> io::Result<String> {
        let mut bytes = self.upload_bytes(upload_id).await?;
        let mut h = Sha256::new();
        while let Some(chunk) = bytes.next().await {
            h.update(chunk?);
        }
        Ok(hex::encode(h.finalize()))
    }

    async fn finish_upload(&self, upload_id: &str) -> io::Result<String> {
        let name = uuid::Uuid::now_v7().simple().to_string();
        let to = self.blob_path(&name)?;
        let up = self.segments(upload_id).await?;
        match up.run.as_slice() {
            // One segment (the usual case: one PATCH): copied inside the
            // bucket, no byte through the hub.
            [(offset, _)] => {
                let from = self.segment_path(upload_id, *offset)?;
                self.store.copy(&from, &to).await.map_err(io_err)?;
            }
            _ => {
                let mut w = BufWriter::with_capacity(self.store.clone(), to, PART_BYTES)
                    .with_max_concurrency(PART_CONCURRENCY);
                let mut bytes = self.upload_bytes(upload_id).await?;
                let copied = async {
                    while let Some(chunk) = bytes.next().await {
                        w.put(chunk?).await.map_err(io_err)?;
                    }
                    w.shutdown().await
                }
                .await;
                if let Err(e) = copied {
                    let _ = w.abort().await;
                    return Err(e);
                }
            }
        }
        Ok(name)
    }

    async fn remove_part(&self, upload_id: &str) -> io::Result<()> {
        let dir = self.upload_dir(upload_id)?;
        let names = self.store.list(Some(&dir)).map_ok(|m| m.location).boxed();
        let mut deleted = self.store.delete_stream(names);
        while let Some(r) = deleted.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Ok(())
    }

    async fn read_range(&self, blob: &str, start: u64, len: u64) -> io::Result<ByteStream> {
        let path = self.blob_path(blob)?;
        if len == 0 {
            self.store.head(&path).await.map_err(io_err)?;
            return Ok(Box::pin(futures_util::stream::empty()));
        }
        let options = GetOptions {
            range: Some(GetRange::Bounded(start..start.saturating_add(len))),
            ..GetOptions::default()
        };
        let got = self.store.get_opts(&path, options).await.map_err(io_err)?;
        Ok(Box::pin(got.into_stream().map_err(io_err)))
    }

    async fn remove(&self, blob: &str) -> io::Result<()> {
        match self.store.delete(&self.blob_path(blob)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
}

/// One PATCH's bytes on their way to one segment: a single PUT when they
/// fit in [`PART_BYTES`], else a multipart upload, completed by `keep`.
struct S3Append {
    /// `None` once kept.
    writer: Option<BufWriter>,
    written: u64,
}

#[async_trait::async_trait]
impl PartAppend for S3Append {
    async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        let Some(w) = self.writer.as_mut() else {
            return Err(io::Error::other("append already kept"));
        };
        w.put(Bytes::copy_from_slice(chunk)).await.map_err(io_err)?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    async fn keep(mut self: Box<Self>) -> io::Result<()> {
        let Some(mut w) = self.writer.take() else {
            return Ok(());
        };
        if self.written == 0 {
            // Nothing to add: no empty segment.
            return w.abort().await.map_err(io_err);
        }
        if let Err(e) = w.shutdown().await {
            let _ = w.abort().await;
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for S3Append {
    fn drop(&mut self) {
        // Not kept: the segment never becomes visible. A multipart upload
        // already begun is aborted so its parts are not billed forever.
        if let Some(mut w) = self.writer.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = w.abort().await {
                        tracing::warn!(error = %e, "cannot abort an upload chunk's multipart upload");
                    }
                });
            }
        }
    }
}
