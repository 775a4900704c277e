//! SIGHUP makes `logbookd` re-read its configuration and use a new device
//! token without a restart.
