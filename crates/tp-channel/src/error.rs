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
    /// The buffer lives on a device this channel does not move memory of.
    UnsupportedDevice {
        /// Channel name.
        channel: &'static str,
        /// The buffer's device.
        device: tp_wire::Device,
    },
    /// A device (GPU) call failed.
    Device {
        /// What was being done.
        op: &'static str,
        /// The driver's message.
        message: String,
    },
    /// An OS call failed.
    Io {
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

impl ChannelError {
    /// [`ChannelError::Io`].
    pub fn io(op: &'static str, source: io::Error) -> Self {
        Self::Io { op, source }
    }

    /// [`ChannelError::Protocol`].
    pub fn protocol(why: impl fmt::Display) -> Self {
        Self::Protocol(why.to_string())
    }

    /// [`ChannelError::Device`].
    pub fn device(op: &'static str, message: impl fmt::Display) -> Self {
        Self::Device {
            op,
            message: message.to_string(),
        }
    }

    /// [`ChannelError::NotViable`].
    pub fn not_viable(channel: &'static str, reason: impl fmt::Display) -> Self {
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
            Self::UnsupportedDevice { channel, device } => {
                write!(f, "channel {channel} cannot move memory of {device}")
            }
            Self::Device { op, message } => write!(f, "{op}: {message}"),
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
