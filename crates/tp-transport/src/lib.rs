//! tp-transport: byte-stream transports for tp's pipes.
//!
//! A transport carries a pipe's control frames and payloads: ordered, reliable byte
//! streams between two contexts. This crate holds the three traits every transport
//! implements — [`Transport`] (the context: name, viability, domain descriptor, listen,
//! connect), [`Listener`] and [`Connection`] — and the backends:
//!
//! | backend | feature | state |
//! |---|---|---|
//! | [`tcp`] | `tcp` (default) | IPv4/IPv6, ephemeral ports, `TCP_NODELAY`, address guessing |
//! | [`shm`] | `shm` (default, Linux) | memfd rings, eventfd parking, `SCM_RIGHTS` bootstrap, peer checks |
//! | [`ibv`] | `ibv` (needs libibverbs) | RDMA write-with-immediate rings over a TCP bootstrap; the protocol ([`ibv::proto`]) is sans-IO and tested against a queue-pair model; without an RDMA device the context reports why it is not viable |
//!
//! # The API is plain futures
//!
//! Every operation returns a future that works under any executor; I/O readiness comes
//! from the `async-io` reactor (epoll through `polling`). Operations take `&self`, so a
//! connection can have many reads and writes in flight at once. Each is queued *when it
//! is issued* (when the method is called), and reads complete in issue order, as do
//! writes. A future dropped before it started gives up its place; one dropped halfway
//! through its I/O leaves the stream at an unknown position, so the connection closes and
//! later operations fail with [`TransportError::Broken`].
//!
//! Beside the futures, [`Connection::try_write`] and [`Connection::try_read_exact`] do an
//! operation *now* if it needs no waiting — nothing ahead of it, and the bytes fit or are
//! there — or do nothing at all. A caller that polls a future just to see whether it is
//! done at once (a pipe does, for every small message) saves the boxed future. shm
//! implements them; the other transports always answer "not now".
//!
//! # Frames
//!
//! Besides raw exact-length reads and writes, a connection reads and writes
//! length-prefixed frames: an 8-byte little-endian length, then the bytes.
//! [`Connection::read_frame`] checks the length against the caller's limit before it
//! allocates anything; a peer that announces more is cut off.
//!
//! # Close
//!
//! Closing a connection, a listener or a whole transport context fails every pending
//! operation on it exactly once with [`TransportError::Closed`]; a peer's close shows up
//! as [`TransportError::Eof`].

#![deny(unsafe_code)]
// With no backend feature only `ibv::proto` is built, and the shared machinery idles.
#![cfg_attr(
    not(any(feature = "tcp", feature = "shm")),
    allow(dead_code, unused_imports, unused_macros)
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod error;
pub mod ibv;
mod listener;
pub mod order;
mod ordered;
mod registry;
#[cfg(feature = "shm")]
pub mod shm;
mod signal;
pub mod spin;
#[cfg(feature = "tcp")]
pub mod tcp;

use std::fmt;

pub use error::{ErrorKind, TransportError};
use futures::future::BoxFuture;

/// A boxed connection.
pub type BoxConnection = Box<dyn Connection>;
/// A boxed listener.
pub type BoxListener = Box<dyn Listener>;

/// A transport context: the factory for listeners and connections of one kind.
pub trait Transport: fmt::Debug + Send + Sync {
    /// The registered name (`tcp`, `shm`, `ibv`); also the URL scheme.
    fn name(&self) -> &'static str;

    /// `Ok` when the transport works on this machine, else
    /// [`TransportError::NotViable`] with the reason.
    ///
    /// # Errors
    /// [`TransportError::NotViable`].
    fn viability(&self) -> Result<(), TransportError>;

    /// Returns `true` when [`Transport::viability`] is `Ok`.
    fn is_viable(&self) -> bool {
        self.viability().is_ok()
    }

    /// Two contexts can talk when their domain descriptors are byte-equal.
    fn domain_descriptor(&self) -> &[u8];

    /// Starts listening on `address` (transport-specific; port 0 or an empty name picks
    /// one). The listener reports the address actually bound.
    ///
    /// # Errors
    /// [`TransportError::BadAddress`], [`TransportError::Closed`], or an OS error.
    fn listen(&self, address: &str) -> Result<BoxListener, TransportError>;

    /// Connects to a listener's `address`.
    fn connect(&self, address: &str) -> BoxFuture<'static, Result<BoxConnection, TransportError>>;

    /// Closes the context: every listener and connection it made is closed, and later
    /// calls fail with [`TransportError::Closed`]. Idempotent.
    fn close(&self);
}

/// Accepts connections.
pub trait Listener: fmt::Debug + Send + Sync {
    /// The address actually bound (the ephemeral port resolved).
    fn address(&self) -> &str;

    /// `<transport>://<address>`.
    fn url(&self) -> String;

    /// The next incoming connection. Accepts complete in issue order.
    fn accept(&self) -> BoxFuture<'_, Result<BoxConnection, TransportError>>;

    /// Stops listening; pending and later accepts fail with [`TransportError::Closed`].
    fn close(&self);
}

/// An ordered, reliable byte stream.
pub trait Connection: fmt::Debug + Send + Sync {
    /// Writes every buffer, in order, as one unit after all earlier writes.
    fn write<'a>(&'a self, bufs: &'a [&'a [u8]]) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Fills `buf` entirely with the next bytes of the stream, after all earlier reads.
    fn read_exact<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Writes every buffer now, as [`Connection::write`] would, if that needs no
    /// waiting: no earlier write is pending and the bytes fit. Otherwise writes nothing
    /// and returns `false` — also when the connection has failed; [`Connection::write`]
    /// then does the write, or reports the error. A `true` is a write issued and
    /// completed in one call, with nothing allocated. The default never writes.
    fn try_write(&self, bufs: &[&[u8]]) -> bool {
        let _ = bufs;
        false
    }

    /// Fills `buf` now, as [`Connection::read_exact`] would, if that needs no waiting:
    /// no earlier read is pending and the bytes are there. Otherwise reads nothing and
    /// returns `false` (see [`Connection::try_write`]). The default never reads.
    fn try_read_exact(&self, buf: &mut [u8]) -> bool {
        let _ = buf;
        false
    }

    /// Whether the peer's bytes land in memory this end looks at (shm's ring), so that
    /// [`Connection::try_read_exact`] finds them the moment they arrive: a reader that
    /// waits for them can look for them itself, with no wake-up in between. The default
    /// says no, as does tcp, whose `try_read_exact` only hands out bytes an earlier read
    /// took from the socket.
    fn reads_now(&self) -> bool {
        false
    }

    /// Reads one length-prefixed frame of at most `limit` bytes.
    ///
    /// A larger announced length closes the connection with
    /// [`TransportError::FrameTooLarge`] before any allocation.
    fn read_frame(&self, limit: u64) -> BoxFuture<'_, Result<Vec<u8>, TransportError>>;

    /// Writes `body` as one length-prefixed frame.
    fn write_frame<'a>(&'a self, body: &'a [u8]) -> BoxFuture<'a, Result<(), TransportError>>;

    /// Closes both directions; pending and later operations fail with
    /// [`TransportError::Closed`]. Idempotent.
    fn close(&self);
}
