//! The shared-memory transport (work in progress).
//!
//! **Only the ring exists so far.** [`ring`] is the lock-free single-producer
//! single-consumer byte ring the transport will place in memfd segments: sans-IO,
//! `core`-only, no pointers in shared memory, tested under miri. The transport around it
//! (abstract-socket bootstrap, `SCM_RIGHTS` hand-over, eventfd parking, peer credential
//! checks, the boot-id/namespace domain descriptor) is not written yet, and nothing here
//! claims to be a usable transport.

#[allow(unsafe_code)]
pub mod ring;
