//! The RPC agent (step 6 of the roadmap), PyTorch's TensorPipe agent in Rust.
//!
//! - [`AgentOptions`]: what a worker is told, validated with clear errors.
//! - [`rendezvous`]: finding the group through any [`tp_store::Store`], with PyTorch's
//!   key layout.
//! - [`Agent`]: calls ([`Agent::send`]) with timeouts, requests run by a [`Handler`]
//!   on a worker pool, one pipe per peer (reopened after a failure), graceful shutdown
//!   through the store's call-count barrier, dynamic join and leave, device maps,
//!   metrics.
//!
//! ```no_run
//! use std::sync::Arc;
//! use tp_agent::rpc::{Agent, AgentOptions, Reply, Request, RpcMessage};
//! use tp_store::{MemoryStore, Store};
//!
//! let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
//! let echo = |req: Request| Reply::from(req.message);
//! let a = Agent::start(AgentOptions { world_size: Some(2), ..AgentOptions::new("a", 0) }, store.clone(), echo);
//! # let _ = a;
//! ```

pub mod agent;
mod devices;
pub mod message;
pub mod options;
mod pool;
pub mod rendezvous;
mod timer;

pub use agent::{Agent, AgentError, Call, NetworkData, ShutdownError};
pub use message::{CallError, Handler, Reply, Request, RpcMessage, RpcTensor};
pub use options::{AgentOptions, OptionsError};
pub use rendezvous::{Group, RendezvousError};
