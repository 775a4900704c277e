//! JSON types of the local API (`api.sock`): request bodies, the session and
//! log-record views, and the error codes. The CLI reads the same types.
//!
//! Invariant: these are the only agent types that derive serde besides the
//! config; the store builds them, the API serializes them, nothing else
//! depends on their field layout.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::agent::sync::status::LinkState;
use crate::wire::{Level, Package, SessionStatus};

/// A session as the local API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: Uuid,
    pub device_id: String,
    pub device_name: String,
    pub status: SessionStatus,
    /// RFC 3339.
    pub started_at: String,
    pub ended_at: Option<String>,
    /// For an active session, the time so far.
    pub duration_seconds: f64,
    pub tags: Vec<String>,
    pub package: Option<Package>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub error: Option<String>,
    pub artifact_dir: String,
    /// Records received while this session was active.
    pub log_count: u64,
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OpenSession {
    pub tags: Vec<String>,
    pub package: Option<Package>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// `POST /v1/sessions/{id}/stop`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StopSession {
    pub failed: bool,
    pub error: Option<String>,
}

/// `POST /v1/sessions/{id}/tags`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddTag {
    pub tag: String,
}

/// One record as `GET /v1/logs` and `logbook logs --json` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogItem {
    pub seq: u64,
    pub session_id: Option<Uuid>,
    /// RFC 3339 with nanoseconds.
    pub timestamp: String,
    pub level: Level,
    pub module: String,
    pub message: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub process: Option<String>,
}

/// The `reason` of the last line of a `GET /v1/logs/follow` stream whose
/// session ended (`{"event":"end","reason":…}`); any other reason means the
/// stream was cut short.
pub const FOLLOW_END_SESSION: &str = "session ended";

/// A page of results; `next_cursor` goes back as `before` (or `after` when
/// ascending) to get the next page, and is null on the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// `POST /v1/flush`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Flushed {
    /// Highest seq committed (0 when the buffer has never held a record).
    pub last_seq: u64,
}

/// What a session command refers to: `current` or an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Current,
    Id(Uuid),
}

impl std::str::FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "current" {
            return Ok(Target::Current);
        }
        Uuid::parse_str(s)
            .map(Target::Id)
            .map_err(|_| format!("{s:?} is not a session id (a UUID) or `current`"))
    }
}

/// Why a session command failed; each maps to one HTTP status and code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SessionError {
    #[error("session {0} is already active; stop it first")]
    Active(Uuid),
    #[error("no active session")]
    NoActive,
    #[error("no session {0}")]
    NotFound(Uuid),
    #[error("session {0} is not active")]
    NotActive(Uuid),
    #[error("{0}")]
    Invalid(String),
    #[error("storage failed: {0}")]
    Store(String),
}

impl SessionError {
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::Active(_) => "session_active",
            SessionError::NoActive => "no_active_session",
            SessionError::NotFound(_) => "not_found",
            SessionError::NotActive(_) => "session_not_active",
            SessionError::Invalid(_) => "invalid",
            SessionError::Store(_) => "internal",
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            SessionError::Active(_) | SessionError::NotActive(_) => 409,
            SessionError::NoActive | SessionError::NotFound(_) => 404,
            SessionError::Invalid(_) => 400,
            SessionError::Store(_) => 500,
        }
    }
}

/// One file of a session's artifact directory and its upload state
/// (`GET /v1/sessions/{id}/artifacts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactItem {
    pub session_id: Uuid,
    /// Relative to the session's artifact directory, `/`-separated.
    pub path: String,
    pub size: u64,
    /// `pending`, `uploading`, `uploaded`, `refused` or `failed`.
    pub state: String,
    /// Bytes the hub has acknowledged.
    pub uploaded_bytes: u64,
    pub sha256: Option<String>,
    /// Why it was refused or failed, or the last transient error.
    pub error: Option<String>,
}

/// The `artifacts` object of `GET /v1/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ArtifactStatus {
    /// False when no hub is configured.
    pub enabled: bool,
    pub pending: u64,
    pub uploading: u64,
    pub uploaded: u64,
    /// Refused by the agent (symlinks, escapes) or the hub (invalid).
    pub refused: u64,
    pub failed: u64,
    /// Bytes of pending and uploading files not yet acknowledged.
    pub bytes_pending: u64,
    /// Artifact bytes acknowledged by the hub since the agent started.
    pub bytes_sent: u64,
    /// 401/403 from the hub: uploads stopped until the token is fixed.
    pub auth_failed: bool,
    /// Seconds of the current retry wait, when backing off.
    pub backoff_seconds: Option<f64>,
    pub last_error: Option<String>,
    /// RFC 3339 time of the last acknowledged chunk or completed upload.
    pub last_success: Option<String>,
}

