//! The on-robot daemon `logbookd`: ingest, ring buffer, sessions, local API.
