//! tp-store: the rendezvous key-value store workers find each other through (step 5 of
//! the roadmap), byte-compatible with PyTorch's TCPStore.
//!
//! - [`proto`]: the TCPStore wire protocol (commands 0–18) as a sans-IO codec —
//!   zero-copy incremental parsing with every length checked against [`proto::Limits`]
//!   before anything is buffered for it, and encoding. No allocator needed to parse.
//! - [`data`] (feature `alloc`): what a store holds and the c10d semantics of each
//!   operation (ADD's decimal counters, COMPARE_SET's missing-key rules, queues).
//! - [`serve`] (feature `alloc`): a TCPStore server as a sans-IO state machine — the
//!   per-client VALIDATE check and the WAIT / CANCEL_WAIT / BARRIER bookkeeping.
//!
//! With `std` (the default):
//! - [`Store`], the c10d API, and [`StoreError`];
//! - [`MemoryStore`] (in-process), [`FileStore`] (PyTorch's FileStore format, shared
//!   through a file), [`TcpStore`] (a client, plus [`TcpStoreServer`]: one thread
//!   serving any number of clients), [`PrefixStore`] (wraps any store; nests);
//! - with feature `etcd`, `EtcdStore`: a store on an etcd v3 cluster.
//!
//! ```
//! use std::time::Duration;
//! use tp_store::{Store, TcpStore, TcpStoreOptions};
//!
//! // The first worker serves; every worker is a client.
//! let server = TcpStore::new(TcpStoreOptions {
//!     host: "127.0.0.1".into(),
//!     port: 0,
//!     is_server: true,
//!     ..TcpStoreOptions::default()
//! })?;
//! let worker = TcpStore::new(TcpStoreOptions {
//!     port: server.port(),
//!     ..TcpStoreOptions::default()
//! })?;
//! worker.set("rank0/address", b"tcp://10.0.0.1:5000")?;
//! assert_eq!(server.get("rank0/address")?, b"tcp://10.0.0.1:5000");
//! assert_eq!(server.add("joined", 1)?, 1);
//! worker.wait(&["joined"], Some(Duration::from_secs(1)))?;
//! # Ok::<(), tp_store::StoreError>(())
//! ```
#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "alloc")]
pub mod data;
pub mod proto;
#[cfg(feature = "alloc")]
pub mod serve;

#[cfg(feature = "std")]
mod error;
#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "std")]
mod file;
#[cfg(feature = "std")]
mod memory;
#[cfg(feature = "std")]
mod prefix;
#[cfg(feature = "std")]
mod store;
#[cfg(feature = "std")]
pub mod tcp;

#[cfg(feature = "std")]
pub use error::StoreError;
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;
#[cfg(feature = "std")]
pub use file::FileStore;
#[cfg(feature = "std")]
pub use memory::MemoryStore;
#[cfg(feature = "std")]
pub use prefix::PrefixStore;
#[cfg(feature = "std")]
pub use store::{DEFAULT_TIMEOUT, Store};
#[cfg(feature = "std")]
pub use tcp::{TcpStore, TcpStoreOptions, TcpStoreServer};
