//! Result rows to domain types (the `SELECT` column lists with the
//! functions that read them), small shared lookups, and [`Where`], the
//! builder of filtered `WHERE` clauses with numbered parameters.

use deadpool_postgres::GenericClient;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::hub::store::{
    ArtifactRow, DeviceReport, DeviceRow, LogRow, SessionRow, StoreError, UploadRow,
};
use crate::wire::Level;

pub(super) fn level_of(code: i64) -> Level {
    Level::from_code(code.clamp(0, 5) as u8).unwrap_or(Level::Info)
}

fn u32_of(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

/// `SELECT` columns for a [`LogRow`], in the order `log_row` reads them.
pub(super) const LOG_COLUMNS: &str =
    "l.session_pk, s.id, d.device_id, l.seq, l.ts, l.level, l.module, \
     l.message, l.metadata, l.pid, l.uid, l.gid, l.process, l.id, l.device_pk";

pub(super) fn log_row(r: &Row) -> LogRow {
    LogRow {
        session_pk: r.get(0),
        session_id: r.get(1),
        device_id: r.get(2),
        seq: r.get::<_, i64>(3) as u64,
        timestamp_ns: r.get(4),
        level: level_of(r.get(5)),
        module: r.get(6),
        message: r.get(7),
        metadata: r.get(8),
        pid: u32_of(r.get(9)),
        uid: u32_of(r.get(10)),
        gid: u32_of(r.get(11)),
        process: r.get(12),
        id: r.get(13),
        device_pk: r.get(14),
    }
}

pub(super) const SESSION_COLUMNS: &str =
    "s.pk, s.id, d.device_id, d.name, s.status, s.started_at_ns, \
     s.ended_at_ns, s.duration_ns, s.package_name, s.package_version, s.metadata, s.error, \
     s.n_trace, s.n_debug, s.n_info, s.n_warn, s.n_error, s.n_fatal, s.artifact_count, \
     s.artifact_bytes";

pub(super) fn session_row(r: &Row) -> SessionRow {
    let mut level_counts = [0u64; 6];
    for (i, c) in level_counts.iter_mut().enumerate() {
        *c = r.get::<_, i64>(12 + i) as u64;
    }
    SessionRow {
        pk: r.get(0),
        id: r.get(1),
        device_id: r.get(2),
        device_name: r.get(3),
        status: r.get(4),
        started_at_ns: r.get(5),
        ended_at_ns: r.get(6),
        duration_ns: r.get(7),
        tags: Vec::new(),
        package_name: r.get(8),
        package_version: r.get(9),
        metadata: r.get(10),
        error: r.get(11),
        level_counts,
        artifact_count: r.get::<_, i64>(18) as u64,
        artifact_bytes: r.get::<_, i64>(19) as u64,
        gaps: Vec::new(),
    }
}

/// `SELECT` columns for an [`UploadRow`], in the order `upload_row` reads
/// them.
pub(super) const UPLOAD_COLUMNS: &str =
    "id, device_pk, session_pk, path, content_type, sha256, length, metadata, created_at_ns";

pub(super) fn upload_row(r: &Row) -> UploadRow {
    UploadRow {
        id: r.get(0),
        device_pk: r.get(1),
        session_pk: r.get(2),
        path: r.get(3),
        content_type: r.get(4),
        sha256: r.get(5),
        length: r.get::<_, i64>(6) as u64,
        metadata: r.get(7),
        created_at_ns: r.get(8),
    }
}

pub(super) const DEVICE_COLUMNS: &str = "pk, device_id, name, last_seen_ns, skew_ns, \
     agent_version, buffer_bytes, buffer_max_bytes, dropped, reported_at_ns";

pub(super) fn device_row(r: &Row) -> DeviceRow {
    DeviceRow {
        pk: r.get(0),
        device_id: r.get(1),
        name: r.get(2),
        last_seen_ns: r.get(3),
        skew_ns: r.get(4),
        report: DeviceReport::from_columns(r.get(5), r.get(6), r.get(7), r.get(8), r.get(9)),
    }
}

pub(super) const ARTIFACT_COLUMNS: &str =
    "path, size, content_type, sha256, blob, created_at_ns, upload_id";

pub(super) fn artifact_row(r: &Row) -> ArtifactRow {
    ArtifactRow {
        path: r.get(0),
        size: r.get::<_, i64>(1) as u64,
        content_type: r.get(2),
        sha256: r.get(3),
        blob: r.get(4),
        created_at_ns: r.get(5),
        upload_id: r.get(6),
    }
}

pub(super) async fn session_pk(
    c: &impl GenericClient,
    org: &str,
    project: &str,
    id: &str,
) -> Result<Option<i64>, StoreError> {
    let st = c
        .prepare_cached("SELECT pk FROM sessions WHERE org = $1 AND project = $2 AND id = $3")
        .await?;
    Ok(c.query_opt(&st, &[&org, &project, &id])
        .await?
        .map(|r| r.get(0)))
}

/// A session's tags in byte order (`COLLATE "C"`, as SQLite sorts them).
pub(super) async fn tags_of(c: &impl GenericClient, pk: i64) -> Result<Vec<String>, StoreError> {
    let st = c
        .prepare_cached(
            "SELECT DISTINCT tag COLLATE \"C\" FROM session_tags WHERE session_pk = $1
             ORDER BY 1",
        )
        .await?;
    Ok(c.query(&st, &[&pk])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// One query parameter, owned.
pub(super) type Arg = Box<dyn ToSql + Sync + Send>;

/// A `WHERE` clause built from optional filters: each condition's `?`
/// become numbered parameters (`$1`, `$2`, ...) in the order added.
#[derive(Default)]
pub(super) struct Where {
    sql: Vec<String>,
    args: Vec<Arg>,
}

impl Where {
    pub(super) fn and<const N: usize>(&mut self, condition: &str, args: [Arg; N]) {
        let base = self.args.len();
        let mut out = String::new();
        for (i, part) in condition.split('?').enumerate() {
            if i > 0 {
                out.push_str(&format!("${}", base + i));
            }
            out.push_str(part);
        }
        debug_assert_eq!(condition.matches('?').count(), N);
        self.sql.push(out);
        self.args.extend(args);
    }

    /// Adds `condition` with `value` as its one parameter, when there is one.
    pub(super) fn and_some<T: ToSql + Sync + Send + 'static>(
        &mut self,
        condition: &str,
        value: Option<T>,
    ) {
        if let Some(v) = value {
            self.and(condition, [Box::new(v)]);
        }
    }

    /// The clause, and its parameters as a query takes them.
    pub(super) fn sql(&self) -> String {
        self.sql.join(" AND ")
    }

    pub(super) fn args(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.args
            .iter()
            .map(|a| a.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}
