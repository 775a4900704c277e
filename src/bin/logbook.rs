//! `logbook` binary.
fn main() {}
