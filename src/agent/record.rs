//! What every ingest parser produces: one [`Incoming`] record, before the
//! agent gives it a seq, a session and an arrival time, plus the [`Trusted`]
//! fields the listener takes from the sender's socket credentials.

use crate::wire::Level;

/// A parsed log record, as a client sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    /// Unix nanoseconds from the record; `None` is stamped on arrival.
    pub timestamp_ns: Option<i64>,
    pub level: Level,
    pub module: Option<String>,
    pub message: String,
    /// Every field the parser did not map to the ones above.
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// The same fields already rendered as the JSON object text the store
    /// keeps (empty text: none), by a parser that skipped building
    /// `metadata` (which is then empty). See [`Incoming::take_metadata_text`].
    pub rendered: Option<String>,
    /// The record was over `ingest.max_record_bytes` and was cut, with a
    /// visible mark in its message.
    pub truncated: bool,
}

impl Incoming {
    /// Takes the metadata as the store keeps it: JSON object text, empty
    /// when there is none.
    pub fn take_metadata_text(&mut self) -> String {
        match self.rendered.take() {
            Some(text) => text,
            None if self.metadata.is_empty() => String::new(),
            None => serde_json::to_string(&std::mem::take(&mut self.metadata)).unwrap_or_default(),
        }
    }
}

/// Fields a client cannot forge: from `SO_PEERCRED` (stream sockets) or
/// `SCM_CREDENTIALS` (datagrams), and `/proc/<pid>/comm`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trusted {
    pub pid: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub process: Option<String>,
}
