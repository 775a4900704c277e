//! logbook: the on-robot session agent (`agent`), the fleet hub (`hub`), and
//! what they share: the versioned wire types (`wire`) and configuration
//! loading (`config`).
//!
//! `agent` and `hub` never import each other; the binaries in `src/bin/` are
//! thin shells over this library.
#![deny(unsafe_code)]

pub mod agent;
pub mod client;
pub mod config;
pub mod dev;
pub mod exit;
pub mod hub;
pub mod prom;
pub mod wire;
