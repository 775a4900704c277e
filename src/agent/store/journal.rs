//! The systemd journal reader's position: the `__CURSOR` of the last
//! journal entry the buffer holds, kept in `meta` under `journal_cursor`
//! and written by the writer in the same transaction as that entry's
//! records (`Msg::Journal`), so a crash can never keep one without the
//! other.
//!
//! Invariant: the cursor only moves forward with committed records; it is
//! read once, when the journal reader starts.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension};

use super::{schema, StoreError};

/// Sets the cursor inside the writer's open transaction.
pub fn save_cursor(conn: &Connection, cursor: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO meta(key, value) VALUES ('journal_cursor', ?1)
         ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute([cursor])?;
    Ok(())
}

/// The cursor the last run committed; `None` on a first run.
pub fn load_cursor(db_path: &Path) -> Result<Option<String>, StoreError> {
    let conn = schema::open_reader(db_path)?;
    Ok(conn
        .query_row(
            "SELECT CAST(value AS TEXT) FROM meta WHERE key = 'journal_cursor'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .filter(|c| !c.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_round_trips_through_meta() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = schema::open_writer(&path, false).unwrap();
        assert_eq!(load_cursor(&path).unwrap(), None);
        let c = "s=45dd;i=1;b=640f;m=1;t=661d34b646822;x=e1a8";
        save_cursor(&conn, c).unwrap();
        save_cursor(&conn, &format!("{c}2")).unwrap();
        assert_eq!(load_cursor(&path).unwrap(), Some(format!("{c}2")));
    }
}
