//! tp-tests: the workspace's cross-crate tests.
//!
//! - `prop::packets`: proptest for every packet codec — round trips, arbitrary bytes,
//!   truncation at every offset, single-byte mutations.
//! - `prop::pipe`: random interleavings of write, read and close through tp-wire's
//!   deterministic harness; order and exactly-once must hold.
//!
//! Conformance suites for transports and channels (iceoryx2 style, one suite
//! instantiated per backend) join here as those crates land.

#[cfg(test)]
mod prop;
