//! A session's artifacts, the step that turns a finished upload into one
//! (replacing an earlier file at the same path), and tus uploads in
//! progress: their rows, the lookups that make creation idempotent and
//! bound each device, and the expiry sweep's pages.

use deadpool_postgres::GenericClient;

use super::now_ns;
use super::rows::{artifact_row, upload_row, ARTIFACT_COLUMNS, UPLOAD_COLUMNS};
use crate::hub::store::{ArtifactRow, FinishedUpload, StoreError, UploadRow};

pub(super) async fn list(
    c: &impl GenericClient,
    session_pk: i64,
) -> Result<Vec<ArtifactRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE session_pk = $1
             ORDER BY path COLLATE \"C\""
        ))
        .await?;
    Ok(c.query(&st, &[&session_pk])
        .await?
        .iter()
        .map(artifact_row)
        .collect())
}

pub(super) async fn get(
    c: &impl GenericClient,
    session_pk: i64,
    path: &str,
) -> Result<Option<ArtifactRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {ARTIFACT_COLUMNS} FROM artifacts WHERE session_pk = $1 AND path = $2"
        ))
        .await?;
    Ok(c.query_opt(&st, &[&session_pk, &path])
        .await?
        .as_ref()
        .map(artifact_row))
}

/// Records a completed upload as the session's artifact at its path,
/// replacing (and returning the blob of) any earlier one, and forgets the
/// upload.
pub(super) async fn complete_upload(
    client: &mut deadpool_postgres::Client,
    upload: &UploadRow,
    blob: &str,
) -> Result<Option<String>, StoreError> {
    let tx = client.transaction().await?;
    // Locks the session row: two completions of one path commit in turn.
    tx.execute(
        "SELECT 1 FROM sessions WHERE pk = $1 FOR UPDATE",
        &[&upload.session_pk],
    )
    .await?;
    let old: Option<String> = tx
        .query_opt(
            "SELECT blob FROM artifacts WHERE session_pk = $1 AND path = $2",
            &[&upload.session_pk, &upload.path],
        )
        .await?
        .map(|r| r.get(0));
    tx.execute(
        "INSERT INTO artifacts (session_pk, path, size, content_type, sha256, blob, created_at_ns,
                                upload_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (session_pk, path) DO UPDATE SET size = excluded.size,
           content_type = excluded.content_type, sha256 = excluded.sha256,
           blob = excluded.blob, created_at_ns = excluded.created_at_ns,
           upload_id = excluded.upload_id",
        &[
            &upload.session_pk,
            &upload.path,
            &(upload.length as i64),
            &upload.content_type,
            &upload.sha256,
            &blob,
            &now_ns(),
            &upload.id,
        ],
    )
    .await?;
    tx.execute(
        "UPDATE sessions SET
           artifact_count = (SELECT count(*) FROM artifacts WHERE session_pk = $1),
           artifact_bytes = (SELECT COALESCE(sum(size), 0)::bigint FROM artifacts WHERE session_pk = $1)
         WHERE pk = $1",
        &[&upload.session_pk],
    )
    .await?;
    tx.execute("DELETE FROM uploads WHERE id = $1", &[&upload.id])
        .await?;
    tx.commit().await?;
    Ok(old)
}

pub(super) async fn finished_upload(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<FinishedUpload>, StoreError> {
    let st = c
        .prepare_cached(
            "SELECT s.device_pk, a.size FROM artifacts a JOIN sessions s ON s.pk = a.session_pk
             WHERE a.upload_id = $1",
        )
        .await?;
    Ok(c.query_opt(&st, &[&id]).await?.map(|r| FinishedUpload {
        device_pk: r.get(0),
        length: r.get::<_, i64>(1) as u64,
    }))
}

pub(super) async fn create_upload(
    c: &impl GenericClient,
    upload: &UploadRow,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO uploads (id, device_pk, session_pk, path, content_type, sha256, length,
                              metadata, created_at_ns)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &upload.id,
            &upload.device_pk,
            &upload.session_pk,
            &upload.path,
            &upload.content_type,
            &upload.sha256,
            &(upload.length as i64),
            &upload.metadata,
            &upload.created_at_ns,
        ],
    )
    .await?;
    Ok(())
}

