//! Tests of what only the SQLite backend has: its migrations under
//! `user_version`, its FTS5 queries and index. The behaviour every backend
//! shares is tested in `hub::store::tests`, through the trait.

use rusqlite::Connection;
use uuid::Uuid;

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

/// Writes `n` transactions of about 64 KiB each through the writer,
/// calling `after` with the WAL's size after each.
fn write_blobs(db: &Db, n: usize, mut after: impl FnMut(u64)) {
    let wal = db.path.with_file_name("hub.db-wal");
    db.write(|tx| Ok(tx.execute_batch("CREATE TABLE IF NOT EXISTS blobs (b BLOB)")?))
        .unwrap();
    for _ in 0..n {
        db.write(|tx| Ok(tx.execute("INSERT INTO blobs VALUES (randomblob(65536))", [])?))
            .unwrap();
        after(std::fs::metadata(&wal).map_or(0, |m| m.len()));
    }
}

#[test]
fn commits_are_checkpointed_on_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    // A limit never reached: only the checkpointer thread copies pages.
    let db = Db::open_with(&path, u64::MAX).unwrap();
    let before = std::fs::metadata(&path).unwrap().len();
    write_blobs(&db, 64, |_| {});
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::metadata(&path).unwrap().len() < before + (4 << 20) {
        assert!(
            std::time::Instant::now() < deadline,
            "the 4 MiB committed never reached the database file"
        );
        // Each commit wakes it; it copies what is committed by then.
        write_blobs(&db, 1, |_| {});
    }
}

#[test]
fn the_wal_stays_within_its_limit_however_fast_commits_come() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 1 << 20;
    let db = Db::open_with(&dir.path().join("hub.db"), limit).unwrap();
    let mut most = 0;
    write_blobs(&db, 200, |wal| most = most.max(wal));
    // Past the limit by at most the transaction that crossed it (and
    // SQLite's page headers).
    assert!(most <= limit + (80 << 10), "the WAL reached {most} bytes");
}

/// Keys made before keys could be scoped (schema 8) read their whole
/// organization after the migration, whatever project they name; device
/// tokens stay bound to theirs.
#[test]
fn keys_from_before_project_scopes_stay_organization_wide() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let conn = Connection::open(&path).unwrap();
    for sql in &MIGRATIONS[..8] {
        conn.execute_batch(sql).unwrap();
    }
    conn.pragma_update(None, "user_version", 8).unwrap();
    conn.execute_batch(
        "INSERT INTO tokens VALUES ('op', 'operator', 'acme', 'warehouse', NULL, 1);
         INSERT INTO tokens VALUES ('dev', 'device', 'acme', 'warehouse', 'robot-1', 1);",
    )
    .unwrap();
    drop(conn);
    let db = Db::open(&path).unwrap();
    let op = db.find_token("op").unwrap().unwrap();
    assert!(op.all_projects && op.reads("acme", "lab"), "{op:?}");
    let dev = db.find_token("dev").unwrap().unwrap();
    assert!(!dev.all_projects, "{dev:?}");
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

/// The index merges 16 segments at a time (issue 18), a setting FTS5
/// keeps in the index's own config table.
#[test]
fn the_fts_index_merges_sixteen_segments_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    drop(Db::open(&path).unwrap());
    let conn = Connection::open(dir.path().join("hub-search.db")).unwrap();
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
    store.catch_up();
    let count = |sql| count(&store, sql);
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

/// The one number `sql` selects, read on a reader connection.
fn count(store: &SqliteStore, sql: &str) -> i64 {
    store
        .db
        .read(|c| Ok(c.query_row(sql, [], |r| r.get::<_, i64>(0))?))
        .unwrap()
}

