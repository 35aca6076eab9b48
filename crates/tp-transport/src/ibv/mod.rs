//! The InfiniBand/RoCE transport (cargo feature `ibv`).
//!
//! The original's design: each side of a connection registers an *inbox* ring the peer
//! RDMA-writes into (write-with-immediate, the immediate carrying the byte count) from
//! its local *outbox*; the reader acknowledges consumed bytes with send-with-immediate,
//! which frees the writer's outbox space. Connections bootstrap over TCP (`host:port`
//! addresses, as [`tcp`](crate::tcp)), exchanging a fixed little-endian
//! [`proto::SetupInfo`] record, and the TCP socket stays open to tell when the peer is
//! gone.
//!
//! - [`proto`] is the ring and acknowledgement protocol as a sans-IO, `core`-only state
//!   machine, tested against an in-memory model of a reliable-connected queue pair.
//! - [`read`] splits one-sided RDMA reads into requests and checks their completions
//!   (also `core`-only); with the `ibv` feature, [`RdmaReader`] drives it for channels
//!   that pull large buffers straight from the peer's memory (cuda_gdr).
//! - With the `ibv` feature, [`IbvTransport`] drives it with real verbs: the `ibverbs`
//!   crate finds the devices; the data path calls libibverbs through `ibverbs-sys` (the
//!   safe crate offers no write-with-immediate). It needs libibverbs at build and run
//!   time, which is why it is not a default feature.
//!
//! Better than the original: no thread busy-polls — a connection waits on its
//! completion channel's fd in the reactor; the device, port and GID index are
//! configurable (`TP_IBV_DEVICE`, `TP_IBV_PORT`, `TP_IBV_GID_INDEX`); the bootstrap
//! record has an explicit layout and is validated; a peer that breaks flow control is a
//! protocol error on that connection only.
//!
//! On a machine without an RDMA device (no kernel support: `ibverbs::devices()` fails
//! with ENOSYS; or an empty list; or no active port), [`IbvTransport::viability`]
//! reports why, and `listen`/`connect` fail with [`TransportError::NotViable`].
//!
//! [`IbvTransport::viability`]: crate::Transport::viability
//! [`TransportError::NotViable`]: crate::TransportError::NotViable

pub mod proto;
pub mod read;
#[cfg(feature = "ibv")]
pub mod reader;
#[cfg(feature = "ibv")]
mod transport;
#[cfg(feature = "ibv")]
#[allow(unsafe_code)]
mod verbs;

#[cfg(feature = "ibv")]
pub use reader::{MemoryRegion, RdmaDevice, RdmaReader, RemoteSpan};
#[cfg(feature = "ibv")]
pub use transport::{DOMAIN_DESCRIPTOR, IbvConfig, IbvTransport};
