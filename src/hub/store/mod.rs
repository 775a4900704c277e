//! The hub's storage seam: the [`Store`] trait the route handlers call,
//! the rows, filters and cursors every backend shares, and the backends.
//! Two: `sqlite` ([`SqliteStore`], one file in the data directory) and
//! `postgres` ([`PgStore`], for a fleet of replicas), each with its own
//! migrations.
//!
//! Invariant: only the backends run SQL; [`Store`] speaks of sessions,
//! batches, logs and uploads, never of tables or connections. One batch is
//! one transaction: it is stored whole or not at all. Handlers only
//! `.await` a method: a backend that blocks moves the work off the async
//! threads itself.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::wire::{AgentReport, Batch, BatchAck, Level, SessionStatus};

mod postgres;
mod sqlite;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;

/// A backend's own failure, kept whole for the log.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be opened (`what` names it: a path or a URL
    /// without its password). `reason` is shown in the message, and is not
    /// a `source`, so the one-line error says it once.
    #[error("database {what}: {reason}")]
    Open { what: String, reason: BackendError },
    #[error(
        "database {what} has schema version {found}, newer than this logbook-hub understands ({known}); upgrade logbook-hub"
    )]
    NewerSchema {
        what: String,
        found: i64,
        known: i64,
    },
    /// The request contradicts what is stored (e.g. a session id owned by
    /// another device).
    #[error("{0}")]
    Conflict(String),
    #[error("database: {0}")]
    Backend(BackendError),
}

/// The hub's storage, as the route handlers see it. Methods are grouped
/// by domain as the SQLite backend's files are: tokens, ingest, sessions
/// and devices, logs, artifacts, uploads.
///
/// What a backend on several replicas needs is in the answers, not in
/// process memory: [`Store::ingest`] returns the records it newly stored
/// (the live fan-out of this process), and [`Store::logs_after`] reads
/// everything committed after a hub row id, so a replica that did not
/// ingest a record can still stream it.
#[async_trait::async_trait]
pub trait Store: Send + Sync {
    // ----- tokens -----

    /// Stores the hash of a new token.
    async fn create_token(&self, hash: &str, principal: &Principal) -> Result<(), StoreError>;

    /// Whom the token with this hash belongs to.
    async fn find_token(&self, hash: &str) -> Result<Option<Principal>, StoreError>;

    /// Deletes the token with this hash and the console sign-ins made with
    /// it; whom it belonged to, `None` when there was no such token. The
    /// next request with it is refused (tokens are looked up per request).
    async fn revoke_token(&self, hash: &str) -> Result<Option<Principal>, StoreError>;

    /// Records a console sign-in. Expired sign-ins go at the same time,
    /// and so, past `max` live ones, do those closest to expiry.
    async fn create_signin(&self, signin: &SignInRow, max: u32) -> Result<(), StoreError>;

    /// The sign-in with this id hash, live at `now_ns` and whose token
    /// still exists: whom the token belongs to, and the CSRF token.
    async fn find_signin(
        &self,
        hash: &str,
        now_ns: i64,
    ) -> Result<Option<(Principal, String)>, StoreError>;

    /// Ends a sign-in (nothing when there is none).
    async fn delete_signin(&self, hash: &str) -> Result<(), StoreError>;

    // ----- ingest -----

    /// Stores one batch in one transaction. `want_live` asks for copies of
    /// the newly stored records (only worth it when someone streams).
    async fn ingest(
        &self,
        scope: &DeviceScope,
        batch: Arc<Batch>,
        want_live: bool,
    ) -> Result<Ingested, StoreError>;

    /// The (session, device) row ids of a device's session, the session
    /// made as an active placeholder if its state has not arrived yet
    /// (uploads may race the batch that opens it). `None` when the session
    /// was deleted.
    async fn session_for_device(
        &self,
        scope: &DeviceScope,
        id: uuid::Uuid,
    ) -> Result<Option<(i64, i64)>, StoreError>;

    // ----- sessions and devices -----

    /// The session's row id, if it exists in this org and project.
    async fn find_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<i64>, StoreError>;

