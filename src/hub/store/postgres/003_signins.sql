-- Console sign-ins, shared by every replica: the SHA-256 of the cookie's
-- id (never the id), the token it signed in with (by hash: deleting the
-- token ends the sign-in), its CSRF token.
CREATE TABLE signins (
    hash text PRIMARY KEY,
    token_hash text NOT NULL,
    csrf text NOT NULL,
    expires_at_ns bigint NOT NULL
);
CREATE INDEX signins_expiry ON signins (expires_at_ns);
