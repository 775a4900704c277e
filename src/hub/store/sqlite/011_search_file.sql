-- Migration 11: the full-text index moves to a file of its own
-- (`hub-search.db`, see `fts`), written after ingest commits rather than
-- inside them (issue 18); it is rebuilt there from `logs`. What stays here
-- is the epoch: a number this database was given at random, raised by
-- each session's delete. The index records the epoch it has seen; an
-- index whose epoch differs (a restored backup, a delete that did not
-- reach it) is rebuilt, never trusted.
DROP TABLE logs_fts;
DROP TABLE fts_blocks;
CREATE TABLE search_epoch (
    one INTEGER PRIMARY KEY CHECK (one = 1),
    epoch INTEGER NOT NULL
);
INSERT INTO search_epoch VALUES (1, random() & 0x3fffffffffffffff);
