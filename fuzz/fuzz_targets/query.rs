//! Fuzz target `query`: the hub's query decoding (the filters of the logs and sessions routes, tags, times) and the `Range` header never panic, refuse with a one-line 400, and keep a range inside the file (checks in `hub::api::fuzz_one`).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run query -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::hub::fuzz_query(data);
});
