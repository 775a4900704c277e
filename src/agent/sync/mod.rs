//! Sync from the agent to the hub: batches of records, session changes and gaps, and resumable tus artifact uploads.

pub mod artifacts;
pub mod backoff;
pub mod error;
pub mod link;
pub mod status;
pub mod throttle;
pub mod tus;
pub mod uploader;
