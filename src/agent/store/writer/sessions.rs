//! The writer's session commands (open, close, tag, untag) and the boot-id
//! rule applied at start: a session still active from an earlier boot is
//! closed as failed, "device rebooted"; one from this boot stays active.
//!
//! Invariant: at most one session is active (`Writer::current`), and only
//! one started in this boot; a command that fails leaves its session as it
//! was; a duration comes from `store::duration`, never from arithmetic here.

use rusqlite::{params, OptionalExtension};
use uuid::Uuid;

use super::{SessionCmd, Writer};
use crate::agent::store::duration::{duration_ns, Now, Span};
use crate::agent::store::read::session_by_sid;
use crate::agent::store::{boottime_ns, now_ns, StoreError};
use crate::agent::types::{SessionError, SessionView, Target};

impl Writer {
    /// The boot-id rule, applied once when the database opens: a session
    /// still active from an earlier boot (another kernel boot id) is closed
    /// as failed with "device rebooted", ending at its last record; the
    /// newest one from this boot (the agent itself restarted) stays active.
    pub(super) fn close_sessions_of_earlier_boots(&mut self) -> Result<(), StoreError> {
        let active: Vec<(i64, String, String, i64, i64)> = {
            let mut stmt = self.conn.prepare(
                "SELECT pk, id, boot_id, started_at_ns, started_boottime_ns FROM sessions \
                 WHERE status = 'active' ORDER BY pk DESC",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        for (pk, id, boot, started, started_boot) in active {
            if boot == self.cfg.view.boot_id && self.current.is_none() {
                self.current = Some((pk, Uuid::parse_str(&id).unwrap_or_default()));
                tracing::info!("session {id} is still active (same boot)");
                continue;
            }
            // The session's last record is the best guess of when it ended.
            let last: Option<i64> = self.conn.query_row(
                "SELECT max(ts_ns) FROM records WHERE session = ?1",
                [pk],
                |r| r.get(0),
            )?;
            let ended = last.unwrap_or(started).max(started);
            let span = Span {
                started_ns: started,
                started_boottime_ns: started_boot,
                boot_id: &boot,
                ended_ns: Some(ended),
                duration_ns: None,
            };
            let duration = duration_ns(&span, &self.cfg.view.boot_id, Now::read());
            self.conn.execute(
                "UPDATE sessions SET status = 'failed', error = 'device rebooted', ended_at_ns = ?2, \
                 duration_ns = ?3, revision = revision + 1 WHERE pk = ?1",
                params![pk, ended, duration],
            )?;
            tracing::warn!("session {id} was active during an earlier boot: closed as failed");
        }
        Ok(())
    }

    fn resolve(&self, target: Target) -> Result<i64, SessionError> {
        match target {
            Target::Current => self.current.map(|(pk, _)| pk).ok_or(SessionError::NoActive),
            Target::Id(id) => self
                .conn
                .query_row(
                    "SELECT pk FROM sessions WHERE id = ?1",
                    [id.to_string()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| SessionError::Store(e.to_string()))?
                .ok_or(SessionError::NotFound(id)),
        }
    }

    fn view(&self, pk: i64) -> Result<SessionView, SessionError> {
        session_by_sid(&self.conn, &self.cfg.view, pk)
            .map_err(|e| SessionError::Store(e.to_string()))?
            .ok_or_else(|| SessionError::Store("session vanished".into()))
    }

    pub(super) fn session(&mut self, cmd: SessionCmd) -> Result<SessionView, SessionError> {
        let store = |e: rusqlite::Error| SessionError::Store(e.to_string());
        self.conn.execute_batch("BEGIN").map_err(store)?;
        match cmd {
            SessionCmd::Open(req) => {
                if let Some((_, id)) = self.current {
                    return Err(SessionError::Active(id));
                }
                if req.tags.len() > MAX_TAGS {
                    return Err(SessionError::Invalid(format!(
                        "a session has at most {MAX_TAGS} tags"
                    )));
                }
                let mut tags = Vec::new();
                for t in req.tags {
                    let t = check_tag(&t)?;
                    if !tags.contains(&t) {
                        tags.push(t);
                    }
                }
                if let Some(p) = &req.package {
                    if p.name.trim().is_empty() || p.name.len() > 256 {
                        return Err(SessionError::Invalid(
                            "package name must be 1 to 256 characters".into(),
                        ));
                    }
                }
                let metadata = serde_json::to_string(&req.metadata)
                    .map_err(|e| SessionError::Invalid(e.to_string()))?;
                if metadata.len() > 64 << 10 {
                    return Err(SessionError::Invalid(
                        "session metadata is over 64KiB".into(),
                    ));
                }
                let id = Uuid::now_v7();
                let dir = self.cfg.view.artifact_dir(&id);
                std::fs::create_dir_all(&dir).map_err(|e| {
                    SessionError::Store(format!(
                        "cannot create artifact directory {}: {e}",
                        dir.display()
                    ))
                })?;
                self.conn
                    .execute(
                        "INSERT INTO sessions(id, status, started_at_ns, boot_id, started_boottime_ns, tags, \
                         package_name, package_version, metadata) VALUES (?1, 'active', ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![
                            id.to_string(),
                            now_ns(),
                            self.cfg.view.boot_id,
                            boottime_ns(),
                            serde_json::to_string(&tags).expect("strings serialize"),
                            req.package.as_ref().map(|p| p.name.clone()),
                            req.package.as_ref().and_then(|p| p.version.clone()),
                            metadata,
                        ],
                    )
                    .map_err(store)?;
                let pk = self.conn.last_insert_rowid();
                self.current = Some((pk, id));
                tracing::info!("session {id} opened");
                self.view(pk)
            }
            SessionCmd::Stop {
                target,
                failed,
                error,
            } => {
                let pk = self.resolve(target)?;
                if self.current.map(|(s, _)| s) != Some(pk) {
                    let v = self.view(pk)?;
                    return Err(SessionError::NotActive(v.id));
                }
                let (started, boot, started_boot): (i64, String, i64) = self
                    .conn
                    .query_row(
                        "SELECT started_at_ns, boot_id, started_boottime_ns FROM sessions WHERE pk = ?1",
                        [pk],
                        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                    )
                    .map_err(store)?;
                let now = Now::read();
                let span = Span {
                    started_ns: started,
                    started_boottime_ns: started_boot,
                    boot_id: &boot,
                    ended_ns: None,
                    duration_ns: None,
                };
                let duration = duration_ns(&span, &self.cfg.view.boot_id, now);
                let error = if failed {
                    Some(error.unwrap_or_else(|| "failed".into()))
                } else {
                    error
                };
                self.conn
                    .execute(
                        "UPDATE sessions SET status = ?2, ended_at_ns = ?3, duration_ns = ?4, error = ?5, \
                         revision = revision + 1 WHERE pk = ?1",
                        params![
                            pk,
                            if failed { "failed" } else { "completed" },
                            now.wall_ns,
                            duration,
                            error
                        ],
                    )
                    .map_err(store)?;
                self.current = None;
                let v = self.view(pk)?;
                tracing::info!("session {} {}", v.id, v.status.as_str());
                Ok(v)
            }
            SessionCmd::Tag { target, tag } => {
                let pk = self.resolve(target)?;
                let tag = check_tag(&tag)?;
                let mut v = self.view(pk)?;
                if !v.tags.contains(&tag) {
                    if v.tags.len() >= MAX_TAGS {
                        return Err(SessionError::Invalid(format!(
                            "a session has at most {MAX_TAGS} tags"
                        )));
                    }
                    v.tags.push(tag);
                    self.set_tags(pk, &v.tags)?;
                }
                self.view(pk)
            }
            SessionCmd::Untag { target, tag } => {
                let pk = self.resolve(target)?;
                let mut v = self.view(pk)?;
                let before = v.tags.len();
                v.tags.retain(|t| *t != tag);
                if v.tags.len() != before {
                    self.set_tags(pk, &v.tags)?;
                }
                self.view(pk)
            }
        }
    }

    fn set_tags(&self, pk: i64, tags: &[String]) -> Result<(), SessionError> {
        self.conn
            .execute(
                "UPDATE sessions SET tags = ?2, revision = revision + 1 WHERE pk = ?1",
                params![pk, serde_json::to_string(tags).expect("strings serialize")],
            )
            .map_err(|e| SessionError::Store(e.to_string()))?;
        Ok(())
    }
}

/// Tags per session: enough for any labelling scheme, small enough that a
/// session row stays small.
const MAX_TAGS: usize = 64;

fn check_tag(tag: &str) -> Result<String, SessionError> {
    let t = tag.trim();
    if t.is_empty() || t.len() > 128 || t.chars().any(char::is_control) {
        return Err(SessionError::Invalid(format!(
            "tag {tag:?} must be 1 to 128 characters without control characters"
        )));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{put, rows, writer_in_boot};
    use super::*;
    use crate::agent::types::OpenSession;
    use crate::wire::Level;

    #[test]
    fn a_session_left_active_survives_an_agent_restart_but_not_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = writer_in_boot(dir.path(), "boot-1");
        let open = w.session(SessionCmd::Open(OpenSession::default())).unwrap();
        w.commit();
        let started: i64 = w
            .conn
            .query_row("SELECT started_at_ns FROM sessions", [], |r| r.get(0))
            .unwrap();
        let mut last = rows(Level::Info, 1);
        last[0].timestamp_ns = started + 5_000_000_000;
        put(&mut w, last);
        drop(w);

        // The agent restarted in the same boot: the session goes on.
        let w = writer_in_boot(dir.path(), "boot-1");
        assert_eq!(w.current(), Some(open.id));
        drop(w);

        // The device rebooted: failed, ended at its last record.
        let w = writer_in_boot(dir.path(), "boot-2");
        assert_eq!(w.current(), None);
        let row: (String, Option<String>, i64, i64) = w
            .conn
            .query_row(
                "SELECT status, error, ended_at_ns - started_at_ns, duration_ns FROM sessions",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        let five = 5_000_000_000;
        assert_eq!(
            row,
            ("failed".into(), Some("device rebooted".into()), five, five)
        );
    }
}
