//! Opening `agent.db`: pragmas, numbered migrations under `PRAGMA
//! user_version`, a newer database refused untouched, a corrupt one moved
//! aside.
//!
//! Invariant: migrations only ever append to [`MIGRATIONS`]; an existing
//! entry never changes, so every older database upgrades along the same path.

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags};

use super::StoreError;

/// Schema migrations; entry `i` takes `user_version` from `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: sessions, records, gaps, and the persisted seq counter (`seq` is
    // assigned by the writer, not AUTOINCREMENT: one counter write per
    // transaction instead of one per record).
    "CREATE TABLE sessions(
        sid INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        status TEXT NOT NULL,
        started_at_ns INTEGER NOT NULL,
        ended_at_ns INTEGER,
        duration_ns INTEGER,
        boot_id TEXT NOT NULL,
        started_boottime_ns INTEGER NOT NULL,
        tags TEXT NOT NULL DEFAULT '[]',
        package_name TEXT,
        package_version TEXT,
        metadata TEXT NOT NULL DEFAULT '{}',
        error TEXT,
        log_count INTEGER NOT NULL DEFAULT 0,
        revision INTEGER NOT NULL DEFAULT 1,
        synced_revision INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE records(
        seq INTEGER PRIMARY KEY,
        session INTEGER,
        ts_ns INTEGER NOT NULL,
        level INTEGER NOT NULL,
        module TEXT NOT NULL,
        message TEXT NOT NULL,
        metadata TEXT NOT NULL,
        pid INTEGER,
        uid INTEGER,
        gid INTEGER,
        process TEXT,
        synced INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX records_evict ON records(synced, level, seq);
    CREATE TABLE gaps(
        session INTEGER NOT NULL,
        level INTEGER NOT NULL,
        reason TEXT NOT NULL,
        dropped INTEGER NOT NULL,
        synced_dropped INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY(session, level, reason)
    );
    CREATE TABLE meta(
        key TEXT PRIMARY KEY,
        value INTEGER NOT NULL
    );",
    // 2: per-session log queries (`GET /v1/logs?session=`) without a scan.
    "CREATE INDEX records_session ON records(session, seq);",
    // 3: artifact upload state (see `store::artifacts`): one row per file of
    // a session's artifact directory, with the tus upload URL and the
    // offset the hub acknowledged, so uploads resume after a restart.
    "CREATE TABLE artifacts(
        id INTEGER PRIMARY KEY,
        session INTEGER NOT NULL,
        path TEXT NOT NULL,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        state TEXT NOT NULL,
        sha256 TEXT,
        upload_url TEXT,
        acked INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        UNIQUE(session, path)
    );
    CREATE INDEX artifacts_todo ON artifacts(state, size);",
    // 4: a synced-seq watermark instead of a per-record flag (see
    // `store::sync`). `meta.synced_through` = W: every record with seq <= W
    // is synced; `synced_ahead` holds the few synced records above W
    // (errors sent first, set-asides). Acknowledging a batch then moves W
    // instead of updating every row and the `records_evict` index with it.
    // `records.synced` stays, unused and always 0 for new rows: dropping a
    // column rewrites the whole table, which on a robot means the whole
    // buffer (hundreds of MB of flash) rewritten inside the migration's
    // transaction with twice its size on disk; an unused 0 costs one header
    // byte per row. `records_level` keeps eviction (lowest level, oldest
    // first) and errors-first reads on an index.
    "INSERT INTO meta(key, value) VALUES ('synced_through',
        coalesce((SELECT min(seq) FROM records WHERE synced = 0) - 1,
                 (SELECT max(seq) FROM records), 0))
        ON CONFLICT(key) DO UPDATE SET value = excluded.value;
    CREATE TABLE synced_ahead(seq INTEGER PRIMARY KEY);
    INSERT INTO synced_ahead(seq) SELECT seq FROM records
        WHERE synced = 1 AND seq > (SELECT value FROM meta WHERE key = 'synced_through');
    DROP INDEX records_evict;
    CREATE INDEX records_level ON records(level, seq);",
    // 5: a session's row key is `pk`, as the hub names its own (and as the
    // code calls it); it was `sid`. Only the schema text changes: SQLite
    // renames the column and every reference to it, no row is rewritten.
    "ALTER TABLE sessions RENAME COLUMN sid TO pk;",
    // 6: marks (see `store::marks`): a named moment of a session (0: the
    // device logs outside sessions) with a window before and after it, and
    // `pins`, the union of the windows of marks not released, which
    // eviction keeps last. AUTOINCREMENT: a mark's id names it to the hub
    // and is never reused. `revision`/`synced_revision` as for sessions.
    "CREATE TABLE marks(
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        session INTEGER NOT NULL,
        ts_ns INTEGER NOT NULL,
        before_ns INTEGER NOT NULL,
        after_ns INTEGER NOT NULL,
        name TEXT NOT NULL,
        metadata TEXT NOT NULL,
        priority INTEGER NOT NULL,
        released TEXT,
        revision INTEGER NOT NULL DEFAULT 1,
        synced_revision INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX marks_session ON marks(session, ts_ns);
    CREATE TABLE pins(
        session INTEGER NOT NULL,
        start_ns INTEGER NOT NULL,
        end_ns INTEGER NOT NULL,
        PRIMARY KEY(session, start_ns)
    ) WITHOUT ROWID;",
];

