//! A session's artifacts, and the step that turns a finished upload into
//! one (replacing an earlier file at the same path).

use rusqlite::{params, OptionalExtension};

use super::rows::artifact_row;
use super::{now_ns, Db};
use crate::hub::store::{ArtifactRow, FinishedUpload, StoreError, UploadRow};

impl Db {
    pub fn list_artifacts(&self, session_pk: i64) -> Result<Vec<ArtifactRow>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT path, size, content_type, sha256, blob, created_at_ns, upload_id FROM artifacts
                 WHERE session_pk = ?1 ORDER BY path",
            )?;
            let rows = st
                .query_map([session_pk], artifact_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    pub fn get_artifact(
        &self,
        session_pk: i64,
        path: &str,
    ) -> Result<Option<ArtifactRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT path, size, content_type, sha256, blob, created_at_ns, upload_id FROM artifacts
                 WHERE session_pk = ?1 AND path = ?2",
            )?
            .query_row(params![session_pk, path], artifact_row)
            .optional()?)
        })
    }

    /// Records a completed upload as the session's artifact at its path,
    /// replacing (and returning the blob of) any earlier one, and forgets
    /// the upload.
    pub fn complete_upload(
        &self,
        upload: &UploadRow,
        blob: &str,
    ) -> Result<Option<String>, StoreError> {
        self.write(|tx| {
            let old: Option<String> = tx
                .query_row(
                    "SELECT blob FROM artifacts WHERE session_pk = ?1 AND path = ?2",
                    params![upload.session_pk, upload.path],
                    |r| r.get(0),
                )
                .optional()?;
            tx.execute(
                "INSERT INTO artifacts (session_pk, path, size, content_type, sha256, blob, created_at_ns, upload_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (session_pk, path) DO UPDATE SET size = excluded.size,
                   content_type = excluded.content_type, sha256 = excluded.sha256,
                   blob = excluded.blob, created_at_ns = excluded.created_at_ns,
                   upload_id = excluded.upload_id",
                params![
                    upload.session_pk,
                    upload.path,
                    upload.length as i64,
                    upload.content_type,
                    upload.sha256,
                    blob,
                    now_ns(),
                    upload.id
                ],
            )?;
            tx.execute(
                "UPDATE sessions SET
                   artifact_count = (SELECT count(*) FROM artifacts WHERE session_pk = ?1),
                   artifact_bytes = (SELECT COALESCE(sum(size), 0) FROM artifacts WHERE session_pk = ?1)
                 WHERE pk = ?1",
                [upload.session_pk],
            )?;
            tx.execute("DELETE FROM uploads WHERE id = ?1", [&upload.id])?;
            Ok(old)
        })
    }

    pub fn finished_upload(&self, id: &str) -> Result<Option<FinishedUpload>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(
                "SELECT s.device_pk, a.size FROM artifacts a JOIN sessions s ON s.pk = a.session_pk
                 WHERE a.upload_id = ?1",
            )?
            .query_row([id], |r| {
                Ok(FinishedUpload {
                    device_pk: r.get(0)?,
                    length: r.get::<_, i64>(1)? as u64,
                })
            })
            .optional()?)
        })
    }
}
