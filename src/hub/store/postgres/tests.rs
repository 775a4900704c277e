//! What only the PostgreSQL backend has: its migrations (version readable
//! by an operator, a newer schema refused, two hubs migrating at once), its
//! month partitions, and one-line errors for bad configuration.

use super::testdb::{cluster_port, fresh_database, PASSWORD_ROLE};
use super::PgStore;
use crate::hub::store::tests::{batch, rec, scope, session_uuid};
use crate::hub::store::Store;
use crate::hub::store::StoreError;
use crate::wire::Level;

async fn query_i64(url: &str, sql: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.query_one(sql, &[]).await.unwrap().get(0)
}

async fn execute(url: &str, sql: &str) {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client.batch_execute(sql).await.unwrap();
}

#[tokio::test]
async fn two_hubs_migrating_at_once_both_open_and_the_version_is_readable() {
    let Some(url) = fresh_database("postgres::two_hubs_migrating_at_once") else {
        return;
    };
    let (a, b) = tokio::join!(PgStore::migrate_url(&url), PgStore::migrate_url(&url));
    let known = PgStore::schema_version();
    assert_eq!((a.unwrap(), b.unwrap()), (known, known));
    // What an operator reads.
    assert_eq!(
        query_i64(&url, "SELECT max(version)::bigint FROM logbook_schema").await,
        PgStore::schema_version()
    );
    assert_eq!(
        query_i64(&url, "SELECT count(*) FROM logbook_schema").await,
        known
    );
    PgStore::open(&url).await.unwrap();
}

#[tokio::test]
async fn a_newer_schema_is_refused_untouched() {
    let Some(url) = fresh_database("postgres::a_newer_schema_is_refused") else {
        return;
    };
    PgStore::migrate_url(&url).await.unwrap();
    execute(&url, "INSERT INTO logbook_schema (version) VALUES (99)").await;
    let err = PgStore::open(&url).await.err().unwrap();
    assert!(matches!(err, StoreError::NewerSchema { found: 99, .. }));
    let text = err.to_string();
    assert!(!text.contains('\n'), "{text}");
    assert!(
        text.contains(&format!(
            "schema version 99, newer than this logbook-hub understands ({})",
            PgStore::schema_version()
        )),
        "{text}"
    );
    assert_eq!(
        query_i64(&url, "SELECT max(version)::bigint FROM logbook_schema").await,
        99
    );
}

#[tokio::test]
async fn unreachable_database_and_wrong_password_are_one_line_each() {
    let Some(port) = cluster_port("postgres::unreachable_database_and_wrong_password") else {
        return;
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let check = async |url: String, want: &str| {
        let text = PgStore::open(&url).await.err().unwrap().to_string();
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains(want), "{text:?} lacks {want:?}");
        assert!(!text.contains("wrong"), "the password leaked: {text}");
    };
    check(
        format!("postgres://{PASSWORD_ROLE}:wrong@127.0.0.1:{closed}/postgres"),
        &format!("database postgres://{PASSWORD_ROLE}:***@127.0.0.1:{closed}/postgres: "),
    )
    .await;
    check(
        format!("postgres://{PASSWORD_ROLE}:wrong@127.0.0.1:{port}/postgres"),
        "password authentication failed",
    )
    .await;
    check(
        format!("postgres://postgres@127.0.0.1:{port}/no_such_db"),
        "database \"no_such_db\" does not exist",
    )
    .await;
}

#[tokio::test]
async fn records_land_in_their_month_partition() {
    let Some(url) = fresh_database("postgres::records_land_in_their_month_partition") else {
        return;
    };
    let store = PgStore::open(&url).await.unwrap();
    let mut december = rec(1, Some(session_uuid(1)), Level::Info, "m", "in december");
    december.timestamp_ns = 1_796_403_600_000_000_000; // 2026-12-04
    let mut january = rec(2, Some(session_uuid(1)), Level::Info, "m", "in january");
    january.timestamp_ns = 1_798_761_600_000_000_000; // 2027-01-01
    let epoch = rec(3, Some(session_uuid(1)), Level::Info, "m", "clock unset");
    store
        .ingest(
            &scope("r1"),
            batch("r1", vec![], vec![december, january, epoch], vec![]),
            false,
        )
        .await
        .unwrap();
    for (table, n) in [
        ("logs_y2026m12", 1),
        ("logs_y2027m01", 1),
        ("logs_other", 1),
    ] {
        assert_eq!(
            query_i64(&url, &format!("SELECT count(*) FROM ONLY {table}")).await,
            n,
            "{table}"
        );
    }
    // A second store (another replica) finds the partitions made.
    let other = PgStore::open(&url).await.unwrap();
    let mut later = rec(4, Some(session_uuid(1)), Level::Info, "m", "later");
    later.timestamp_ns = 1_796_403_600_000_000_001;
    other
        .ingest(
            &scope("r1"),
            batch("r1", vec![], vec![later], vec![]),
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        query_i64(&url, "SELECT count(*) FROM ONLY logs_y2026m12").await,
        2
    );
}

