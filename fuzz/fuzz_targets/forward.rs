//! Fuzz target `forward`: the Fluent Forward decoder never panics on any
//! stream, keeps its buffer and records within their bounds, and frames the
//! same whatever the read sizes (checks in `forward::fuzz_one`).
//!
//! Run: `cargo +nightly fuzz run forward -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::agent::formats::forward::fuzz_one(data);
});
