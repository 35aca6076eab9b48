//! tp-agent: tp's public face — Context, Listener, Pipe — and the RPC agent (steps 4
//! and 6 of the roadmap), plus the `tp` command-line tool.
//!
//! **Status.** [`Context`] is here: the registries of transports and channels, chosen
//! by cargo feature, ranked by PyTorch's priorities (overridable), with backends that
//! are not viable skipped and the reason logged; URL parsing for listen/connect. The
//! Listener and Pipe that drive [`tp_wire`]'s sans-IO pipe over real transports and
//! channels, `tp demo`, `tp bench pipe` and the RPC agent are not written yet, and
//! nothing here claims to be one.
//!
//! The `tp` binary (built with the default features) has the benchmarks:
//!
//! - `tp bench transport --transport tcp|shm|ibv`: a ping-pong over one
//!   [`tp_transport`] connection (both ends spawned unless `--mode` is given), with raw
//!   blocking TCP measured at the same sizes in the same run (round trips and streaming),
//!   a regime line, and the CPU an idle connected pair uses;
//! - `tp bench channel --channel basic|xth|cma|mpt`: a tensor ping-pong over one
//!   [`tp_channel`] channel between two processes, with the same run's physical limit;
//! - `tp bench limits`: memcpy bandwidth, raw loopback TCP round trips and streaming, an
//!   eventfd ping-pong between two processes, and single-thread `process_vm_readv`.
//!
//! Cargo features: `tcp`, `shm`, `basic`, `xth`, `cma`, `mpt` (default), `ibv` (needs
//! libibverbs).
#![forbid(unsafe_code)]

pub mod context;

pub use context::{Context, ContextBuilder, ContextError};
