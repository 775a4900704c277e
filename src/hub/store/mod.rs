//! The hub's storage, as the domain sees it: the rows, filters and cursors
//! every backend shares, and the backends. Today one: [`sqlite`], a SQLite
//! database in WAL mode.
//!
//! Invariant: only the backends run SQL; what this module defines speaks
//! of sessions, batches, logs and uploads, never of tables. One batch is
//! one transaction: it is stored whole or not at all.

use std::path::PathBuf;

use crate::wire::{BatchAck, Level, SessionStatus};

mod sqlite;

pub use sqlite::Store;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this logbook-hub understands ({known}); upgrade logbook-hub"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    /// The request contradicts what is stored (e.g. a session id owned by
    /// another device).
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
}

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// Reads and manages everything of one organization.
    Operator,
    /// Ingests for one device of one project.
    Device,
}

impl TokenKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            TokenKind::Operator => "operator",
            TokenKind::Device => "device",
        }
    }
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: TokenKind,
    pub org: String,
    pub project: String,
    /// Set for device tokens only.
    pub device_id: Option<String>,
}

/// The device a batch or upload comes from, as its token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceScope {
    pub org: String,
    pub project: String,
    pub device_id: String,
}

/// One stored log record, joined with its session and device ids.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRow {
    /// The hub's row id: the order records were committed in here (not the
    /// device's `seq` order: errors and set-asides arrive out of it). Live
    /// streams resume after it.
    pub id: i64,
    pub device_pk: i64,
    pub session_pk: Option<i64>,
    pub session_id: Option<String>,
    pub device_id: String,
    pub seq: u64,
    pub timestamp_ns: i64,
    pub level: Level,
    pub module: String,
    pub message: String,
    /// JSON object text, or empty.
    pub metadata: String,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub process: Option<String>,
}

/// Result of storing one batch.
#[derive(Debug)]
pub struct Ingested {
    pub ack: BatchAck,
    /// Records newly stored (for live streams); empty unless asked for.
    pub live: Vec<LogRow>,
    /// Sessions whose state changed (pk, new status).
    pub changed_sessions: Vec<(i64, SessionStatus)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GapRow {
    pub level: Level,
    pub reason: String,
    pub dropped: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub pk: i64,
    pub id: String,
    pub device_id: String,
    pub device_name: String,
    pub status: String,
    pub started_at_ns: i64,
    pub ended_at_ns: Option<i64>,
    pub duration_ns: Option<i64>,
    pub tags: Vec<String>,
    pub package_name: Option<String>,
    pub package_version: Option<String>,
    /// JSON object text.
    pub metadata: String,
    pub error: Option<String>,
    /// Stored records per level, indexed by `Level::code`.
    pub level_counts: [u64; 6],
    pub artifact_count: u64,
    pub artifact_bytes: u64,
    /// Filled by `get_session` only.
    pub gaps: Vec<GapRow>,
}

/// Sort keys of the session list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionSort {
    #[default]
    StartedAt,
    EndedAt,
    Duration,
}

/// A keyset position in the session list: the sort value and the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionCursor {
    pub value: i64,
    pub pk: i64,
}

#[derive(Debug, Clone, Default)]
pub struct SessionQuery {
    pub device_id: Option<String>,
    pub status: Option<String>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    /// Every tag must be present.
    pub tags: Vec<String>,
    pub package_name: Option<String>,
    pub package_version: Option<String>,
    pub has_errors: Option<bool>,
    /// `metadata` key equals the JSON value.
    pub metadata: Vec<(String, serde_json::Value)>,
    pub sort: SessionSort,
    pub descending: bool,
    pub limit: u64,
    /// Rows to skip (page-number pagination); ignored with a cursor.
    pub offset: u64,
    pub cursor: Option<SessionCursor>,
}

#[derive(Debug)]
pub struct SessionPage {
    pub items: Vec<SessionRow>,
    pub total: u64,
    pub next_cursor: Option<SessionCursor>,
}

/// Whose logs to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogScope {
    Session(i64),
    /// Records a device sent outside any session.
    Device(i64),
}

#[derive(Debug, Clone, Default)]
pub struct LogQuery {
    /// At or above this level.
    pub min_level: Option<Level>,
    /// Exact module, or a prefix when it ends with `*`.
    pub module: Option<String>,
    pub search: Option<String>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub limit: u64,
    /// Ascending seq order (default: newest first).
    pub ascending: bool,
    /// Exclusive seq bound in the direction of travel.
    pub cursor: Option<u64>,
    /// Also count every match (costs a second query).
    pub want_total: bool,
}

#[derive(Debug)]
pub struct LogPage {
    pub items: Vec<LogRow>,
    pub total: Option<u64>,
    pub next_cursor: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRow {
    pub path: String,
    pub size: u64,
    pub content_type: String,
    pub sha256: String,
    pub blob: String,
    pub created_at_ns: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UploadRow {
    pub id: String,
    pub device_pk: i64,
    pub session_pk: i64,
    pub path: String,
    pub content_type: String,
    pub sha256: String,
    pub length: u64,
    /// The `Upload-Metadata` header as received, echoed on HEAD.
    pub metadata: String,
    pub created_at_ns: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub pk: i64,
    pub device_id: String,
    pub name: String,
    pub last_seen_ns: i64,
    pub skew_ns: i64,
}

/// Files to remove after a session was deleted.
#[derive(Debug, Default)]
pub struct Deleted {
    pub blobs: Vec<String>,
    pub uploads: Vec<String>,
}