#[tokio::test]
async fn a_batch_sent_to_two_replicas_at_once_is_stored_once_and_acked_by_both() {
    let Some(url) = fresh_database("postgres::a_batch_sent_to_two_replicas_at_once") else {
        return;
    };
    let (a, b) = (
        PgStore::open(&url).await.unwrap(),
        PgStore::open(&url).await.unwrap(),
    );
    let s = session_uuid(7);
    let records: Vec<_> = (1..=200)
        .map(|seq| rec(seq, Some(s), Level::Info, "m", "same batch"))
        .collect();
    let sent = batch("r1", vec![], records, vec![]);
    let device = scope("r1");
    let (x, y) = tokio::join!(
        a.ingest(&device, sent.clone(), false),
        b.ingest(&device, sent.clone(), false)
    );
    let (x, y) = (x.unwrap().ack, y.unwrap().ack);
    assert_eq!(x.stored + y.stored, 200);
    assert_eq!(x.duplicates + y.duplicates, 200);
    assert_eq!(x.acked, y.acked);
    assert_eq!(query_i64(&url, "SELECT count(*) FROM logs").await, 200);
}

/// The live fan-out: a commit on one store is heard by another store on
/// the same database (never by its own), with the streams it changed; a
/// cut listening connection comes back and says every stream may be behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_are_heard_by_the_other_replicas_and_a_cut_feed_resyncs() {
    use crate::hub::store::{Changed, Heard};
    use crate::wire::SessionStatus;
    use tokio_util::sync::CancellationToken;

    let Some(url) = fresh_database("postgres::commits_are_heard") else {
        return;
    };
    let a = PgStore::open(&url).await.unwrap();
    let b = std::sync::Arc::new(PgStore::open(&url).await.unwrap());
    let stop = CancellationToken::new();
    let follow = |store: std::sync::Arc<PgStore>| {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = stop.clone();
        tokio::spawn(async move {
            store
                .follow_commits(Box::new(move |h| tx.send(h).unwrap()), stop)
                .await
        });
        rx
    };
    let mut heard_b = follow(b.clone());
    assert_eq!(
        heard_b.recv().await,
        Some(Heard::Resync),
        "listening starts"
    );
    // A's own commits are not heard back by A (it wakes its streams itself).
    let a = std::sync::Arc::new(a);
    let mut heard_a = follow(a.clone());
    assert_eq!(heard_a.recv().await, Some(Heard::Resync));

    let s = session_uuid(1);
    let ing = a
        .ingest(
            &scope("robot-1"),
            batch(
                "robot-1",
                vec![crate::hub::store::tests::state(
                    s,
                    1,
                    SessionStatus::Active,
                    &[],
                )],
                vec![
                    rec(1, Some(s), Level::Info, "nav", "in a session"),
                    rec(2, None, Level::Info, "boot", "outside"),
                ],
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    let Some(Heard::Changed(c)) = heard_b.recv().await else {
        panic!("B hears A's commit");
    };
    assert_eq!(c, ing.changed);
    assert_eq!(c.sessions.len(), 1);
    assert_eq!(c.devices.len(), 1);
    assert!(c.ended.is_empty());
    let ended = a
        .ingest(
            &scope("robot-1"),
            batch(
                "robot-1",
                vec![crate::hub::store::tests::state(
                    s,
                    2,
                    SessionStatus::Completed,
                    &[],
                )],
                vec![],
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        heard_b.recv().await,
        Some(Heard::Changed(Changed {
            ended: ended.changed.ended.clone(),
            ..Changed::default()
        }))
    );
    assert_eq!(ended.changed.ended, c.sessions);

    // Both listeners cut: each comes back and resyncs.
    let killed = super::testdb::psql(
        &url,
        &format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = '{}' AND datname = current_database()",
            super::notify::APPLICATION_NAME
        ),
    );
    assert_eq!(killed.trim(), "2");
    assert_eq!(heard_b.recv().await, Some(Heard::Resync));
    assert_eq!(heard_a.recv().await, Some(Heard::Resync));
    assert!(heard_a.try_recv().is_err(), "A never hears itself");
    stop.cancel();
}
