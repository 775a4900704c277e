//! The store's test suite, written against the [`Store`] trait and run
//! against every backend (`per_backend!` below): idempotent ingest,
//! session revisions, gaps, search, deletion, keyset pagination and the
//! live stream's reads. What only one backend has (its migrations, its
//! indexes) is tested beside it.

use std::sync::Arc;

use super::*;
use crate::wire::{Device, Gap, Package, Record, SessionState, BATCH_VERSION};
use uuid::Uuid;

/// Each test of the suite as a `#[tokio::test]` per backend, on a fresh
/// store: SQLite in a temporary directory, PostgreSQL in a fresh database
/// of this process's throwaway cluster (`postgres::testdb`).
macro_rules! per_backend {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = crate::hub::store::SqliteStore::open(&dir.path().join("hub.db"))
                        .unwrap();
                    super::$test(&store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    // Skips with a notice where PostgreSQL is not installed
                    // (never under CI).
                    let Some(url) = crate::hub::store::postgres::testdb::fresh_database(
                        concat!("postgres::", stringify!($test)),
                    ) else {
                        return;
                    };
                    let store = crate::hub::store::PgStore::open(&url).await.unwrap();
                    super::$test(&store).await;
                }
            )*
        }
    };
}

per_backend!(
    ingest_is_idempotent_per_device_and_seq,
    newest_revision_wins_and_gaps_keep_the_maximum,
    filters_search_and_cursors,
    totals_count_exactly_what_matches,
    delete_removes_everything_and_stays_deleted,
    session_list_filters_sorts_and_pages,
    logs_after_an_id_page_through_one_session_in_commit_order,
    level_histogram_counts_each_slice_in_one_pass,
    first_errors_are_one_per_module_earliest_first,
    signins_refer_to_their_token_expire_and_are_bounded,
    keys_keep_their_project_scope_and_projects_are_listed,
    marks_are_kept_once_at_their_newest_revision_and_filter_sessions,
    the_latest_agent_report_is_kept_per_device,
    a_sessions_unfinished_uploads_by_path,
    every_record_is_found_once_its_batch_is_stored,
);

pub(super) fn scope(device: &str) -> DeviceScope {
    DeviceScope {
        org: "acme".into(),
        project: "warehouse".into(),
        device_id: device.into(),
    }
}

pub(super) fn session_uuid(n: u128) -> Uuid {
    Uuid::from_u128(0x0193_0000_0000_7000_8000_0000_0000_0000 + n)
}

pub(super) fn rec(
    seq: u64,
    session: Option<Uuid>,
    level: Level,
    module: &str,
    message: &str,
) -> Record {
    Record {
        seq,
        session_id: session,
        timestamp_ns: 1_000 + seq as i64,
        level,
        module: module.into(),
        message: message.into(),
        metadata: String::new(),
        pid: Some(1),
        uid: Some(2),
        gid: Some(3),
        process: Some("proc".into()),
    }
}

pub(super) fn state(id: Uuid, revision: u64, status: SessionStatus, tags: &[&str]) -> SessionState {
    SessionState {
        id,
        revision,
        status,
        started_at_ns: 1_000,
        ended_at_ns: (status != SessionStatus::Active).then_some(9_000),
        duration_ns: Some(8_000),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        package: Some(Package {
            name: "perception".into(),
            version: Some("2.1.0".into()),
        }),
        metadata: serde_json::json!({"site": "berlin"})
            .as_object()
            .unwrap()
            .clone(),
        error: None,
    }
}

pub(super) fn batch(
    device: &str,
    sessions: Vec<SessionState>,
    records: Vec<Record>,
    gaps: Vec<Gap>,
) -> Arc<Batch> {
    Arc::new(Batch {
        marks: Vec::new(),
        agent: None,
        version: BATCH_VERSION,
        device: Device {
            id: device.into(),
            name: format!("{device}-name"),
        },
        sent_at_ns: 0,
        sessions,
        records,
        gaps,
    })
}

