//! The RPC agent (step 6 of the roadmap), PyTorch's TensorPipe agent in Rust.
//!
//! **Status: its first layer.** [`AgentOptions`] (validated with clear errors) and the
//! rendezvous through any [`tp_store::Store`] ([`rendezvous`]): the static/dynamic group
//! check, rank → name and name → address with PyTorch's key layout, duplicate names
//! and ranks refused with both workers named. Calls, timeouts, shutdown and device
//! maps in flight come next.

pub mod options;
pub mod rendezvous;

pub use options::{AgentOptions, OptionsError};
pub use rendezvous::{Group, RendezvousError};
