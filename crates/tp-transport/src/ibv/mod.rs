//! The InfiniBand/RoCE transport (work in progress).
//!
//! **Only the protocol exists so far.** [`proto`] is the ring and acknowledgement
//! protocol of the original's ibv transport — RDMA write-with-immediate into the peer's
//! registered inbox ring, acknowledgements sent back as send-with-immediate — as a
//! sans-IO, `core`-only state machine, tested here against an in-memory model of a
//! reliable-connected queue pair. The verbs glue (the `ibverbs` crate behind the `ibv`
//! feature, TCP bootstrap, viability probe) is not written yet, and nothing here claims
//! to be a usable transport. This machine has no RDMA device (`ibverbs::devices()` fails
//! with ENOSYS), so the glue can only ever be compile-tested here.

pub mod proto;
