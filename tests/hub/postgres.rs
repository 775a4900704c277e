//! `logbook-hub` on PostgreSQL: `migrate` (on SQLite too) and its one-line
//! errors, and a real hub serving from a fresh database answering the
//! Sessions API with the same bytes as a hub on SQLite fed the same batches,
//! and a real agent syncing through it. The cluster is
//! the library's test harness (one per test process; skipped with a notice
//! where PostgreSQL is not installed, never under CI).

use std::process::Command;

use logbook::wire::{Gap, Level, SessionStatus};

use super::*;

use super::testdb;

fn migrate(env: &[(&str, &str)]) -> std::process::Output {
    Command::new(crate::util::bin("logbook-hub"))
        .arg("migrate")
        .env_remove("LOGBOOK_STORAGE_DATABASE")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `migrate`'s one line: `schema version N (where)`.
fn assert_schema_line(out: &str, what: &str) {
    let version = out
        .strip_prefix("schema version ")
        .and_then(|rest| rest.strip_suffix(&format!(" ({what})\n")))
        .and_then(|n| n.parse::<u32>().ok());
    assert!(matches!(version, Some(1..)), "{out:?}");
}

#[test]
fn migrate_prints_the_schema_version_and_bad_databases_are_one_line() {
    let Some(url) = testdb::fresh_database("hub::postgres::migrate") else {
        return;
    };
    for _ in 0..2 {
        let out = migrate(&[("LOGBOOK_STORAGE_DATABASE", &url)]);
        assert!(out.status.success(), "{out:?}");
        assert_schema_line(&String::from_utf8(out.stdout).unwrap(), &url);
    }
    let port = testdb::cluster_port("hub::postgres::migrate").unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let wrong_password = format!(
        "postgres://{}:wrong@127.0.0.1:{port}/postgres",
        testdb::PASSWORD_ROLE
    );
    let unreachable = format!("postgres://hub:wrong@127.0.0.1:{closed}/logbook");
    for (url, want) in [
        (wrong_password.as_str(), "password authentication failed"),
        (unreachable.as_str(), "Connection refused"),
    ] {
        let out = migrate(&[("LOGBOOK_STORAGE_DATABASE", url)]);
        assert!(!out.status.success());
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("logbook-hub: cannot migrate: database postgres://"),
            "{err}"
        );
        assert!(err.contains(want), "{err}");
        assert!(!err.contains("wrong"), "password shown: {err}");
    }
    // A role that may make tables but not create extensions in a database
    // it does not own: the server's reason and hint, on one line.
    let Some(theirs) = testdb::fresh_database("hub::postgres::migrate") else {
        return;
    };
    testdb::psql(
        &theirs,
        &format!("GRANT CREATE ON SCHEMA public TO {}", testdb::PASSWORD_ROLE),
    );
    let name = theirs.rsplit('/').next().unwrap();
    let as_role = format!(
        "postgres://{}:right@127.0.0.1:{port}/{name}",
        testdb::PASSWORD_ROLE
    );
    let out = migrate(&[("LOGBOOK_STORAGE_DATABASE", &as_role)]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("logbook-hub: cannot migrate: "), "{err}");
    assert!(
        err.contains(r#"permission denied to create extension "btree_gin""#),
        "{err}"
    );
    assert!(err.contains("CREATE privilege"), "{err}");
    assert!(!err.contains("right"), "password shown: {err}");
}

/// The same batches into a hub on each backend, then the same requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_on_postgres_answers_the_same_bytes_as_on_sqlite() {
    let Some(url) = testdb::fresh_database("hub::postgres::same_bytes") else {
        return;
    };
    let pg = HubProc::start_with("hub_pg_same", &[("LOGBOOK_STORAGE_DATABASE", &url)]);
    let lite = HubProc::start("hub_pg_same_sqlite");
    let (s1, s2) = (session_id(1), session_id(2));
    let levels = [Level::Debug, Level::Info, Level::Warn, Level::Error];
    let recs: Vec<_> = (1..=60u64)
        .map(|i| {
            let s = if i % 3 == 0 { s2 } else { s1 };
            record(
                i,
                Some(s),
                levels[i as usize % 4],
                ["nav", "perception", "perception.lidar"][i as usize % 3],
                &format!("Detected {i} obstacles near dock-{}", i % 5),
            )
        })
        .collect();
    let batches = [
        batch(
            vec![
                state(s1, 1, SessionStatus::Active, &["production", "b-tag"]),
                state(s2, 1, SessionStatus::Active, &["Zeta", "alpha"]),
            ],
            recs[..30].to_vec(),
            vec![Gap {
                session_id: Some(s1),
                level: Level::Debug,
                reason: "evicted".into(),
                dropped: 40,
            }],
        ),
        // A retry overlapping the first, and the rest.
        batch(vec![], recs[20..].to_vec(), vec![]),
        batch(
            vec![state(s1, 2, SessionStatus::Completed, &["production"])],
            // PostgreSQL's text holds no NUL: both store U+FFFD for it.
            vec![record(61, None, Level::Warn, "bo\0ot", "no session\0 yet")],
            vec![],
        ),
    ];
    for b in &batches {
        for hub in [&pg, &lite] {
            let (status, ack) = hub.post_batch(b).await;
            assert_eq!(status, 200, "{ack}");
        }
    }
    let routes = [
        "/sessions".to_string(),
        "/sessions?sort=duration&order=asc&limit=1".into(),
        "/sessions?tag=production".into(),
        format!("/sessions/{s1}"),
        format!("/sessions/{s2}"),
        format!("/sessions/{s1}/logs"),
        format!("/sessions/{s1}/logs?limit=7&order=asc"),
        format!("/sessions/{s2}/logs?search=obstacles%20near&level=warn"),
        format!("/sessions/{s1}/logs?search=dock-3"),
        format!("/sessions/{s1}/logs?module=perception*"),
        format!("/devices/{DEVICE}/logs"),
    ];
    for route in &routes {
        let (a, b) = (raw(&pg, route).await, raw(&lite, route).await);
        assert_eq!(a.0, 200, "{route}: {}", a.1);
        assert_eq!(a, b, "{route} differs between PostgreSQL and SQLite");
    }
    let (_, body) = raw(&pg, &format!("/devices/{DEVICE}/logs")).await;
    assert!(
        body.contains("no session\u{FFFD} yet") && body.contains("bo\u{FFFD}ot"),
        "{body}"
    );
    // The searches found some records, not all: the comparison means something.
    for (route, want) in [
        (format!("/sessions/{s1}/logs?search=dock-3"), 8),
        (
            format!("/sessions/{s2}/logs?search=obstacles%20near&level=warn"),
            10,
        ),
    ] {
        let (_, body) = raw(&pg, &route).await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v["items"].as_array().unwrap().len(),
            want,
            "{route}: {body}"
        );
    }
}

