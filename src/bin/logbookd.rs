//! `logbookd` binary.
fn main() {}