/// A v4 batch's report lands on its device row; a batch without one (an
/// agent sending v3) leaves the last one there; another device's is its own.
async fn the_latest_agent_report_is_kept_per_device(store: &dyn Store) {
    let report = |bytes: u64, evicted: u64| crate::wire::AgentReport {
        version: "1.2.3".into(),
        buffer_bytes: bytes,
        buffer_max_bytes: 256 << 20,
        dropped: vec![("evicted".into(), evicted), ("bad_json".into(), 2)],
    };
    let with = |device: &str, seq: u64, agent: Option<crate::wire::AgentReport>| {
        let mut b = (*batch(
            device,
            vec![],
            vec![rec(seq, None, Level::Info, "m", "x")],
            vec![],
        ))
        .clone();
        b.agent = agent;
        Arc::new(b)
    };
    store
        .ingest(&scope("r1"), with("r1", 1, None), false)
        .await
        .unwrap();
    let d = store
        .find_device("acme", "warehouse", "r1")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.report, None);
    store
        .ingest(&scope("r1"), with("r1", 2, Some(report(1 << 20, 5))), false)
        .await
        .unwrap();
    store
        .ingest(&scope("r1"), with("r1", 3, Some(report(2 << 20, 7))), false)
        .await
        .unwrap();
    store
        .ingest(&scope("r1"), with("r1", 4, None), false)
        .await
        .unwrap();
    store
        .ingest(&scope("r2"), with("r2", 1, Some(report(9, 0))), false)
        .await
        .unwrap();
    let d = store
        .find_device("acme", "warehouse", "r1")
        .await
        .unwrap()
        .unwrap();
    let r = d.report.expect("a report");
    let mut want = report(2 << 20, 7);
    // Stored by reason.
    want.dropped.sort();
    assert_eq!(r.agent, want);
    assert!(r.reported_at_ns > 0 && r.reported_at_ns <= d.last_seen_ns);
    let all = store.list_devices("acme", "warehouse").await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].report.as_ref().unwrap().agent, want);
    assert_eq!(all[1].report.as_ref().unwrap().agent.buffer_bytes, 9);
}

/// Uploads in progress are listed per session, by path, up to the limit.
async fn a_sessions_unfinished_uploads_by_path(store: &dyn Store) {
    let s = session_uuid(1);
    let (session_pk, device_pk) = store
        .session_for_device(&scope("r1"), s)
        .await
        .unwrap()
        .unwrap();
    let (other_pk, _) = store
        .session_for_device(&scope("r1"), session_uuid(2))
        .await
        .unwrap()
        .unwrap();
    for (id, pk, path) in [
        ("u1", session_pk, "b.bin"),
        ("u2", session_pk, "a.bin"),
        ("u3", other_pk, "c.bin"),
    ] {
        store
            .create_upload(&UploadRow {
                id: id.into(),
                device_pk,
                session_pk: pk,
                path: path.into(),
                content_type: "application/octet-stream".into(),
                sha256: "0".repeat(64),
                length: 100,
                metadata: String::new(),
                created_at_ns: 1,
            })
            .await
            .unwrap();
    }
    let ids = |rows: Vec<UploadRow>| rows.into_iter().map(|u| u.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.session_uploads(session_pk, 10).await.unwrap()),
        ["u2", "u1"]
    );
    assert_eq!(
        ids(store.session_uploads(session_pk, 1).await.unwrap()),
        ["u2"]
    );
    assert_eq!(
        ids(store.session_uploads(other_pk, 10).await.unwrap()),
        ["u3"]
    );
    store.delete_upload("u2").await.unwrap();
    assert_eq!(
        ids(store.session_uploads(session_pk, 10).await.unwrap()),
        ["u1"]
    );
}

async fn all_logs(store: &dyn Store, pk: i64, q: LogQuery) -> Vec<u64> {
    store
        .logs(LogScope::Session(pk), &LogQuery { limit: 500, ..q })
        .await
        .unwrap()
        .items
        .iter()
        .map(|r| r.seq)
        .collect()
}

/// The search bound (issue 18): under sustained ingest from two devices,
/// a search right after a batch is stored finds every record of it, and
/// every record stored before, whatever the full-text index has reached
/// (on SQLite its indexer works beside ingest, behind it).
async fn every_record_is_found_once_its_batch_is_stored(store: &dyn Store) {
    const BATCHES: u64 = 60;
    const PER_BATCH: u64 = 50;
    let (a, b) = (session_uuid(40), session_uuid(41));
    let load = |device: &'static str, s: Uuid| async move {
        for n in 0..BATCHES {
            let recs = (1..=PER_BATCH)
                .map(|i| {
                    let seq = n * PER_BATCH + i;
                    rec(
                        seq,
                        Some(s),
                        Level::Info,
                        "nav",
                        &format!("ok batch{n} step {seq}"),
                    )
                })
                .collect();
            let states = vec![state(s, 1, SessionStatus::Active, &[])];
            store
                .ingest(&scope(device), batch(device, states, recs, vec![]), false)
                .await
                .unwrap();
            let pk = store
                .find_session("acme", "warehouse", &s.to_string())
                .await
                .unwrap()
                .unwrap();
            let search = |text: String| {
                all_logs(
                    store,
                    pk,
                    LogQuery {
                        search: Some(text),
                        ..Default::default()
                    },
                )
            };
            let found = search(format!("OK Batch{n}")).await;
            let want: Vec<u64> = (n * PER_BATCH + 1..=(n + 1) * PER_BATCH).rev().collect();
            assert_eq!(found, want, "{device}: batch {n} right after it was stored");
            let step = n * PER_BATCH / 2 + 1;
            let found = search(format!("step {step}")).await;
            assert_eq!(
                found,
                vec![step],
                "{device}: an older record after batch {n}"
            );
        }
    };
    tokio::join!(load("r1", a), load("r2", b));
}

