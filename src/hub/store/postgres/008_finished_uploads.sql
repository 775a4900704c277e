-- Migration 8: each artifact remembers the upload it was finished from,
-- so a HEAD on a finished upload answers it whole (a client whose last
-- PATCH answer was lost is done, not sent back to create it again), and a
-- creation of a file the hub holds names that upload. Artifacts finished
-- before this have none and answer as before.
ALTER TABLE artifacts ADD COLUMN upload_id text;
CREATE UNIQUE INDEX artifacts_by_upload ON artifacts (upload_id) WHERE upload_id IS NOT NULL;
