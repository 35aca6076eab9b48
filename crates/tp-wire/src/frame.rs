//! The frame: a fixed 12-byte header followed by a packet body.
//!
//! ```text
//! offset  size  field
//!      0     4  magic      "TPIP" (0x54 0x50 0x49 0x50)
//!      4     1  version    protocol version of the body's encoding (1)
//!      5     1  kind       FrameKind
//!      6     2  flags      u16 LE; every bit is reserved in version 1 and must be 0
//!      8     4  body_len   u32 LE; bytes after the header
//! ```
//!
//! A receiver reads exactly [`HEADER_LEN`] bytes, calls [`FrameHeader::parse`] (which
//! checks the magic, the version, the kind, the flags and the body length against
//! [`Limits::max_frame_len`](crate::Limits::max_frame_len) before anything is
//! allocated), then reads `body_len` bytes and decodes the packet the kind names.
//!
//! **Unknown version or kind.** Either is a [`DecodeError`]; the receiver closes the
//! connection, sending a [`Goodbye`](crate::packet::Goodbye) first when it can. Version
//! negotiation happens in the handshake, not per frame: see [`crate::pipe`] and
//! docs/wire.md §2.

use zerocopy::byteorder::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{DecodeError, EncodeError, Limit};
use crate::limits::Limits;

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"TPIP";
/// Length of the frame header.
pub const HEADER_LEN: usize = 12;
/// The protocol version this build speaks (and the only one it accepts).
pub const VERSION: u8 = 1;
/// The lowest protocol version this build can speak.
pub const MIN_VERSION: u8 = 1;

/// What a frame carries. The numbering is part of the wire format.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
#[repr(u8)]
pub enum FrameKind {
    /// [`SpontaneousConnection`](crate::packet::SpontaneousConnection): first frame of a new pipe.
    SpontaneousConnection = 1,
    /// [`RequestedConnection`](crate::packet::RequestedConnection): first frame of an extra connection.
    RequestedConnection = 2,
    /// [`Brochure`](crate::packet::BrochureRepr): the client's offer.
    Brochure = 3,
    /// [`BrochureAnswer`](crate::packet::BrochureAnswerRepr): the server's choice.
    BrochureAnswer = 4,
    /// [`Descriptor`](crate::packet::DescriptorRepr): announces one message.
    Descriptor = 5,
    /// [`DescriptorReply`](crate::packet::DescriptorReplyRepr): the reader's target devices.
    DescriptorReply = 6,
    /// [`Goodbye`](crate::packet::GoodbyeRepr): the sender closes, with a reason.
    Goodbye = 7,
}

impl FrameKind {
    /// Every kind, in wire order.
    pub const ALL: [Self; 7] = [
        Self::SpontaneousConnection,
        Self::RequestedConnection,
        Self::Brochure,
        Self::BrochureAnswer,
        Self::Descriptor,
        Self::DescriptorReply,
        Self::Goodbye,
    ];

    /// Maps a wire byte to a kind.
    ///
    /// # Errors
    /// [`DecodeError::UnknownKind`].
    pub const fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::SpontaneousConnection,
            2 => Self::RequestedConnection,
            3 => Self::Brochure,
            4 => Self::BrochureAnswer,
            5 => Self::Descriptor,
            6 => Self::DescriptorReply,
            7 => Self::Goodbye,
            other => return Err(DecodeError::UnknownKind(other)),
        })
    }

    /// The wire byte.
    pub const fn to_u8(self) -> u8 {
        match self {
            Self::SpontaneousConnection => 1,
            Self::RequestedConnection => 2,
            Self::Brochure => 3,
            Self::BrochureAnswer => 4,
            Self::Descriptor => 5,
            Self::DescriptorReply => 6,
            Self::Goodbye => 7,
        }
    }
}

/// The raw header as it lies on the wire (zerocopy view, no alignment needed).
#[derive(
    Clone, Copy, Debug, Eq, FromBytes, Immutable, IntoBytes, KnownLayout, PartialEq, Unaligned,
)]
#[repr(C)]
pub struct RawHeader {
    /// `TPIP`.
    pub magic: [u8; 4],
    /// Protocol version.
    pub version: u8,
    /// Frame kind byte.
    pub kind: u8,
    /// Flags (reserved).
    pub flags: U16,
    /// Body length.
    pub body_len: U32,
}

const _: () = assert!(size_of::<RawHeader>() == HEADER_LEN);

/// A validated frame header.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct FrameHeader {
    /// The protocol version of the body.
    pub version: u8,
    /// What the body holds.
    pub kind: FrameKind,
    /// How many body bytes follow the header.
    pub body_len: u32,
}

impl FrameHeader {
    /// Creates a header of the current [`VERSION`].
    pub const fn new(kind: FrameKind, body_len: u32) -> Self {
        Self {
            version: VERSION,
            kind,
            body_len,
        }
    }