async fn ingest_is_idempotent_per_device_and_seq(store: &dyn Store) {
    let s = session_uuid(1);
    let recs: Vec<Record> = (1..=10)
        .map(|i| rec(i, Some(s), Level::Info, "nav", "moving"))
        .collect();
    let first = store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![state(s, 1, SessionStatus::Active, &[])],
                recs[..6].to_vec(),
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    assert_eq!((first.ack.stored, first.ack.duplicates), (6, 0));
    // Overlap: 4..=10 again; 4, 5, 6 are duplicates.
    let second = store
        .ingest(
            &scope("r1"),
            batch("r1", vec![], recs[3..].to_vec(), vec![]),
            true,
        )
        .await
        .unwrap();
    assert_eq!((second.ack.stored, second.ack.duplicates), (4, 3));
    assert_eq!(second.ack.acked, vec![(4, 10)]);
    assert_eq!(second.live.len(), 4);
    let pk = store
        .find_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        all_logs(store, pk, LogQuery::default()).await,
        (1..=10).rev().collect::<Vec<_>>()
    );
    let row = store
        .get_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.level_counts[Level::Info.code() as usize], 10);
    // Another device may use the same seqs.
    let other = store
        .ingest(
            &scope("r2"),
            batch(
                "r2",
                vec![],
                recs[..2]
                    .iter()
                    .map(|r| Record {
                        session_id: None,
                        ..r.clone()
                    })
                    .collect(),
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    assert_eq!(other.ack.stored, 2);
    // A seq twice in one batch: the first is stored, the second is a
    // duplicate, and row ids follow the records' order.
    let twice = store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![],
                vec![
                    rec(12, Some(s), Level::Info, "nav", "first"),
                    rec(11, Some(s), Level::Info, "nav", "eleven"),
                    rec(12, Some(s), Level::Info, "nav", "second"),
                ],
                vec![],
            ),
            true,
        )
        .await
        .unwrap();
    assert_eq!((twice.ack.stored, twice.ack.duplicates), (2, 1));
    let live: Vec<(u64, &str)> = twice
        .live
        .iter()
        .map(|r| (r.seq, r.message.as_str()))
        .collect();
    assert_eq!(live, [(12, "first"), (11, "eleven")]);
    assert!(twice.live[0].id < twice.live[1].id, "ids in record order");
    assert_eq!(
        all_logs(store, pk, LogQuery::default()).await,
        (1..=12).rev().collect::<Vec<_>>()
    );
}

async fn newest_revision_wins_and_gaps_keep_the_maximum(store: &dyn Store) {
    let s = session_uuid(2);
    let gap = |n| Gap {
        session_id: Some(s),
        level: Level::Debug,
        reason: "evicted".into(),
        dropped: n,
    };
    store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![state(s, 2, SessionStatus::Active, &["a"])],
                vec![],
                vec![gap(10)],
            ),
            false,
        )
        .await
        .unwrap();
    store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![state(s, 3, SessionStatus::Completed, &["b"])],
                vec![],
                vec![gap(4312)],
            ),
            false,
        )
        .await
        .unwrap();
    // An older state and a smaller (stale) counter change nothing.
    let stale = store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![state(s, 1, SessionStatus::Active, &["c"])],
                vec![],
                vec![gap(7)],
            ),
            false,
        )
        .await
        .unwrap();
    assert_eq!(stale.ack.sessions, 0);
    let row = store
        .get_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.status, "completed");
    assert_eq!(row.tags, vec!["b"]);
    assert_eq!(
        row.gaps,
        vec![GapRow {
            level: Level::Debug,
            reason: "evicted".into(),
            dropped: 4312
        }]
    );
    // Another device cannot write into this session.
    let err = store
        .ingest(
            &scope("r2"),
            batch(
                "r2",
                vec![state(s, 9, SessionStatus::Failed, &[])],
                vec![],
                vec![],
            ),
            false,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
}

