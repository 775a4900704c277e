//! Parsers for the log formats robots already speak besides JSON lines:
//! syslog (RFC 5424 / RFC 3164) and the Fluent Forward protocol. Pure
//! functions from bytes to [`crate::agent::record::Incoming`]: no I/O, no
//! clock reads except where a caller-supplied `now` is needed, no panics on
//! any input (each parser has a `fuzz_one` entry point that proves it).
//!
//! How the listeners call them:
//! - `syslog.sock` (SOCK_DGRAM): `recvmmsg` into buffers of
//!   `ingest.max_record_bytes` plus headroom each, with `SO_PASSCRED` set so
//!   the kernel attaches `SCM_CREDENTIALS` (pid, uid, gid) to every
//!   datagram, even from senders that pass none; then
//!   [`syslog::parse_in`] with the local [`tz::Zone`] (or
//!   [`syslog::parse`], UTC). `Err` means an empty datagram: count it. A
//!   record whose metadata has [`syslog::ERROR_KEY`] was kept as text: count it as
//!   malformed too. A datagram cut by the buffer (`MSG_TRUNC`) is parsed
//!   as received and marked truncated by the listener.
//! - `forward.sock` (SOCK_STREAM): one [`forward::ForwardDecoder`] per
//!   connection, fed every read; after each feed call
//!   [`forward::ForwardDecoder::next_frame`] until `Ok(None)`. For each
//!   frame: hand `records` to the pipeline (trusted fields from
//!   `SO_PEERCRED` of the connection), count `bad`, report `first_error`,
//!   then write `ack` back if present. A fatal `Err` closes this connection
//!   only.
//! - Both: never wait on SQLite; the records go into the same bounded
//!   queue as JSON lines.

pub mod fields;
pub mod forward;
mod msgpack;
pub mod syslog;
pub mod tz;

/// Appended to a message that was cut to fit `ingest.max_record_bytes`, so a
/// reader sees the cut instead of silently missing text.
pub const TRUNCATION_MARK: &str = " …[truncated]";

/// Cuts `message` so that it, plus [`TRUNCATION_MARK`], fits in `max_bytes`,
/// on a char boundary. Returns whether it cut anything.
pub fn truncate_message(message: &mut String, max_bytes: usize) -> bool {
    if message.len() <= max_bytes {
        return false;
    }
    let mut keep = max_bytes.saturating_sub(TRUNCATION_MARK.len());
    while keep > 0 && !message.is_char_boundary(keep) {
        keep -= 1;
    }
    message.truncate(keep);
    message.push_str(TRUNCATION_MARK);
    true
}

/// Deterministic byte mutations of real samples, shared by the parsers'
/// "never panics" tests (they live in [`crate::test_rng`], shared with the
/// hub's decoders).
#[cfg(test)]
pub(crate) mod mutate {
    pub use crate::test_rng::{mutate, Rng};
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, max: usize, expected: &str, cut: bool) {
        let mut s = input.to_string();
        assert_eq!(truncate_message(&mut s, max), cut, "{input:?}");
        assert_eq!(s, expected);
        assert!(s.len() <= max.max(TRUNCATION_MARK.len()));
    }

    #[test]
    fn truncation() {
        check("short", 100, "short", false);
        check("exactly", 7, "exactly", false);
        check(
            &"a".repeat(40),
            20,
            &format!("{}{TRUNCATION_MARK}", "a".repeat(5)),
            true,
        );
        // Never splits a UTF-8 sequence: "é" is two bytes.
        check(
            &"é".repeat(20),
            22,
            &format!("{}{TRUNCATION_MARK}", "é".repeat(3)),
            true,
        );
        check("abcdef", 0, TRUNCATION_MARK, true);
    }
}
