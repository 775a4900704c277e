//! Fuzz target `tz`: the time-zone reader (TZif bytes and POSIX `TZ`
//! rules, used for RFC 3164 times) never panics on any input (checks in
//! `tz::fuzz_one`).
//!
//! Run: `cargo +nightly fuzz run tz -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::agent::formats::tz::fuzz_one(data);
});
