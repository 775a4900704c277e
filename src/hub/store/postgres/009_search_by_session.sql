-- Migration 9: the full-text index leads with the session, so a search in
-- one session reads only that session's entries of each word (GIN's
-- scan skips through the word's posting tree to the session's rows)
-- instead of building a bitmap of every record in the hub holding the word
-- and intersecting it with the session's rows: counting a common word's
-- matches in one session of 100,000 at 10M records went from about 370 ms
-- to 16-25 ms (BENCHMARKS.md, "Queries at 10M records on PostgreSQL").
-- A GIN index over a bigint column needs btree_gin's operator classes
-- (a trusted extension since PostgreSQL 13: a database owner may create
-- it). Searches of a device's records outside sessions use the word
-- column alone, as before. Rebuilding the index locks writes to `logs`
-- for as long as it takes (about 80 s per 10M records here).
CREATE EXTENSION IF NOT EXISTS btree_gin;
DROP INDEX logs_search;
CREATE INDEX logs_search ON logs USING gin
    (session_pk, to_tsvector('simple', regexp_replace(message, '[^[:alnum:]]+', ' ', 'g')));
