//! The on-robot daemon `logbookd`: ingest, ring buffer, sessions, local API.

pub mod formats;
pub mod record;
pub mod sync;