/// Status and body bytes of an operator GET.
async fn raw(hub: &HubProc, route: &str) -> (u16, String) {
    let r = hub
        .http
        .get(hub.api(route))
        .bearer_auth(&hub.operator)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `migrate` on the default backend: SQLite's hub.db in the data directory.
#[test]
fn migrate_without_a_database_url_migrates_sqlite_in_the_data_dir() {
    let dir = crate::util::TestDir::new("hub_migrate_sqlite");
    let data = dir.join("data");
    let cfg = dir.join("hub.toml");
    std::fs::write(
        &cfg,
        format!("[server]\ndata_dir = \"{}\"\n", data.display()),
    )
    .unwrap();
    let out = crate::util::run_ok(
        Command::new(crate::util::bin("logbook-hub"))
            .args(["migrate", "--config"])
            .arg(&cfg)
            .env_remove("LOGBOOK_STORAGE_DATABASE")
            .env_remove("LOGBOOK_SERVER_DATA_DIR"),
    );
    assert_schema_line(
        &String::from_utf8(out.stdout).unwrap(),
        &data.join("hub.db").display().to_string(),
    );
    assert!(data.join("hub.db").exists());
}

/// A real agent syncing to a hub on PostgreSQL: every record arrives once,
/// in order, and the session closes.
#[test]
fn an_agent_syncs_through_a_hub_on_postgres() {
    use crate::sync::{
        assert_exact_seqs, hub_logs, hub_session, start_agent, sync_env, wait_synced,
    };
    let Some(url) = testdb::fresh_database("hub::postgres::agent_syncs") else {
        return;
    };
    let hub = HubProc::start_with("hub_pg_sync", &[("LOGBOOK_STORAGE_DATABASE", &url)]);
    let dir = crate::util::TestDir::new("hub_pg_sync_agent");
    let agent = start_agent(&dir, &sync_env(&hub.url, &hub.device));
    let (status, open) = agent.api("POST", "/v1/sessions", Some(r#"{"tags":["fleet"]}"#));
    assert_eq!(status, 201, "{open}");
    let id = open["id"].as_str().unwrap().to_owned();
    let lines: Vec<String> = (1..=25)
        .map(|i| format!(r#"{{"level":"info","module":"nav","msg":"line {i}"}}"#))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    crate::agent::send_lines(&agent, &refs);
    agent.flush();
    agent.ok("POST", "/v1/sessions/current/stop", Some("{}"));
    let s = crate::util::wait_for(
        "the session closed at the hub with its 25 records",
        Duration::from_secs(20),
        || hub_session(&hub, &id).filter(|s| s["status"] == "completed" && s["log_count"] == 25),
    );
    assert_eq!(s["tags"], serde_json::json!(["fleet"]));
    assert_exact_seqs(&hub_logs(&hub, &format!("/sessions/{id}/logs")), 1..=25);
    wait_synced(&agent, Duration::from_secs(10));
}

/// `logbook-hub serve` on `env`'s storage: it must stop (within a bound)
/// with a failure, never having said it listens; its stderr.
fn serve_refused(name: &str, env: &[(&str, &str)]) -> String {
    let dir = crate::util::TestDir::new(name);
    let child = Command::new(crate::util::bin("logbook-hub"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .env_remove("LOGBOOK_STORAGE_DATABASE")
        .env_remove("LOGBOOK_STORAGE_BLOBS")
        .env("LOGBOOK_LOG", "error")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = crate::util::KillOnDrop(child);
    let status = crate::util::wait_for(
        "logbook-hub serve to refuse its storage",
        Duration::from_secs(60),
        || child.0.try_wait().unwrap(),
    );
    assert!(!status.success(), "{name}: serve exited 0");
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
    // "listening" is said only once the storage is open.
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.0.stdout.take().unwrap(), &mut out).unwrap();
    assert!(!out.contains("listening"), "{name}: said {out:?} first");
    err
}

/// Bad storage configuration stops `serve` with one line that says what
/// to fix, and never the password: an unreachable database, wrong
/// credentials, a schema newer than the binary, a missing bucket.
#[test]
fn serve_refuses_bad_storage_in_one_line() {
    let test = "hub::postgres::serve_refuses_bad_storage";
    let Some(url) = testdb::fresh_database(test) else {
        return;
    };
    let port = testdb::cluster_port(test).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A database a newer hub migrated.
    let out = migrate(&[("LOGBOOK_STORAGE_DATABASE", &url)]);
    assert!(out.status.success(), "{out:?}");
    testdb::psql(&url, "INSERT INTO logbook_schema (version) VALUES (99)");
    let wrong_password = format!(
        "postgres://{}:wrong@127.0.0.1:{port}/postgres",
        testdb::PASSWORD_ROLE
    );
    let unreachable = format!("postgres://hub:wrong@127.0.0.1:{closed}/logbook");
    let cases = [
        (
            "hub_serve_unreachable",
            unreachable.as_str(),
            format!("logbook-hub: database postgres://hub:***@127.0.0.1:{closed}/logbook: error connecting to server: Connection refused"),
        ),
        (
            "hub_serve_wrong_password",
            wrong_password.as_str(),
            format!(
                "logbook-hub: database postgres://{}:***@127.0.0.1:{port}/postgres: db error: FATAL: password authentication failed for user \"{}\"",
                testdb::PASSWORD_ROLE,
                testdb::PASSWORD_ROLE
            ),
        ),
        (
            "hub_serve_newer_schema",
            url.as_str(),
            format!(
                "logbook-hub: database {url} has schema version 99, newer than this logbook-hub understands"
            ),
        ),
    ];
    for (name, db, want) in &cases {
        let err = serve_refused(name, &[("LOGBOOK_STORAGE_DATABASE", db)]);
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with(want.as_str()), "{name}: {err}");
        assert!(!err.contains("wrong"), "{name}: password shown: {err}");
    }
    // The same for the bucket, on a reachable S3 server.
    let Some(bucket) = testbucket::fresh_bucket(test) else {
        return;
    };
    let env: Vec<(&str, String)> = bucket.env();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    env.push(("LOGBOOK_STORAGE_BLOBS", "s3://no-such-bucket/hub"));
    let err = serve_refused("hub_serve_no_bucket", &env);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with(
            "logbook-hub: storage.blobs s3://no-such-bucket/hub: the bucket does not exist"
        ),
        "{err}"
    );
}
