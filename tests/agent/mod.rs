//! Integration tests of `logbookd` and the `logbook` CLI against it.
