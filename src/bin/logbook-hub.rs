//! `logbook-hub` binary.
fn main() {}
