//! Channel errors.

use std::fmt;
use std::io;

use tp_transport::TransportError;

/// Why a channel operation failed.
#[non_exhaustive]
#[derive(Debug)]
pub enum ChannelError {
    /// The channel cannot work here.
    NotViable {
        /// Channel name.
        channel: &'static str,
        /// Why.
        reason: String,
    },
    /// The channel (or its context) was closed.
    Closed,
    /// A connection under the channel failed.
    Transport(TransportError),
    /// The peer sent a tensor of another length than this end expected.
    LengthMismatch {
        /// What this end expected.
        expected: u64,
        /// What the peer announced.
        announced: u64,
    },
    /// The peer broke the channel's protocol.
    Protocol(String),
    /// An OS call failed.
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl ChannelError {
    pub(crate) fn io(op: &'static str, source: io::Error) -> Self {
        Self::Io { op, source }
    }

    pub(crate) fn protocol(why: impl fmt::Display) -> Self {
        Self::Protocol(why.to_string())
    }

    pub(crate) fn not_viable(channel: &'static str, reason: impl fmt::Display) -> Self {
        Self::NotViable {
            channel,
            reason: reason.to_string(),
        }
    }

    /// The [`tp_wire::pipe::IoErrorKind`] a pipe records for this failure.
    pub fn kind(&self) -> tp_wire::pipe::IoErrorKind {
        use tp_wire::pipe::IoErrorKind;
        match self {
            Self::Transport(TransportError::Eof) => IoErrorKind::Eof,
            Self::Transport(TransportError::Broken) => IoErrorKind::Reset,
            _ => IoErrorKind::Other,
        }
    }
}

impl fmt::Display for ChannelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotViable { channel, reason } => {
                write!(f, "channel {channel} is not viable: {reason}")
            }
            Self::Closed => f.write_str("channel closed"),
            Self::Transport(e) => write!(f, "channel connection failed: {e}"),
            Self::LengthMismatch {
                expected,
                announced,
            } => write!(
                f,
                "tensor length mismatch: expected {expected} bytes, the peer sent {announced}"
            ),
            Self::Protocol(why) => write!(f, "channel protocol violation: {why}"),
            Self::Io { op, source } => write!(f, "{op}: {source}"),
        }
    }
}

impl std::error::Error for ChannelError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Transport(e) => Some(e),
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<TransportError> for ChannelError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Closed => Self::Closed,
            e => Self::Transport(e),
        }
    }
}
