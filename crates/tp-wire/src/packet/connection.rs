//! The first frame of every connection: [`SpontaneousConnection`] or [`RequestedConnection`].

#[cfg(feature = "alloc")]
use alloc::string::{String, ToString};
use core::fmt;

use super::{Element, Packet};
use crate::codec::{Reader, Writer, bytes_len};
use crate::error::{DecodeError, EncodeError};
use crate::frame::{FrameKind, split_frame};
use crate::limits::Limits;

/// A token that routes an extra connection to the pipe that asked for it.
///
/// The server's driver draws these from a source of randomness it owns (tp-wire has
/// none), so a third party cannot guess them and hijack a pipe's connection.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct RegistrationId(pub u64);

impl fmt::Display for RegistrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

impl Element<'_> for RegistrationId {
    const MIN_LEN: usize = 8;

    fn decode(r: &mut Reader<'_>, _limits: &Limits) -> Result<Self, DecodeError> {
        r.u64().map(Self)
    }

    fn wire_len(&self) -> usize {
        8
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.0)
    }
}

/// First frame of a new pipe: the client's context name (`remote_name` on the server).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct SpontaneousConnection<'a> {
    /// The connecting context's name (for logs and `remote_name`).
    pub context_name: &'a str,
}

impl<'a> Packet<'a> for SpontaneousConnection<'a> {
    const KIND: FrameKind = FrameKind::SpontaneousConnection;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            context_name: r.str(limits.max_string_len)?,
        })
    }

    fn buffer_len(&self) -> usize {
        bytes_len(self.context_name.len())
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes("context name", self.context_name.as_bytes())
    }
}

/// Owned form of [`SpontaneousConnection`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct OwnedSpontaneousConnection {
    /// The connecting context's name.
    pub context_name: String,
}

#[cfg(feature = "alloc")]
impl OwnedSpontaneousConnection {
    /// Borrows as the encodable view.
    pub fn as_repr(&self) -> SpontaneousConnection<'_> {
        SpontaneousConnection {
            context_name: &self.context_name,
        }
    }
}

#[cfg(feature = "alloc")]
impl SpontaneousConnection<'_> {
    /// Copies into the owned form.
    pub fn to_owned(&self) -> OwnedSpontaneousConnection {
        OwnedSpontaneousConnection {
            context_name: self.context_name.to_string(),
        }
    }
}

/// First frame of an extra connection opened on the server's request.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct RequestedConnection {
    /// The id from the [`BrochureAnswer`](super::BrochureAnswerRepr) this connection answers.
    pub registration_id: RegistrationId,
}

impl<'a> Packet<'a> for RequestedConnection {
    const KIND: FrameKind = FrameKind::RequestedConnection;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            registration_id: RegistrationId::decode(r, limits)?,
        })
    }

    fn buffer_len(&self) -> usize {
        8
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.registration_id.encode(w)
    }
}

/// The first frame a listener reads on an accepted connection: either kind of request.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Greeting<'a> {
    /// A new pipe.
    Spontaneous(SpontaneousConnection<'a>),
    /// An extra connection for an existing pipe.
    Requested(RequestedConnection),
}

impl<'a> Greeting<'a> {
    /// Parses a complete frame that must be one of the two greetings.
    ///
    /// # Errors
    /// Any header or packet error; [`DecodeError::UnexpectedKind`] for another kind.
    pub fn parse_frame(frame: &'a [u8], limits: &Limits) -> Result<Self, DecodeError> {
        let (header, body) = split_frame(frame, limits)?;
        match header.kind {
            FrameKind::SpontaneousConnection => {
                SpontaneousConnection::parse(body, limits).map(Self::Spontaneous)
            }
            FrameKind::RequestedConnection => {
                RequestedConnection::parse(body, limits).map(Self::Requested)
            }
            other => Err(DecodeError::UnexpectedKind {
                expected: FrameKind::SpontaneousConnection.to_u8(),
                found: other.to_u8(),
            }),
        }
    }
}
