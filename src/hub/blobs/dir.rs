//! The directory backend of [`Blobs`]: finished artifacts as
//! `blobs/<random name>` and tus uploads in progress as
//! `uploads/<upload id>.part` under the data directory. A part's length is
//! its upload's offset and its modification time the last write; finishing
//! an upload hard-links its part into `blobs/` (a copy where links fail).
//!
//! Invariant: every file name is checked to be the hub's own (ASCII
//! letters and digits) before it is joined to a directory; an
//! all-or-nothing append not kept is cut back to where it began, even when
//! its request goes away.

use std::io::{Seek, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::{Blobs, ByteStream, PartAppend, PartInfo};

/// Bytes read from a blob at a time.
const READ_CHUNK: usize = 64 << 10;

pub struct DirBlobs {
    blobs: PathBuf,
    parts: PathBuf,
}

fn valid_name(name: &str) -> std::io::Result<&str> {
    if !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(name)
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not a blob or upload name: {name:?}"),
        ))
    }
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl DirBlobs {
    /// Uses (creating) `blobs/` and `uploads/` under `data_dir`. Blocking.
    pub fn open(data_dir: &Path) -> std::io::Result<DirBlobs> {
        let b = DirBlobs {
            blobs: data_dir.join("blobs"),
            parts: data_dir.join("uploads"),
        };
        std::fs::create_dir_all(&b.blobs)?;
        std::fs::create_dir_all(&b.parts)?;
        Ok(b)
    }

    /// The file holding an upload's bytes so far (its length is the offset).
    pub fn part_path(&self, upload_id: &str) -> std::io::Result<PathBuf> {
        Ok(self.parts.join(format!("{}.part", valid_name(upload_id)?)))
    }

    fn blob_path(&self, blob: &str) -> std::io::Result<PathBuf> {
        Ok(self.blobs.join(valid_name(blob)?))
    }

    /// How many blobs exist (for tests and checks). Blocking.
    pub fn count(&self) -> std::io::Result<usize> {
        Ok(std::fs::read_dir(&self.blobs)?.count())
    }
}

#[async_trait::async_trait]
impl Blobs for DirBlobs {
    async fn create_part(&self, upload_id: &str) -> std::io::Result<()> {
        tokio::fs::File::create(self.part_path(upload_id)?)
            .await
            .map(drop)
    }

    async fn part(&self, upload_id: &str) -> std::io::Result<PartInfo> {
        let meta = tokio::fs::metadata(self.part_path(upload_id)?).await?;
        Ok(PartInfo {
            len: meta.len(),
            modified: meta.modified()?,
        })
    }

    async fn append_part(
        &self,
        upload_id: &str,
        offset: u64,
        all_or_nothing: bool,
    ) -> std::io::Result<Box<dyn PartAppend>> {
        let path = self.part_path(upload_id)?;
        let file = tokio::task::spawn_blocking(move || {
            let mut file = std::fs::OpenOptions::new().write(true).open(path)?;
            file.seek(std::io::SeekFrom::Start(offset))?;
            Ok::<_, std::io::Error>(file)
        })
        .await??;
        Ok(Box::new(DirAppend {
            file: Some(file),
            offset,
            all_or_nothing,
        }))
    }

    async fn part_sha256(&self, upload_id: &str) -> std::io::Result<String> {
        let path = self.part_path(upload_id)?;
        tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::open(path)?;
            let mut h = Sha256::new();
            std::io::copy(&mut f, &mut h)?;
            Ok(hex::encode(h.finalize()))
        })
        .await?
    }

    async fn finish_upload(&self, upload_id: &str) -> std::io::Result<String> {
        let name = uuid::Uuid::now_v7().simple().to_string();
        let (part, blob) = (self.part_path(upload_id)?, self.blob_path(&name)?);
        if tokio::fs::hard_link(&part, &blob).await.is_err() {
            // A filesystem without links: a copy, then made durable.
            tokio::task::spawn_blocking(move || {
                std::fs::copy(&part, &blob)?;
                std::fs::File::open(&blob)?.sync_all()
            })
            .await??;
        }
        Ok(name)
    }

    async fn remove_part(&self, upload_id: &str) -> std::io::Result<()> {
        ignore_missing(tokio::fs::remove_file(self.part_path(upload_id)?).await)
    }

    async fn read_range(&self, blob: &str, start: u64, len: u64) -> std::io::Result<ByteStream> {
        let mut f = tokio::fs::File::open(self.blob_path(blob)?).await?;
        f.seek(std::io::SeekFrom::Start(start)).await?;
        let stream = tokio_util::io::ReaderStream::with_capacity(f.take(len), READ_CHUNK);
        Ok(Box::pin(stream))
    }

    async fn remove(&self, blob: &str) -> std::io::Result<()> {
        ignore_missing(tokio::fs::remove_file(self.blob_path(blob)?).await)
    }
}

