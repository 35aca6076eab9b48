//! tp-agent: tp's public face — Context, Listener, Pipe — and the RPC agent (steps 4
//! and 6 of the roadmap), plus the `tp` command-line tool.
//!
//! **Status.** The library part is not implemented yet: there is no Context, Listener,
//! Pipe or agent in this crate so far, and nothing here claims to be one. What exists is
//! the `tp` binary's benchmarks:
//!
//! - `tp bench transport --transport tcp|shm`: a ping-pong over one [`tp_transport`]
//!   connection (both ends spawned unless `--mode` is given), with raw blocking TCP
//!   measured at the same sizes in the same run, a regime line, and the CPU an idle
//!   connected pair uses;
//! - `tp bench limits`: memcpy bandwidth, raw loopback TCP round trips and streaming, and
//!   an eventfd ping-pong between two processes.
//!
//! The plan: a context with transport and channel registries chosen by cargo features
//! and ranked by priority; listeners and pipes that drive [`tp_wire`]'s sans-IO pipe
//! state machine over real transports and channels; the RPC agent (rendezvous through
//! tp-store, calls with timeouts, graceful shutdown); `tp demo`.
#![forbid(unsafe_code)]
