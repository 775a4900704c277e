//! Artifact upload state in `agent.db`: one row per file of a session's
//! artifact directory, with its version (size, mtime), SHA-256, the tus
//! upload URL and the offset the hub acknowledged. Changes are
//! [`ArtifactCmd`]s applied by the writer thread; reads run on the
//! [`Reader`]'s read-only connections.
//!
//! Invariant: a row's `(size, mtime_ns)` names the file version its `sha256`,
//! `upload_url` and `acked` belong to; reporting a different version resets
//! them, so a changed file is uploaded again from the start.

use rusqlite::{params, Connection, OptionalExtension};
use uuid::Uuid;

use super::read::Reader;
use super::StoreError;
use crate::agent::types::{ArtifactItem, ArtifactStatus};

/// Upload states of an artifact row.
pub mod state {
    pub const PENDING: &str = "pending";
    pub const UPLOADING: &str = "uploading";
    pub const UPLOADED: &str = "uploaded";
    /// Refused by the agent (symlink, escape) or the hub (invalid request).
    pub const REFUSED: &str = "refused";
    /// Gave up (too large for the hub, checksum kept failing); retried when
    /// the file changes.
    pub const FAILED: &str = "failed";
}

/// A change to artifact state, applied by the writer.
#[derive(Debug, Clone)]
pub enum ArtifactCmd {
    /// The watcher found a complete file. New: a pending row. Known with the
    /// same version: nothing. Known with another version: pending again,
    /// upload state forgotten.
    Seen {
        session: Uuid,
        path: String,
        size: u64,
        mtime_ns: i64,
    },
    /// The watcher refuses this entry (symlink, escape, special file).
    Refuse {
        session: Uuid,
        path: String,
        reason: String,
    },
    /// An upload was created (or found) for this version.
    Started {
        of: Version,
        sha256: String,
        url: String,
    },
    /// The hub acknowledged bytes up to `acked`.
    Progress { of: Version, acked: u64 },
    /// The hub holds the whole file.
    Done { of: Version },
    /// Give up on this version (reported; a new version retries).
    Fail {
        of: Version,
        state: &'static str,
        error: String,
    },
    /// Start this version over (the hub forgot the upload, or the file
    /// changed under it): pending, no URL, `error` kept for status.
    Reset { of: Version, error: String },
}

/// The file version an uploader command is about. A command about a
/// version the watcher has since replaced changes nothing, so an upload
/// finishing or failing late can never mark the new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub id: i64,
    pub size: u64,
    pub mtime_ns: i64,
}

/// What the uploader needs of a row.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRow {
    pub id: i64,
    pub session: Uuid,
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub state: String,
    pub sha256: Option<String>,
    pub upload_url: Option<String>,
    pub acked: u64,
    pub attempts: u64,
}

/// The row and version an uploader command names (`?1`-`?3`); refusals
/// are left alone too (the watcher decided those).
const SAME_VERSION: &str = "WHERE id = ?1 AND size = ?2 AND mtime_ns = ?3 AND state != 'refused'";

fn pk_of(conn: &Connection, session: &Uuid) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT pk FROM sessions WHERE id = ?1")?
        .query_row([session.to_string()], |r| r.get(0))
        .optional()
}

/// Applies `cmd` on the write connection (the writer calls this outside any
/// other transaction; each statement commits on its own).
pub fn apply(conn: &Connection, cmd: ArtifactCmd) -> rusqlite::Result<()> {
    match cmd {
        ArtifactCmd::Seen {
            session,
            path,
            size,
            mtime_ns,
        } => {
            let Some(pk) = pk_of(conn, &session)? else {
                return Ok(());
            };
            conn.prepare_cached(
                "INSERT INTO artifacts(session, path, size, mtime_ns, state) VALUES (?1, ?2, ?3, ?4, 'pending') \
                 ON CONFLICT(session, path) DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns, \
                 state = 'pending', sha256 = NULL, upload_url = NULL, acked = 0, error = NULL, attempts = 0 \
                 WHERE size != excluded.size OR mtime_ns != excluded.mtime_ns OR state = 'refused'",
            )?
            .execute(params![pk, path, size as i64, mtime_ns])?;
        }
        ArtifactCmd::Refuse {
            session,
            path,
            reason,
        } => {
            let Some(pk) = pk_of(conn, &session)? else {
                return Ok(());
            };
            conn.prepare_cached(
                "INSERT INTO artifacts(session, path, size, mtime_ns, state, error) VALUES (?1, ?2, 0, 0, 'refused', ?3) \
                 ON CONFLICT(session, path) DO UPDATE SET state = 'refused', error = excluded.error, \
                 sha256 = NULL, upload_url = NULL, acked = 0",
            )?
            .execute(params![pk, path, reason])?;
        }
        ArtifactCmd::Started { of, sha256, url } => {
            conn.prepare_cached(&format!(
                "UPDATE artifacts SET state = 'uploading', sha256 = ?4, upload_url = ?5, \
                 attempts = attempts + 1 {SAME_VERSION}"
            ))?
            .execute(params![of.id, of.size as i64, of.mtime_ns, sha256, url])?;
        }
        ArtifactCmd::Progress { of, acked } => {
            conn.prepare_cached(&format!(
                "UPDATE artifacts SET acked = ?4, error = NULL {SAME_VERSION}"
            ))?
            .execute(params![of.id, of.size as i64, of.mtime_ns, acked as i64])?;
        }
        ArtifactCmd::Done { of } => {
            conn.prepare_cached(&format!(
                "UPDATE artifacts SET state = 'uploaded', acked = size, upload_url = NULL, error = NULL \
                 {SAME_VERSION}"
            ))?
            .execute(params![of.id, of.size as i64, of.mtime_ns])?;
        }
        ArtifactCmd::Fail { of, state, error } => {
            conn.prepare_cached(&format!(
                "UPDATE artifacts SET state = ?4, error = ?5, upload_url = NULL {SAME_VERSION}"
            ))?
            .execute(params![of.id, of.size as i64, of.mtime_ns, state, error])?;
        }
        ArtifactCmd::Reset { of, error } => {
            conn.prepare_cached(&format!(
                "UPDATE artifacts SET state = 'pending', upload_url = NULL, acked = 0, sha256 = NULL, \
                 error = ?4, attempts = attempts + 1 {SAME_VERSION}"
            ))?
            .execute(params![of.id, of.size as i64, of.mtime_ns, error])?;
        }
    }
    Ok(())
}

