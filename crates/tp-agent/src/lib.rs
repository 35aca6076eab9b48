//! tp-agent: tp's public face — Context, Listener, Pipe — and the RPC agent (steps 4
//! and 6 of the roadmap), plus the `tp` command-line tool.
//!
//! **Status: not implemented yet.** This crate holds no code so far; nothing here works.
//! The plan: a context with transport and channel registries chosen by cargo features
//! and ranked by priority; listeners and pipes that drive [`tp_wire`]'s sans-IO pipe
//! state machine over real transports and channels; the RPC agent (rendezvous through
//! tp-store, calls with timeouts, graceful shutdown); the `tp` tool (`tp demo`,
//! `tp bench ...`).
#![forbid(unsafe_code)]
