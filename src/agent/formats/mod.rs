//! Parsers for the log formats robots already speak besides JSON lines: syslog (RFC 5424 / RFC 3164) and the Fluent Forward protocol. Pure functions from bytes to [`crate::agent::record::Incoming`].
