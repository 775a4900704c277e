//! The writer's side of marks: storing one (from the local API or from a
//! record's `event` field) in the active session, and releasing pins over
//! `buffer.pinned_max` before eviction, each release counted as a
//! `pin_released` gap.
//!
//! Invariant: a pin is never released without its gap counter growing in
//! the same transaction.

use std::sync::atomic::Ordering;

use rusqlite::Connection;

use super::bound::add_gap;
use super::Writer;
use crate::agent::marks::MarkSpec;
use crate::agent::store::marks::{self, MarkError, PIN_RELEASED};
use crate::agent::store::now_ns;
use crate::agent::types::SessionError;

impl Writer {
    /// A mark from the local API, in the open transaction.
    pub(super) fn mark(&mut self, spec: &MarkSpec) -> Result<i64, SessionError> {
        let session = self.current.map_or(0, |(pk, _)| pk);
        marks::insert(&self.conn, session, spec, now_ns()).map_err(|e| match e {
            MarkError::TooMany => SessionError::Invalid(e.to_string()),
            MarkError::Sql(e) => SessionError::Store(e.to_string()),
        })
    }

    /// A mark a record asked for: a refusal is counted and logged, never
    /// fails the record.
    pub(super) fn mark_of_record(&mut self, spec: &MarkSpec) {
        if let Err(e) = self.mark(spec) {
            self.stats.marks_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("mark {:?} not stored: {e}", spec.name);
        }
    }
}

/// Releases pins over `max` bytes (oldest normal ones first) and counts
/// each released window as a `pin_released` gap; returns how many marks
/// were released.
pub(super) fn release_over(conn: &Connection, max: u64) -> rusqlite::Result<u64> {
    if !marks::has_pins(conn)? {
        return Ok(0);
    }
    let (released, gaps) = marks::release_over(conn, max.min(i64::MAX as u64) as i64)?;
    for (session, level, n) in gaps {
        add_gap(conn, session, level, PIN_RELEASED, n)?;
    }
    if released > 0 {
        tracing::warn!(
            "marks pin more than buffer.pinned_max: released the pins of {released} marks (counted as gaps)"
        );
    }
    Ok(released)
}
