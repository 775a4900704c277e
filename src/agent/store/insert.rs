//! The writer's connection, with its record INSERT prepared once and bound
//! without copies: rusqlite binds every text with `SQLITE_TRANSIENT`, so
//! SQLite allocates and copies the module, message, metadata and process
//! name of every row before it copies them again into the row's record.
//! Here they are bound `SQLITE_STATIC`, borrowed for the one `sqlite3_step`
//! that reads them. The statement lives as long as the connection: prepared
//! for every batch of rows, its compilation was a fifth of the writer's CPU
//! at a steady 2,000 records/s (BENCHMARKS.md, "The writer's INSERT,
//! prepared once").
//!
//! Invariant: one of the crate's three unsafe modules, with
//! `systemd::adopt` and `ingest::mmsg`. A bound pointer is only ever read
//! inside [`WriteConn::insert`], while the `&Row` it came from is borrowed,
//! and every binding is cleared before `insert` returns; the statement is
//! finalized when the [`WriteConn`] drops, before its connection closes
//! (the connection is only ever lent out shared, so it cannot be swapped
//! from under the statement).

use std::ffi::{c_char, c_int, CStr};
use std::ops::Deref;
use std::ptr::NonNull;

use rusqlite::{ffi, Connection};

use super::Row;

/// The columns, in the order [`WriteConn::insert`] binds them.
const SQL: &CStr = c"INSERT INTO records(seq, session, ts_ns, level, module, message, metadata, pid, uid, gid, process) \
                      VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)";

/// The writer's connection and its prepared record INSERT. Everything else
/// uses the connection through `Deref`.
pub struct WriteConn {
    conn: Connection,
    stmt: NonNull<ffi::sqlite3_stmt>,
}

// SAFETY: the statement is only used through `&mut WriteConn`, on whichever
// thread holds it, together with its connection; rusqlite moves a
// `Connection` between threads with its cached statements the same way.
#[allow(unsafe_code)]
unsafe impl Send for WriteConn {}

impl Deref for WriteConn {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        &self.conn
    }
}

impl WriteConn {
    /// Takes `conn` and prepares the INSERT on it.
    #[allow(unsafe_code)]
    pub fn new(conn: Connection) -> rusqlite::Result<WriteConn> {
        // SAFETY: the handle is used while `conn` lives, which it does until
        // after the statement is finalized (see `Drop`).
        let db = unsafe { conn.handle() };
        let mut stmt = std::ptr::null_mut();
        // SAFETY: `SQL` is NUL-terminated (length -1); `stmt` is written by
        // SQLite. PERSISTENT: it is kept for the connection's life.
        let rc = unsafe {
            ffi::sqlite3_prepare_v3(
                db,
                SQL.as_ptr(),
                -1,
                ffi::SQLITE_PREPARE_PERSISTENT as _,
                &mut stmt,
                std::ptr::null_mut(),
            )
        };
        if rc != ffi::SQLITE_OK {
            return Err(error(db, rc));
        }
        let stmt = NonNull::new(stmt).ok_or_else(|| error(db, ffi::SQLITE_MISUSE))?;
        Ok(WriteConn { conn, stmt })
    }

    /// Inserts `row` in `session` as record `seq`, in whatever transaction
    /// the connection has open.
    #[allow(unsafe_code)]
    pub fn insert(&mut self, seq: i64, session: Option<i64>, row: &Row) -> rusqlite::Result<()> {
        let s = self.stmt.as_ptr();
        let t = &row.trusted;
        let process = t.process.as_deref();
        // SAFETY: `s` is a live statement; every text bound below is
        // borrowed from `row`, which outlives the step that reads it, and
        // the bindings are cleared before this returns (so no pointer is
        // kept past the borrow).
        let rc = unsafe {
            let binds = [
                ffi::sqlite3_bind_int64(s, 1, seq),
                bind_opt_int(s, 2, session),
                ffi::sqlite3_bind_int64(s, 3, row.timestamp_ns),
                ffi::sqlite3_bind_int(s, 4, c_int::from(row.level.code())),
                bind_text(s, 5, Some(&row.module)),
                bind_text(s, 6, Some(&row.message)),
                bind_text(s, 7, Some(&row.metadata)),
                bind_opt_int(s, 8, t.pid.map(i64::from)),
                bind_opt_int(s, 9, t.uid.map(i64::from)),
                bind_opt_int(s, 10, t.gid.map(i64::from)),
                bind_text(s, 11, process),
            ];
            let rc = match binds.into_iter().find(|&rc| rc != ffi::SQLITE_OK) {
                Some(failed) => failed,
                None => ffi::sqlite3_step(s),
            };
            ffi::sqlite3_reset(s);
            ffi::sqlite3_clear_bindings(s);
            rc
        };
        match rc {
            ffi::SQLITE_DONE => Ok(()),
            ffi::SQLITE_OK | ffi::SQLITE_ROW => Err(self.error(ffi::SQLITE_MISUSE)),
            rc => Err(self.error(rc)),
        }
    }

