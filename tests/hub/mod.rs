//! Integration tests of `logbook-hub`.
