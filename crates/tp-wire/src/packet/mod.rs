//! The packets of the pipe protocol, as zero-copy views and (under `alloc`) owned values.
//!
//! Each packet has a borrowed form, `*Repr<'a>`, whose strings, metadata and lists point
//! into the bytes it was parsed from, so decoding allocates nothing. Lists are
//! [`Seq`]s: either a slice the caller built (for encoding) or the validated bytes of the
//! list (after decoding), iterated lazily. Under the `alloc` feature each packet also has
//! an owned form (`Descriptor`, `Brochure`, ...) that converts to and from its `Repr`.
//!
//! All packets implement [`Packet`]: `parse` (body bytes → view), `buffer_len` and
//! `emit` (view → caller's buffer). [`frame_len`], [`emit_frame`] and [`parse_frame`]
//! add and check the 12-byte [`frame`](crate::frame) header. The byte layout of every
//! packet is in docs/wire.md.

mod brochure;
mod connection;
mod descriptor;
mod goodbye;
mod seq;

#[cfg(feature = "alloc")]
pub use brochure::{
    Brochure, BrochureAnswer, OwnedChannelOffer, OwnedChannelRegistration, OwnedDeviceDescriptor,
    OwnedDevicePairChoice, OwnedTransportOffer,
};
pub use brochure::{
    BrochureAnswerRepr, BrochureRepr, ChannelOffer, ChannelRegistration, DeviceDescriptor,
    DevicePairChoice, TransportOffer,
};
#[cfg(feature = "alloc")]
pub use connection::OwnedSpontaneousConnection;
pub use connection::{Greeting, RegistrationId, RequestedConnection, SpontaneousConnection};
#[cfg(feature = "alloc")]
pub use descriptor::{Descriptor, DescriptorReply, Payload, Tensor};
pub use descriptor::{DescriptorReplyRepr, DescriptorRepr, PayloadDesc, TensorDesc};
#[cfg(feature = "alloc")]
pub use goodbye::Goodbye;
pub use goodbye::{CloseReason, GoodbyeRepr};
pub use seq::{Element, Seq, SeqIter};

use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError};
use crate::frame::{FrameHeader, FrameKind, HEADER_LEN, split_frame};
use crate::limits::Limits;

/// A packet body: parsed from borrowed bytes, emitted into a caller's buffer.
pub trait Packet<'a>: Sized {
    /// The frame kind that carries this packet.
    const KIND: FrameKind;

    /// Decodes a packet body, checking every length against `limits` first.
    ///
    /// # Errors
    /// A [`DecodeError`]; never panics, whatever the input.
    fn parse(body: &'a [u8], limits: &Limits) -> Result<Self, DecodeError> {
        let mut r = Reader::new(body);
        let p = Self::decode(&mut r, limits)?;
        r.finish()?;
        Ok(p)
    }

    /// Decodes the packet's fields from `r` (used by [`Packet::parse`]).
    ///
    /// # Errors
    /// A [`DecodeError`].
    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError>;

    /// Returns the exact length of the encoded body.
    fn buffer_len(&self) -> usize;

    /// Writes the packet's fields to `w` (used by [`Packet::emit`]).
    ///
    /// # Errors
    /// An [`EncodeError`].
    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError>;

    /// Encodes the body into the start of `buf`, returning the bytes written.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`] when `buf` is shorter than [`Packet::buffer_len`],
    /// [`EncodeError::TooLong`] when a field does not fit the format.
    fn emit(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        let needed = self.buffer_len();
        if buf.len() < needed {
            return Err(EncodeError::BufferTooSmall { needed });
        }
        let mut w = Writer::new(buf);
        self.encode(&mut w)?;
        Ok(w.position())
    }
}

/// Returns the length of `packet` framed: header plus body.
pub fn frame_len<'a, P: Packet<'a>>(packet: &P) -> usize {
    packet.buffer_len().saturating_add(HEADER_LEN)
}

/// Writes `packet` as a complete frame (header and body) into `buf`, returning its length.
///
/// # Errors
/// [`EncodeError::BufferTooSmall`], or [`EncodeError::TooLong`] for a body over 4 GiB.
pub fn emit_frame<'a, P: Packet<'a>>(packet: &P, buf: &mut [u8]) -> Result<usize, EncodeError> {
    let body_len = packet.buffer_len();
    let needed = body_len.saturating_add(HEADER_LEN);
    let wire_len = u32::try_from(body_len).map_err(|_| EncodeError::TooLong {
        field: "frame body",
        len: body_len,
    })?;
    let (head, body) = buf
        .split_at_mut_checked(HEADER_LEN)
        .ok_or(EncodeError::BufferTooSmall { needed })?;
    if body.len() < body_len {
        return Err(EncodeError::BufferTooSmall { needed });
    }
    FrameHeader::new(P::KIND, wire_len).emit(head)?;
    packet.emit(body)?;
    Ok(needed)
}

/// Encodes `packet` as a complete frame into a new vector.
///
/// # Errors
/// [`EncodeError::TooLong`] for a body over 4 GiB.
#[cfg(feature = "alloc")]
pub fn frame_to_vec<'a, P: Packet<'a>>(packet: &P) -> Result<alloc::vec::Vec<u8>, EncodeError> {
    let mut v = alloc::vec::Vec::new();
    frame_into(packet, &mut v)?;
    Ok(v)
}

/// Encodes `packet` as a complete frame into `buf`, replacing what it held: its
/// allocation is reused when large enough.
///
/// # Errors
/// [`EncodeError::TooLong`] for a body over 4 GiB; `buf` is empty then.
#[cfg(feature = "alloc")]
pub fn frame_into<'a, P: Packet<'a>>(
    packet: &P,
    buf: &mut alloc::vec::Vec<u8>,
) -> Result<(), EncodeError> {
    buf.clear();
    buf.resize(frame_len(packet), 0);
    match emit_frame(packet, buf) {
        Ok(n) => {
            buf.truncate(n);
            Ok(())
        }
        Err(e) => {
            buf.clear();
            Err(e)
        }
    }
}

/// Parses a complete frame that must carry a `P`.
///
/// # Errors
/// Any header error, [`DecodeError::UnexpectedKind`] when the frame carries another
/// packet, or the packet's own decode error.
pub fn parse_frame<'a, P: Packet<'a>>(frame: &'a [u8], limits: &Limits) -> Result<P, DecodeError> {
    let (header, body) = split_frame(frame, limits)?;
    if header.kind != P::KIND {
        return Err(DecodeError::UnexpectedKind {
            expected: P::KIND.to_u8(),
            found: header.kind.to_u8(),
        });
    }
    P::parse(body, limits)
}