/// One PATCH's writes into a part file. Small synchronous writes of at
/// most one body frame: the page cache absorbs them, and holding no buffer
/// keeps memory flat.
struct DirAppend {
    /// `None` once kept.
    file: Option<std::fs::File>,
    /// Where the append began: an all-or-nothing append not kept is cut
    /// back to it.
    offset: u64,
    all_or_nothing: bool,
}

#[async_trait::async_trait]
impl PartAppend for DirAppend {
    async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.write_all(chunk),
            None => Err(std::io::Error::other("append already kept")),
        }
    }

    async fn keep(mut self: Box<Self>) -> std::io::Result<()> {
        let Some(file) = self.file.take() else {
            return Ok(());
        };
        // An fsync can take a while: on the blocking pool.
        tokio::task::spawn_blocking(move || file.sync_data()).await?
    }
}

impl Drop for DirAppend {
    fn drop(&mut self) {
        if let Some(f) = self.file.take().filter(|_| self.all_or_nothing) {
            if let Err(e) = f.set_len(self.offset) {
                tracing::error!(error = %e, "cannot roll back an upload chunk");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::TryStreamExt;

    use super::*;

    async fn read(b: &DirBlobs, blob: &str, start: u64, len: u64) -> Vec<u8> {
        let chunks: Vec<_> = b
            .read_range(blob, start, len)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn names_are_checked_and_parts_become_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBlobs::open(dir.path()).unwrap();
        for bad in ["", "../x", "a/b", "a.b", "x\0"] {
            assert!(b.part_path(bad).is_err(), "{bad:?}");
            assert!(b.read_range(bad, 0, 1).await.is_err(), "{bad:?}");
            assert!(b.remove(bad).await.is_err(), "{bad:?}");
        }
        b.create_part("abc123").await.unwrap();
        let mut a = b.append_part("abc123", 0, false).await.unwrap();
        a.write(b"hel").await.unwrap();
        a.write(b"lo").await.unwrap();
        a.keep().await.unwrap();
        assert_eq!(b.part("abc123").await.unwrap().len, 5);
        assert_eq!(
            b.part_sha256("abc123").await.unwrap(),
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        let name = b.finish_upload("abc123").await.unwrap();
        // The part stays until its caller has recorded the blob.
        assert_eq!(b.part("abc123").await.unwrap().len, 5);
        b.remove_part("abc123").await.unwrap();
        assert_eq!(
            b.part("abc123").await.unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
        assert_eq!(read(&b, &name, 1, 3).await, b"ell");
        assert_eq!(read(&b, &name, 0, 99).await, b"hello");
        assert_eq!(b.count().unwrap(), 1);
        b.remove(&name).await.unwrap();
        b.remove(&name).await.unwrap();
        assert_eq!(b.count().unwrap(), 0);
    }

    #[tokio::test]
    async fn an_all_or_nothing_append_not_kept_leaves_the_part_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let b = DirBlobs::open(dir.path()).unwrap();
        b.create_part("up1").await.unwrap();
        let mut a = b.append_part("up1", 0, true).await.unwrap();
        a.write(b"kept").await.unwrap();
        a.keep().await.unwrap();
        // Dropped before it was kept (a bad checksum, a client gone).
        let mut a = b.append_part("up1", 4, true).await.unwrap();
        a.write(b" and lost").await.unwrap();
        drop(a);
        assert_eq!(b.part("up1").await.unwrap().len, 4);
        // Without all-or-nothing, what was written stays.
        let mut a = b.append_part("up1", 4, false).await.unwrap();
        a.write(b" too").await.unwrap();
        drop(a);
        assert_eq!(b.part("up1").await.unwrap().len, 8);
        let name = b.finish_upload("up1").await.unwrap();
        assert_eq!(read(&b, &name, 0, 8).await, b"kept too");
    }
}