pub(super) async fn get_upload(
    c: &impl GenericClient,
    id: &str,
) -> Result<Option<UploadRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = $1"
        ))
        .await?;
    Ok(c.query_opt(&st, &[&id]).await?.as_ref().map(upload_row))
}

pub(super) async fn find_unfinished_upload(
    c: &impl GenericClient,
    device_pk: i64,
    session_pk: i64,
    path: &str,
    sha256: &str,
    length: u64,
) -> Result<Option<UploadRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE device_pk = $1 AND session_pk = $2
             AND path = $3 AND sha256 = $4 AND length = $5 ORDER BY created_at_ns DESC LIMIT 1"
        ))
        .await?;
    Ok(c.query_opt(
        &st,
        &[&device_pk, &session_pk, &path, &sha256, &(length as i64)],
    )
    .await?
    .as_ref()
    .map(upload_row))
}

pub(super) async fn unfinished_uploads(
    c: &impl GenericClient,
    device_pk: i64,
) -> Result<u64, StoreError> {
    let st = c
        .prepare_cached("SELECT count(*) FROM uploads WHERE device_pk = $1")
        .await?;
    Ok(c.query_one(&st, &[&device_pk]).await?.get::<_, i64>(0) as u64)
}

pub(super) async fn session_uploads(
    c: &impl GenericClient,
    session_pk: i64,
    limit: u32,
) -> Result<Vec<UploadRow>, StoreError> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads WHERE session_pk = $1
             ORDER BY path, created_at_ns LIMIT $2"
        ))
        .await?;
    let rows = c.query(&st, &[&session_pk, &i64::from(limit)]).await?;
    Ok(rows.iter().map(upload_row).collect())
}

pub(super) async fn uploads_created_before(
    c: &impl GenericClient,
    before_ns: i64,
    after: Option<(i64, &str)>,
    limit: u32,
) -> Result<Vec<UploadRow>, StoreError> {
    let (at, id) = after.unwrap_or((i64::MIN, ""));
    let st = c
        .prepare_cached(&format!(
            "SELECT {UPLOAD_COLUMNS} FROM uploads
             WHERE created_at_ns < $1
               AND (created_at_ns > $2 OR (created_at_ns = $2 AND id COLLATE \"C\" > $3))
             ORDER BY created_at_ns, id COLLATE \"C\" LIMIT $4"
        ))
        .await?;
    Ok(c.query(&st, &[&before_ns, &at, &id, &i64::from(limit)])
        .await?
        .iter()
        .map(upload_row)
        .collect())
}

pub(super) async fn delete_upload(c: &impl GenericClient, id: &str) -> Result<bool, StoreError> {
    Ok(c.execute("DELETE FROM uploads WHERE id = $1", &[&id])
        .await?
        > 0)
}

/// One conditional upsert: two replicas racing for a lease cannot both
/// see their row written (the loser's `ON CONFLICT ... WHERE` finds the
/// winner's unexpired row and changes nothing).
pub(super) async fn take_lease(
    c: &impl GenericClient,
    name: &str,
    holder: &str,
    now_ns: i64,
    until_ns: i64,
) -> Result<bool, StoreError> {
    let changed = c
        .execute(
            "INSERT INTO leases (name, holder, until_ns) VALUES ($1, $2, $4)
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, until_ns = excluded.until_ns
             WHERE leases.until_ns <= $3 OR leases.holder = excluded.holder",
            &[&name, &holder, &now_ns, &until_ns],
        )
        .await?;
    Ok(changed == 1)
}

pub(super) async fn release_lease(
    c: &impl GenericClient,
    name: &str,
    holder: &str,
) -> Result<(), StoreError> {
    c.execute(
        "DELETE FROM leases WHERE name = $1 AND holder = $2",
        &[&name, &holder],
    )
    .await?;
    Ok(())
}
