-- Console sign-ins, shared by every process on this database: the
-- SHA-256 of the cookie's id (never the id), the token it signed in with
-- (by hash: deleting the token ends the sign-in), its CSRF token.
CREATE TABLE signins (
    hash TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires_at_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX signins_expiry ON signins (expires_at_ns);
