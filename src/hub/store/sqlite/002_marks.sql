-- Migration 2: marks (README "Marks"), each (device, mark id) once at its
-- highest revision; session_pk 0 for a mark made outside sessions.
CREATE TABLE marks (
    pk INTEGER PRIMARY KEY,
    device_pk INTEGER NOT NULL,
    mark_id INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    session_pk INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    before_ns INTEGER NOT NULL,
    after_ns INTEGER NOT NULL,
    name TEXT NOT NULL,
    priority TEXT NOT NULL,
    metadata TEXT NOT NULL,
    released TEXT,
    UNIQUE (device_pk, mark_id)
);
CREATE INDEX marks_session ON marks (session_pk, ts);
CREATE INDEX marks_name ON marks (name, session_pk);