/// `GET /v1/status`: what the agent serves and `logbook status` reads. Every
/// field is required, so a field the CLI expects and the agent does not send
/// is an error, never a silent zero.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub device_id: String,
    pub device_name: String,
    pub version: String,
    pub uptime_seconds: f64,
    pub current_session: Option<Uuid>,
    pub buffer: BufferStatus,
    pub records: RecordCounts,
    pub ingest: IngestCounts,
    pub gaps: Vec<GapItem>,
    pub sync: SyncStatus,
    /// Artifact uploads (all zero and `enabled: false` without a hub).
    pub artifacts: ArtifactStatus,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BufferStatus {
    pub bytes_used: u64,
    pub bytes_limit: u64,
    /// The last commit failed for want of space on the state directory
    /// (the writer is evicting to make room; what it cannot store is
    /// counted in `disk_full` gaps).
    pub disk_full: bool,
    /// Times `agent.db` went bad while the agent ran and was moved aside
    /// (its unsynced records counted in a `corrupt` gap).
    pub quarantined: u64,
    /// Where the last bad database was moved to.
    pub quarantined_to: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordCounts {
    pub stored: i64,
    pub synced: i64,
    pub unsynced: i64,
    pub last_seq: i64,
    pub evicted_synced: u64,
    pub evicted_unsynced: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IngestCounts {
    pub accepted: u64,
    /// `accepted` by protocol (`json`, `syslog`, `forward`).
    pub accepted_by_protocol: std::collections::BTreeMap<String, u64>,
    pub truncated: u64,
    pub refused: u64,
    /// Bad records by reason.
    pub bad: std::collections::BTreeMap<String, u64>,
    pub connections_total: u64,
    pub connections_open: i64,
    pub committed: u64,
    /// Records SQLite refused to store (disk full, I/O error).
    pub write_failed: u64,
    pub commits: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GapItem {
    pub session_id: Option<Uuid>,
    pub level: Level,
    pub reason: String,
    pub dropped: u64,
}

/// The `sync` object of `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    pub link: LinkState,
    /// RFC 3339 time of the last acknowledged batch.
    pub last_success: Option<String>,
    /// Records not yet acknowledged by the hub.
    pub backlog_records: u64,
    /// Their approximate size in the buffer.
    pub backlog_bytes: u64,
    /// Upper bound of the current retry wait, while backing off.
    pub backoff_seconds: Option<f64>,
    /// Bytes on the wire (gzip or zstd) of acknowledged batches.
    pub bytes_sent: u64,
    pub bytes_uncompressed: u64,
    /// Uncompressed over compressed bytes (0 before the first batch).
    pub compression_ratio: f64,
    /// The `Content-Encoding` of the batches sent now: `gzip`, or `zstd`
    /// once the hub has said it reads it.
    pub content_encoding: String,
    pub batches_sent: u64,
    pub records_sent: u64,
    /// Failed requests since start.
    pub failures: u64,
    /// Batches the hub refused as invalid, set aside and counted as gaps.
    pub set_aside_batches: u64,
    pub set_aside_records: u64,
    pub uploader_restarts: u64,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            device_id: "d".into(),
            device_name: "n".into(),
            version: "0".into(),
            uptime_seconds: 1.5,
            current_session: None,
            buffer: BufferStatus {
                bytes_used: 1,
                bytes_limit: 2,
                disk_full: false,
                quarantined: 0,
                quarantined_to: None,
            },
            records: RecordCounts {
                stored: 3,
                synced: 1,
                unsynced: 2,
                last_seq: 3,
                evicted_synced: 0,
                evicted_unsynced: 0,
            },
            ingest: IngestCounts {
                accepted: 3,
                accepted_by_protocol: [("json".to_owned(), 3)].into(),
                truncated: 0,
                refused: 0,
                bad: Default::default(),
                connections_total: 1,
                connections_open: 0,
                committed: 3,
                write_failed: 0,
                commits: 1,
            },
            gaps: Vec::new(),
            sync: SyncStatus {
                link: LinkState::Disabled,
                last_success: None,
                backlog_records: 2,
                backlog_bytes: 10,
                backoff_seconds: None,
                bytes_sent: 0,
                bytes_uncompressed: 0,
                compression_ratio: 0.0,
                content_encoding: "gzip".into(),
                batches_sent: 0,
                records_sent: 0,
                failures: 0,
                set_aside_batches: 0,
                set_aside_records: 0,
                uploader_restarts: 0,
                last_error: None,
            },
            artifacts: ArtifactStatus::default(),
        }
    }

    /// The CLI reads what the agent writes; a field gone from the JSON (a
    /// rename on one side) is an error, not a silent zero.
    #[test]
    fn status_round_trips_and_a_missing_field_is_an_error() {
        let s = status();
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(serde_json::from_value::<Status>(json.clone()).unwrap(), s);
        for (outer, inner) in [
            ("records", "stored"),
            ("ingest", "accepted_by_protocol"),
            ("sync", "backlog_records"),
            ("artifacts", "enabled"),
        ] {
            let mut j = json.clone();
            j[outer].as_object_mut().unwrap().remove(inner).unwrap();
            let e = serde_json::from_value::<Status>(j).unwrap_err();
            assert!(e.to_string().contains(inner), "{e}");
        }
        let mut j = json;
        j.as_object_mut().unwrap().remove("artifacts");
        assert!(serde_json::from_value::<Status>(j).is_err());
    }
}

/// `POST /v1/marks`: a mark in the active session (or among the device
/// logs when none is active). Windows are seconds or a duration text
/// (`"30s"`); the time is RFC 3339, the agent's clock when absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewMark {
    pub name: String,
    pub timestamp: Option<String>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    pub priority: Option<String>,
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// One mark as `GET /v1/marks` and `logbook marks --json` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MarkView {
    /// The agent's id of the mark, increasing, never reused.
    pub id: i64,
    pub session_id: Option<Uuid>,
    pub name: String,
    /// The mark's moment, RFC 3339 with nanoseconds.
    pub timestamp: String,
    /// The window it pins: `timestamp` minus `before`, plus `after`.
    pub start: String,
    pub end: String,
    pub before_seconds: f64,
    pub after_seconds: f64,
    /// `high` or `normal`.
    pub priority: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Why its window is no longer pinned (`pinned_max`), or null.
    pub released: Option<String>,
}
