//! tp-tests: the workspace's cross-crate tests.
//!
//! - `prop::packets`: proptest for every packet codec — round trips, arbitrary bytes,
//!   truncation at every offset, single-byte mutations.
//! - `prop::pipe`: random interleavings of write, read and close through tp-wire's
//!   deterministic harness; order and exactly-once must hold.
//! - `prop::cuda_ipc`: cuda_ipc's tensor descriptor (the frame that carries a peer's
//!   CUDA memory handle) — round trips, arbitrary bytes, cut and extended encodings.
//! - `prop::cuda_gdr`: cuda_gdr's per-tensor descriptor (the same three properties)
//!   and the RDMA read plan (coverage, window, completion order) against a model.
//!
//! - `conformance::transport`: one suite of transport behaviours (tensorpipe.md §6.2
//!   plus bad input), instantiated for every transport and run under two executors.
//! - `conformance::channel`: one suite of channel behaviours (tensorpipe.md §6.4 plus
//!   large tensors, close, order), instantiated for basic, xth, cma and mpt.
//! - `conformance::store`: one suite of c10d store behaviours, instantiated for the
//!   memory, file, tcp, prefix (and prefix-in-prefix over tcp) and etcd stores (etcd:
//!   a server the tests start; SKIPPED without the binary, a failure with
//!   `TP_REQUIRE_ETCD=1`).

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod prop;
