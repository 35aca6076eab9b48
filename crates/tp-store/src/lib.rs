//! tp-store: the rendezvous key-value store (step 5 of the roadmap).
//!
//! **Status.** [`proto`] is here: PyTorch's TCPStore wire protocol (commands 0–18) as a
//! sans-IO codec that builds without `std` — zero-copy, incremental request and
//! response parsing with every length checked against [`proto::Limits`] before
//! anything is buffered for it, and encoding. The `Store` trait, the memory, file, TCP
//! (client and server around this codec), prefix and etcd stores, the server's wait
//! bookkeeping and the `tp store` subcommands are not written yet.
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod proto;
