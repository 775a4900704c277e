//! tus uploads in progress: their rows, the lookups that make creation
//! idempotent and bound each device, and the expiry sweep's pages.

use rusqlite::{params, OptionalExtension};

use super::rows::{upload_row, UPLOAD_COLUMNS};
use super::Db;
use crate::hub::store::{StoreError, UploadRow};

impl Db {
    pub fn create_upload(&self, upload: &UploadRow) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO uploads (id, device_pk, session_pk, path, content_type, sha256, length,
                                      metadata, created_at_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    upload.id,
                    upload.device_pk,
                    upload.session_pk,
                    upload.path,
                    upload.content_type,
                    upload.sha256,
                    upload.length as i64,
                    upload.metadata,
                    upload.created_at_ns
                ],
            )?;
            Ok(())
        })
    }

    pub fn get_upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = ?1"
            ))?
            .query_row([id], upload_row)
            .optional()?)
        })
    }

    /// An unfinished upload of this device for the same file version, so
    /// a retried creation (its answer lost on the way) resumes that upload
    /// instead of leaving an orphan behind.
    pub fn find_unfinished_upload(
        &self,
        device_pk: i64,
        session_pk: i64,
        path: &str,
        sha256: &str,
        length: u64,
    ) -> Result<Option<UploadRow>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE device_pk = ?1 AND session_pk = ?2
                 AND path = ?3 AND sha256 = ?4 AND length = ?5 ORDER BY created_at_ns DESC LIMIT 1"
            ))?
            .query_row(
                params![device_pk, session_pk, path, sha256, length as i64],
                upload_row,
            )
            .optional()?)
        })
    }

    /// Uploads a device has started and not finished.
    pub fn unfinished_uploads(&self, device_pk: i64) -> Result<u64, StoreError> {
        self.read(|c| {
            Ok(
                c.prepare_cached("SELECT count(*) FROM uploads WHERE device_pk = ?1")?
                    .query_row([device_pk], |r| r.get::<_, i64>(0))? as u64,
            )
        })
    }

    /// Up to `limit` unfinished uploads of a session, by path.
    pub fn session_uploads(
        &self,
        session_pk: i64,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE session_pk = ?1
                 ORDER BY path, created_at_ns LIMIT ?2"
            ))?;
            let rows = st
                .query_map(params![session_pk, limit], upload_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    /// Up to `limit` unfinished uploads created before `before_ns`, oldest
    /// first and after `(created_at_ns, id)` cursor `after` when given: the
    /// candidates for expiry, a page at a time.
    pub fn uploads_created_before(
        &self,
        before_ns: i64,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError> {
        let (at, id) = after.unwrap_or((i64::MIN, ""));
        self.read(|c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {UPLOAD_COLUMNS} FROM uploads
                 WHERE created_at_ns < ?1 AND (created_at_ns, id) > (?2, ?3)
                 ORDER BY created_at_ns, id LIMIT ?4"
            ))?;
            let rows = st
                .query_map(params![before_ns, at, id, limit], upload_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    pub fn delete_upload(&self, id: &str) -> Result<bool, StoreError> {
        self.write(|tx| Ok(tx.execute("DELETE FROM uploads WHERE id = ?1", [id])? > 0))
    }

    pub fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ns: i64,
        until_ns: i64,
    ) -> Result<bool, StoreError> {
        self.write(|tx| {
            let changed = tx.execute(
                "INSERT INTO leases (name, holder, until_ns) VALUES (?1, ?2, ?4)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ns = excluded.until_ns
             WHERE leases.until_ns <= ?3 OR leases.holder = excluded.holder",
                rusqlite::params![name, holder, now_ns, until_ns],
            )?;
            Ok(changed == 1)
        })
    }

    pub fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM leases WHERE name = ?1 AND holder = ?2",
                [name, holder],
            )?;
            Ok(())
        })
    }
}