async fn filters_search_and_cursors(store: &dyn Store) {
    let s = session_uuid(3);
    let recs = vec![
        rec(1, Some(s), Level::Debug, "nav", "planning route"),
        rec(
            2,
            Some(s),
            Level::Error,
            "perception",
            "Detected 5 obstacles",
        ),
        rec(3, Some(s), Level::Warn, "perception", "lidar timeout"),
        rec(
            4,
            Some(s),
            Level::Fatal,
            "nav.planner",
            "obstacle too close",
        ),
        rec(5, Some(s), Level::Info, "perception", "detected nothing"),
    ];
    store
        .ingest(&scope("r1"), batch("r1", vec![], recs, vec![]), false)
        .await
        .unwrap();
    let pk = store
        .find_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    let check = async |q: LogQuery, want: &[u64]| assert_eq!(all_logs(store, pk, q).await, want);
    check(
        LogQuery {
            min_level: Some(Level::Warn),
            ..Default::default()
        },
        &[4, 3, 2],
    )
    .await;
    check(
        LogQuery {
            module: Some("perception".into()),
            ..Default::default()
        },
        &[5, 3, 2],
    )
    .await;
    check(
        LogQuery {
            module: Some("nav*".into()),
            ..Default::default()
        },
        &[4, 1],
    )
    .await;
    // Whole words: "obstacle" is not "obstacles".
    check(
        LogQuery {
            search: Some("obstacle".into()),
            ..Default::default()
        },
        &[4],
    )
    .await;
    check(
        LogQuery {
            search: Some("obstacles".into()),
            ..Default::default()
        },
        &[2],
    )
    .await;
    check(
        LogQuery {
            search: Some("DETECTED 5".into()),
            ..Default::default()
        },
        &[2],
    )
    .await;
    check(
        LogQuery {
            search: Some("\"); DROP".into()),
            ..Default::default()
        },
        &[],
    )
    .await;
    check(
        LogQuery {
            since_ns: Some(1_002),
            until_ns: Some(1_004),
            ..Default::default()
        },
        &[3, 2],
    )
    .await;
    check(
        LogQuery {
            ascending: true,
            cursor: Some(3),
            ..Default::default()
        },
        &[4, 5],
    )
    .await;
    check(
        LogQuery {
            cursor: Some(3),
            ..Default::default()
        },
        &[2, 1],
    )
    .await;
    let page = store
        .logs(
            LogScope::Session(pk),
            &LogQuery {
                limit: 2,
                want_total: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((page.total, page.next_cursor), (Some(5), Some(4)));
}

/// A page's total is every record its filters match, whether the store
/// counts rows or reads the session's counters (a level floor alone):
/// after batches that repeat records, and beside another session and a
/// device's records outside sessions.
async fn totals_count_exactly_what_matches(store: &dyn Store) {
    let (s, other) = (session_uuid(4), session_uuid(5));
    let levels = Level::ALL;
    let make = |seqs: std::ops::Range<u64>, session| {
        seqs.map(|seq| {
            let level = levels[(seq * 7 % 6) as usize];
            rec(seq, session, level, "nav", "route planned")
        })
        .collect::<Vec<_>>()
    };
    // Seqs 1-40 in the session, 41-50 in another, 51-55 outside any;
    // then 21-40 again with 56-70 (the repeats are not stored twice).
    let first = [
        make(1..41, Some(s)),
        make(41..51, Some(other)),
        make(51..56, None),
    ]
    .concat();
    let second = [make(21..41, Some(s)), make(56..71, Some(s))].concat();
    for recs in [first, second.clone(), second] {
        store
            .ingest(&scope("r1"), batch("r1", vec![], recs, vec![]), false)
            .await
            .unwrap();
    }
    let pk = store
        .find_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    let stored: Vec<u64> = (1..41).chain(56..71).collect();
    for floor in [None].into_iter().chain(levels.map(Some)) {
        for module in [None, Some("nav".to_owned())] {
            let q = LogQuery {
                min_level: floor,
                module: module.clone(),
                limit: 3,
                want_total: true,
                ..Default::default()
            };
            let want = stored
                .iter()
                .filter(|&&seq| floor.is_none_or(|f| levels[(seq * 7 % 6) as usize] >= f))
                .count() as u64;
            let page = store.logs(LogScope::Session(pk), &q).await.unwrap();
            assert_eq!(page.total, Some(want), "floor {floor:?}, module {module:?}");
        }
    }
}

async fn delete_removes_everything_and_stays_deleted(store: &dyn Store) {
    let s = session_uuid(4);
    store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![state(s, 1, SessionStatus::Active, &[])],
                vec![rec(1, Some(s), Level::Info, "m", "gone soon")],
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    assert!(store
        .add_tag("acme", "warehouse", &s.to_string(), "keep")
        .await
        .unwrap());
    let pk = store
        .find_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap();
    let deleted = store
        .delete_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap();
    assert!(deleted.is_some());
    assert!(store
        .get_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .is_none());
    // A late retry is acknowledged but does not bring it back.
    let late = store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![state(s, 2, SessionStatus::Completed, &[])],
                vec![rec(2, Some(s), Level::Info, "m", "late")],
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    assert_eq!(late.ack.acked, vec![(2, 2)]);
    assert!(store
        .get_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .is_none());
    assert_eq!(all_logs(store, pk, LogQuery::default()).await, [0u64; 0]);
    let (rows, _) = store
        .logs_after(LogScope::Session(pk), 0, &LogQuery::default(), 10)
        .await
        .unwrap();
    assert!(rows.is_empty());
}

async fn session_list_filters_sorts_and_pages(store: &dyn Store) {
    for i in 0..7u128 {
        let mut st = state(
            session_uuid(10 + i),
            1,
            if i % 2 == 0 {
                SessionStatus::Completed
            } else {
                SessionStatus::Active
            },
            if i < 3 { &["prod"] } else { &[] },
        );
        st.started_at_ns = 1_000 * i as i64;
        st.duration_ns = Some(100 * (7 - i as i64));
        let recs = if i == 5 {
            vec![rec(
                1,
                Some(session_uuid(10 + i)),
                Level::Error,
                "m",
                "boom",
            )]
        } else {
            vec![]
        };
        store
            .ingest(&scope("r1"), batch("r1", vec![st], recs, vec![]), false)
            .await
            .unwrap();
    }
    let list = async |q: SessionQuery| {
        let p = store
            .list_sessions(
                "acme",
                "warehouse",
                &SessionQuery {
                    limit: if q.limit == 0 { 100 } else { q.limit },
                    ..q
                },
            )
            .await
            .unwrap();
        (
            p.total,
            p.items
                .iter()
                .map(|s| s.started_at_ns / 1_000)
                .collect::<Vec<_>>(),
            p.next_cursor,
        )
    };
    assert_eq!(
        list(SessionQuery {
            descending: true,
            ..Default::default()
        })
        .await
        .1,
        vec![6, 5, 4, 3, 2, 1, 0]
    );
    assert_eq!(
        list(SessionQuery {
            status: Some("completed".into()),
            descending: true,
            ..Default::default()
        })
        .await
        .1,
        vec![6, 4, 2, 0]
    );
    assert_eq!(
        list(SessionQuery {
            tags: vec!["prod".into()],
            ..Default::default()
        })
        .await
        .1,
        vec![0, 1, 2]
    );
    assert_eq!(
        list(SessionQuery {
            has_errors: Some(true),
            ..Default::default()
        })
        .await
        .1,
        vec![5]
    );
    assert_eq!(
        list(SessionQuery {
            sort: SessionSort::Duration,
            ..Default::default()
        })
        .await
        .1,
        vec![6, 5, 4, 3, 2, 1, 0]
    );
    assert_eq!(
        list(SessionQuery {
            metadata: vec![("site".into(), "berlin".into())],
            ..Default::default()
        })
        .await
        .0,
        7
    );
    assert_eq!(
        list(SessionQuery {
            metadata: vec![("site".into(), "paris".into())],
            ..Default::default()
        })
        .await
        .0,
        0
    );
    assert_eq!(
        list(SessionQuery {
            package_name: Some("perception".into()),
            package_version: Some("2.1.0".into()),
            ..Default::default()
        })
        .await
        .0,
        7
    );
    // The search box: a substring of a tag (any case), of the id, of the
    // metadata; LIKE's wildcards stand for themselves.
    let search = async |text: &str| {
        list(SessionQuery {
            search: Some(text.into()),
            ..Default::default()
        })
        .await
        .1
    };
    assert_eq!(search("PRO").await, vec![0, 1, 2]);
    let id = session_uuid(13).to_string();
    assert_eq!(search(&id[id.len() - 6..]).await, vec![3]);
    assert_eq!(search("berl").await.len(), 7);
    assert_eq!(search("ber_in").await, Vec::<i64>::new());
    assert_eq!(search("%").await, Vec::<i64>::new());
    // Keyset pages cover everything once.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let (total, items, next) = list(SessionQuery {
            descending: true,
            limit: 3,
            cursor,
            ..Default::default()
        })
        .await;
        assert_eq!(total, 7);
        seen.extend(items);
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, vec![6, 5, 4, 3, 2, 1, 0]);
    let (_, items, _) = list(SessionQuery {
        descending: true,
        limit: 3,
        offset: 3,
        ..Default::default()
    })
    .await;
    assert_eq!(items, vec![3, 2, 1]);
}

