//! The blob seam: the [`Blobs`] trait every artifact byte goes through,
//! finished artifacts (named by the hub) and tus upload parts (named by
//! their upload id), and its backends: `dir` ([`DirBlobs`]), files under
//! the data directory, and `s3` ([`S3Blobs`]), an S3-compatible bucket
//! through `object_store`. Nothing here hands out a file, a path or a
//! whole object in memory, only streams, ranges and appends.
//!
//! Invariant: names are only ever made by the hub (hex upload ids, random
//! blob names); nothing a device sends becomes a name. An all-or-nothing
//! append that is not kept leaves the part as it was.

use std::io;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::stream::BoxStream;

mod dir;
mod s3;
#[cfg(test)]
#[allow(dead_code)]
pub(crate) mod testbucket;
#[cfg(test)]
mod tests;

pub use dir::DirBlobs;
pub use s3::{S3Blobs, S3Error};

/// A blob's bytes, as they are read (a few 64 KiB chunks at a time).
pub type ByteStream = BoxStream<'static, io::Result<Bytes>>;

/// What is known of an upload's part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartInfo {
    /// Bytes held: the upload's offset.
    pub len: u64,
    /// When the part was last written (uploads expire after a while
    /// without a write).
    pub modified: SystemTime,
}

#[async_trait::async_trait]
pub trait Blobs: Send + Sync {
    // ----- upload parts -----

    /// Starts an empty part for upload `upload_id`.
    async fn create_part(&self, upload_id: &str) -> io::Result<()>;

    /// The part's length and last write; `NotFound` when there is none.
    async fn part(&self, upload_id: &str) -> io::Result<PartInfo>;

    /// Opens the part for appending at `offset` (its current length).
    /// The bytes written are part of the upload once [`PartAppend::keep`]
    /// returns. An append dropped unkept: with `all_or_nothing`, leaves
    /// the part as it was; without, may leave what was written (the
    /// directory does) or not (S3 does not): callers that want the bytes
    /// of a cut-off append keep it.
    async fn append_part(
        &self,
        upload_id: &str,
        offset: u64,
        all_or_nothing: bool,
    ) -> io::Result<Box<dyn PartAppend>>;

    /// The hex SHA-256 of the whole part, read as a stream.
    async fn part_sha256(&self, upload_id: &str) -> io::Result<String>;

    /// Makes a complete part into a new blob and returns the blob's name,
    /// leaving the part in place: the caller records the blob, then
    /// removes the part. A crash in between leaves the upload whole (it
    /// finishes again), never an upload row whose bytes are gone.
    async fn finish_upload(&self, upload_id: &str) -> io::Result<String>;

    /// Removes a part; a part already gone is fine.
    async fn remove_part(&self, upload_id: &str) -> io::Result<()>;

    // ----- blobs -----

    /// `len` bytes of a blob from `start`.
    async fn read_range(&self, blob: &str, start: u64, len: u64) -> io::Result<ByteStream>;

    /// Removes a blob; a blob already gone is fine.
    async fn remove(&self, blob: &str) -> io::Result<()>;
}

/// One append to an upload's part (one PATCH).
#[async_trait::async_trait]
pub trait PartAppend: Send {
    /// Appends `chunk` after what was written so far.
    async fn write(&mut self, chunk: &[u8]) -> io::Result<()>;

    /// Makes every byte written durable and part of the upload (the
    /// offset a HEAD reports must survive a crash).
    async fn keep(self: Box<Self>) -> io::Result<()>;
}
