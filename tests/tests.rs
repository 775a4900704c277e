//! One integration-test binary: each `mod` is an area, each test starts the
//! real binaries on a fresh temporary directory (see `util`).

mod agent;
mod cli;
mod hub;
mod ingest;
mod sync;
mod tidy;
mod util;
