//! Artifact bytes on disk: finished artifacts as `blobs/<random name>` and
//! tus uploads in progress as `uploads/<upload id>.part` under the data
//! directory. Every file operation on artifacts goes through [`Blobs`], the
//! seam where an S3-compatible store would plug in (parts stay local as a
//! staging area; `commit`, `reader`, `open_range` and `remove` would talk
//! to the bucket).
//!
//! Invariant: file names here are only ever made by the hub (hex upload
//! ids, random blob names); nothing a device sends becomes a path.

use std::io::Seek;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

pub struct Blobs {
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

impl Blobs {
    /// Uses (creating) `blobs/` and `uploads/` under `data_dir`.
    pub fn open(data_dir: &Path) -> std::io::Result<Blobs> {
        let b = Blobs {
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

    pub async fn create_part(&self, upload_id: &str) -> std::io::Result<()> {
        tokio::fs::File::create(self.part_path(upload_id)?)
            .await
            .map(drop)
    }

    pub async fn part_len(&self, upload_id: &str) -> std::io::Result<u64> {
        Ok(tokio::fs::metadata(self.part_path(upload_id)?).await?.len())
    }

    /// When a part was last written.
    pub async fn part_modified(&self, upload_id: &str) -> std::io::Result<std::time::SystemTime> {
        tokio::fs::metadata(self.part_path(upload_id)?)
            .await?
            .modified()
    }

    /// Removes a part; a part already gone is fine.
    pub fn remove_part(&self, upload_id: &str) -> std::io::Result<()> {
        ignore_missing(std::fs::remove_file(self.part_path(upload_id)?))
    }

    /// Hex SHA-256 of a whole part (blocking).
    pub fn part_sha256(&self, upload_id: &str) -> std::io::Result<String> {
        let mut f = std::fs::File::open(self.part_path(upload_id)?)?;
        let mut h = Sha256::new();
        std::io::copy(&mut f, &mut h)?;
        Ok(hex::encode(h.finalize()))
    }

    /// Turns a finished part into a blob; returns the blob's new name.
    pub async fn commit(&self, upload_id: &str) -> std::io::Result<String> {
        let name = uuid::Uuid::now_v7().simple().to_string();
        tokio::fs::rename(self.part_path(upload_id)?, self.blobs.join(&name)).await?;
        Ok(name)
    }

    /// A blocking reader over a whole blob.
    pub fn reader(&self, blob: &str) -> std::io::Result<std::fs::File> {
        std::fs::File::open(self.blobs.join(valid_name(blob)?))
    }

    /// An async reader over `len` bytes of a blob from `start`.
    pub async fn open_range(
        &self,
        blob: &str,
        start: u64,
        len: u64,
    ) -> std::io::Result<impl tokio::io::AsyncRead + Send + Unpin + 'static> {
        let mut f = self.reader(blob)?;
        f.seek(std::io::SeekFrom::Start(start))?;
        Ok(tokio::io::AsyncReadExt::take(
            tokio::fs::File::from_std(f),
            len,
        ))
    }

    /// Removes a blob; a blob already gone is fine.
    pub fn remove(&self, blob: &str) -> std::io::Result<()> {
        ignore_missing(std::fs::remove_file(self.blobs.join(valid_name(blob)?)))
    }

    /// How many blobs exist (for tests and checks).
    pub fn count(&self) -> std::io::Result<usize> {
        Ok(std::fs::read_dir(&self.blobs)?.count())
    }
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_parts_become_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let b = Blobs::open(dir.path()).unwrap();
        for bad in ["", "../x", "a/b", "a.b", "x\0"] {
            assert!(b.part_path(bad).is_err(), "{bad:?}");
            assert!(b.reader(bad).is_err(), "{bad:?}");
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            b.create_part("abc123").await.unwrap();
            std::fs::write(b.part_path("abc123").unwrap(), b"hello").unwrap();
            assert_eq!(b.part_len("abc123").await.unwrap(), 5);
            assert_eq!(
                b.part_sha256("abc123").unwrap(),
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            );
            let name = b.commit("abc123").await.unwrap();
            assert!(b.part_len("abc123").await.is_err());
            let mut s = String::new();
            let mut r = b.open_range(&name, 1, 3).await.unwrap();
            tokio::io::AsyncReadExt::read_to_string(&mut r, &mut s)
                .await
                .unwrap();
            assert_eq!(s, "ell");
            assert_eq!(b.count().unwrap(), 1);
            b.remove(&name).unwrap();
            b.remove(&name).unwrap();
            assert_eq!(b.count().unwrap(), 0);
        });
    }
}
