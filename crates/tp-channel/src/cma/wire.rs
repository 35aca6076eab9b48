//! cma's two frames, as a peer sends them (`docs/wire.md` §9): the tensor descriptor
//! (sender → receiver) and the help request (receiver → sender). Integers are
//! little-endian. Decoding checks the shape only — exact lengths — and leaves meaning
//! (a length that fits the receive buffer, a pid that names a process) to the channel.

use crate::ChannelError;
use crate::handoff::le_bytes;

/// The length of the channel's secret, which an offer of help carries.
pub const SECRET_LEN: usize = 16;

/// Where a tensor's bytes are in the sending process, and whether the sender offers
/// help (then it carries the channel's secret).
///
/// `pid u32 | address u64 | length u64` — 20 bytes — then, with an offer, `secret
/// [16]` — 36 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorDescriptor {
    /// The sending process.
    pub pid: u32,
    /// The tensor's address in it.
    pub address: u64,
    /// The tensor's length in bytes.
    pub length: u64,
    /// The channel's secret, when the sender offers help.
    pub secret: Option<[u8; SECRET_LEN]>,
}

impl TensorDescriptor {
    /// The length of a descriptor without an offer.
    pub const LEN: usize = 20;
    /// The length of a descriptor that offers help.
    pub const OFFER_LEN: usize = Self::LEN + SECRET_LEN;

    /// The descriptor's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut d = Vec::with_capacity(Self::OFFER_LEN);
        d.extend_from_slice(&self.pid.to_le_bytes());
        d.extend_from_slice(&self.address.to_le_bytes());
        d.extend_from_slice(&self.length.to_le_bytes());
        if let Some(secret) = &self.secret {
            d.extend_from_slice(secret);
        }
        d
    }

    /// Reads a descriptor of exactly [`Self::LEN`] or [`Self::OFFER_LEN`] bytes.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`] for any other length.
    pub fn decode(d: &[u8]) -> Result<Self, ChannelError> {
        if d.len() != Self::LEN && d.len() != Self::OFFER_LEN {
            return Err(ChannelError::protocol(format!(
                "a cma descriptor is {} bytes, not {} or {}",
                d.len(),
                Self::LEN,
                Self::OFFER_LEN
            )));
        }
        Ok(Self {
            pid: u32::from_le_bytes(le_bytes(d, 0)?),
            address: u64::from_le_bytes(le_bytes(d, 4)?),
            length: u64::from_le_bytes(le_bytes(d, 12)?),
            secret: if d.len() == Self::OFFER_LEN {
                Some(le_bytes(d, Self::LEN)?)
            } else {
                None
            },
        })
    }
}

/// A receiver's request to a sender that offered help: "write your bytes `from..` to
/// `destination + from` in process `pid`; the channel's secret is at `proof` there".
///
/// `pid u32 | destination u64 | from u64 | proof u64` — 28 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelpRequest {
    /// The receiving process.
    pub pid: u32,
    /// The receive buffer's address in it.
    pub destination: u64,
    /// The first byte the sender writes.
    pub from: u64,
    /// Where the channel's secret is in the receiving process.
    pub proof: u64,
}

impl HelpRequest {
    /// A request's length.
    pub const LEN: usize = 28;

    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut r = Vec::with_capacity(Self::LEN);
        r.extend_from_slice(&self.pid.to_le_bytes());
        r.extend_from_slice(&self.destination.to_le_bytes());
        r.extend_from_slice(&self.from.to_le_bytes());
        r.extend_from_slice(&self.proof.to_le_bytes());
        r
    }

    /// Reads a request of exactly [`Self::LEN`] bytes.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`] for any other length.
    pub fn decode(r: &[u8]) -> Result<Self, ChannelError> {
        if r.len() != Self::LEN {
            return Err(ChannelError::protocol(format!(
                "a cma help request is {} bytes, not {}",
                r.len(),
                Self::LEN
            )));
        }
        Ok(Self {
            pid: u32::from_le_bytes(le_bytes(r, 0)?),
            destination: u64::from_le_bytes(le_bytes(r, 4)?),
            from: u64::from_le_bytes(le_bytes(r, 12)?),
            proof: u64::from_le_bytes(le_bytes(r, 20)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_layout() {
        let d = TensorDescriptor {
            pid: 0x0102_0304,
            address: 0x1122_3344_5566_7788,
            length: 9,
            secret: Some([0xab; SECRET_LEN]),
        };
        let bytes = d.encode();
        assert_eq!(&bytes[..4], &[4, 3, 2, 1]);
        assert_eq!(&bytes[4..12], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&bytes[12..20], &9u64.to_le_bytes());
        assert_eq!(&bytes[20..], &[0xab; SECRET_LEN]);
        assert_eq!(TensorDescriptor::decode(&bytes).unwrap(), d);
        let r = HelpRequest {
            pid: 7,
            destination: 8,
            from: 9,
            proof: 10,
        };
        let bytes = r.encode();
        assert_eq!(bytes.len(), HelpRequest::LEN);
        assert_eq!(&bytes[20..], &10u64.to_le_bytes());
        assert_eq!(HelpRequest::decode(&bytes).unwrap(), r);
    }
}