async fn logs_after_an_id_page_through_one_session_in_commit_order(store: &dyn Store) {
    let (a, b) = (session_uuid(7), session_uuid(8));
    // Two robots' sessions interleaved, and session a's errors arriving
    // before its older records (as after an outage).
    let post = async |device: &str, s: Uuid, seqs: &[u64], level: Level| {
        let recs = seqs
            .iter()
            .map(|&i| rec(i, Some(s), level, "nav", &format!("{device} {i}")))
            .collect();
        let states = vec![state(s, 1, SessionStatus::Active, &[])];
        store
            .ingest(&scope(device), batch(device, states, recs, vec![]), false)
            .await
            .unwrap();
    };
    post("r1", a, &[1, 2], Level::Info).await;
    post("r2", b, &[1, 2, 3], Level::Info).await;
    post("r1", a, &[9, 10], Level::Error).await;
    post("r2", b, &[4], Level::Info).await;
    post("r1", a, &[3, 4, 5], Level::Info).await;
    let pk = async |s: Uuid| {
        store
            .find_session("acme", "warehouse", &s.to_string())
            .await
            .unwrap()
            .unwrap()
    };
    let pa = pk(a).await;
    let read_all = async |q: &LogQuery, page: u64| {
        let (mut after, mut seqs, mut pages) = (0, Vec::new(), 0);
        loop {
            let (rows, next) = store
                .logs_after(LogScope::Session(pa), after, q, page)
                .await
                .unwrap();
            assert!(rows
                .iter()
                .all(|r| r.id > after && r.session_pk == Some(pa)));
            assert!(next >= after);
            seqs.extend(rows.iter().map(|r| r.seq));
            pages += 1;
            let short = (rows.len() as u64) < page;
            after = next;
            if short {
                return (seqs, after, pages);
            }
        }
    };
    let (seqs, last, pages) = read_all(&LogQuery::default(), 2).await;
    assert_eq!(seqs, [1, 2, 9, 10, 3, 4, 5], "commit order, not seq order");
    assert_eq!(pages, 4);
    // Caught up: nothing after the last id, and it stays there.
    assert_eq!(
        store
            .logs_after(LogScope::Session(pa), last, &LogQuery::default(), 2)
            .await
            .unwrap(),
        (vec![], last)
    );

    // A filter that matches few rows still ends past every row of the
    // session, so the next call does not read them again.
    let errors = LogQuery {
        min_level: Some(Level::Error),
        ..Default::default()
    };
    let (seqs, after_errors, _) = read_all(&errors, 500).await;
    assert_eq!(seqs, [9, 10]);
    assert_eq!(after_errors, last);

    // The tail comes with the session's last id of the same snapshot.
    let (page, last_id) = store
        .logs_tail(
            LogScope::Session(pk(b).await),
            &LogQuery {
                limit: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.items.iter().map(|r| r.seq).collect::<Vec<_>>(), [4, 3]);
    assert_eq!(last_id, Some(page.items[0].id));
}

async fn level_histogram_counts_each_slice_in_one_pass(store: &dyn Store) {
    let s = session_uuid(30);
    // Records 1..=100 at 1_001..=1_100 ns; every tenth an error.
    let recs = (1..=100u64)
        .map(|seq| {
            let level = if seq % 10 == 0 {
                Level::Error
            } else {
                Level::Info
            };
            rec(seq, Some(s), level, "m", "x")
        })
        .collect();
    store
        .ingest(
            &scope("r1"),
            batch(
                "r1",
                vec![state(s, 1, SessionStatus::Completed, &[])],
                recs,
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    let pk = store
        .get_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap()
        .pk;
    let (info, error) = (Level::Info.code() as usize, Level::Error.code() as usize);
    // Ten slices of 10 ns from 1_000; the last one reaches to 1_101.
    let h = store
        .level_histogram(pk, Histogram::new(1_000, 1_101, 10))
        .await
        .unwrap();
    assert_eq!(h.len(), 10);
    assert_eq!((h[0][info], h[0][error]), (9, 0)); // 1_001..=1_009
    for slice in &h[1..9] {
        assert_eq!((slice[info], slice[error]), (9, 1)); // 1_010 is an error
    }
    assert_eq!((h[9][info], h[9][error]), (9, 2)); // 1_090..=1_100
    assert_eq!(h.iter().flatten().sum::<u64>(), 100);
    // A window inside the session counts only its records; another
    // session's pk counts none.
    let h = store
        .level_histogram(pk, Histogram::new(1_050, 1_060, 2))
        .await
        .unwrap();
    assert_eq!(h, vec![[0, 0, 4, 0, 1, 0], [0, 0, 5, 0, 0, 0]]);
    let h = store
        .level_histogram(pk + 1_000, Histogram::new(1_000, 1_101, 3))
        .await
        .unwrap();
    assert_eq!(h, vec![[0u64; 6]; 3]);
}

async fn first_errors_are_one_per_module_earliest_first(store: &dyn Store) {
    let (s, other) = (session_uuid(31), session_uuid(32));
    let mut recs = vec![
        rec(1, Some(s), Level::Error, "nav", "later by time"),
        rec(2, Some(s), Level::Warn, "arm", "below error"),
        rec(3, Some(s), Level::Fatal, "arm", "first arm"),
        rec(4, Some(s), Level::Error, "arm", "second arm"),
        rec(5, Some(s), Level::Error, "io", "first io"),
        rec(6, Some(s), Level::Error, "io", "same time as 5, later seq"),
        rec(7, Some(other), Level::Error, "gps", "other session"),
    ];
    // Record time, not seq, says which came first: seq 1 is the newest.
    recs[0].timestamp_ns = 2_000;
    recs[5].timestamp_ns = recs[4].timestamp_ns;
    let sessions = vec![
        state(s, 1, SessionStatus::Active, &[]),
        state(other, 1, SessionStatus::Active, &[]),
    ];
    store
        .ingest(&scope("r1"), batch("r1", sessions, recs, vec![]), false)
        .await
        .unwrap();
    let pk = store
        .get_session("acme", "warehouse", &s.to_string())
        .await
        .unwrap()
        .unwrap()
        .pk;
    let firsts = store.first_errors(pk, 10).await.unwrap();
    let got: Vec<(&str, u64, &str)> = firsts
        .iter()
        .map(|r| (r.module.as_str(), r.seq, r.session_id.as_deref().unwrap()))
        .collect();
    let sid = s.to_string();
    assert_eq!(
        got,
        [("arm", 3, sid.as_str()), ("io", 5, &sid), ("nav", 1, &sid)]
    );
    assert_eq!(firsts[0].level, Level::Fatal);
    assert_eq!(firsts[0].device_id, "r1");
    let two: Vec<u64> = store
        .first_errors(pk, 2)
        .await
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(two, [3, 5]);
    assert!(store.first_errors(pk + 1_000, 10).await.unwrap().is_empty());
}

async fn signins_refer_to_their_token_expire_and_are_bounded(store: &dyn Store) {
    let operator = Principal {
        kind: TokenKind::Operator,
        org: "acme".into(),
        project: "warehouse".into(),
        device_id: None,
        all_projects: true,
    };
    store.create_token("key-hash", &operator).await.unwrap();
    let now = 1_000_000;
    let row = |n: i64| SignInRow {
        hash: format!("signin-{n}"),
        token_hash: "key-hash".into(),
        csrf: format!("csrf-{n}"),
        // Far in the future: creation sweeps by the real clock.
        expires_at_ns: i64::MAX - 10 + n,
    };
    store.create_signin(&row(1), 10).await.unwrap();
    assert_eq!(
        store.find_signin("signin-1", now).await.unwrap(),
        Some((operator.clone(), "csrf-1".into()))
    );
    assert_eq!(store.find_signin("signin-2", now).await.unwrap(), None);
    // Expired at the time asked about.
    assert_eq!(store.find_signin("signin-1", i64::MAX).await.unwrap(), None);
    // A sign-in whose token is gone is no sign-in.
    store
        .create_signin(
            &SignInRow {
                token_hash: "no-such-key".into(),
                ..row(2)
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(store.find_signin("signin-2", now).await.unwrap(), None);
    // Past the bound, those closest to expiry go.
    for n in 3..=5 {
        store.create_signin(&row(n), 2).await.unwrap();
    }
    let mut live = Vec::new();
    for n in 1..=5 {
        let found = store
            .find_signin(&format!("signin-{n}"), now)
            .await
            .unwrap();
        live.push(found.is_some());
    }
    assert_eq!(live, [false, false, false, true, true]);
    store.delete_signin("signin-5").await.unwrap();
    assert_eq!(store.find_signin("signin-5", now).await.unwrap(), None);
    store.delete_signin("signin-5").await.unwrap();
}

async fn keys_keep_their_project_scope_and_projects_are_listed(store: &dyn Store) {
    let key = |project: &str, all_projects: bool, device: Option<&str>| Principal {
        kind: if device.is_some() {
            TokenKind::Device
        } else {
            TokenKind::Operator
        },
        org: "acme".into(),
        project: project.into(),
        device_id: device.map(str::to_owned),
        all_projects,
    };
    let org_wide = key("", true, None);
    let scoped = key("lab", false, None);
    let device = key("yard", false, Some("robot-9"));
    store.create_token("org-wide", &org_wide).await.unwrap();
    store.create_token("scoped", &scoped).await.unwrap();
    store.create_token("device", &device).await.unwrap();
    assert_eq!(
        store.find_token("org-wide").await.unwrap(),
        Some(org_wide.clone())
    );
    assert_eq!(
        store.find_token("scoped").await.unwrap(),
        Some(scoped.clone())
    );
    assert_eq!(
        store.find_token("device").await.unwrap(),
        Some(device.clone())
    );
    assert!(org_wide.reads("acme", "lab") && org_wide.reads("acme", "warehouse"));
    assert!(scoped.reads("acme", "lab") && !scoped.reads("acme", "warehouse"));
    assert!(!scoped.reads("globex", "lab"), "another organization");
    assert!(
        !device.reads("acme", "yard"),
        "a device token reads nothing"
    );
    // Projects: those with a device that sent a batch ("warehouse"), and
    // those a token names; the organization-wide key names none.
    store
        .ingest(
            &scope("robot-1"),
            batch(
                "robot-1",
                vec![],
                vec![rec(1, None, Level::Info, "m", "x")],
                vec![],
            ),
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        store.list_projects("acme").await.unwrap(),
        ["lab", "warehouse", "yard"]
    );
    assert!(store.list_projects("globex").await.unwrap().is_empty());
    // Revoking says whose key it was, scope included.
    assert_eq!(store.revoke_token("scoped").await.unwrap(), Some(scoped));
}

fn mark(id: u64, revision: u64, session: Option<Uuid>, name: &str, ts: i64) -> crate::wire::Mark {
    crate::wire::Mark {
        id,
        revision,
        session_id: session,
        timestamp_ns: ts,
        before_ns: 10,
        after_ns: 5,
        name: name.into(),
        priority: "normal".into(),
        metadata: r#"{"bumper":"front"}"#.into(),
        released: None,
    }
}

async fn marks_are_kept_once_at_their_newest_revision_and_filter_sessions(store: &dyn Store) {
    use crate::hub::store::{MarkQuery, SessionQuery};
    let (a, b) = (session_uuid(1), session_uuid(2));
    let mut first = (*batch(
        "r1",
        vec![
            state(a, 1, SessionStatus::Completed, &[]),
            state(b, 1, SessionStatus::Completed, &[]),
        ],
        vec![],
        vec![],
    ))
    .clone();
    first.marks = vec![
        mark(1, 1, Some(a), "collision", 2_000),
        mark(2, 1, Some(b), "estop", 1_500),
        mark(3, 1, None, "collision", 1_200),
    ];
    store
        .ingest(&scope("r1"), Arc::new(first.clone()), false)
        .await
        .unwrap();
    // Sent again, and a newer revision (its pin released) of mark 1 then
    // an older one: one row each, at the newest revision.
    store
        .ingest(&scope("r1"), Arc::new(first.clone()), false)
        .await
        .unwrap();
    let mut released = mark(1, 2, Some(a), "collision", 2_000);
    released.released = Some("pin_released".into());
    let mut second = first.clone();
    second.sessions.clear();
    second.marks = vec![released.clone()];
    store
        .ingest(&scope("r1"), Arc::new(second.clone()), false)
        .await
        .unwrap();
    second.marks = vec![mark(1, 1, Some(a), "collision", 2_000)];
    store
        .ingest(&scope("r1"), Arc::new(second), false)
        .await
        .unwrap();

    let list = |q: MarkQuery| async move {
        store
            .list_marks("acme", "warehouse", &MarkQuery { limit: 100, ..q })
            .await
            .unwrap()
    };
    let all = list(MarkQuery::default()).await;
    let got: Vec<(i64, &str, Option<&str>)> = all
        .iter()
        .map(|m| (m.mark_id, m.name.as_str(), m.released.as_deref()))
        .collect();
    // Oldest first.
    assert_eq!(
        got,
        [
            (3, "collision", None),
            (2, "estop", None),
            (1, "collision", Some("pin_released"))
        ]
    );
    assert_eq!(all[2].session_id, Some(a.to_string()));
    assert_eq!(all[0].session_id, None);
    assert_eq!(
        (all[2].before_ns, all[2].after_ns, all[2].device_id.as_str()),
        (10, 5, "r1")
    );
    let pk_a = store
        .find_session("acme", "warehouse", &a.to_string())
        .await
        .unwrap()
        .unwrap();
    let of_a = list(MarkQuery {
        session_pk: Some(pk_a),
        ..Default::default()
    })
    .await;
    assert_eq!(of_a.len(), 1);
    let named = list(MarkQuery {
        name: Some("collision".into()),
        since_ns: Some(1_500),
        ..Default::default()
    })
    .await;
    assert_eq!(named.len(), 1);
    // Another project sees none.
    assert!(store
        .list_marks(
            "acme",
            "other",
            &MarkQuery {
                limit: 10,
                ..Default::default()
            }
        )
        .await
        .unwrap()
        .is_empty());
    // The session list's `mark` filter: sessions with a collision.
    let page = store
        .list_sessions(
            "acme",
            "warehouse",
            &SessionQuery {
                mark: Some("collision".into()),
                limit: 10,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let ids: Vec<String> = page.items.iter().map(|s| s.id.clone()).collect();
    assert_eq!(ids, [a.to_string()]);
    // Deleting a session takes its marks.
    assert!(store
        .delete_session("acme", "warehouse", &a.to_string())
        .await
        .unwrap()
        .is_some());
    assert_eq!(list(MarkQuery::default()).await.len(), 2);
}

mod leases {
    use super::*;

    per_backend!(one_holder_at_a_time_until_it_runs_out);

    /// A lease has one holder until it is released or runs out; its holder
    /// renews it; a release by another holder changes nothing.
    async fn one_holder_at_a_time_until_it_runs_out(store: &dyn Store) {
        let take = |holder: &'static str, now: i64, until: i64| async move {
            store
                .take_lease("upload:a", holder, now, until)
                .await
                .unwrap()
        };
        assert!(take("one", 100, 200).await);
        assert!(!take("two", 150, 300).await, "held until 200");
        assert!(take("one", 150, 400).await, "its holder renews it");
        assert!(!take("two", 300, 500).await, "renewed until 400");
        store.release_lease("upload:a", "two").await.unwrap();
        assert!(!take("two", 300, 500).await, "not released by another");
        assert!(take("two", 400, 500).await, "free once it ran out");
        store.release_lease("upload:a", "two").await.unwrap();
        assert!(take("three", 401, 600).await, "free once released");
        assert!(
            store
                .take_lease("sweep:uploads", "two", 401, 600)
                .await
                .unwrap(),
            "leases are named"
        );
    }
}