/// The records' seqs a search finds in a session, newest first.
async fn found(store: &SqliteStore, pk: i64, search: &str) -> Vec<u64> {
    store
        .logs(
            LogScope::Session(pk),
            &LogQuery {
                search: Some(search.into()),
                limit: 500,
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .items
        .iter()
        .map(|r| r.seq)
        .collect()
}

/// Runs of one session's records are indexed as blocks of at most 64; a search still answers per record and per whole
/// word, and deleting a session forgets its blocks word for word.
#[tokio::test]
async fn blocks_of_records_answer_searches_as_records_do() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    let (a, b) = (session_uuid(5), session_uuid(6));
    let msg = |seq: u64| match seq {
        70 => "obstacle seen".to_owned(),
        71 => "Obstacles SEEN".to_owned(),
        _ => format!("step {seq} ok"),
    };
    // Seqs 1..=100 in A, 101..=103 in B, 104..=108 in A again, 109..=110
    // without a session: blocks 1-64, 65-100, 101-103, 104-108, 109-110.
    let recs = (1..=110)
        .map(|seq| {
            let session = match seq {
                101..=103 => Some(b),
                109.. => None,
                _ => Some(a),
            };
            rec(seq, session, Level::Info, "m", &msg(seq))
        })
        .collect();
    let states = vec![
        state(a, 1, SessionStatus::Active, &[]),
        state(b, 1, SessionStatus::Active, &[]),
    ];
    store
        .ingest(&scope("r1"), batch("r1", states, recs, vec![]), false)
        .await
        .unwrap();
    store.catch_up();
    let count = |sql| count(&store, sql);
    assert_eq!(count("SELECT count(*) FROM fts_blocks"), 5);
    assert_eq!(
        count("SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'step'"),
        5
    );
    let pk = |s: Uuid| {
        let s = s.to_string();
        let store = &store;
        async move {
            store
                .find_session("acme", "warehouse", &s)
                .await
                .unwrap()
                .unwrap()
        }
    };
    let (pa, pb) = (pk(a).await, pk(b).await);
    // Whole words per record, though 70 and 71 share a block.
    assert_eq!(found(&store, pa, "obstacle").await, vec![70]);
    assert_eq!(found(&store, pa, "OBSTACLES").await, vec![71]);
    assert_eq!(found(&store, pa, "seen").await, vec![71, 70]);
    // Words from two records of one block are not one record's.
    assert_eq!(found(&store, pa, "obstacle 64").await, Vec::<u64>::new());
    // Either side of a block's edge, and in the second run of A.
    assert_eq!(found(&store, pa, "step 64").await, vec![64]);
    assert_eq!(found(&store, pa, "step 65").await, vec![65]);
    assert_eq!(found(&store, pa, "step 104 ok").await, vec![104]);
    assert_eq!(found(&store, pb, "step 102").await, vec![102]);
    assert_eq!(found(&store, pb, "step 104").await, Vec::<u64>::new());
    assert_eq!(found(&store, pa, "ok").await.len(), 103);

    store
        .delete_session("acme", "warehouse", &a.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(count("SELECT count(*) FROM fts_blocks"), 2);
    assert_eq!(
        count("SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'step'"),
        2,
        "B's block and the device's stay, A's three are gone"
    );
    assert_eq!(
        count("SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'obstacle OR seen OR 70'"),
        0
    );
    store
        .db
        .index
        .lock()
        .execute_batch("INSERT INTO logs_fts (logs_fts) VALUES ('integrity-check')")
        .unwrap();
    assert_eq!(found(&store, pb, "step 102").await, vec![102]);
}

/// The index's watermark and the highest record id.
fn watermark(store: &SqliteStore) -> (i64, i64) {
    (
        count(store, "SELECT indexed FROM search.state"),
        count(store, "SELECT coalesce(max(id), 0) FROM logs"),
    )
}

/// Stores `messages` as seqs `from..` of session `s` on device r1.
async fn store_in(store: &SqliteStore, s: Uuid, from: u64, messages: &[&str]) -> i64 {
    let recs = (from..)
        .zip(messages)
        .map(|(seq, m)| rec(seq, Some(s), Level::Info, "m", m))
        .collect();
    let states = vec![state(s, 1, SessionStatus::Active, &[])];
    store
        .ingest(&scope("r1"), batch("r1", states, recs, vec![]), false)
        .await
        .unwrap();
    store
        .find_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap()
}

/// A record is found from the moment its batch is stored, whether the
/// indexer has reached it or not: past the watermark, searches read the
/// records one by one.
#[tokio::test]
// Held on purpose: ingest and search never take the index's writer.
#[allow(clippy::await_holding_lock)]
async fn records_the_indexer_has_not_reached_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    let s = session_uuid(8);
    let pk = store_in(&store, s, 1, &["motor stalled", "motor ok"]).await;
    store.catch_up();
    assert_eq!(watermark(&store), (2, 2));
    {
        // The indexer cannot pass while its writer is held.
        let _held = store.db.index.lock();
        store_in(&store, s, 3, &["motor stalled again", "lidar ok"]).await;
        assert_eq!(watermark(&store), (2, 4), "the tail is not indexed");
        assert_eq!(found(&store, pk, "stalled").await, vec![3, 1]);
        assert_eq!(found(&store, pk, "ok").await, vec![4, 2]);
        assert_eq!(found(&store, pk, "lidar").await, vec![4]);
        assert_eq!(found(&store, pk, "Motor STALLED").await, vec![3, 1]);
        assert_eq!(found(&store, pk, "stall").await, Vec::<u64>::new());
    }
    store.catch_up();
    assert_eq!(watermark(&store), (4, 4));
    assert_eq!(found(&store, pk, "stalled").await, vec![3, 1]);
    assert_eq!(found(&store, pk, "lidar").await, vec![4]);
}

/// Deleting the newest session frees its ids, and SQLite hands them out
/// again: the watermark falls below them, so the records that take them
/// are searched as the tail, then indexed, never taken for indexed.
#[tokio::test]
// Held on purpose: ingest and search never take the index's writer.
#[allow(clippy::await_holding_lock)]
async fn ids_freed_by_a_delete_and_taken_again_are_found() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    let (a, b) = (session_uuid(9), session_uuid(10));
    store_in(&store, a, 1, &["first words", "first words too"]).await;
    store.catch_up();
    assert_eq!(watermark(&store), (2, 2));
    store
        .delete_session("acme", "warehouse", &a.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(watermark(&store), (0, 0));
    let _held = store.db.index.lock();
    let pb = store_in(&store, b, 1, &["second run", "second words"]).await;
    assert_eq!(watermark(&store), (0, 2), "the freed ids were taken again");
    assert_eq!(found(&store, pb, "second").await, vec![2, 1]);
    assert_eq!(found(&store, pb, "first").await, Vec::<u64>::new());
    drop(_held);
    store.catch_up();
    assert_eq!(found(&store, pb, "words").await, vec![2]);
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'first'"
        ),
        0,
        "A's words left the index"
    );
}