/// The schema version this build writes.
pub fn version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Opens (creating if needed) the database at `path` for writing and brings
/// its schema up to date. A file SQLite cannot read is moved aside to
/// `agent.db.corrupt-<unix seconds>` with a loud error and a fresh database
/// is started; a database from a newer build is refused untouched.
pub fn open_writer(path: &Path, synchronous_full: bool) -> Result<Connection, StoreError> {
    match open_checked(path, synchronous_full, MIGRATIONS.len()) {
        Err(StoreError::Corrupt { path: p, reason }) => {
            let aside = move_aside(&p)?;
            tracing::error!(
                "database {} is unreadable ({reason}); moved it to {} and starting a fresh one",
                p.display(),
                aside.display()
            );
            open_checked(path, synchronous_full, MIGRATIONS.len())
        }
        other => other,
    }
}

/// Opens and migrates up to `target` migrations (tests build old schemas
/// with a smaller target).
pub fn open_checked(
    path: &Path,
    synchronous_full: bool,
    target: usize,
) -> Result<Connection, StoreError> {
    let corrupt = |e: rusqlite::Error| StoreError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let mut conn = Connection::open(path).map_err(|e| StoreError::Open {
        path: path.to_owned(),
        source: e,
    })?;
    // Reading the header is the first thing that fails on a file that is not
    // a database.
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(corrupt)?;
    if found > MIGRATIONS.len() as i64 {
        return Err(StoreError::Newer {
            path: path.to_owned(),
            found,
            supported: MIGRATIONS.len() as i64,
        });
    }
    let check: String = conn
        .pragma_query_value(None, "quick_check", |r| r.get(0))
        .map_err(corrupt)?;
    if check != "ok" {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            reason: check,
        });
    }
    if found == 0 {
        // Only take effect before the first table exists. Incremental
        // auto-vacuum lets eviction hand freed pages back to the filesystem;
        // 8 KiB pages append measurably faster than 4 KiB ones.
        conn.pragma_update(None, "page_size", 8192)
            .map_err(corrupt)?;
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")
            .map_err(corrupt)?;
    }
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(corrupt)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt {
            path: path.to_owned(),
            reason: format!("cannot switch to WAL (journal_mode is {mode})"),
        });
    }
    conn.pragma_update(
        None,
        "synchronous",
        if synchronous_full { "FULL" } else { "NORMAL" },
    )
    .map_err(corrupt)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(corrupt)?;
    conn.set_prepared_statement_cache_capacity(64);
    let tx = conn.transaction().map_err(corrupt)?;
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(found as usize)
    {
        tx.execute_batch(sql).map_err(corrupt)?;
        tracing::info!("database schema migrated to version {}", i + 1);
    }
    tx.pragma_update(None, "user_version", (target as i64).max(found))
        .map_err(corrupt)?;
    tx.commit().map_err(corrupt)?;
    Ok(conn)
}

