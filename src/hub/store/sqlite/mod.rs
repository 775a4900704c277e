//! The SQLite backend of the hub's store: one database file in WAL mode,
//! one writer connection behind a mutex and a small pool of readers; the
//! numbered migrations (`001_initial.sql`, ...) under `PRAGMA user_version`.
//! The methods are split by domain: `tokens`, `ingest`, `sessions`,
//! `logs`, `artifacts`, `uploads`; `rows` maps result rows to the domain
//! types. Every method is blocking.
//!
//! Invariant: a database newer than this binary is refused untouched;
//! `MIGRATIONS` only grows at the end.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, Transaction};

use super::StoreError;
use crate::wire::Level;

mod artifacts;
mod ingest;
mod logs;
mod rows;
mod sessions;
mod tokens;
mod uploads;

/// Numbered migrations; `PRAGMA user_version` is how many have run.
const MIGRATIONS: &[&str] = &[include_str!("001_initial.sql")];

/// Reader connections kept open between requests.
const MAX_IDLE_READERS: usize = 8;

pub struct Store {
    path: PathBuf,
    writer: Mutex<Connection>,
    readers: Mutex<Vec<Connection>>,
}

fn pragmas(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// Runs the migrations `user_version` has not seen, in one transaction;
/// refuses a database newer than this binary.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found,
            known,
        });
    }
    if found == known {
        return Ok(());
    }
    let tx = conn.transaction()?;
    for sql in &MIGRATIONS[found as usize..] {
        tx.execute_batch(sql)?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

pub(super) fn now_ns() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp_nanos() as i64
}

pub(super) fn level_of(code: i64) -> Level {
    Level::from_code(code.clamp(0, 5) as u8).unwrap_or(Level::Info)
}

impl Store {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_owned(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        pragmas(&conn).map_err(open_err)?;
        // The writer keeps the hot index pages of every device and session
        // in memory (64 MiB), and checkpoints less often, so a page written
        // by many batches reaches the database file once per checkpoint.
        conn.pragma_update(None, "cache_size", -65536)
            .and_then(|()| conn.pragma_update(None, "wal_autocheckpoint", 8192))
            .and_then(|()| conn.pragma_update(None, "temp_store", "MEMORY"))
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        Ok(Store {
            path: path.to_owned(),
            writer: Mutex::new(conn),
            readers: Mutex::new(Vec::new()),
        })
    }

    pub(super) fn write<T>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let conn = self.readers.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open(&self.path)?;
                pragmas(&c)?;
                c
            }
        };
        let out = f(&conn);
        let mut idle = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE_READERS {
            idle.push(conn);
        }
        out
    }
}

#[cfg(test)]
mod tests;
