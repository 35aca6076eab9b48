//! The RPC agent's framing: how one call or reply rides in one pipe message
//! (docs/wire.md §8).
//!
//! A pipe message carries an RPC message as:
//!
//! - the message **metadata**: the 16-byte [`RpcHeader`] — magic `TPRC`, version,
//!   [`RpcKind`], two reserved zero bytes, and the call id (`u64`, little-endian);
//! - exactly **one payload**: the caller's or handler's bytes, or, for
//!   [`RpcKind::Error`], the error's UTF-8 text;
//! - any number of **tensors**, each with [`Device::WIRE_LEN`] bytes of metadata: the
//!   device the tensor lived on at the sender ([`encode_source_device`]); the pipe's own
//!   `target_device` says where it goes at the receiver.
//!
//! A response reuses its request's id. Decoding checks every byte: a wrong magic, an
//! unknown version or kind, non-zero reserved bytes or a wrong length is a
//! [`DecodeError`], and the agent closes that one pipe.

use crate::Device;
use crate::codec::{Reader, Writer};
use crate::error::DecodeError;

/// The header's first four bytes.
pub const MAGIC: [u8; 4] = *b"TPRC";
/// The framing version this build speaks.
pub const VERSION: u8 = 1;
/// The header's length in bytes.
pub const HEADER_LEN: usize = 16;

/// What an RPC message is.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
#[repr(u8)]
pub enum RpcKind {
    /// A call for the receiver's handler.
    Request = 1,
    /// The handler's reply to the request with the same id.
    Response = 2,
    /// The request with the same id failed at the callee; the payload says why.
    Error = 3,
    /// The sender is leaving the (dynamic) group: the receiver stops calling it and
    /// answers with a [`RpcKind::Response`] once its own calls to the sender are over.
    Leave = 4,
}

impl RpcKind {
    const fn to_u8(self) -> u8 {
        match self {
            Self::Request => 1,
            Self::Response => 2,
            Self::Error => 3,
            Self::Leave => 4,
        }
    }

    fn from_u8(v: u8) -> Result<Self, DecodeError> {
        Ok(match v {
            1 => Self::Request,
            2 => Self::Response,
            3 => Self::Error,
            4 => Self::Leave,
            other => {
                return Err(DecodeError::InvalidTag {
                    field: "rpc kind",
                    value: u32::from(other),
                });
            }
        })
    }
}

/// The header of an RPC message (the pipe message's metadata).
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct RpcHeader {
    /// What the message is.
    pub kind: RpcKind,
    /// The call id, chosen by the caller; a response carries its request's.
    pub id: u64,
}

impl RpcHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        let mut w = Writer::new(&mut out);
        // Cannot fail: exactly HEADER_LEN bytes are written into HEADER_LEN.
        let _ = w
            .put(&MAGIC)
            .and_then(|()| w.u8(VERSION))
            .and_then(|()| w.u8(self.kind.to_u8()))
            .and_then(|()| w.u16(0))
            .and_then(|()| w.u64(self.id));
        out
    }

    /// Parses a header; the input must be exactly [`HEADER_LEN`] bytes.
    ///
    /// # Errors
    /// [`DecodeError`] for anything but a well-formed header of this version.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(bytes);
        if r.take(MAGIC.len())? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let kind = RpcKind::from_u8(r.u8()?)?;
        let reserved = r.u16()?;
        if reserved != 0 {
            return Err(DecodeError::ReservedFlags(reserved));
        }
        let id = r.u64()?;
        if r.remaining() != 0 {
            return Err(DecodeError::TrailingBytes(r.remaining()));
        }
        Ok(Self { kind, id })
    }
}

/// A tensor's metadata in an RPC message: the device it lived on at the sender.
pub fn encode_source_device(device: Device) -> [u8; Device::WIRE_LEN] {
    let mut out = [0u8; Device::WIRE_LEN];
    // Cannot fail: a device is exactly WIRE_LEN bytes.
    let _ = device.encode(&mut Writer::new(&mut out));
    out
}

/// Parses a tensor's metadata (exactly [`Device::WIRE_LEN`] bytes).
///
/// # Errors
/// [`DecodeError`] for a wrong length or an unknown device kind.
pub fn decode_source_device(bytes: &[u8]) -> Result<Device, DecodeError> {
    let mut r = Reader::new(bytes);
    let d = Device::decode(&mut r)?;
    if r.remaining() != 0 {
        return Err(DecodeError::TrailingBytes(r.remaining()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_header_is_byte_for_byte_as_documented() {
        let h = RpcHeader {
            kind: RpcKind::Response,
            id: 0x0102_0304_0506_0708,
        };
        assert_eq!(
            h.encode(),
            [b'T', b'P', b'R', b'C', 1, 2, 0, 0, 8, 7, 6, 5, 4, 3, 2, 1]
        );
        assert_eq!(encode_source_device(Device::cuda(3)), [1, 3, 0, 0, 0]);
    }

    #[test]
    fn malformed_headers_are_typed_errors() {
        let good = RpcHeader {
            kind: RpcKind::Request,
            id: 9,
        }
        .encode();
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(RpcHeader::decode(&bad), Err(DecodeError::BadMagic));
        let mut bad = good;
        bad[4] = 2;
        assert_eq!(
            RpcHeader::decode(&bad),
            Err(DecodeError::UnsupportedVersion(2))
        );
        let mut bad = good;
        bad[5] = 9;
        assert!(matches!(
            RpcHeader::decode(&bad),
            Err(DecodeError::InvalidTag { .. })
        ));
        let mut bad = good;
        bad[6] = 1;
        assert_eq!(RpcHeader::decode(&bad), Err(DecodeError::ReservedFlags(1)));
        assert!(matches!(
            RpcHeader::decode(good.get(..15).unwrap_or_default()),
            Err(DecodeError::Truncated { .. })
        ));
        let mut long = [0u8; 17];
        long[..16].copy_from_slice(&good);
        assert_eq!(RpcHeader::decode(&long), Err(DecodeError::TrailingBytes(1)));
        assert!(decode_source_device(&[2, 0, 0, 0, 0]).is_err());
        assert!(decode_source_device(&[0, 0, 0, 0]).is_err());
    }

    proptest! {
        #[test]
        fn headers_round_trip(kind in 1u8..=4, id in any::<u64>()) {
            let h = RpcHeader { kind: RpcKind::from_u8(kind).unwrap(), id };
            prop_assert_eq!(RpcHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn any_bytes_decode_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(h) = RpcHeader::decode(&bytes) {
                prop_assert_eq!(&h.encode()[..], &bytes[..]);
            }
            if let Ok(d) = decode_source_device(&bytes) {
                prop_assert_eq!(&encode_source_device(d)[..], &bytes[..]);
            }
        }

        #[test]
        fn devices_round_trip(cuda in any::<bool>(), index in any::<u32>()) {
            let d = if cuda { Device::cuda(index) } else { Device { kind: crate::DeviceKind::Cpu, index } };
            prop_assert_eq!(decode_source_device(&encode_source_device(d)), Ok(d));
        }
    }
}
