//! [`TransportError`]: what can go wrong on a transport, and whose fault it is.

use std::fmt;
use std::io;

/// A transport operation failed.
#[non_exhaustive]
#[derive(Debug)]
pub enum TransportError {
    /// The transport cannot work on this machine.
    NotViable {
        /// Transport name.
        transport: &'static str,
        /// Why.
        reason: String,
    },
    /// The address does not parse or resolve.
    BadAddress {
        /// The address given.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// The connection, listener or transport was closed locally.
    Closed,
    /// The peer closed the connection (end of stream).
    Eof,
    /// A frame announced more bytes than the reader's limit; the connection was closed
    /// before anything was allocated for it.
    FrameTooLarge {
        /// The announced length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// An earlier operation was abandoned halfway (its future dropped), so the stream's
    /// position is unknown; the connection was closed.
    Broken,
    /// A system call failed.
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// The kind of a [`TransportError`], for callers that branch on it.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum ErrorKind {
    /// [`TransportError::NotViable`].
    NotViable,
    /// [`TransportError::BadAddress`].
    BadAddress,
    /// [`TransportError::Closed`].
    Closed,
    /// [`TransportError::Eof`].
    Eof,
    /// [`TransportError::FrameTooLarge`].
    FrameTooLarge,
    /// [`TransportError::Broken`].
    Broken,
    /// [`TransportError::Io`].
    Io,
}

impl TransportError {
    /// The kind of error.
    pub const fn kind(&self) -> ErrorKind {
        match self {
            Self::NotViable { .. } => ErrorKind::NotViable,
            Self::BadAddress { .. } => ErrorKind::BadAddress,
            Self::Closed => ErrorKind::Closed,
            Self::Eof => ErrorKind::Eof,
            Self::FrameTooLarge { .. } => ErrorKind::FrameTooLarge,
            Self::Broken => ErrorKind::Broken,
            Self::Io { .. } => ErrorKind::Io,
        }
    }

    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Self::Io { op, source }
    }

    pub(crate) fn bad_address(address: &str, reason: impl fmt::Display) -> Self {
        Self::BadAddress {
            address: address.to_string(),
            reason: reason.to_string(),
        }
    }
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotViable { transport, reason } => {
                write!(f, "transport {transport} is not viable: {reason}")
            }
            Self::BadAddress { address, reason } => write!(f, "bad address {address:?}: {reason}"),
            Self::Closed => f.write_str("closed"),
            Self::Eof => f.write_str("peer closed the connection"),
            Self::FrameTooLarge { len, limit } => {
                write!(
                    f,
                    "peer announced a {len}-byte frame, over the {limit}-byte limit"
                )
            }
            Self::Broken => f.write_str("connection broken by an abandoned operation"),
            Self::Io { op, source } => write!(f, "{op} failed: {source}"),
        }
    }
}

impl std::error::Error for TransportError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