    /// Parses and validates the first [`HEADER_LEN`] bytes of `bytes`.
    ///
    /// Checks, in this order: length, magic, version, kind, flags, body length against
    /// `limits.max_frame_len`.
    ///
    /// # Errors
    /// The first check that fails, as a [`DecodeError`].
    pub fn parse(bytes: &[u8], limits: &Limits) -> Result<Self, DecodeError> {
        let (raw, _) = RawHeader::ref_from_prefix(bytes).map_err(|_| DecodeError::Truncated {
            needed: HEADER_LEN.saturating_sub(bytes.len()),
        })?;
        if raw.magic != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        if !(MIN_VERSION..=VERSION).contains(&raw.version) {
            return Err(DecodeError::UnsupportedVersion(raw.version));
        }
        let kind = FrameKind::from_u8(raw.kind)?;
        let flags = raw.flags.get();
        if flags != 0 {
            return Err(DecodeError::ReservedFlags(flags));
        }
        let body_len = raw.body_len.get();
        if body_len > limits.max_frame_len {
            return Err(DecodeError::LimitExceeded {
                limit: Limit::FrameLen,
                value: u64::from(body_len),
                max: u64::from(limits.max_frame_len),
            });
        }
        Ok(Self {
            version: raw.version,
            kind,
            body_len,
        })
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    ///
    /// # Errors
    /// [`EncodeError::BufferTooSmall`].
    pub fn emit(&self, buf: &mut [u8]) -> Result<(), EncodeError> {
        let raw = RawHeader {
            magic: MAGIC,
            version: self.version,
            kind: self.kind.to_u8(),
            flags: U16::new(0),
            body_len: U32::new(self.body_len),
        };
        raw.write_to_prefix(buf)
            .map_err(|_| EncodeError::BufferTooSmall { needed: HEADER_LEN })
    }
}

/// Splits a complete frame into its header and body.
///
/// # Errors
/// Any header error, [`DecodeError::Truncated`] when the body is short, or
/// [`DecodeError::TrailingBytes`] when `frame` is longer than header + body.
pub fn split_frame<'a>(
    frame: &'a [u8],
    limits: &Limits,
) -> Result<(FrameHeader, &'a [u8]), DecodeError> {
    let header = FrameHeader::parse(frame, limits)?;
    let rest = frame.get(HEADER_LEN..).unwrap_or_default();
    let body_len = crate::codec::usize_from(header.body_len);
    match rest.len().cmp(&body_len) {
        core::cmp::Ordering::Less => Err(DecodeError::Truncated {
            needed: body_len.saturating_sub(rest.len()),
        }),
        core::cmp::Ordering::Greater => Err(DecodeError::TrailingBytes(
            rest.len().saturating_sub(body_len),
        )),
        core::cmp::Ordering::Equal => Ok((header, rest)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: [u8; 12] = [
        0x54, 0x50, 0x49, 0x50, // magic
        0x01, // version
        0x05, // kind: descriptor
        0x00, 0x00, // flags
        0x10, 0x00, 0x00, 0x00, // body length 16
    ];

    #[test]
    fn frame_header_parse_golden() {
        let h = FrameHeader::parse(&GOLDEN, &Limits::DEFAULT).unwrap();
        assert_eq!(h, FrameHeader::new(FrameKind::Descriptor, 16));
    }

    #[test]
    fn frame_header_emit_golden() {
        let mut buf = [0u8; HEADER_LEN];
        FrameHeader::new(FrameKind::Descriptor, 16)
            .emit(&mut buf)
            .unwrap();
        assert_eq!(buf, GOLDEN);
    }

    #[test]
    fn frame_header_truncated_rejected() {
        for n in 0..HEADER_LEN {
            assert_eq!(
                FrameHeader::parse(&GOLDEN[..n], &Limits::DEFAULT),
                Err(DecodeError::Truncated {
                    needed: HEADER_LEN - n
                })
            );
        }
    }

    #[test]
    fn frame_header_unknown_version_rejected() {
        let mut b = GOLDEN;
        b[4] = 2;
        assert_eq!(
            FrameHeader::parse(&b, &Limits::DEFAULT),
            Err(DecodeError::UnsupportedVersion(2))
        );
        b[4] = 0;
        assert_eq!(
            FrameHeader::parse(&b, &Limits::DEFAULT),
            Err(DecodeError::UnsupportedVersion(0))
        );
    }

    #[test]
    fn frame_header_unknown_kind_rejected() {
        for k in [0u8, 8, 0xff] {
            let mut b = GOLDEN;
            b[5] = k;
            assert_eq!(
                FrameHeader::parse(&b, &Limits::DEFAULT),
                Err(DecodeError::UnknownKind(k))
            );
        }
    }

    #[test]
    fn frame_header_bad_magic_and_flags_rejected() {
        let mut b = GOLDEN;
        b[0] = b'X';
        assert_eq!(
            FrameHeader::parse(&b, &Limits::DEFAULT),
            Err(DecodeError::BadMagic)
        );
        let mut b = GOLDEN;
        b[7] = 0x80;
        assert_eq!(
            FrameHeader::parse(&b, &Limits::DEFAULT),
            Err(DecodeError::ReservedFlags(0x8000))
        );
    }

    #[test]
    fn frame_header_over_limit_rejected() {
        let mut b = GOLDEN;
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            FrameHeader::parse(&b, &Limits::DEFAULT),
            Err(DecodeError::LimitExceeded {
                limit: Limit::FrameLen,
                ..
            })
        ));
    }
}
