//! Client library for programs on the robot: a `tracing` layer that logs to `logbookd` without ever blocking, and session control.
