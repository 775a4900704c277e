//! Artifact sync end to end: a real `logbookd` watching session artifact
//! directories and uploading over tus to a real `logbook-hub`, through the
//! fault proxy. Checks what arrives at the hub (paths, sizes, SHA-256) and
//! the hub's counters of kept PATCH bytes and stale-offset PATCHes, which
//! show that no acknowledged byte range was sent twice.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::faultproxy::{schedule_rng, Fault, FaultProxy};
use crate::agent::Agent;
use crate::hub::HubProc;
use crate::util::{wait_for, TestDir};

/// Hub, proxy and agent wired together; the agent reaches the hub only
/// through the proxy.
struct Rig {
    agent: Agent,
    proxy: FaultProxy,
    hub: HubProc,
    dir: TestDir,
    env: Vec<(String, String)>,
    rt: tokio::runtime::Runtime,
}

impl Rig {
    /// `fault` is the proxy's state before the agent starts; `extra` adds
    /// to (or overrides) the agent's environment.
    fn start(name: &str, fault: Fault, extra: &[(&str, &str)]) -> Rig {
        let hub = HubProc::start(&format!("{name}-hub"));
        let proxy = FaultProxy::start(hub.addr.parse().unwrap());
        proxy.set(fault);
        let dir = TestDir::new(name);
        let mut env: Vec<(String, String)> = vec![
            ("LOGBOOK_DEVICE_ID".into(), crate::hub::DEVICE.into()),
            ("LOGBOOK_SYNC_HUB".into(), proxy.url()),
            ("LOGBOOK_SYNC_TOKEN".into(), hub.device.clone()),
            ("LOGBOOK_ARTIFACTS_SETTLE_SECS".into(), "0.3".into()),
            ("LOGBOOK_ARTIFACTS_RESCAN_SECS".into(), "1".into()),
            ("LOGBOOK_ARTIFACTS_CHUNK_BYTES".into(), "128KiB".into()),
            ("LOGBOOK_ARTIFACTS_RETRY_MAX_SECS".into(), "1".into()),
            ("LOGBOOK_SYNC_LINGER".into(), "0.05".into()),
            ("LOGBOOK_SYNC_RETRY_MIN".into(), "0.05".into()),
            ("LOGBOOK_SYNC_RETRY_MAX".into(), "0.5".into()),
        ];
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        let agent = Agent::start(&dir, &refs(&env));
        Rig {
            agent,
            proxy,
            hub,
            dir,
            env,
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    /// Restarts the agent on the same directory (after a kill).
    fn restart(&mut self) {
        self.agent = Agent::start(&self.dir, &refs(&self.env));
    }

    /// Opens a session; its id and artifact directory.
    fn open_session(&self) -> (String, PathBuf) {
        let s = self.agent.ok("POST", "/v1/sessions", Some("{}"));
        (
            s["id"].as_str().unwrap().to_owned(),
            PathBuf::from(s["artifact_dir"].as_str().unwrap()),
        )
    }

    /// The agent's view of a session's artifacts, by path.
    fn local(&self, id: &str) -> Vec<Value> {
        let v = self
            .agent
            .ok("GET", &format!("/v1/sessions/{id}/artifacts"), None);
        v["items"].as_array().unwrap().clone()
    }

    fn local_state(&self, id: &str, path: &str) -> Option<String> {
        self.local(id)
            .into_iter()
            .find(|a| a["path"] == path)
            .map(|a| a["state"].as_str().unwrap().to_owned())
    }

    /// The hub's artifacts of a session (empty while it has none).
    fn remote(&self, id: &str) -> Vec<Value> {
        let url = self.hub.api(&format!("/sessions/{id}/files"));
        let (status, v) = self.rt.block_on(self.hub.get(&url));
        if status != 200 {
            return Vec::new();
        }
        v["items"].as_array().cloned().unwrap_or_default()
    }

    fn remote_file(&self, id: &str, path: &str) -> Option<Value> {
        self.remote(id).into_iter().find(|a| a["path"] == path)
    }

    /// Waits until the hub holds `path` with this content hash.
    fn wait_remote(&self, id: &str, path: &str, sha: &str, timeout: Duration) {
        wait_for(&format!("{path} at the hub"), timeout, || {
            self.remote_file(id, path).filter(|f| f["sha256"] == sha)
        });
    }

    /// A sample of the hub's `/metrics` (0 when absent).
    fn hub_metric(&self, sample: &str) -> u64 {
        self.rt.block_on(self.hub.metric(sample))
    }

    /// No PATCH ever re-sent acknowledged bytes, and the bytes the hub
    /// kept are exactly the files' bytes.
    fn assert_no_resent_bytes(&self, total: u64) {
        // The watcher's own opens and reads must not feed it events (a
        // loop that overflows its queue and rescans without end).
        let log = self.agent.log_text();
        assert!(
            !log.contains("events were lost"),
            "the artifact watcher overflowed:\n{log}"
        );
        assert_eq!(
            self.hub_metric("logbook_hub_rejects_total{reason=\"upload_stale_offset\"}"),
            0,
            "a PATCH re-sent acknowledged bytes"
        );
        assert_eq!(
            self.hub_metric("logbook_hub_upload_acked_bytes_total"),
            total,
            "bytes kept by the hub differ from the files' sizes"
        );
    }
}

fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Writes `len` pseudo-random bytes as a recorder would (a `.part` file
/// renamed into place); returns the hex SHA-256.
fn write_artifact(dir: &Path, rel: &str, len: usize, seed: u64) -> String {
    let path = dir.join(rel);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let part = PathBuf::from(format!("{}.part", path.display()));
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&part).unwrap());
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        h.update(&buf[..n]);
        left -= n;
    }
    f.into_inner().unwrap().sync_all().unwrap();
    std::fs::rename(&part, &path).unwrap();
    hex::encode(h.finalize())
}

