-- Migration 1: the hub's first PostgreSQL schema. Times are Unix
-- nanoseconds (bigint), as on SQLite; JSON is kept as the text received so
-- both backends answer the same bytes.

-- Tokens are stored as the SHA-256 of the token text, never the text.
CREATE TABLE tokens (
    hash text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('operator', 'device')),
    org text NOT NULL,
    project text NOT NULL,
    device_id text,
    created_at_ns bigint NOT NULL
);

CREATE TABLE devices (
    pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org text NOT NULL,
    project text NOT NULL,
    device_id text NOT NULL,
    name text NOT NULL,
    last_seen_ns bigint NOT NULL,
    -- hub clock minus the device clock at the last batch
    skew_ns bigint NOT NULL,
    UNIQUE (org, project, device_id)
);

CREATE TABLE sessions (
    pk bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org text NOT NULL,
    project text NOT NULL,
    id text NOT NULL,
    device_pk bigint NOT NULL,
    -- 0 for a placeholder made from records that arrived before the state
    revision bigint NOT NULL,
    status text NOT NULL,
    started_at_ns bigint NOT NULL,
    ended_at_ns bigint,
    duration_ns bigint,
    package_name text,
    package_version text,
    metadata text NOT NULL DEFAULT '{}',
    error text,
    n_trace bigint NOT NULL DEFAULT 0,
    n_debug bigint NOT NULL DEFAULT 0,
    n_info bigint NOT NULL DEFAULT 0,
    n_warn bigint NOT NULL DEFAULT 0,
    n_error bigint NOT NULL DEFAULT 0,
    n_fatal bigint NOT NULL DEFAULT 0,
    -- the last hub row id of this session's logs (a live stream's start)
    last_log_id bigint,
    artifact_count bigint NOT NULL DEFAULT 0,
    artifact_bytes bigint NOT NULL DEFAULT 0,
    UNIQUE (org, project, id)
);
-- The session list's sort keys, each with pk as the keyset tiebreak.
CREATE INDEX sessions_started ON sessions (org, project, started_at_ns, pk);
CREATE INDEX sessions_ended ON sessions (org, project, (COALESCE(ended_at_ns, 9223372036854775807)), pk);
CREATE INDEX sessions_duration ON sessions (org, project, (COALESCE(duration_ns, 0)), pk);
CREATE INDEX sessions_device ON sessions (device_pk);

-- A deleted session's id, so a late retry from the device cannot revive it.
CREATE TABLE deleted_sessions (
    org text NOT NULL,
    project text NOT NULL,
    id text NOT NULL,
    PRIMARY KEY (org, project, id)
);

-- source: 'device' tags are replaced by each newer session state,
-- 'operator' tags are added and removed through the API.
CREATE TABLE session_tags (
    session_pk bigint NOT NULL,
    tag text NOT NULL,
    source text NOT NULL,
    PRIMARY KEY (session_pk, tag, source)
);
CREATE INDEX session_tags_tag ON session_tags (tag, session_pk);

-- The idempotence key: each (device, seq) is stored once. A table of its
-- own because a unique index on the partitioned `logs` would have to
-- include the partition key; a key commits in the same transaction as
-- its record.
CREATE TABLE log_keys (
    device_pk bigint NOT NULL,
    seq bigint NOT NULL,
    PRIMARY KEY (device_pk, seq)
);

-- Hub row ids: the order records were committed in (ingest holds a
-- transaction lock while it takes them, see `ingest.rs`).
CREATE SEQUENCE logs_id_seq AS bigint;

-- Partitioned by record time (`ts`, ns), one partition per calendar month
-- (UTC), named logs_yYYYYmMM. Partitions are made on insert: before a
-- batch's transaction the hub creates the months it is about to write
-- that do not exist yet (`partitions.rs`, under an advisory lock).
-- Expiring a month is dropping its partition; nothing is rewritten.
-- Times outside 2000..2100 (a device clock gone wrong) land in the
-- default partition.
CREATE TABLE logs (
    id bigint NOT NULL DEFAULT nextval('logs_id_seq'),
    device_pk bigint NOT NULL,
    seq bigint NOT NULL,
    session_pk bigint,
    ts bigint NOT NULL,
    level bigint NOT NULL,
    module text NOT NULL,
    message text NOT NULL,
    metadata text NOT NULL,
    pid bigint,
    uid bigint,
    gid bigint,
    process text
) PARTITION BY RANGE (ts);
ALTER SEQUENCE logs_id_seq OWNED BY logs.id;
CREATE TABLE logs_other PARTITION OF logs DEFAULT;
CREATE INDEX logs_id ON logs (id);
CREATE INDEX logs_session_seq ON logs (session_pk, seq) WHERE session_pk IS NOT NULL;
CREATE INDEX logs_device_only ON logs (device_pk, seq) WHERE session_pk IS NULL;
-- Full-text search on whole words, case-insensitive: the message split at
-- every character that is not a letter or digit (as SQLite's FTS5
-- unicode61 tokenizer splits it), no stemming, no stop words ('simple').
-- Queries must use this same expression (`logs.rs`, SEARCH_VECTOR).
CREATE INDEX logs_search ON logs USING gin
    (to_tsvector('simple', regexp_replace(message, '[^[:alnum:]]+', ' ', 'g')));

-- Cumulative counters from the device: the hub keeps the maximum seen.
-- session_pk 0 stands for "no session".
CREATE TABLE gaps (
    device_pk bigint NOT NULL,
    session_pk bigint NOT NULL,
    level bigint NOT NULL,
    reason text NOT NULL,
    dropped bigint NOT NULL,
    PRIMARY KEY (device_pk, session_pk, level, reason)
);
CREATE INDEX gaps_session ON gaps (session_pk);

-- blob: a random file name under blobs/; the path never touches the disk.
CREATE TABLE artifacts (
    session_pk bigint NOT NULL,
    path text NOT NULL,
    size bigint NOT NULL,
    content_type text NOT NULL,
    sha256 text NOT NULL,
    blob text NOT NULL,
    created_at_ns bigint NOT NULL,
    PRIMARY KEY (session_pk, path)
);

-- tus uploads in progress; the bytes are in uploads/<id>.part.
CREATE TABLE uploads (
    id text PRIMARY KEY,
    device_pk bigint NOT NULL,
    session_pk bigint NOT NULL,
    path text NOT NULL,
    content_type text NOT NULL,
    sha256 text NOT NULL,
    length bigint NOT NULL,
    metadata text NOT NULL,
    created_at_ns bigint NOT NULL
);
CREATE INDEX uploads_device ON uploads (device_pk);
CREATE INDEX uploads_created ON uploads (created_at_ns, id);
