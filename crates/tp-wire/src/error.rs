//! Error types of the wire layer.
//!
//! Every error here is `Copy`, carries no heap data and says who is at fault:
//! [`DecodeError`] means the bytes from the peer are wrong (the connection they came on
//! must be closed), [`EncodeError`] means the local caller asked for something the format
//! cannot express or gave a buffer that is too small.

use core::fmt;

/// A limit from [`Limits`](crate::Limits) that a peer's input exceeded.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum Limit {
    /// [`Limits::max_frame_len`](crate::Limits::max_frame_len).
    FrameLen,
    /// [`Limits::max_metadata_len`](crate::Limits::max_metadata_len).
    MetadataLen,
    /// [`Limits::max_string_len`](crate::Limits::max_string_len).
    StringLen,
    /// [`Limits::max_payloads`](crate::Limits::max_payloads).
    Payloads,
    /// [`Limits::max_tensors`](crate::Limits::max_tensors).
    Tensors,
    /// [`Limits::max_message_len`](crate::Limits::max_message_len).
    MessageLen,
    /// [`Limits::max_list_len`](crate::Limits::max_list_len): any other list (offers,
    /// devices, registration ids, device pairs).
    ListLen,
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FrameLen => "frame length",
            Self::MetadataLen => "metadata length",
            Self::StringLen => "string length",
            Self::Payloads => "payload count",
            Self::Tensors => "tensor count",
            Self::MessageLen => "total message length",
            Self::ListLen => "list length",
        })
    }
}

/// Why a frame or packet from the wire could not be decoded.
///
/// A peer that sends any of these is misbehaving (or speaks another protocol): the
/// connection the bytes came from is closed. Decoding never panics and never allocates
/// before these checks pass.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum DecodeError {
    /// The input ended before a field was complete; `needed` more bytes were expected.
    Truncated {
        /// How many more bytes the field needed.
        needed: usize,
    },
    /// The frame does not start with the magic bytes `TPIP`.
    BadMagic,
    /// The frame header names a protocol version this build does not speak.
    UnsupportedVersion(u8),
    /// The frame header names a frame kind this version does not define.
    UnknownKind(u8),
    /// The frame header sets flag bits that are reserved in this version.
    ReservedFlags(u16),
    /// The frame kind is valid but not the one the receiver expects at this point.
    UnexpectedKind {
        /// The kind the receiver waited for.
        expected: u8,
        /// The kind that arrived.
        found: u8,
    },
    /// A length or count is over a configured limit.
    LimitExceeded {
        /// Which limit.
        limit: Limit,
        /// The value announced by the peer (saturated to `u64`).
        value: u64,
        /// The configured maximum.
        max: u64,
    },
    /// A count announces more elements than the remaining bytes could hold.
    CountExceedsInput {
        /// The announced count.
        count: u32,
        /// The bytes left in the frame.
        remaining: usize,
    },
    /// A string field is not valid UTF-8.
    InvalidUtf8,
    /// A tag byte (device kind, option, goodbye reason) has a value the format does not define.
    InvalidTag {
        /// Which field.
        field: &'static str,
        /// The value found.
        value: u32,
    },
    /// Bytes were left over after the packet's last field.
    TrailingBytes(usize),
    /// A structural rule was broken (for example a duplicate device, or a reply whose
    /// length does not match its message).
    Invalid(&'static str),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Truncated { needed } => write!(f, "input truncated: {needed} more bytes needed"),
            Self::BadMagic => f.write_str("bad magic: not a tp frame"),
            Self::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            Self::UnknownKind(k) => write!(f, "unknown frame kind {k}"),
            Self::ReservedFlags(fl) => write!(f, "reserved frame flags set: {fl:#06x}"),
            Self::UnexpectedKind { expected, found } => {
                write!(f, "unexpected frame kind {found} (expected {expected})")
            }
            Self::LimitExceeded { limit, value, max } => {
                write!(f, "{limit} {value} exceeds the limit of {max}")
            }
            Self::CountExceedsInput { count, remaining } => write!(
                f,
                "count {count} cannot fit in the {remaining} bytes left in the frame"
            ),
            Self::InvalidUtf8 => f.write_str("string is not valid utf-8"),
            Self::InvalidTag { field, value } => write!(f, "invalid {field} tag {value}"),
            Self::TrailingBytes(n) => write!(f, "{n} trailing bytes after the packet"),
            Self::Invalid(why) => write!(f, "invalid packet: {why}"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a packet could not be encoded.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum EncodeError {
    /// The output buffer is shorter than [`buffer_len`](crate::packet::Packet::buffer_len).
    BufferTooSmall {
        /// The number of bytes the encoding needs.
        needed: usize,
    },
    /// A field is longer than the format can express (lengths and counts are `u32`).
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BufferTooSmall { needed } => {
                write!(f, "output buffer too small: {needed} bytes needed")
            }
            Self::TooLong { field, len } => {
                write!(f, "{field} of length {len} does not fit the wire format")
            }
        }
    }
}

impl core::error::Error for EncodeError {}