    /// One session with its tags and gaps.
    async fn get_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<SessionRow>, StoreError>;

    /// A page of a project's sessions (tags filled, gaps not).
    async fn list_sessions(
        &self,
        org: &str,
        project: &str,
        q: &SessionQuery,
    ) -> Result<SessionPage, StoreError>;

    /// Deletes a session with its logs, tags, gaps, artifacts and uploads,
    /// and remembers it so a late batch does not bring it back; returns
    /// the blobs and upload parts to remove, or `None` if there was no
    /// such session.
    async fn delete_session(
        &self,
        org: &str,
        project: &str,
        id: &str,
    ) -> Result<Option<Deleted>, StoreError>;

    /// Adds an operator tag; false if the session does not exist.
    async fn add_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<bool, StoreError>;

    /// Removes a tag whoever set it; `None` if the session does not exist,
    /// else whether the tag was there.
    async fn remove_tag(
        &self,
        org: &str,
        project: &str,
        id: &str,
        tag: &str,
    ) -> Result<Option<bool>, StoreError>;

    /// A session's status (`active`, `completed`, ...), by row id.
    async fn session_status(&self, pk: i64) -> Result<Option<String>, StoreError>;

    async fn list_devices(&self, org: &str, project: &str) -> Result<Vec<DeviceRow>, StoreError>;

    /// The projects of `org`, by name: those with a device that has sent
    /// anything, and those a token names (a device token made for a robot
    /// that has not synced yet, a project-scoped operator key).
    async fn list_projects(&self, org: &str) -> Result<Vec<String>, StoreError>;

    async fn find_device(
        &self,
        org: &str,
        project: &str,
        device_id: &str,
    ) -> Result<Option<DeviceRow>, StoreError>;

    // ----- logs -----

    /// A page of `scope`'s records matching `q`, by seq.
    async fn logs(&self, scope: LogScope, q: &LogQuery) -> Result<LogPage, StoreError>;

    /// The newest `q.limit` records of `scope` as [`Store::logs`] gives
    /// them, and an id every record of that same snapshot is at or below
    /// (`None` when there is none): a live stream's starting point.
    async fn logs_tail(
        &self,
        scope: LogScope,
        q: &LogQuery,
    ) -> Result<(LogPage, Option<i64>), StoreError>;

    /// Up to `limit` records of `scope` committed after hub row id `after`
    /// (see [`LogRow::id`]) and matching `q` (its limit, order and cursor
    /// aside), in commit order, and the id the next call should start
    /// after: the last one read, or, when fewer than `limit` came back, the
    /// last id of the same snapshot (so records that did not match are not
    /// read again).
    async fn logs_after(
        &self,
        scope: LogScope,
        after: i64,
        q: &LogQuery,
        limit: u64,
    ) -> Result<(Vec<LogRow>, i64), StoreError>;

    /// A session's records per level (indexed by `Level::code`) in
    /// `buckets` slices of `[from_ns, to_ns)` as [`Histogram`] cuts them:
    /// a timeline, counted in one pass over the session's rows.
    async fn level_histogram(
        &self,
        session_pk: i64,
        slices: Histogram,
    ) -> Result<Vec<[u64; 6]>, StoreError>;

    /// The first record at error level or above of each module of a
    /// session (by record time, then seq), the earliest first, at most
    /// `limit` of them: the error nodes of a session's timeline
    /// (`hub::timeline`).
    async fn first_errors(&self, session_pk: i64, limit: u64) -> Result<Vec<LogRow>, StoreError>;

    // ----- artifacts -----

    /// A session's artifacts, by path.
    async fn list_artifacts(&self, session_pk: i64) -> Result<Vec<ArtifactRow>, StoreError>;

    async fn get_artifact(
        &self,
        session_pk: i64,
        path: &str,
    ) -> Result<Option<ArtifactRow>, StoreError>;

    /// Records a completed upload as the session's artifact at its path,
    /// stored as `blob`, replacing (and returning the blob of) any earlier
    /// one, and forgets the upload.
    async fn complete_upload(
        &self,
        upload: &UploadRow,
        blob: &str,
    ) -> Result<Option<String>, StoreError>;

