//! Fuzz target `syslog`: the syslog parser never panics on any datagram,
//! keeps every non-empty one within its size bound, and refuses only
//! datagrams of nothing but terminators (checks in `syslog::fuzz_one`).
//!
//! Run: `cargo +nightly fuzz run syslog -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::agent::formats::syslog::fuzz_one(data);
});
