//! Artifact uploads over tus: an upload cut off mid-PATCH resumes from the
//! offset HEAD reports; chunk and whole-file checksums; replacement;
//! termination; downloads with Range; the streamed ZIP of all artifacts.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use logbook::wire::SessionStatus;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::*;

crate::per_blobs!(
    interrupted_upload_resumes_and_downloads,
    checksum_mismatch_termination_and_zip,
    unfinished_uploads_are_bounded_per_device,
    repeated_creation_resumes_the_same_upload,
    unfinished_uploads_expire_unless_written_to,
);

fn content(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 11) as u8)
        .collect()
}

struct Tus<'a> {
    hub: &'a HubProc,
}

impl Tus<'_> {
    fn url(&self) -> String {
        format!("{}/api/v1/ingest/uploads", self.hub.url)
    }

    /// Creates an upload; returns its absolute URL.
    async fn create(&self, session: Uuid, path: &str, data: &[u8], sha: Option<&str>) -> String {
        self.hub.create_upload(session, path, data, sha).await
    }

    async fn head(&self, url: &str) -> reqwest::Response {
        self.hub
            .http
            .head(url)
            .bearer_auth(&self.hub.device)
            .header("tus-resumable", "1.0.0")
            .send()
            .await
            .unwrap()
    }

    async fn offset(&self, url: &str) -> Option<u64> {
        let r = self.head(url).await;
        if r.status() == 404 {
            return None;
        }
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["cache-control"], "no-store");
        Some(
            r.headers()["upload-offset"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap(),
        )
    }

    async fn patch(
        &self,
        url: &str,
        offset: u64,
        data: &[u8],
        checksum: Option<&[u8]>,
    ) -> (u16, Value) {
        let mut req = self
            .hub
            .http
            .patch(url)
            .bearer_auth(&self.hub.device)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", offset.to_string());
        if let Some(sum) = checksum {
            req = req.header(
                "upload-checksum",
                format!("sha256 {}", b64(&Sha256::digest(sum))),
            );
        }
        let r = req.body(data.to_vec()).send().await.unwrap();
        let st = r.status().as_u16();
        if st == 204 {
            assert_eq!(
                r.headers()["upload-offset"].to_str().unwrap(),
                (offset + data.len() as u64).to_string()
            );
        }
        (
            st,
            serde_json::from_str(&r.text().await.unwrap()).unwrap_or(Value::Null),
        )
    }
}

/// Sends a PATCH that announces `total` bytes but sends only `sent`, then
/// drops the connection: a robot losing its link mid-upload.
fn interrupted_patch(addr: &str, path: &str, token: &str, data: &[u8], total: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Tus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n\
         Upload-Offset: 0\r\nContent-Length: {total}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(data).unwrap();
    s.flush().unwrap();
    s.shutdown(std::net::Shutdown::Both).unwrap();
}