    #[allow(unsafe_code)]
    fn error(&self, rc: c_int) -> rusqlite::Error {
        // SAFETY: the connection is live while `self` is.
        error(unsafe { self.conn.handle() }, rc)
    }
}

impl Drop for WriteConn {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: the statement is live and finalized only here, before the
        // connection (a field) closes.
        unsafe { ffi::sqlite3_finalize(self.stmt.as_ptr()) };
    }
}

/// Binds `text` (or NULL) without a copy: it must stay alive and unchanged
/// until the statement's next step has run.
///
/// # Safety
/// `s` must be a live statement and `i` one of its parameters.
#[allow(unsafe_code)]
unsafe fn bind_text(s: *mut ffi::sqlite3_stmt, i: c_int, text: Option<&str>) -> c_int {
    match text {
        None => ffi::sqlite3_bind_null(s, i),
        Some(text) => match c_int::try_from(text.len()) {
            Ok(len) => ffi::sqlite3_bind_text(
                s,
                i,
                text.as_ptr().cast::<c_char>(),
                len,
                ffi::SQLITE_STATIC(),
            ),
            Err(_) => ffi::SQLITE_TOOBIG,
        },
    }
}

/// Binds `v` (or NULL).
///
/// # Safety
/// `s` must be a live statement and `i` one of its parameters.
#[allow(unsafe_code)]
unsafe fn bind_opt_int(s: *mut ffi::sqlite3_stmt, i: c_int, v: Option<i64>) -> c_int {
    match v {
        None => ffi::sqlite3_bind_null(s, i),
        Some(v) => ffi::sqlite3_bind_int64(s, i, v),
    }
}