/// The index is derived from the database and rebuilt when it is not the
/// database's: here the database is restored from a backup taken before
/// a session's delete and more records, while the index saw both.
#[tokio::test]
async fn an_index_ahead_of_a_restored_database_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let backup = dir.path().join("backup.db");
    let (a, b) = (session_uuid(11), session_uuid(12));
    {
        let store = SqliteStore::open(&path).unwrap();
        store_in(&store, a, 1, &["alpha one", "alpha two"]).await;
        store.catch_up();
        let sql = format!("VACUUM INTO '{}'", backup.display());
        store.db.read(|c| Ok(c.execute_batch(&sql)?)).unwrap();
        store
            .delete_session("acme", "warehouse", &a.to_string())
            .await
            .unwrap()
            .unwrap();
        store_in(&store, b, 1, &["beta one", "beta two", "beta three"]).await;
        store.catch_up();
        assert_eq!(watermark(&store), (3, 3));
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    std::fs::rename(&backup, &path).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let pa = store
        .find_session("acme", "warehouse", &a.to_string())
        .await
        .unwrap()
        .unwrap();
    // Before and after the rebuild reaches the records.
    assert_eq!(found(&store, pa, "alpha").await, vec![2, 1]);
    store.catch_up();
    assert_eq!(watermark(&store), (2, 2));
    assert_eq!(found(&store, pa, "alpha").await, vec![2, 1]);
    assert_eq!(found(&store, pa, "two").await, vec![2]);
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'beta'"
        ),
        0
    );
}

/// A hub upgraded from schema 10 (the index inside the database) keeps
/// its records searchable: migration 11 drops the old index, and the new
/// one is built from the records.
#[tokio::test]
async fn a_hub_from_before_the_index_file_is_searchable() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let s = session_uuid(13);
    {
        let store = SqliteStore::open(&path).unwrap();
        store_in(&store, s, 1, &["old record", "older record"]).await;
    }
    {
        // Back to schema 10: the index in the database, as it was.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE search_epoch;
             CREATE VIRTUAL TABLE logs_fts USING fts5 (message, content = '', columnsize = 0, detail = none);
             CREATE TABLE fts_blocks (first INTEGER PRIMARY KEY, last INTEGER NOT NULL);
             INSERT INTO logs_fts (rowid, message) SELECT id, message FROM logs;
             PRAGMA user_version = 10;",
        )
        .unwrap();
    }
    std::fs::remove_file(dir.path().join("hub-search.db")).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let pk = store
        .find_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found(&store, pk, "record").await, vec![2, 1]);
    store.catch_up();
    assert_eq!(watermark(&store), (2, 2));
    assert_eq!(found(&store, pk, "older").await, vec![2]);
    let old: i64 = Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_schema WHERE name IN ('logs_fts', 'fts_blocks')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(old, 0, "the old index is gone from the database");
}

/// A damaged index file does not keep the hub from starting: it is
/// replaced and rebuilt from the records.
#[tokio::test]
async fn a_damaged_index_file_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hub.db");
    let s = session_uuid(14);
    {
        let store = SqliteStore::open(&path).unwrap();
        store_in(&store, s, 1, &["kept words", "more kept words"]).await;
        store.catch_up();
    }
    let index = dir.path().join("hub-search.db");
    std::fs::write(&index, vec![0x5a; 64 * 1024]).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    let pk = store
        .find_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found(&store, pk, "kept").await, vec![2, 1]);
    store.catch_up();
    assert_eq!(watermark(&store), (2, 2));
    assert_eq!(found(&store, pk, "more").await, vec![2]);
}

/// An index holding a block where the records say there is none (here
/// planted at the next record's id) is emptied and built again when a
/// pass runs into it, rather than failing at every commit.
#[tokio::test]
async fn an_index_that_disagrees_with_the_records_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("hub.db")).unwrap();
    let s = session_uuid(15);
    let pk = store_in(&store, s, 1, &["first one"]).await;
    store.catch_up();
    store
        .db
        .index
        .lock()
        .execute_batch(
            "INSERT INTO logs_fts (rowid, message) VALUES (2, 'planted');
             INSERT INTO fts_blocks VALUES (2, 2, NULL);",
        )
        .unwrap();
    store_in(&store, s, 2, &["second one"]).await;
    store.catch_up();
    assert_eq!(watermark(&store), (2, 2));
    assert_eq!(found(&store, pk, "one").await, vec![2, 1]);
    assert_eq!(
        count(
            &store,
            "SELECT count(*) FROM logs_fts WHERE logs_fts MATCH 'planted'"
        ),
        0
    );
}
