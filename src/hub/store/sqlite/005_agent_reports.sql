-- Migration 5: what each device's agent last reported about itself (a v4
-- batch's `AgentReport`, README "Devices"): its version, its ring
-- buffer's fill and bound, and the records it dropped since it started,
-- by reason (a JSON object, reason to count). NULL until a report
-- arrives: an agent that sends v3 or older never reports.
ALTER TABLE devices ADD COLUMN agent_version TEXT;
ALTER TABLE devices ADD COLUMN buffer_bytes INTEGER;
ALTER TABLE devices ADD COLUMN buffer_max_bytes INTEGER;
ALTER TABLE devices ADD COLUMN dropped TEXT;
ALTER TABLE devices ADD COLUMN reported_at_ns INTEGER;

-- The session screen lists a session's uploads in progress.
CREATE INDEX uploads_session ON uploads (session_pk);
