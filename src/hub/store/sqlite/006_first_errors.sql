-- Migration 6: the first error of each module of a
-- session, for the session timeline (README "Session timeline"), reads
-- only the session's error and fatal rows, not all of its records. A
-- partial index: records below error level cost ingest nothing.
-- Queries must say `level >= 4` literally for it to apply.
CREATE INDEX logs_session_errors ON logs (session_pk, module, ts, seq) WHERE level >= 4;
