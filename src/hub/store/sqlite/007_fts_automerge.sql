-- Migration 7: the full-text index merges its segments 16 at a time
-- instead of FTS5's default 4. Ingest writes one segment per batch and
-- merging them was over a third of the index's cost on the ingest path;
-- with 16, segments are merged less often (BENCHMARKS.md, issue 18: the
-- index's insert cost per record -23 %), while a search
-- reads a few more segments (a 1M-record search 11.7 -> 13 ms). The
-- setting is stored in the index's own config row, so it holds for every
-- connection.
INSERT INTO logs_fts (logs_fts, rank) VALUES ('automerge', 16);
