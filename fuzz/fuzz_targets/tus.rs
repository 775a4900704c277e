//! Fuzz target `tus`: the tus header decoding (Upload-Metadata, and the artifact path it names) never panics, and metadata that parses encodes back to itself (checks in `hub::tus::fuzz_one`).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run tus -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::hub::fuzz_tus(data);
});