fn stdout(cmd: &mut std::process::Command) -> String {
    String::from_utf8(crate::util::run_ok(cmd).stdout).unwrap()
}

fn sha_of(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[test]
fn offline_first_session_with_a_50mb_artifact_goes_up_when_the_hub_appears() {
    let rig = Rig::start(
        "art_offline",
        Fault::Down,
        &[("LOGBOOK_ARTIFACTS_CHUNK_BYTES", "4MiB")],
    );
    let (id, dir) = rig.open_session();
    crate::agent::send_lines(&rig.agent, &[r#"{"msg":"recording","level":"info"}"#]);
    let big = write_artifact(&dir, "bags/run.mcap", 50 << 20, 1);
    std::fs::write(dir.join("notes.txt"), b"left wheel squeaks\n").unwrap();
    std::fs::write(dir.join(".hidden"), b"x").unwrap();
    std::fs::write(dir.join("scratch.tmp"), b"x").unwrap();
    std::fs::write(rig.dir.join("outside.txt"), b"secret").unwrap();
    std::os::unix::fs::symlink(rig.dir.join("outside.txt"), dir.join("escape.txt")).unwrap();
    rig.agent
        .ok("POST", "/v1/sessions/current/stop", Some("{}"));

    // Offline: found, waiting, the link refused and reported.
    wait_for("files recorded as pending", Duration::from_secs(20), || {
        let s = rig.agent.status();
        let a = &s["artifacts"];
        (a["pending"] == 2 && a["refused"] == 1).then_some(())
    });
    let status = rig.agent.status();
    assert_eq!(status["artifacts"]["enabled"], true);
    assert_eq!(status["artifacts"]["bytes_pending"], (50u64 << 20) + 19);
    let escape = rig
        .local(&id)
        .into_iter()
        .find(|a| a["path"] == "escape.txt")
        .unwrap();
    assert!(
        escape["error"].as_str().unwrap().contains("symlink"),
        "{escape}"
    );
    wait_for(
        "a reported connection error",
        Duration::from_secs(20),
        || {
            rig.agent.status()["artifacts"]["last_error"]
                .as_str()
                .map(str::to_owned)
        },
    );
    assert!(rig.remote(&id).is_empty());

    rig.proxy.set(Fault::Pass);
    rig.wait_remote(&id, "bags/run.mcap", &big, Duration::from_secs(180));
    let notes = sha_of(b"left wheel squeaks\n");
    rig.wait_remote(&id, "notes.txt", &notes, Duration::from_secs(10));
    let files = rig.remote(&id);
    let mut paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    paths.sort();
    assert_eq!(paths, ["bags/run.mcap", "notes.txt"], "{files:?}");
    // Small before large.
    let created = |p: &str| rig.remote_file(&id, p).unwrap()["created_at"].clone();
    assert!(
        created("notes.txt").as_str() <= created("bags/run.mcap").as_str(),
        "{files:?}"
    );
    assert_eq!(
        rig.remote_file(&id, "bags/run.mcap").unwrap()["size_bytes"],
        50u64 << 20
    );
    wait_for("both uploaded locally", Duration::from_secs(10), || {
        let s = rig.agent.status();
        (s["artifacts"]["uploaded"] == 2 && s["artifacts"]["bytes_pending"] == 0).then_some(())
    });
    rig.assert_no_resent_bytes((50 << 20) + 19);
    // The session and its log went up too, once, with the right fields.
    super::wait_synced(&rig.agent, Duration::from_secs(60));
    let session = super::hub_session(&rig.hub, &id).expect("the session at the hub");
    assert_eq!(session["status"], "completed", "{session}");
    assert_eq!(session["device_id"], crate::hub::DEVICE, "{session}");
    let logs = super::hub_logs(&rig.hub, &format!("/sessions/{id}/logs"));
    assert_eq!(logs.len(), 1, "{logs:?}");
    assert_eq!(logs[0]["message"], "recording");
    let listed = stdout(rig.agent.cli().args(["artifacts", "--session", &id]));
    assert!(
        listed.contains("uploaded") && listed.contains("bags/run.mcap"),
        "{listed}"
    );
    assert!(listed.contains("refused"), "{listed}");
}

#[test]
fn faults_never_make_an_acknowledged_byte_go_twice() {
    let mut rng = schedule_rng();
    let rig = Rig::start("art_faults", Fault::Pass, &[]);
    let (id, dir) = rig.open_session();
    let mut files = Vec::new();
    let mut log = rig.agent.ingest();
    for step in 0..14u64 {
        let fault = Fault::random(&mut rng, 1_000..300_000, 1..30);
        eprintln!("step {step}: {fault:?}");
        // Cut kept-alive connections first, so the new fault applies to
        // every request from now on.
        rig.proxy.set(Fault::Down);
        rig.proxy.set(fault);
        if step % 2 == 0 {
            let len = rng.random_range(1..3_000_000);
            let rel = format!("cam/frames-{step}.bin");
            let sha = write_artifact(&dir, &rel, len, rng.random());
            files.push((rel, sha, len as u64));
        }
        let hold = Duration::from_millis(rng.random_range(300..1200));
        let until = std::time::Instant::now() + hold;
        // Continuous logging while the link misbehaves.
        while std::time::Instant::now() < until {
            writeln!(log, r#"{{"msg":"tick {step}","level":"debug"}}"#).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    rig.proxy.set(Fault::Pass);
    for (rel, sha, _) in &files {
        rig.wait_remote(&id, rel, sha, Duration::from_secs(120));
    }
    let at_hub = rig.remote(&id);
    assert_eq!(at_hub.len(), files.len(), "{at_hub:?}");
    rig.assert_no_resent_bytes(files.iter().map(|f| f.2).sum());
    let (accepted, faulted) = rig.proxy.counts();
    eprintln!("proxy: {accepted} connections, {faulted} faulted");
}

#[test]
fn kill_9_mid_upload_repeatedly_resumes_without_resending() {
    let mut rig = Rig::start(
        "art_kill9",
        Fault::Pass,
        // Slow enough to be killed several times mid-file.
        &[("LOGBOOK_SYNC_MAX_BYTES_PER_SEC", "1MiB")],
    );
    let (id, dir) = rig.open_session();
    let len = 6 << 20;
    let sha = write_artifact(&dir, "lidar.bin", len, 7);
    let mut last = 0u64;
    for round in 0..3 {
        last = wait_for(
            &format!("upload progress before kill {round}"),
            Duration::from_secs(60),
            || {
                rig.local(&id)
                    .into_iter()
                    .find(|a| a["path"] == "lidar.bin")
                    .and_then(|a| a["uploaded_bytes"].as_u64())
                    .filter(|n| *n > last && *n < len as u64)
            },
        );
        eprintln!("round {round}: killing at {last} acknowledged bytes");
        rig.agent.kill9();
        rig.restart();
    }
    rig.wait_remote(&id, "lidar.bin", &sha, Duration::from_secs(60));
    wait_for("uploaded locally", Duration::from_secs(10), || {
        (rig.local_state(&id, "lidar.bin").as_deref() == Some("uploaded")).then_some(())
    });
    assert_eq!(rig.remote(&id).len(), 1);
    rig.assert_no_resent_bytes(len as u64);
}

#[test]
fn a_file_changed_after_upload_goes_up_again() {
    let rig = Rig::start("art_changed", Fault::Pass, &[]);
    let (id, dir) = rig.open_session();
    std::fs::write(dir.join("map.yaml"), b"origin: [0, 0]\n").unwrap();
    rig.wait_remote(
        &id,
        "map.yaml",
        &sha_of(b"origin: [0, 0]\n"),
        Duration::from_secs(30),
    );
    let v2 = b"origin: [1.5, -2]\nresolution: 0.05\n";
    std::fs::write(dir.join("map.yaml"), v2).unwrap();
    rig.wait_remote(&id, "map.yaml", &sha_of(v2), Duration::from_secs(30));
    assert_eq!(rig.remote(&id).len(), 1);
    let url = rig.hub.api(&format!("/sessions/{id}/files/map.yaml"));
    let body = rig.rt.block_on(async {
        let r = rig
            .hub
            .http
            .get(url)
            .bearer_auth(&rig.hub.operator)
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap()
    });
    assert_eq!(&body[..], v2);
    wait_for("uploaded locally", Duration::from_secs(10), || {
        (rig.local_state(&id, "map.yaml").as_deref() == Some("uploaded")).then_some(())
    });
}

#[test]
fn links_and_escapes_are_refused_and_reported() {
    let rig = Rig::start("art_links", Fault::Pass, &[]);
    let (id, dir) = rig.open_session();
    let outside = rig.dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), b"secret").unwrap();
    std::fs::write(outside.join("shadow"), b"root:x").unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("logs")).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), dir.join("secret.txt")).unwrap();
    std::fs::hard_link(outside.join("shadow"), dir.join("shadow")).unwrap();
    std::fs::write(dir.join("ok.txt"), b"fine").unwrap();
    rig.wait_remote(&id, "ok.txt", &sha_of(b"fine"), Duration::from_secs(30));
    wait_for("three refusals", Duration::from_secs(20), || {
        (rig.agent.status()["artifacts"]["refused"] == 3).then_some(())
    });
    let mut refused: Vec<(String, String)> = rig
        .local(&id)
        .into_iter()
        .filter(|a| a["state"] == "refused")
        .map(|a| {
            (
                a["path"].as_str().unwrap().to_owned(),
                a["error"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    refused.sort();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert_eq!(refused[0].0, "logs");
    assert!(refused[0].1.contains("symlink"), "{refused:?}");
    assert_eq!(refused[1].0, "secret.txt");
    assert!(refused[1].1.contains("symlink"), "{refused:?}");
    assert_eq!(refused[2].0, "shadow");
    assert!(refused[2].1.contains("hard link"), "{refused:?}");
    let at_hub = rig.remote(&id);
    assert_eq!(at_hub.len(), 1, "{at_hub:?}");
    let summary = stdout(rig.agent.cli().arg("status"));
    assert!(summary.contains("3 refused"), "{summary}");
}

#[test]
fn a_refused_token_stops_uploads_and_says_so() {
    let rig = Rig::start(
        "art_auth",
        Fault::Pass,
        &[("LOGBOOK_SYNC_TOKEN", "not-a-valid-token")],
    );
    let (id, dir) = rig.open_session();
    std::fs::write(dir.join("a.txt"), b"a").unwrap();
    wait_for("auth-failed in status", Duration::from_secs(30), || {
        (rig.agent.status()["artifacts"]["auth_failed"] == true).then_some(())
    });
    let status = rig.agent.status();
    let err = status["artifacts"]["last_error"].as_str().unwrap();
    assert!(err.contains("401"), "{err}");
    assert_eq!(rig.local_state(&id, "a.txt").as_deref(), Some("pending"));
    let summary = stdout(rig.agent.cli().arg("status"));
    assert!(summary.contains("refused the device token"), "{summary}");
}

#[test]
fn files_written_while_the_agent_was_down_are_found_without_events() {
    let mut rig = Rig::start("art_down", Fault::Pass, &[]);
    let (id, dir) = rig.open_session();
    rig.agent.kill9();
    // No watcher is running: only the scan after start can find these.
    let sha = write_artifact(&dir, "early/imu.bin", 300_000, 11);
    std::fs::write(dir.join("summary.json"), b"{\"ok\":true}").unwrap();
    rig.restart();
    rig.wait_remote(&id, "early/imu.bin", &sha, Duration::from_secs(30));
    rig.wait_remote(
        &id,
        "summary.json",
        &sha_of(b"{\"ok\":true}"),
        Duration::from_secs(30),
    );
    rig.assert_no_resent_bytes(300_000 + 11);
}

#[test]
fn a_file_rewritten_mid_upload_ends_up_as_its_new_version() {
    let rig = Rig::start(
        "art_rewrite",
        Fault::Pass,
        // 3 MiB at 512 KiB/s (after a 512 KiB burst): a window of about five
        // seconds for the rewrite to land mid-upload, even on a loaded
        // machine. The test ends soon after the rewrite either way.
        &[("LOGBOOK_SYNC_MAX_BYTES_PER_SEC", "512KiB")],
    );
    let (id, dir) = rig.open_session();
    write_artifact(&dir, "trace.bin", 3 << 20, 21);
    wait_for("upload under way", Duration::from_secs(30), || {
        rig.local(&id)
            .into_iter()
            .find(|a| a["path"] == "trace.bin")
            .and_then(|a| a["uploaded_bytes"].as_u64())
            .filter(|n| *n > 0)
    });
    // Rewritten in place (same inode), shorter: the upload of the old
    // version must stop, and the new one go up.
    let v2 = b"rewritten: the old bytes are gone\n".repeat(1000);
    std::fs::write(dir.join("trace.bin"), &v2).unwrap();
    rig.wait_remote(&id, "trace.bin", &sha_of(&v2), Duration::from_secs(60));
    assert_eq!(rig.remote(&id).len(), 1);
    let log = rig.agent.log_text();
    assert!(
        log.contains("trace.bin changed; waiting for the new version"),
        "the old version's upload was not stopped:\n{log}"
    );
    wait_for("uploaded locally", Duration::from_secs(10), || {
        (rig.local_state(&id, "trace.bin").as_deref() == Some("uploaded")).then_some(())
    });
}

#[test]
fn a_burst_of_files_is_found_completely_even_if_events_are_lost() {
    // Hub unreachable: this is about finding files, not sending them.
    let rig = Rig::start(
        "art_burst",
        Fault::Down,
        // A tiny queue, so the burst surely overflows it.
        &[("LOGBOOK_ARTIFACTS_EVENT_QUEUE", "16")],
    );
    let (id, dir) = rig.open_session();
    // Thousands of events at once: the watcher's queue overflows; the
    // rescan that follows must find every file.
    // Once a first file is recorded, the directory is watched.
    std::fs::write(dir.join("first.txt"), b"1").unwrap();
    wait_for("the first file", Duration::from_secs(20), || {
        rig.local_state(&id, "first.txt")
    });
    let n = 3000;
    for i in 0..n {
        let sub = dir.join(format!("frames/{:02}", i % 30));
        if i < 30 {
            std::fs::create_dir_all(&sub).unwrap();
        }
        std::fs::write(sub.join(format!("{i:05}.jpg")), i.to_string()).unwrap();
    }
    wait_for("every file recorded", Duration::from_secs(120), || {
        (rig.agent.status()["artifacts"]["pending"] == n + 1).then_some(())
    });
    let listed = rig.local(&id);
    assert_eq!(listed.len(), n as usize + 1);
    assert!(listed.iter().all(|a| a["state"] == "pending"));
    let log = rig.agent.log_text();
    assert!(
        log.contains("events were lost"),
        "no overflow happened:\n{log}"
    );
}