async fn interrupted_upload_resumes_and_downloads(storage: Storage) {
    let hub = HubProc::start_on("hub_tus_resume", storage, &[]);
    let tus = Tus { hub: &hub };
    let s = session_id(1);
    hub.post_batch(&batch(
        vec![state(s, 1, SessionStatus::Active, &[])],
        vec![],
        vec![],
    ))
    .await;
    let data = content(6 << 20, 1);
    let url = tus.create(s, "data/telemetry.bin", &data, None).await;
    assert_eq!(tus.offset(&url).await, Some(0));

    // The link drops after 2 MiB of a PATCH meant to carry everything.
    let cut = 2 << 20;
    let path = url.strip_prefix(&hub.url).unwrap().to_owned();
    let (addr, token, part) = (hub.addr.clone(), hub.device.clone(), data[..cut].to_vec());
    let total = data.len();
    tokio::task::spawn_blocking(move || interrupted_patch(&addr, &path, &token, &part, total))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut offset = 0;
    while std::time::Instant::now() < deadline {
        offset = tus.offset(&url).await.unwrap();
        if offset == cut as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        offset, cut as u64,
        "HEAD reports what arrived before the cut"
    );

    // A stale offset is a conflict; a chunk with a wrong checksum is
    // discarded whole. Until the cut PATCH's handler has seen its
    // connection end, it still holds the upload: 423, try again.
    let mut st = 423;
    while st == 423 && std::time::Instant::now() < deadline {
        st = tus.patch(&url, 0, &data[..10], None).await.0;
        if st == 423 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    assert_eq!(st, 409);
    let next = &data[cut..cut + (1 << 20)];
    let (st, v) = tus
        .patch(&url, cut as u64, next, Some(b"something else"))
        .await;
    assert_eq!(
        (st, v["error"]["code"].as_str()),
        (460, Some("checksum_mismatch"))
    );
    assert_eq!(tus.offset(&url).await, Some(cut as u64));
    // Resume: the rest, with checksums.
    let (st, _) = tus.patch(&url, cut as u64, next, Some(next)).await;
    assert_eq!(st, 204);
    let rest = &data[cut + (1 << 20)..];
    let (st, v) = tus
        .patch(&url, (cut + (1 << 20)) as u64, rest, Some(rest))
        .await;
    assert_eq!(st, 204, "{v}");
    assert_eq!(
        tus.offset(&url).await,
        Some(data.len() as u64),
        "a finished upload answers every byte in"
    );

    // Listed, counted and downloadable, whole or by range.
    let (_, files) = hub.get(&hub.api(&format!("/sessions/{s}/files"))).await;
    assert_eq!(files["items"][0]["path"], "data/telemetry.bin");
    assert_eq!(files["items"][0]["size_bytes"], data.len());
    assert_eq!(
        files["items"][0]["sha256"],
        hex::encode(Sha256::digest(&data))
    );
    let (_, sess) = hub.get(&hub.api(&format!("/sessions/{s}"))).await;
    assert_eq!(sess["metrics"]["artifact_count"], 1);
    assert_eq!(sess["metrics"]["artifact_size_bytes"], data.len());
    let file_url = hub.api(&format!("/sessions/{s}/files/data/telemetry.bin"));
    let get = |range: Option<&'static str>| {
        let (hub, url) = (&hub, file_url.clone());
        async move {
            let mut req = hub.http.get(url).bearer_auth(&hub.operator);
            if let Some(r) = range {
                req = req.header("range", r);
            }
            let r = req.send().await.unwrap();
            let st = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_owned());
            if st < 300 {
                assert_eq!(r.headers()["content-security-policy"], "sandbox");
            }
            (st, ct, r.bytes().await.unwrap().to_vec())
        }
    };
    let (st, ct, body) = get(None).await;
    assert_eq!((st, ct.as_deref()), (200, Some("application/octet-stream")));
    assert!(body == data, "downloaded artifact differs");
    let (st, _, body) = get(Some("bytes=100-199")).await;
    assert_eq!((st, &body[..]), (206, &data[100..200]));
    let (st, _, body) = get(Some("bytes=-10")).await;
    assert_eq!((st, &body[..]), (206, &data[data.len() - 10..]));
    let (st, _, _) = get(Some("bytes=99999999-")).await;
    assert_eq!(st, 416);

    // The same path again replaces the artifact (and its file).
    let small = b"second version\n".to_vec();
    let url2 = tus.create(s, "data/telemetry.bin", &small, None).await;
    assert_eq!(tus.patch(&url2, 0, &small, None).await.0, 204);
    let (_, files) = hub.get(&hub.api(&format!("/sessions/{s}/files"))).await;
    assert_eq!(files["items"].as_array().unwrap().len(), 1);
    assert_eq!(files["items"][0]["size_bytes"], small.len());
    assert_eq!(get(None).await.2, small);
    let blobs = hub.stored("blobs");
    assert_eq!(blobs.len(), 1, "the replaced file is gone: {blobs:?}");
}

