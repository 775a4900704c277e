//! The blob suite: one set of checks written against the [`Blobs`] trait
//! and run against every backend (`per_backend!` below): the directory,
//! and S3 on this process's throwaway moto server (`testbucket`).

use futures_util::TryStreamExt;

use super::*;

macro_rules! per_backend {
    ($($test:ident),* $(,)?) => {
        mod dir {
            $(
                #[tokio::test]
                async fn $test() {
                    let dir = tempfile::tempdir().unwrap();
                    let blobs = super::super::DirBlobs::open(dir.path()).unwrap();
                    super::$test(&blobs).await;
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test]
                async fn $test() {
                    // Skips with a notice where moto is not installed
                    // (never under CI).
                    let Some(bucket) = super::super::testbucket::fresh_bucket(
                        concat!("blobs::s3::", stringify!($test)),
                    ) else {
                        return;
                    };
                    let blobs = super::s3_blobs(&bucket, "some/prefix").await.unwrap();
                    super::$test(&blobs).await;
                }
            )*
        }
    };
}

async fn s3_blobs(bucket: &testbucket::TestBucket, prefix: &str) -> Result<S3Blobs, S3Error> {
    let config = crate::hub::config::S3Config {
        bucket: bucket.bucket.clone(),
        prefix: prefix.into(),
        endpoint: None,
        region: None,
        virtual_hosted: None,
        allow_http: None,
    };
    let env: Vec<(String, String)> = bucket
        .env()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    S3Blobs::open_with_env(&config, &env).await
}

per_backend!(
    parts_become_blobs_read_in_ranges,
    an_append_not_kept_with_all_or_nothing_leaves_the_part_as_it_was,
    a_part_of_many_appends_larger_than_one_s3_part,
    names_are_checked,
);

async fn read(b: &dyn Blobs, blob: &str, start: u64, len: u64) -> Vec<u8> {
    let chunks: Vec<_> = b
        .read_range(blob, start, len)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    chunks.concat()
}

async fn append(b: &dyn Blobs, id: &str, offset: u64, chunks: &[&[u8]]) {
    let mut a = b.append_part(id, offset, true).await.unwrap();
    for c in chunks {
        a.write(c).await.unwrap();
    }
    a.keep().await.unwrap();
}

async fn parts_become_blobs_read_in_ranges(b: &dyn Blobs) {
    assert_eq!(
        b.part("abc123").await.unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
    b.create_part("abc123").await.unwrap();
    let empty = b.part("abc123").await.unwrap();
    assert_eq!(empty.len, 0);
    append(b, "abc123", 0, &[b"hel", b"lo"]).await;
    let held = b.part("abc123").await.unwrap();
    assert_eq!(held.len, 5);
    assert!(held.modified >= empty.modified);
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
    assert_eq!(read(b, &name, 1, 3).await, b"ell");
    assert_eq!(read(b, &name, 0, 5).await, b"hello");
    assert_eq!(read(b, &name, 2, 0).await, b"");
    b.remove(&name).await.unwrap();
    b.remove(&name).await.unwrap();
    assert!(b.read_range(&name, 0, 1).await.is_err());
    b.remove_part("abc123").await.unwrap();
}

async fn an_append_not_kept_with_all_or_nothing_leaves_the_part_as_it_was(b: &dyn Blobs) {
    b.create_part("up1").await.unwrap();
    append(b, "up1", 0, &[b"kept"]).await;
    // Dropped before it was kept (a bad checksum, a client gone).
    let mut a = b.append_part("up1", 4, true).await.unwrap();
    a.write(b" and lost").await.unwrap();
    drop(a);
    assert_eq!(b.part("up1").await.unwrap().len, 4);
    append(b, "up1", 4, &[b" too"]).await;
    assert_eq!(b.part("up1").await.unwrap().len, 8);
    let name = b.finish_upload("up1").await.unwrap();
    b.remove_part("up1").await.unwrap();
    assert_eq!(read(b, &name, 0, 8).await, b"kept too");
    // A part removed before it finished is gone.
    b.create_part("up2").await.unwrap();
    append(b, "up2", 0, &[b"x"]).await;
    b.remove_part("up2").await.unwrap();
    b.remove_part("up2").await.unwrap();
    assert_eq!(
        b.part("up2").await.unwrap_err().kind(),
        std::io::ErrorKind::NotFound
    );
}

/// Appends past S3's 5 MiB part (a multipart segment) and several
/// segments streamed into one blob; its SHA-256 and ranges across the
/// seams are right.
async fn a_part_of_many_appends_larger_than_one_s3_part(b: &dyn Blobs) {
    use sha2::{Digest, Sha256};
    let data: Vec<u8> = (0..(11u32 << 20) + 12345)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    b.create_part("big").await.unwrap();
    let cuts = [0, 7 << 20, (7 << 20) + 1, data.len()];
    for w in cuts.windows(2) {
        let chunks: Vec<&[u8]> = data[w[0]..w[1]].chunks(64 << 10).collect();
        append(b, "big", w[0] as u64, &chunks).await;
        assert_eq!(b.part("big").await.unwrap().len, w[1] as u64);
    }
    assert_eq!(
        b.part_sha256("big").await.unwrap(),
        hex::encode(Sha256::digest(&data))
    );
    let name = b.finish_upload("big").await.unwrap();
    b.remove_part("big").await.unwrap();
    let whole = read(b, &name, 0, data.len() as u64).await;
    assert!(whole == data, "the blob differs from what was appended");
    let seam = (7 << 20) - 3;
    assert_eq!(
        read(b, &name, seam as u64, 10).await,
        &data[seam..seam + 10]
    );
    b.remove(&name).await.unwrap();
}

async fn names_are_checked(b: &dyn Blobs) {
    for bad in ["", "../x", "a/b", "a.b", "x\0"] {
        assert!(b.create_part(bad).await.is_err(), "{bad:?}");
        assert!(b.part(bad).await.is_err(), "{bad:?}");
        assert!(b.read_range(bad, 0, 1).await.is_err(), "{bad:?}");
        assert!(b.remove(bad).await.is_err(), "{bad:?}");
    }
}

/// A missing bucket and an endpoint nobody listens on are one line each,
/// at start-up, naming the bucket and what to fix.
#[tokio::test]
async fn bad_s3_settings_are_one_line_at_start_up() {
    let Some(bucket) = testbucket::fresh_bucket("blobs::s3::bad_settings") else {
        return;
    };
    let missing = testbucket::TestBucket {
        bucket: "no-such-bucket".into(),
        endpoint: bucket.endpoint.clone(),
    };
    let no_bucket = s3_blobs(&missing, "p").await.err().unwrap().to_string();
    assert!(
        no_bucket.starts_with("storage.blobs s3://no-such-bucket/p: the bucket does not exist"),
        "{no_bucket}"
    );
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let unreachable = testbucket::TestBucket {
        bucket: bucket.bucket.clone(),
        endpoint: format!("http://127.0.0.1:{closed}"),
    };
    let no_answer = s3_blobs(&unreachable, "p").await.err().unwrap().to_string();
    assert!(
        no_answer.contains("the endpoint cannot be reached"),
        "{no_answer}"
    );
    for e in [no_bucket, no_answer] {
        assert_eq!(e.lines().count(), 1, "{e}");
    }
}
