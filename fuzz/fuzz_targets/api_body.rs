//! Fuzz target `api_body`: the local API's JSON bodies (sessions, stop, tags, marks) and session ids of its paths never panic and refuse with a one-line 400 (checks in `agent::api::fuzz_one`).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run api_body -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::agent::api::fuzz_one(data);
});
