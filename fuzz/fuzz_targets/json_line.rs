//! Fuzz target `json_line`: the JSON-lines parser must never panic, and a
//! record it keeps must respect the size bound it was given.
//!
//! Run: `cargo +nightly fuzz run json_line -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use logbook::agent::ingest::json::{parse_line, TRUNCATION_MARK};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the bound, so small bounds get exercised too.
    let Some((&b, line)) = data.split_first() else {
        return;
    };
    let max = 256 + (b as usize) * 64;
    if let Ok(record) = parse_line(line, max) {
        if record.truncated {
            assert!(record.message.ends_with(TRUNCATION_MARK));
            assert!(record.message.len() <= max + TRUNCATION_MARK.len());
        }
    }
});