async fn checksum_mismatch_termination_and_zip(storage: Storage) {
    let hub = HubProc::start_on("hub_tus_zip", storage, &[]);
    let tus = Tus { hub: &hub };
    let s = session_id(2);
    hub.post_batch(&batch(
        vec![state(s, 1, SessionStatus::Completed, &[])],
        vec![],
        vec![],
    ))
    .await;

    // Whole-file SHA-256 mismatch: refused with a reason, upload discarded.
    let data = content(70_000, 2);
    let wrong = "0".repeat(64);
    let url = tus.create(s, "bad.bin", &data, Some(&wrong)).await;
    let (st, v) = tus.patch(&url, 0, &data, None).await;
    assert_eq!(st, 460);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("discarded"),
        "{v}"
    );
    assert_eq!(tus.offset(&url).await, None);

    // Termination.
    let url = tus.create(s, "never.bin", &data, None).await;
    let r = hub
        .http
        .delete(&url)
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(tus.offset(&url).await, None);

    // Capability discovery.
    let r = hub
        .http
        .request(reqwest::Method::OPTIONS, tus.url())
        .bearer_auth(&hub.device)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["tus-version"], "1.0.0");
    assert_eq!(
        r.headers()["tus-extension"],
        "creation,checksum,termination,expiration"
    );
    assert_eq!(r.headers()["tus-checksum-algorithm"], "sha256");

    // Two artifacts (one empty), then the ZIP of all of them.
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("logs/session.log", b"line 1\nline 2\n".to_vec()),
        ("data/blob.bin", data.clone()),
        ("empty.txt", vec![]),
    ];
    for (path, body) in &files {
        let url = tus.create(s, path, body, None).await;
        if !body.is_empty() {
            assert_eq!(tus.patch(&url, 0, body, Some(body)).await.0, 204);
        }
    }
    let (_, list) = hub.get(&hub.api(&format!("/sessions/{s}/files"))).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 3, "{list}");
    let r = hub
        .http
        .get(hub.api(&format!("/sessions/{s}/files/download")))
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/zip");
    let zip = r.bytes().await.unwrap().to_vec();
    assert!(zip.starts_with(b"PK\x03\x04"));
    if !crate::util::interop_client("python3") {
        return;
    }
    let path = hub.dir.join("all.zip");
    std::fs::write(&path, &zip).unwrap();
    let out = crate::util::run_ok(
        std::process::Command::new("python3")
            .arg("-c")
            .arg(
                "import sys, zipfile, hashlib\n\
         z = zipfile.ZipFile(sys.argv[1])\n\
         assert z.testzip() is None\n\
         for i in sorted(z.infolist(), key=lambda i: i.filename):\n\
         \x20   print(i.filename, i.file_size, hashlib.sha256(z.read(i)).hexdigest())\n",
            )
            .arg(&path),
    );
    let mut want: Vec<String> = files
        .iter()
        .map(|(p, b)| format!("{p} {} {}", b.len(), hex::encode(Sha256::digest(b))))
        .collect();
    want.sort();
    let got: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(got, want);
}

async fn unfinished_uploads_are_bounded_per_device(storage: Storage) {
    let hub = HubProc::start_on("hub_tus_bound", storage, &[]);
    let tus = Tus { hub: &hub };
    let s = session_id(3);
    let data = content(10, 3);
    let mut urls = Vec::new();
    for i in 0..64 {
        urls.push(tus.create(s, &format!("part-{i}.bin"), &data, None).await);
    }
    let meta = format!(
        "session_id {},path {}",
        b64(s.to_string().as_bytes()),
        b64(b"one-more.bin")
    );
    let r = hub
        .http
        .post(tus.url())
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "10")
        .header("upload-metadata", meta)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    // Finishing one frees a place.
    assert_eq!(tus.patch(&urls[0], 0, &data, None).await.0, 204);
    tus.create(s, "one-more.bin", &data, None).await;
}

/// A creation whose answer was lost is sent again by the agent: the hub
/// answers with the upload already under way for that file version, so no
/// orphan is left and no acknowledged byte is sent twice; once finished, a
/// creation is complete at once and names the finished upload, whose HEAD
/// answers every byte in.
async fn repeated_creation_resumes_the_same_upload(storage: Storage) {
    let hub = HubProc::start_on("hub_tus_again", storage, &[]);
    let tus = Tus { hub: &hub };
    let s = session_id(4);
    let data = content(1000, 4);
    let url = tus.create(s, "bags/a.bin", &data, None).await;
    assert_eq!(
        tus.patch(&url, 0, &data[..400], Some(&data[..400])).await.0,
        204
    );
    let again = tus.create(s, "bags/a.bin", &data, None).await;
    assert_eq!(again, url);
    assert_eq!(tus.offset(&again).await, Some(400));
    // Another version of the file (other content) is another upload.
    let other = content(1000, 5);
    assert_ne!(tus.create(s, "bags/a.bin", &other, None).await, url);
    assert_eq!(
        tus.patch(&url, 400, &data[400..], Some(&data[400..]))
            .await
            .0,
        204
    );
    // The answer to that last PATCH could have been lost: creating the
    // same file again is complete at once, with nothing to send.
    let meta = format!(
        "session_id {},path {},sha256 {}",
        b64(s.to_string().as_bytes()),
        b64(b"bags/a.bin"),
        b64(hex::encode(Sha256::digest(&data)).as_bytes())
    );
    let r = hub
        .http
        .post(tus.url())
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", "1000")
        .header("upload-metadata", meta)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["upload-offset"], "1000");
    // It names the upload the file was finished from, and a HEAD there
    // answers it whole (a client asking where it stands is done) to its
    // own device only.
    let id = url.rsplit('/').next().unwrap();
    let location = r.headers()["location"].to_str().unwrap();
    assert!(
        location.ends_with(&format!("/{id}")),
        "{location} for {url}"
    );
    assert_eq!(tus.offset(&url).await, Some(1000));
    let r = tus.head(&url).await;
    assert_eq!(r.headers()["upload-length"], "1000");
    // A PATCH sent again (or from 0, as tuspy does after such a creation)
    // is told every byte is in.
    // (Its own client: the body is not read, so the connection closes.)
    let r = reqwest::Client::new()
        .patch(&url)
        .bearer_auth(&hub.device)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .body(data[..100].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["upload-offset"], "1000");
    let other = hub.token(ORG, PROJECT, Some("robot-other"));
    let r = hub
        .http
        .head(&url)
        .bearer_auth(&other)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "another device's finished upload");
}

