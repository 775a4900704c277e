//! Fuzz target `config`: `agent.toml` and `hub.toml` (TOML, the key tables, `LOGBOOK_*` values) never panic on load and resolve, and refuse with one line (checks in `config::fuzz_one`).
//!
//! Run: `RUSTC_BOOTSTRAP=1 cargo fuzz run config -- -max_total_time=60` (in `fuzz/`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    logbook::agent::config::fuzz_one(data);
    logbook::hub::config::fuzz_one(data);
});