/// A file's (device, inode).
pub type FileId = (u64, u64);

/// The identity of the file at `path`: a connection opened on another one
/// reads a database the writer moved aside.
pub fn file_id(path: &Path) -> Option<FileId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// A read-only connection for queries; WAL lets it read while the writer
/// commits.
pub fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| StoreError::Open {
        path: path.to_owned(),
        source: e,
    })?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(StoreError::Sql)?;
    Ok(conn)
}

/// Renames `path` (and its WAL and shared-memory files) to
/// `<path>.corrupt-<unix seconds>`; returns the new name.
pub(super) fn move_aside(path: &Path) -> Result<PathBuf, StoreError> {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Never over an earlier one moved aside in the same second.
    let aside = (0..)
        .map(|n| {
            let mut aside = path.as_os_str().to_owned();
            aside.push(format!(".corrupt-{ts}"));
            if n > 0 {
                aside.push(format!("-{n}"));
            }
            PathBuf::from(aside)
        })
        .find(|p| !p.exists())
        .expect("an unused name");
    std::fs::rename(path, &aside).map_err(|e| StoreError::Io {
        what: format!("moving {} aside", path.display()),
        source: e,
    })?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        let mut side_aside = aside.as_os_str().to_owned();
        side_aside.push(suffix);
        let _ = std::fs::rename(&side, &side_aside);
    }
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_schema_upgrades_and_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let v1 = open_checked(&path, false, 1).unwrap();
        v1.execute(
            "INSERT INTO records(session, ts_ns, level, module, message, metadata) VALUES (NULL, 1, 2, 'm', 'kept', '')",
            [],
        )
        .unwrap();
        drop(v1);
        let conn = open_writer(&path, false).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, version());
        let msg: String = conn
            .query_row("SELECT message FROM records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(msg, "kept");
        let idx: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name='records_session'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(idx, 1);
    }

    #[test]
    fn newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let before = std::fs::read(&path).unwrap();
        let err = open_writer(&path, false).unwrap_err().to_string();
        assert!(err.contains("schema version 99"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        std::fs::write(
            &path,
            b"this is not a database, not even close. ".repeat(200),
        )
        .unwrap();
        let conn = open_writer(&path, false).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, version());
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("agent.db.corrupt-")
            })
            .collect();
        assert_eq!(moved.len(), 1);
    }

    #[test]
    fn per_record_synced_flags_become_a_watermark() {
        // (synced flags of seq 1.., W, ahead set) after the upgrade.
        let check = |flags: &[i64], w: i64, ahead: &[i64]| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("agent.db");
            let v3 = open_checked(&path, false, 3).unwrap();
            for (i, f) in flags.iter().enumerate() {
                v3.execute(
                    "INSERT INTO records(seq, ts_ns, level, module, message, metadata, synced) \
                     VALUES (?1, 1, 2, 'm', 'x', '', ?2)",
                    [i as i64 + 1, *f],
                )
                .unwrap();
            }
            drop(v3);
            let conn = open_writer(&path, false).unwrap();
            let got_w: i64 = conn
                .query_row(
                    "SELECT value FROM meta WHERE key = 'synced_through'",
                    [],
                    |r| r.get(0),
                )
                .unwrap();
            let mut stmt = conn
                .prepare("SELECT seq FROM synced_ahead ORDER BY seq")
                .unwrap();
            let got_ahead: Vec<i64> = stmt
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert_eq!((got_w, got_ahead), (w, ahead.to_vec()), "{flags:?}");
            let synced = super::super::sync::count_synced(&conn).unwrap();
            assert_eq!(synced, flags.iter().sum::<i64>(), "{flags:?}");
            let indexes: Vec<String> = conn
                .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'records' ORDER BY name")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            assert_eq!(indexes, vec!["records_level", "records_session"]);
        };
        check(&[1, 1, 0, 1, 0, 1], 2, &[4, 6]);
        check(&[0, 1, 1], 0, &[2, 3]);
        check(&[1, 1, 1], 3, &[]);
        check(&[0, 0], 0, &[]);
        check(&[], 0, &[]);
    }
}