/// The connection's error for result code `rc`, as rusqlite reports it.
#[allow(unsafe_code)]
fn error(db: *mut ffi::sqlite3, rc: c_int) -> rusqlite::Error {
    // SAFETY: `db` is a live connection; its message is copied at once.
    let (code, msg) = unsafe {
        let code = ffi::sqlite3_extended_errcode(db);
        let msg = ffi::sqlite3_errmsg(db);
        let msg = (!msg.is_null()).then(|| CStr::from_ptr(msg).to_string_lossy().into_owned());
        (code, msg)
    };
    // The connection's last error is this one unless binding failed
    // (binding errors are not recorded on the connection).
    let code = if code & 0xff == rc & 0xff { code } else { rc };
    rusqlite::Error::SqliteFailure(ffi::Error::new(code), msg)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::agent::record::Trusted;
    use crate::agent::store::schema;
    use crate::wire::Level;

    fn rows() -> Vec<Row> {
        let texts = [
            "",
            "plain",
            "ünïcødé ✓",
            "nul\0inside",
            "quote ' and \" and \\",
        ];
        let trusted = [
            Trusted::default(),
            Trusted {
                pid: Some(u32::MAX),
                uid: Some(0),
                gid: Some(1000),
                process: Some("planner".into()),
            },
            Trusted {
                pid: Some(7),
                uid: None,
                gid: None,
                process: Some(String::new()),
            },
        ];
        (0..30)
            .map(|i| Row {
                timestamp_ns: [i64::MIN, 0, 1_700_000_000_123_456_789, i64::MAX][i % 4],
                level: Level::ALL[i % Level::ALL.len()],
                module: texts[i % texts.len()].to_owned(),
                message: texts[(i + 1) % texts.len()].repeat(i),
                metadata: if i % 3 == 0 {
                    String::new()
                } else {
                    format!("{{\"i\":{i}}}")
                },
                trusted: Arc::new(trusted[i % trusted.len()].clone()),
                client_dropped: 0,
                mark: None,
            })
            .collect()
    }

    type Stored = (i64, Option<i64>, i64, i64, String, Vec<u8>, String);
    type StoredTrusted = (Option<i64>, Option<i64>, Option<i64>, Option<String>);

    fn stored(conn: &Connection) -> Vec<(Stored, StoredTrusted)> {
        let mut stmt = conn
            .prepare(
                "SELECT seq, session, ts_ns, level, module, CAST(message AS BLOB), metadata, \
                 pid, uid, gid, process FROM records ORDER BY seq",
            )
            .unwrap();
        stmt.query_map([], |r| {
            Ok((
                (
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                ),
                (r.get(7)?, r.get(8)?, r.get(9)?, r.get(10)?),
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    #[test]
    fn stores_what_rusqlite_binding_stores() {
        let dir = tempfile::tempdir().unwrap();
        let mut ours =
            WriteConn::new(schema::open_writer(&dir.path().join("ours.db"), false).unwrap())
                .unwrap();
        let theirs = schema::open_writer(&dir.path().join("theirs.db"), false).unwrap();
        let rows = rows();
        for (i, r) in rows.iter().enumerate() {
            ours.insert(i as i64 + 1, (i % 2 == 0).then_some(3), r)
                .unwrap();
        }
        for (i, r) in rows.iter().enumerate() {
            theirs
                .execute(
                    "INSERT INTO records(seq, session, ts_ns, level, module, message, metadata, \
                     pid, uid, gid, process) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    rusqlite::params![
                        i as i64 + 1,
                        (i % 2 == 0).then_some(3),
                        r.timestamp_ns,
                        r.level.code(),
                        r.module,
                        r.message,
                        r.metadata,
                        r.trusted.pid,
                        r.trusted.uid,
                        r.trusted.gid,
                        r.trusted.process,
                    ],
                )
                .unwrap();
        }
        let got = stored(&ours);
        assert_eq!(got.len(), rows.len());
        assert_eq!(got, stored(&theirs));
        // The text after a NUL is kept, as rusqlite keeps it.
        assert!(got
            .iter()
            .any(|((.., m, _), _)| m.windows(2).any(|w| w == b"\0i")));
    }

    #[test]
    fn a_failed_insert_is_reported_with_its_code_and_the_next_one_works() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn =
            WriteConn::new(schema::open_writer(&dir.path().join("a.db"), false).unwrap()).unwrap();
        let rows = rows();
        conn.insert(1, None, &rows[1]).unwrap();
        let e = conn.insert(1, None, &rows[2]).unwrap_err();
        assert_eq!(
            e.sqlite_error().map(|e| e.extended_code),
            Some(ffi::SQLITE_CONSTRAINT_PRIMARYKEY),
            "{e}"
        );
        assert!(e.to_string().contains("UNIQUE constraint failed"), "{e}");
        conn.insert(2, None, &rows[2]).unwrap();
        let got = stored(&conn);
        assert_eq!(
            got.iter().map(|((seq, ..), _)| *seq).collect::<Vec<_>>(),
            [1, 2]
        );
        assert_eq!(got[1].0 .6, rows[2].metadata);
    }

    #[test]
    fn the_statement_serves_every_transaction_and_a_changed_schema() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn =
            WriteConn::new(schema::open_writer(&dir.path().join("a.db"), false).unwrap()).unwrap();
        let rows = rows();
        conn.execute_batch("BEGIN").unwrap();
        conn.insert(1, None, &rows[1]).unwrap();
        conn.execute_batch("COMMIT; BEGIN").unwrap();
        conn.insert(2, None, &rows[2]).unwrap();
        conn.execute_batch("ROLLBACK").unwrap();
        // SQLite prepares it again by itself after a schema change.
        conn.execute_batch("CREATE INDEX records_by_module ON records(module)")
            .unwrap();
        conn.insert(3, Some(4), &rows[3]).unwrap();
        let got = stored(&conn);
        assert_eq!(
            got.iter().map(|((seq, ..), _)| *seq).collect::<Vec<_>>(),
            [1, 3]
        );
        let by_module: i64 = conn
            .query_row(
                "SELECT count(*) FROM records INDEXED BY records_by_module WHERE module = ?1",
                [&rows[3].module],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(by_module, 1);
    }
}
