//! tp-store: the rendezvous key-value store (step 5 of the roadmap).
//!
//! **Status: not implemented yet.** This crate holds no code so far; nothing here works.
//! The plan: the c10d `Store` API (set, get, add, compare_set, wait, ...) with memory,
//! file, TCP (byte-compatible with PyTorch's TCPStore, its protocol as a sans-IO `alloc`
//! module) and prefix implementations.
#![forbid(unsafe_code)]