/// An unfinished upload nobody writes to is deleted after
/// `uploads.expire_after`, part file and all; one still being written to
/// stays, and every answer says when it would expire.
async fn unfinished_uploads_expire_unless_written_to(storage: Storage) {
    let hub = HubProc::start_on(
        "hub_tus_expire",
        storage,
        &[("LOGBOOK_UPLOADS_EXPIRE_AFTER", "2s")],
    );
    let tus = Tus { hub: &hub };
    let s = session_id(5);
    let data = content(1000, 5);
    let stale = tus.create(s, "stale.bin", &data, None).await;
    let alive = tus.create(s, "alive.bin", &data, None).await;
    assert_eq!(tus.patch(&stale, 0, &data[..100], None).await.0, 204);
    let part_exists = |url: &str| {
        let id = url.rsplit('/').next().unwrap().to_owned();
        hub.stored("uploads").contains(&id)
    };
    assert!(part_exists(&stale));

    // `alive` gets a chunk every half second for three seconds; each answer
    // moves its expiry on.
    let expiry = |r: &reqwest::Response| {
        let text = r.headers()["upload-expires"].to_str().unwrap().to_owned();
        let format = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        time::PrimitiveDateTime::parse(&text, format)
            .unwrap_or_else(|e| panic!("Upload-Expires {text:?}: {e}"))
            .assume_utc()
    };
    let mut expiries = Vec::new();
    for i in 0..6u64 {
        let r = hub
            .http
            .patch(&alive)
            .bearer_auth(&hub.device)
            .header("tus-resumable", "1.0.0")
            .header("content-type", "application/offset+octet-stream")
            .header("upload-offset", (i * 10).to_string())
            .body(data[(i * 10) as usize..(i * 10 + 10) as usize].to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        expiries.push(expiry(&r));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let now = time::OffsetDateTime::now_utc();
    assert!(expiries.windows(2).all(|w| w[0] <= w[1]), "{expiries:?}");
    assert!(expiries[5] > expiries[0], "{expiries:?}");
    assert!(
        expiries[5] > now - time::Duration::seconds(2)
            && expiries[5] < now + time::Duration::seconds(4),
        "{expiries:?} at {now}"
    );

    // `stale` had no write for three seconds: the hub's sweeper deleted it.
    util::wait_for(
        "the stale upload's file to go",
        Duration::from_secs(10),
        || (!part_exists(&stale)).then_some(()),
    );
    assert_eq!(tus.offset(&stale).await, None);
    assert!(hub.metric("logbook_hub_uploads_expired_total").await >= 1);

    // `alive` is where it was, and finishes.
    assert_eq!(tus.offset(&alive).await, Some(60));
    assert_eq!(tus.patch(&alive, 60, &data[60..], None).await.0, 204);
    let (st, files) = hub.get(&hub.api(&format!("/sessions/{s}/files"))).await;
    assert_eq!(st, 200);
    let paths: Vec<&str> = files["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["alive.bin"]);
}

/// A hub on the SQLite store with blobs in its data directory (tests that
/// write the state a crash leaves into its files) with session `s` open;
/// `None`, with a notice, on other storage.
async fn hub_on_files(name: &str, s: Uuid) -> Option<HubProc> {
    let files = Storage {
        postgres: false,
        s3: false,
    };
    if Storage::from_env() != files {
        eprintln!(
            "notice: {name} writes into SQLite and a blob directory; skipped on this storage"
        );
        return None;
    }
    let hub = HubProc::start(name);
    hub.post_batch(&batch(
        vec![state(s, 1, SessionStatus::Active, &[])],
        vec![],
        vec![],
    ))
    .await;
    Some(hub)
}

/// Every byte of an upload is in but it was never finished, and a replica
/// that died holds it (its lease in the store until it runs out): `HEAD`
/// answers 423 `upload_busy`, not "every byte is here" (a client would
/// take the upload as done while its artifact does not exist), until the
/// lease runs out; then `HEAD` finishes it and the artifact is there.
/// Made on the SQLite store with blobs in the data directory (the state a
/// SIGKILL leaves is written into its files); skipped on other storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_upload_held_by_a_dead_replica_is_busy_until_its_lease_ends() {
    let Some(hub) = hub_on_files("hub_upload_dead_holder", session_id(7)).await else {
        return;
    };
    let tus = Tus { hub: &hub };
    let s = session_id(7);
    let data = content(64 << 10, 7);
    let url = tus.create(s, "bags/cut.mcap", &data, None).await;
    let last = data.len() - 1;
    assert_eq!(tus.patch(&url, 0, &data[..last], None).await.0, 204);

    // What a replica killed between its last write and the finish leaves:
    // the last byte in the part, and its hold on the upload for 2 s more.
    let id = url.rsplit('/').next().unwrap().to_owned();
    let mut part = std::fs::OpenOptions::new()
        .append(true)
        .open(hub.data_dir().join("uploads").join(format!("{id}.part")))
        .unwrap();
    part.write_all(&data[last..]).unwrap();
    drop(part);
    let until = time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 + 2_000_000_000;
    rusqlite::Connection::open(hub.data_dir().join("hub.db"))
        .unwrap()
        .execute(
            "INSERT INTO leases (name, holder, until_ns) VALUES (?1, 'dead-replica', ?2)",
            rusqlite::params![format!("upload:{id}"), until],
        )
        .unwrap();

    let head = || async {
        let r = tus.head(&url).await;
        let offset = r
            .headers()
            .get("upload-offset")
            .map(|v| v.to_str().unwrap().to_owned());
        (r.status().as_u16(), offset)
    };
    assert_eq!(
        head().await,
        (423, None),
        "busy while the dead replica's lease lasts"
    );
    let files = hub.api(&format!("/sessions/{s}/files/bags/cut.mcap"));
    assert_eq!(hub.get(&files).await.0, 404, "no artifact yet");

    // Once the lease has run out, a HEAD finishes it.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let answer = loop {
        let a = head().await;
        if a.0 != 423 || std::time::Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(answer, (200, Some(data.len().to_string())));
    let r = hub
        .http
        .get(&files)
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        hex::encode(Sha256::digest(r.bytes().await.unwrap())),
        hex::encode(Sha256::digest(&data))
    );
}

/// An upload whose row is in the store but whose file is gone (what an
/// older hub left when it died after moving the finished file and before
/// deleting the row, or a file removed by hand) cannot be resumed: `HEAD`
/// and `PATCH` answer 404 and the row goes, and the client's creation
/// starts it anew instead of resuming a hole, where the hub used to answer
/// 500 to all three until the upload expired. A finished upload leaves no
/// file in `uploads/`. SQLite + directory only, like the test above.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_whose_file_is_gone_is_created_again() {
    let Some(hub) = hub_on_files("hub_upload_lost_file", session_id(8)).await else {
        return;
    };
    let tus = Tus { hub: &hub };
    let s = session_id(8);
    let data = content(48 << 10, 8);
    let sha = hex::encode(Sha256::digest(&data));
    let url = tus.create(s, "bags/lost.mcap", &data, Some(&sha)).await;
    assert_eq!(tus.patch(&url, 0, &data[..1000], None).await.0, 204);
    let parts = hub.data_dir().join("uploads");
    let id = url.rsplit('/').next().unwrap().to_owned();
    std::fs::remove_file(parts.join(format!("{id}.part"))).unwrap();

    let r = tus.head(&url).await;
    assert_eq!(r.status(), 404);
    assert!(
        r.headers().get("upload-offset").is_none(),
        "no offset for a lost upload"
    );
    // An empty PATCH: a refused body left unread would close the pooled
    // connection under the next request.
    assert_eq!(tus.patch(&url, 1000, &[], None).await.0, 404);

    // Created again: a new upload from offset 0, finished whole.
    let again = tus.create(s, "bags/lost.mcap", &data, Some(&sha)).await;
    assert_ne!(again, url, "a new upload, not the lost one");
    assert_eq!(tus.offset(&again).await, Some(0));
    assert_eq!(tus.patch(&again, 0, &data, None).await.0, 204);
    let files = hub.api(&format!("/sessions/{s}/files/bags/lost.mcap"));
    let r = hub
        .http
        .get(&files)
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(hex::encode(Sha256::digest(r.bytes().await.unwrap())), sha);
    let left: Vec<_> = std::fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "a finished upload leaves no part: {left:?}"
    );
}
