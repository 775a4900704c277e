-- Migration 2: marks (README "Marks"), each (device, mark id) once at its
-- highest revision; session_pk 0 for a mark made outside sessions.
CREATE TABLE marks (
    pk bigserial PRIMARY KEY,
    device_pk bigint NOT NULL,
    mark_id bigint NOT NULL,
    revision bigint NOT NULL,
    session_pk bigint NOT NULL,
    ts bigint NOT NULL,
    before_ns bigint NOT NULL,
    after_ns bigint NOT NULL,
    name text COLLATE "C" NOT NULL,
    priority text NOT NULL,
    metadata text NOT NULL,
    released text,
    UNIQUE (device_pk, mark_id)
);
CREATE INDEX marks_session ON marks (session_pk, ts);
CREATE INDEX marks_name ON marks (name, session_pk);
