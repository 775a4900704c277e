-- Migration 1: the hub's first schema. Times are Unix nanoseconds (i64).

-- Tokens are stored as the SHA-256 of the token text, never the text.
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('operator', 'device')),
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    device_id TEXT,
    created_at_ns INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE devices (
    pk INTEGER PRIMARY KEY,
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    device_id TEXT NOT NULL,
    name TEXT NOT NULL,
    last_seen_ns INTEGER NOT NULL,
    -- hub clock minus the device clock at the last batch
    skew_ns INTEGER NOT NULL,
    UNIQUE (org, project, device_id)
);

CREATE TABLE sessions (
    pk INTEGER PRIMARY KEY,
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    id TEXT NOT NULL,
    device_pk INTEGER NOT NULL,
    -- 0 for a placeholder made from records that arrived before the state
    revision INTEGER NOT NULL,
    status TEXT NOT NULL,
    started_at_ns INTEGER NOT NULL,
    ended_at_ns INTEGER,
    duration_ns INTEGER,
    package_name TEXT,
    package_version TEXT,
    metadata TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    n_trace INTEGER NOT NULL DEFAULT 0,
    n_debug INTEGER NOT NULL DEFAULT 0,
    n_info INTEGER NOT NULL DEFAULT 0,
    n_warn INTEGER NOT NULL DEFAULT 0,
    n_error INTEGER NOT NULL DEFAULT 0,
    n_fatal INTEGER NOT NULL DEFAULT 0,
    -- hub row ids bounding this session's logs, to narrow full-text search
    first_log_id INTEGER,
    last_log_id INTEGER,
    artifact_count INTEGER NOT NULL DEFAULT 0,
    artifact_bytes INTEGER NOT NULL DEFAULT 0,
    UNIQUE (org, project, id)
);
CREATE INDEX sessions_started ON sessions (org, project, started_at_ns);
CREATE INDEX sessions_device ON sessions (device_pk);

-- A deleted session's id, so a late retry from the device cannot revive it.
CREATE TABLE deleted_sessions (
    org TEXT NOT NULL,
    project TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (org, project, id)
) WITHOUT ROWID;

-- source: 'device' tags are replaced by each newer session state,
-- 'operator' tags are added and removed through the API.
CREATE TABLE session_tags (
    session_pk INTEGER NOT NULL,
    tag TEXT NOT NULL,
    source TEXT NOT NULL,
    PRIMARY KEY (session_pk, tag, source)
) WITHOUT ROWID;
CREATE INDEX session_tags_tag ON session_tags (tag, session_pk);

CREATE TABLE logs (
    id INTEGER PRIMARY KEY,
    device_pk INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    session_pk INTEGER,
    ts INTEGER NOT NULL,
    level INTEGER NOT NULL,
    module TEXT NOT NULL,
    message TEXT NOT NULL,
    metadata TEXT NOT NULL,
    pid INTEGER,
    uid INTEGER,
    gid INTEGER,
    process TEXT
);
-- The idempotence key: each (device, seq) is stored once.
CREATE UNIQUE INDEX logs_device_seq ON logs (device_pk, seq);
CREATE INDEX logs_session_seq ON logs (session_pk, seq) WHERE session_pk IS NOT NULL;
CREATE INDEX logs_device_only ON logs (device_pk, seq) WHERE session_pk IS NULL;

-- Messages only: no copy of the text (contentless), no per-row sizes
-- (no ranking), no positions (whole-word AND queries). Rows are removed
-- with the 'delete' command, which takes the text from `logs`.
CREATE VIRTUAL TABLE logs_fts USING fts5 (
    message,
    content = '',
    columnsize = 0,
    detail = none
);

-- Cumulative counters from the device: the hub keeps the maximum seen.
-- session_pk 0 stands for "no session".
CREATE TABLE gaps (
    device_pk INTEGER NOT NULL,
    session_pk INTEGER NOT NULL,
    level INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dropped INTEGER NOT NULL,
    PRIMARY KEY (device_pk, session_pk, level, reason)
) WITHOUT ROWID;
CREATE INDEX gaps_session ON gaps (session_pk);

-- blob: a random file name under blobs/; the path never touches the disk.
CREATE TABLE artifacts (
    session_pk INTEGER NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    blob TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL,
    PRIMARY KEY (session_pk, path)
) WITHOUT ROWID;

-- tus uploads in progress; the bytes are in uploads/<id>.part.
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    device_pk INTEGER NOT NULL,
    session_pk INTEGER NOT NULL,
    path TEXT NOT NULL,
    content_type TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    length INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    created_at_ns INTEGER NOT NULL
) WITHOUT ROWID;