    /// Upload `id`, finished into an artifact the hub still holds.
    async fn finished_upload(&self, id: &str) -> Result<Option<FinishedUpload>, StoreError>;

    // ----- uploads -----

    async fn create_upload(&self, upload: &UploadRow) -> Result<(), StoreError>;

    async fn get_upload(&self, id: &str) -> Result<Option<UploadRow>, StoreError>;

    /// An unfinished upload of this device for the same file version, so
    /// a retried creation (its answer lost on the way) resumes that upload
    /// instead of leaving an orphan behind.
    async fn find_unfinished_upload(
        &self,
        device_pk: i64,
        session_pk: i64,
        path: &str,
        sha256: &str,
        length: u64,
    ) -> Result<Option<UploadRow>, StoreError>;

    /// How many uploads a device has started and not finished.
    async fn unfinished_uploads(&self, device_pk: i64) -> Result<u64, StoreError>;

    /// Up to `limit` uploads of a session not finished yet, by path (the
    /// session screen's artifacts in progress; their offsets are the
    /// blobs' part lengths).
    async fn session_uploads(
        &self,
        session_pk: i64,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError>;

    /// Up to `limit` unfinished uploads created before `before_ns`, oldest
    /// first and after `(created_at_ns, id)` cursor `after` when given: the
    /// candidates for expiry, a page at a time.
    async fn uploads_created_before(
        &self,
        before_ns: i64,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<UploadRow>, StoreError>;

    /// Forgets an upload; false if there was none.
    async fn delete_upload(&self, id: &str) -> Result<bool, StoreError>;

    // ----- marks -----

    /// Marks of the project's devices matching `q`, oldest first.
    async fn list_marks(
        &self,
        org: &str,
        project: &str,
        q: &MarkQuery,
    ) -> Result<Vec<MarkRow>, StoreError>;

    // ----- leases (one holder across replicas) -----

    /// Takes lease `name` for `holder` until `until_ns` if nobody holds it
    /// at `now_ns` (its last holder's time ran out) or `holder` already
    /// does (a renewal), in one conditional write; whether it did.
    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        now_ns: i64,
        until_ns: i64,
    ) -> Result<bool, StoreError>;

    /// Gives lease `name` back, if `holder` still holds it.
    async fn release_lease(&self, name: &str, holder: &str) -> Result<(), StoreError>;

    // ----- live fan-out (README "Running the hub for a fleet") -----

    /// Whether other hub processes may write this store (replicas on one
    /// PostgreSQL database): live streams then learn of commits from
    /// [`Store::follow_commits`] and read the records from the store, not
    /// from this process's [`Ingested::live`].
    fn shared(&self) -> bool {
        false
    }

    /// Until `stop`, hands `heard` what each batch another hub process
    /// commits changed ([`Heard::Changed`]), and [`Heard::Resync`] each
    /// time the feed is (re)established, when anything may have been
    /// committed unheard. Keeps one connection of its own, reconnecting
    /// with a backoff; `heard` must not block. Returns at once for a store
    /// only this process writes.
    async fn follow_commits(
        &self,
        heard: Box<dyn Fn(Heard) + Send + Sync>,
        stop: CancellationToken,
    ) {
        let _ = (heard, stop);
    }
}

/// What one committed batch changed for live streams, as every replica
/// hears of it: row ids only, never the records themselves (they are read
/// from the store, after the id a stream covered).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changed {
    /// Sessions that got new records.
    pub sessions: Vec<i64>,
    /// Devices that got new records outside any session.
    pub devices: Vec<i64>,
    /// Sessions that left `active`.
    pub ended: Vec<i64>,
}

impl Changed {
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty() && self.devices.is_empty() && self.ended.is_empty()
    }

    /// Whether the stream of `scope` has new records to read.
    pub fn touches(&self, scope: LogScope) -> bool {
        match scope {
            LogScope::Session(pk) => self.sessions.contains(&pk),
            LogScope::Device(pk) => self.devices.contains(&pk),
        }
    }

    /// Whether the stream of `scope` ends (its session left `active`).
    pub fn ends(&self, scope: LogScope) -> bool {
        matches!(scope, LogScope::Session(pk) if self.ended.contains(&pk))
    }
}

