//! Integration tests of sync: real agent, real hub, real sockets, and a
//! fault-injecting proxy between them.

mod artifacts;
mod faultproxy;
