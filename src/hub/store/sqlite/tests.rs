//! Tests of what only the SQLite backend has: its migrations under
//! `user_version`, its FTS5 queries and index. The behaviour every backend
//! shares is tested in `hub::store::tests`, through the trait.

use rusqlite::Connection;

use super::logs::fts_query;
use super::*;
use crate::hub::store::tests::{batch, rec, scope, session_uuid, state};
use crate::wire::SessionStatus;

#[test]
fn migrations_run_once_and_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(Db::open(&path).unwrap());
    drop(Db::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    let v: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(v, MIGRATIONS.len() as i64);
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = Db::open(&path).err().unwrap().to_string();
    assert!(
        err.contains("schema version 99, newer than this logbook-hub understands"),
        "{err}"
    );
}

/// Replicas (or `migrate` beside `serve`) opening one fresh file at once:
/// each migration runs once and every opener succeeds.
#[test]
fn openers_racing_on_a_fresh_file_all_succeed() {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let start = std::sync::Arc::new(std::sync::Barrier::new(4));
        let openers: Vec<_> = (0..4)
            .map(|_| {
                let (path, start) = (path.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    Db::open(&path).map(drop).map_err(|e| e.to_string())
                })
            })
            .collect();
        for o in openers {
            o.join().unwrap().unwrap();
        }
    }
}

/// Migration 7: the index merges 16 segments at a time (issue 18), a
/// setting FTS5 keeps in the index's own config table.
#[test]
fn the_fts_index_merges_sixteen_segments_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(Db::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    let v: i64 = conn
        .query_row(
            "SELECT v FROM logs_fts_config WHERE k = 'automerge'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(v, 16);
}

#[test]
fn fts_queries_quote_user_text() {
    let check = |s: &str, want: Option<&str>| assert_eq!(fts_query(s).as_deref(), want, "{s}");
    check("obstacle", Some("\"obstacle\""));
    check("Detected 5", Some("\"Detected\" AND \"5\""));
    check("a\"b OR c", Some("\"a\" AND \"b\" AND \"OR\" AND \"c\""));
    check("  ;; ", None);
}

#[tokio::test]
async fn a_deleted_session_leaves_nothing_in_the_full_text_index() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    let s = session_uuid(4);
    let recs = vec![rec(1, Some(s), Level::Info, "m", "gone soon")];
    let states = vec![state(s, 1, SessionStatus::Active, &[])];
    store
        .ingest(&scope("r1"), batch("r1", states, recs, vec![]), false)
        .await
        .unwrap();
    let count = |sql: &'static str| {
        store
            .db
            .read(|c| Ok(c.query_row(sql, [], |r| r.get::<_, i64>(0))?))
            .unwrap()
    };
    let indexed = "SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'gone'";
    assert_eq!(count(indexed), 1);
    store
        .delete_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM logs"), 0);
    assert_eq!(
        count(indexed),
        0,
        "the deleted message left the full-text index"
    );
}

/// A session's first errors are read from the partial index of error rows
/// (migration 6), never by walking all of the session's records.
#[test]
fn first_errors_read_only_the_error_index() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(Db::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    let sql = crate::hub::store::first_errors_sql("?1", "?2");
    let plan: Vec<String> = conn
        .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
        .unwrap()
        .query_map((1, 10), |r| r.get(3))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap();
    assert!(
        plan.iter()
            .any(|step| step.contains("USING INDEX logs_session_errors")),
        "{plan:#?}"
    );
}