impl ArtifactRow {
    pub fn version(&self) -> Version {
        Version {
            id: self.id,
            size: self.size,
            mtime_ns: self.mtime_ns,
        }
    }
}

const ROW_COLUMNS: &str =
    "a.id, s.id, a.path, a.size, a.mtime_ns, a.state, a.sha256, a.upload_url, a.acked, a.attempts";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ArtifactRow> {
    let id: String = r.get(1)?;
    Ok(ArtifactRow {
        id: r.get(0)?,
        session: Uuid::parse_str(&id).unwrap_or_default(),
        path: r.get(2)?,
        size: r.get::<_, i64>(3)? as u64,
        mtime_ns: r.get(4)?,
        state: r.get(5)?,
        sha256: r.get(6)?,
        upload_url: r.get(7)?,
        acked: r.get::<_, i64>(8)? as u64,
        attempts: r.get::<_, i64>(9)? as u64,
    })
}

/// Most rows one listing returns.
const MAX_LIST: i64 = 10_000;

impl Reader {
    /// The next file to upload: smallest first, so a large recording never
    /// holds up the small files of later sessions.
    pub fn next_artifact(&self) -> Result<Option<ArtifactRow>, StoreError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM artifacts a JOIN sessions s ON s.pk = a.session \
                 WHERE a.state IN ('pending', 'uploading') ORDER BY a.size, a.id LIMIT 1"
            ))?
            .query_row([], row)
            .optional()
        })
    }

    /// One row by id (the uploader re-reads its row between chunks).
    pub fn artifact(&self, id: i64) -> Result<Option<ArtifactRow>, StoreError> {
        self.with(|c| {
            c.prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM artifacts a JOIN sessions s ON s.pk = a.session WHERE a.id = ?1"
            ))?
            .query_row([id], row)
            .optional()
        })
    }

    /// Every known version, for the watcher to skip files it reported
    /// before a restart: (session, path) → (size, mtime, state).
    pub fn artifact_versions(
        &self,
        session: Uuid,
    ) -> Result<Vec<(String, u64, i64, String)>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT a.path, a.size, a.mtime_ns, a.state FROM artifacts a \
                 WHERE a.session = (SELECT pk FROM sessions WHERE id = ?1) LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![session.to_string(), MAX_LIST], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?))
            })?;
            rows.collect()
        })
    }

    /// Sessions whose artifact directories are watched: the active one,
    /// those that ended less than `recent_ns` ago, and any with files still
    /// to upload.
    pub fn watched_sessions(&self, now_ns: i64, recent_ns: i64) -> Result<Vec<Uuid>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id FROM sessions WHERE status = 'active' OR ended_at_ns >= ?1 \
                 OR pk IN (SELECT session FROM artifacts WHERE state IN ('pending', 'uploading')) \
                 ORDER BY pk DESC LIMIT 256",
            )?;
            let rows = stmt.query_map([now_ns - recent_ns], |r| r.get::<_, String>(0))?;
            Ok(rows
                .filter_map(|r| r.ok().and_then(|s| Uuid::parse_str(&s).ok()))
                .collect())
        })
    }

    /// `GET /v1/sessions/{id}/artifacts`, by path.
    pub fn artifacts(&self, session: Uuid) -> Result<Vec<ArtifactItem>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT a.path, a.size, a.state, a.acked, a.sha256, a.error FROM artifacts a \
                 WHERE a.session = (SELECT pk FROM sessions WHERE id = ?1) ORDER BY a.path LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![session.to_string(), MAX_LIST], |r| {
                Ok(ArtifactItem {
                    session_id: session,
                    path: r.get(0)?,
                    size: r.get::<_, i64>(1)? as u64,
                    state: r.get(2)?,
                    uploaded_bytes: r.get::<_, i64>(3)? as u64,
                    sha256: r.get(4)?,
                    error: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// The counts of `/v1/status`'s `artifacts` object (the task's live
    /// fields are filled in by the caller).
    pub fn artifact_counts(&self) -> Result<ArtifactStatus, StoreError> {
        self.with(|c| {
            let mut out = ArtifactStatus::default();
            let mut stmt = c.prepare_cached(
                "SELECT state, count(*), coalesce(sum(size - acked), 0) FROM artifacts GROUP BY state",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            for r in rows {
                let (st, n, left) = r?;
                match st.as_str() {
                    state::PENDING => out.pending = n,
                    state::UPLOADING => out.uploading = n,
                    state::UPLOADED => out.uploaded = n,
                    state::REFUSED => out.refused = n,
                    _ => out.failed += n,
                }
                if st == state::PENDING || st == state::UPLOADING {
                    out.bytes_pending += left.max(0) as u64;
                }
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::store::read::ViewCtx;
    use crate::agent::store::schema;

    fn setup() -> (tempfile::TempDir, Connection, Reader, Uuid) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        let conn = schema::open_writer(&path, false).unwrap();
        let id = Uuid::now_v7();
        conn.execute(
            "INSERT INTO sessions(id, status, started_at_ns, boot_id, started_boottime_ns) VALUES (?1, 'active', 1, 'b', 1)",
            [id.to_string()],
        )
        .unwrap();
        let reader = Reader::new(
            &path,
            ViewCtx {
                device_id: "d".into(),
                device_name: "n".into(),
                sessions_dir: dir.path().join("sessions"),
                boot_id: "b".into(),
            },
        );
        (dir, conn, reader, id)
    }

    fn seen(session: Uuid, path: &str, size: u64, mtime_ns: i64) -> ArtifactCmd {
        ArtifactCmd::Seen {
            session,
            path: path.into(),
            size,
            mtime_ns,
        }
    }

    #[test]
    fn versions_reset_upload_state_and_smallest_goes_first() {
        let (_d, conn, reader, s) = setup();
        apply(&conn, seen(s, "big.bin", 100, 1)).unwrap();
        apply(&conn, seen(s, "small.txt", 10, 1)).unwrap();
        let next = reader.next_artifact().unwrap().unwrap();
        assert_eq!(
            (next.path.as_str(), next.state.as_str()),
            ("small.txt", "pending")
        );
        let id = next.id;
        let of = next.version();
        let started = ArtifactCmd::Started {
            of,
            sha256: "ab".into(),
            url: "http://h/u/1".into(),
        };
        apply(&conn, started).unwrap();
        apply(&conn, ArtifactCmd::Progress { of, acked: 4 }).unwrap();
        // The same version again changes nothing.
        apply(&conn, seen(s, "small.txt", 10, 1)).unwrap();
        let r = reader.artifact(id).unwrap().unwrap();
        assert_eq!(
            (r.state.as_str(), r.acked, r.upload_url.as_deref()),
            ("uploading", 4, Some("http://h/u/1"))
        );
        apply(&conn, ArtifactCmd::Done { of }).unwrap();
        let counts = reader.artifact_counts().unwrap();
        assert_eq!(
            (counts.pending, counts.uploaded, counts.bytes_pending),
            (1, 1, 100)
        );
        // A new version is pending again, from the start.
        apply(&conn, seen(s, "small.txt", 12, 2)).unwrap();
        let r = reader.artifact(id).unwrap().unwrap();
        assert_eq!(
            (r.state.as_str(), r.acked, r.upload_url, r.sha256),
            ("pending", 0, None, None)
        );
        // A late word about the old version changes nothing.
        apply(&conn, ArtifactCmd::Progress { of, acked: 9 }).unwrap();
        let fail = ArtifactCmd::Fail {
            of,
            state: state::FAILED,
            error: "changed".into(),
        };
        apply(&conn, fail).unwrap();
        let r = reader.artifact(id).unwrap().unwrap();
        assert_eq!((r.state.as_str(), r.acked), ("pending", 0));
    }

    #[test]
    fn refused_entries_are_listed_and_a_regular_file_replaces_them() {
        let (_d, conn, reader, s) = setup();
        let refuse = ArtifactCmd::Refuse {
            session: s,
            path: "link".into(),
            reason: "symlink".into(),
        };
        apply(&conn, refuse).unwrap();
        let items = reader.artifacts(s).unwrap();
        assert_eq!(items.len(), 1);
        assert_eq!(
            (items[0].state.as_str(), items[0].error.as_deref()),
            ("refused", Some("symlink"))
        );
        assert_eq!(reader.next_artifact().unwrap(), None);
        apply(&conn, seen(s, "link", 3, 5)).unwrap();
        assert_eq!(reader.next_artifact().unwrap().unwrap().path, "link");
        // Rows of unknown sessions are not made up.
        apply(&conn, seen(Uuid::now_v7(), "x", 1, 1)).unwrap();
        assert_eq!(reader.artifact_counts().unwrap().pending, 1);
    }
}