/// What [`Store::follow_commits`] hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// A batch another hub process committed.
    Changed(Changed),
    /// The feed was (re)established, or a commit was too large to name:
    /// every stream may be behind.
    Resync,
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

/// A console sign-in as stored: the SHA-256 of its cookie's id, the hash
/// of the token it signed in with, its CSRF token and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignInRow {
    pub hash: String,
    pub token_hash: String,
    pub csrf: String,
    pub expires_at_ns: i64,
}

/// Who a token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: TokenKind,
    pub org: String,
    /// The project a device token ingests into, or the one a
    /// project-scoped operator key reads; empty for an organization-wide
    /// key made without `--project`.
    pub project: String,
    /// Set for device tokens only.
    pub device_id: Option<String>,
    /// An operator key that reads every project of its organization
    /// (`token create --operator` without `--project`, and every key made
    /// before keys could be scoped). False for device tokens.
    pub all_projects: bool,
}

impl Principal {
    /// Whether this operator key reads `org`/`project`.
    pub fn reads(&self, org: &str, project: &str) -> bool {
        self.kind == TokenKind::Operator
            && self.org == org
            && (self.all_projects || self.project == project)
    }
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

impl LogRow {
    /// The row a backend just stored for `rec` of `device_id` under row id
    /// `id`, as live streams get it (every backend builds it the same way).
    pub fn stored(
        id: i64,
        device_pk: i64,
        session_pk: Option<i64>,
        device_id: &str,
        rec: &crate::wire::Record,
    ) -> LogRow {
        LogRow {
            id,
            device_pk,
            session_pk,
            session_id: rec.session_id.map(|u| u.to_string()),
            device_id: device_id.to_owned(),
            seq: rec.seq,
            timestamp_ns: rec.timestamp_ns,
            level: rec.level,
            module: rec.module.clone(),
            message: rec.message.clone(),
            metadata: rec.metadata.clone(),
            pid: rec.pid,
            uid: rec.uid,
            gid: rec.gid,
            process: rec.process.clone(),
        }
    }
}

/// Result of storing one batch.
#[derive(Debug)]
pub struct Ingested {
    pub ack: BatchAck,
    /// Records newly stored (for live streams); empty unless asked for.
    pub live: Vec<LogRow>,
    /// Sessions whose state changed (pk, new status).
    pub changed_sessions: Vec<(i64, SessionStatus)>,
    /// Which streams the batch changed, whether or not `live` was asked
    /// for (the wake a shared store's replicas act on).
    pub changed: Changed,
}

impl Ingested {
    /// What a backend answers once `batch` committed: every seq it carried
    /// is acknowledged, stored now or before (every backend alike).
    pub fn committed(
        batch: &Batch,
        stored: u64,
        duplicates: u64,
        gaps: u64,
        hub_time_ns: i64,
        live: Vec<LogRow>,
        changed_sessions: Vec<(i64, SessionStatus)>,
    ) -> Ingested {
        Ingested {
            ack: BatchAck {
                stored,
                duplicates,
                acked: crate::wire::seq_ranges(batch.records.iter().map(|r| r.seq)),
                sessions: changed_sessions.len() as u64,
                gaps,
                hub_time_ns,
            },
            live,
            changed: Changed {
                ended: changed_sessions
                    .iter()
                    .filter(|(_, st)| *st != SessionStatus::Active)
                    .map(|(pk, _)| *pk)
                    .collect(),
                ..Changed::default()
            },
            changed_sessions,
        }
    }
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
    /// Has a mark of this name.
    pub mark: Option<String>,
    /// `metadata` key equals the JSON value.
    pub metadata: Vec<(String, serde_json::Value)>,
    /// Text in the session's id, device id or name, package name, tags,
    /// metadata or error (a substring, case-insensitive for ASCII
    /// letters): the console's search box. See [`like_pattern`].
    pub search: Option<String>,
    pub sort: SessionSort,
    pub descending: bool,
    pub limit: u64,
    /// Rows to skip (page-number pagination); ignored with a cursor.
    pub offset: u64,
    pub cursor: Option<SessionCursor>,
}

/// One mark as the hub keeps it (README "Marks").
#[derive(Debug, Clone, PartialEq)]
pub struct MarkRow {
    /// `None`: made outside sessions.
    pub session_id: Option<String>,
    pub device_id: String,
    /// The device's id of the mark.
    pub mark_id: i64,
    pub name: String,
    pub timestamp_ns: i64,
    pub before_ns: i64,
    pub after_ns: i64,
    pub priority: String,
    /// JSON object text, or empty.
    pub metadata: String,
    pub released: Option<String>,
}

/// Which marks to list: of one session, of a name, in a time range.
#[derive(Debug, Clone, Default)]
pub struct MarkQuery {
    pub session_pk: Option<i64>,
    pub name: Option<String>,
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub limit: u64,
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

impl LogQuery {
    /// The search text, when it filters: a blank one does not.
    pub fn search_text(&self) -> Option<&str> {
        self.search.as_deref().filter(|s| !s.trim().is_empty())
    }

