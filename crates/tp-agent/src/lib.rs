//! tp-agent: tp's public face — Context, Listener, Pipe — and the RPC agent (steps 4
//! and 6 of the roadmap), plus the `tp` command-line tool.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tp_agent::{Allocation, Context, Message, Payload, Tensor};
//!
//! # futures::executor::block_on(async {
//! let server = Arc::new(Context::new("server"));
//! let listener = server.listen(&["tcp://127.0.0.1:0", "shm://"]).unwrap();
//! let client = Arc::new(Context::new("client"));
//! let pipe = client.connect(&listener.urls()[0]).unwrap();
//! let msg = Message {
//!     metadata: b"hello".to_vec(),
//!     payloads: vec![Payload { data: vec![1, 2, 3], metadata: vec![] }],
//!     tensors: vec![Tensor { data: Box::new(vec![0u8; 1 << 20]), target_device: None, metadata: vec![] }],
//! };
//! let write = pipe.write(msg);
//! let served = listener.accept().await.unwrap();
//! let incoming = served.read_descriptor().await.unwrap();
//! let alloc = Allocation::for_descriptor(&incoming.descriptor);
//! let (alloc, read) = served.read(incoming, alloc).await;
//! read.unwrap();
//! let (_msg_back, written) = write.await;
//! written.unwrap();
//! # });
//! ```
//!
//! **Status.** [`Context`] (backend registries by cargo feature and priority, backends
//! that are not viable skipped with the reason logged, URL parsing), [`Listener`] and
//! [`Pipe`] work: a pipe is [`tp_wire`]'s state machine driven by I/O tasks on the
//! context's runtime thread — the handshake picks the transport and a channel per device
//! pair, messages with payloads and tensors move both ways in order, and closing one
//! end fails the other's pending operations (tested in one process and across
//! processes, including a peer killed mid-message). [`Context::spawn`] runs a task on
//! the context's I/O thread, where a loop that drives pipes runs fastest;
//! [`Context::join`] closes a context and waits until its I/O is done. The RPC agent
//! ([`rpc`]) is PyTorch's TensorPipe agent on these pipes: a group of workers found
//! through a store, calls with timeouts, handlers on a worker pool, graceful shutdown.
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
//! - `tp bench pipe`: message ping-pong over a pipe, as the original's `benchmark_pipe`;
//! - `tp bench store`: a TCPStore server's operations per second under many clients;
//! - `tp bench rpc`: RPC calls per second and latency percentiles between two workers;
//! - `tp demo` and `tp store serve|get|set|add|wait|num-keys`.
//!
//! Cargo features: `tcp`, `shm`, `basic`, `xth`, `cma`, `mpt` (default), `ibv` (needs
//! libibverbs).
#![forbid(unsafe_code)]

pub mod context;
mod listener;
pub mod pipe;
pub mod rpc;
mod runtime;

pub use context::{Context, ContextBuilder, ContextError, ListenError};
pub use listener::Listener;
pub use pipe::{
    Allocation, DescriptorResult, Incoming, Message, OpError, Payload, Pipe, ReadResult, Tensor,
    WriteResult,
};
pub use runtime::Spawned;
