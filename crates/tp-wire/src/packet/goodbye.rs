//! [`GoodbyeRepr`]: the last frame a side sends, saying why it closes.

#[cfg(feature = "alloc")]
use alloc::string::{String, ToString};
use core::fmt;

use super::Packet;
use crate::codec::{Reader, Writer, bytes_len};
use crate::error::{DecodeError, EncodeError};
use crate::frame::FrameKind;
use crate::limits::Limits;

/// Why a side closes its pipe. The numbering is part of the wire format; a code this
/// build does not know decodes as [`CloseReason::Other`], so new reasons can be added
/// without breaking old peers.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum CloseReason {
    /// The user closed the pipe.
    Normal,
    /// The peers share no protocol version.
    VersionMismatch,
    /// The peers share no transport.
    NoCommonTransport,
    /// The peer broke the protocol (bad frame, unexpected packet, inconsistent answer).
    ProtocolViolation,
    /// The peer exceeded a limit.
    LimitExceeded,
    /// The handshake did not complete in time.
    HandshakeTimeout,
    /// A code this build does not know.
    Other(u16),
}

impl CloseReason {
    /// The wire code.
    pub const fn code(self) -> u16 {
        match self {
            Self::Normal => 0,
            Self::VersionMismatch => 1,
            Self::NoCommonTransport => 2,
            Self::ProtocolViolation => 3,
            Self::LimitExceeded => 4,
            Self::HandshakeTimeout => 5,
            Self::Other(c) => c,
        }
    }

    /// Maps a wire code to a reason.
    pub const fn from_code(code: u16) -> Self {
        match code {
            0 => Self::Normal,
            1 => Self::VersionMismatch,
            2 => Self::NoCommonTransport,
            3 => Self::ProtocolViolation,
            4 => Self::LimitExceeded,
            5 => Self::HandshakeTimeout,
            c => Self::Other(c),
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Normal => f.write_str("closed"),
            Self::VersionMismatch => f.write_str("no common protocol version"),
            Self::NoCommonTransport => f.write_str("no common transport"),
            Self::ProtocolViolation => f.write_str("protocol violation"),
            Self::LimitExceeded => f.write_str("limit exceeded"),
            Self::HandshakeTimeout => f.write_str("handshake timed out"),
            Self::Other(c) => write!(f, "close reason {c}"),
        }
    }
}

/// The last frame a side sends before closing a connection.
///
/// Its layout is frozen across protocol versions (docs/wire.md §2), so a peer can always
/// read why it was turned away, even when the versions differ.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct GoodbyeRepr<'a> {
    /// Why.
    pub reason: CloseReason,
    /// The highest protocol version the sender speaks (helps diagnose a mismatch).
    pub max_version: u8,
    /// Human-readable detail.
    pub message: &'a str,
}

impl<'a> Packet<'a> for GoodbyeRepr<'a> {
    const KIND: FrameKind = FrameKind::Goodbye;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            reason: CloseReason::from_code(r.u16()?),
            max_version: r.u8()?,
            message: r.str(limits.max_string_len)?,
        })
    }

    fn buffer_len(&self) -> usize {
        bytes_len(self.message.len()).saturating_add(3)
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u16(self.reason.code())?;
        w.u8(self.max_version)?;
        w.bytes("goodbye message", self.message.as_bytes())
    }
}

/// Owned form of [`GoodbyeRepr`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct Goodbye {
    /// Why.
    pub reason: CloseReason,
    /// The sender's highest protocol version.
    pub max_version: u8,
    /// Detail.
    pub message: String,
}

#[cfg(feature = "alloc")]
impl Goodbye {
    /// Borrows as the encodable view.
    pub fn as_repr(&self) -> GoodbyeRepr<'_> {
        GoodbyeRepr {
            reason: self.reason,
            max_version: self.max_version,
            message: &self.message,
        }
    }
}

#[cfg(feature = "alloc")]
impl GoodbyeRepr<'_> {
    /// Copies into the owned form.
    pub fn to_owned(&self) -> Goodbye {
        Goodbye {
            reason: self.reason,
            max_version: self.max_version,
            message: self.message.to_string(),
        }
    }
}
