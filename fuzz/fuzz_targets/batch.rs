//! Fuzz target `batch`: the sync batch decoders (v1 rows, v2 columns) never
//! panic on any body, raw or gzip, keep what they materialize within the
//! limit, and a body that decodes re-encodes to the same batch (checks in
//! `wire::fuzz_one`).
//!
//! Run: `cargo +nightly fuzz run batch -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::wire::fuzz_one(data);
});