    /// The session and the lowest level code whose counters answer this
    /// query's total, when it reads a session's records and nothing but a
    /// level floor filters them: a session's `n_<level>` counters grow in
    /// the transaction that stores its rows and go only with them (the
    /// session's delete), so their sum is the rows' count, read from one
    /// row instead of counted over all of them. `None` for a device's
    /// records (no counters) or when another filter applies.
    pub fn total_from_counters(&self, scope: LogScope) -> Option<(i64, usize)> {
        let LogScope::Session(pk) = scope else {
            return None;
        };
        let filtered = self.module.is_some()
            || self.search_text().is_some()
            || self.since_ns.is_some()
            || self.until_ns.is_some();
        (!filtered).then(|| (pk, self.min_level.map_or(0, |l| usize::from(l.code()))))
    }
}

/// A session's stored counters per level, trace first (the columns
/// [`LogQuery::total_from_counters`] sums from its floor up).
pub const SESSION_COUNTERS_SQL: &str =
    "SELECT n_trace, n_debug, n_info, n_warn, n_error, n_fatal FROM sessions WHERE pk = ";

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
    /// The upload it was finished from (`None` for one finished before
    /// migration 10/8 kept it): a creation of this file names it.
    pub upload_id: Option<String>,
}

/// A finished upload: whose it is and how long (`Store::finished_upload`).
#[derive(Debug, Clone, PartialEq)]
pub struct FinishedUpload {
    pub device_pk: i64,
    pub length: u64,
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
    /// Its agent's latest report; `None` until a v4 batch brought one.
    pub report: Option<DeviceReport>,
}

/// The latest [`AgentReport`] of a device and when the hub stored it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceReport {
    pub agent: AgentReport,
    pub reported_at_ns: i64,
}

impl DeviceReport {
    /// A report from its stored columns (`agent_version`, `buffer_bytes`,
    /// `buffer_max_bytes`, `dropped`, `reported_at_ns`), `None` while the
    /// device has not reported. Both backends store the same text.
    pub fn from_columns(
        version: Option<String>,
        buffer_bytes: Option<i64>,
        buffer_max_bytes: Option<i64>,
        dropped: Option<String>,
        reported_at_ns: Option<i64>,
    ) -> Option<DeviceReport> {
        Some(DeviceReport {
            agent: AgentReport {
                version: version?,
                buffer_bytes: buffer_bytes?.max(0) as u64,
                buffer_max_bytes: buffer_max_bytes?.max(0) as u64,
                dropped: parse_dropped(&dropped.unwrap_or_default()),
            },
            reported_at_ns: reported_at_ns?,
        })
    }
}

/// The `dropped` column: a JSON object of reason to count.
pub fn dropped_text(dropped: &[(String, u64)]) -> String {
    let map: serde_json::Map<String, serde_json::Value> = dropped
        .iter()
        .map(|(r, n)| (r.clone(), serde_json::Value::from(*n)))
        .collect();
    serde_json::Value::Object(map).to_string()
}

