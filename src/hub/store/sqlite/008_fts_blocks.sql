-- Migration 8: full-text documents per block of records (issue 18). From
-- now on ingest indexes up to 64 records that one batch stored in a row
-- for one session as one document, under the first record's id; this
-- table holds the last id of each block of more than one. A document
-- without a row here is one record, as every document written before this
-- migration is, so the existing index stays as it is.
CREATE TABLE fts_blocks (
    first INTEGER PRIMARY KEY,
    last INTEGER NOT NULL
);
