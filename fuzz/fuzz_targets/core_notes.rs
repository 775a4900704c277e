//! Fuzz target `core_notes`: the core file note parser (crash capture)
//! never panics on any input, whatever its offsets and sizes claim
//! (`agent::crash::elf::fuzz_one`).
//!
//! Run: `cargo +nightly fuzz run core_notes -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::agent::crash::elf::fuzz_one(data);
});