/// [`dropped_text`] read back (by reason; anything else in it ignored).
pub fn parse_dropped(text: &str) -> Vec<(String, u64)> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(m)) => m
            .into_iter()
            .filter_map(|(r, n)| Some((r, n.as_u64()?)))
            .collect(),
        _ => Vec::new(),
    }
}

/// Files to remove after a session was deleted.
#[derive(Debug, Default)]
pub struct Deleted {
    pub blobs: Vec<String>,
    pub uploads: Vec<String>,
}

/// The SQL of [`Store::first_errors`], the same text on both backends
/// but for the parameter markers (`?1`, `?2` on SQLite; `$1`, `$2` on
/// PostgreSQL): the session's rows at error level and above only, through
/// the partial index `logs_session_errors` (migration 6; the level is
/// written as a literal so both planners see the index applies), the
/// first of each module by a window function.
pub fn first_errors_sql(session: &str, limit: &str) -> String {
    format!(
        "SELECT l.session_pk, s.id, d.device_id, l.seq, l.ts, l.level, l.module, \
                l.message, l.metadata, l.pid, l.uid, l.gid, l.process, l.id, l.device_pk
         FROM (SELECT e.*, row_number() OVER (PARTITION BY e.module ORDER BY e.ts, e.seq) AS nth
               FROM logs e WHERE e.session_pk = {session} AND e.level >= {error}) l
         JOIN sessions s ON s.pk = l.session_pk
         JOIN devices d ON d.pk = l.device_pk
         WHERE l.nth = 1 ORDER BY l.ts, l.seq LIMIT {limit}",
        error = crate::wire::Level::Error.code()
    )
}

/// How a timeline cuts `[from_ns, to_ns)` into `buckets` slices: each
/// `step` long, the last one reaching to `to_ns`. Both backends count
/// with the same integer arithmetic ([`Histogram::slice_sql`]), so they
/// agree on every boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram {
    pub from_ns: i64,
    pub to_ns: i64,
    pub buckets: u32,
}

impl Histogram {
    /// Most slices a timeline is cut into.
    pub const MAX_BUCKETS: u32 = 10_000;

    /// One to [`Histogram::MAX_BUCKETS`] slices, of at least one nanosecond.
    pub fn new(from_ns: i64, to_ns: i64, buckets: u32) -> Histogram {
        Histogram {
            from_ns,
            to_ns: to_ns.max(from_ns.saturating_add(1)),
            buckets: buckets.clamp(1, Self::MAX_BUCKETS),
        }
    }

    pub fn step(&self) -> i64 {
        ((self.to_ns - self.from_ns) / i64::from(self.buckets)).max(1)
    }

    /// The slice of a record's time `ts` as SQL both backends evaluate
    /// alike: `min`/`least` of the integer quotient and the last slice.
    /// `least` is the name on PostgreSQL, `min` on SQLite.
    pub fn slice_sql(&self, least: &str, ts: &str) -> String {
        format!(
            "{least}(({ts} - {from}) / {step}, {last})",
            from = self.from_ns,
            step = self.step(),
            last = self.buckets - 1
        )
    }

    /// Folds `(slice, level code, count)` rows into per-slice counts (a
    /// level code out of range counts as the nearest level, as rows do).
    pub fn fold(&self, rows: impl IntoIterator<Item = (i64, i64, i64)>) -> Vec<[u64; 6]> {
        let mut out = vec![[0u64; 6]; self.buckets as usize];
        for (slice, level, n) in rows {
            if let Some(counts) = usize::try_from(slice).ok().and_then(|s| out.get_mut(s)) {
                counts[level.clamp(0, 5) as usize] += n.max(0) as u64;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;

/// A `LIKE … ESCAPE '\'` pattern that matches `text` anywhere: `%`, `_`
/// and `\` in it stand for themselves. Both backends compare the same
/// way: SQLite's `LIKE` and PostgreSQL's `ILIKE` each ignore the case of
/// ASCII letters (PostgreSQL also of other letters).
pub fn like_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}
