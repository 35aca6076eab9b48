//! Devices: where a tensor's memory lives.

use core::fmt;

use crate::codec::{Reader, Writer};
use crate::error::{DecodeError, EncodeError};

/// The kind of memory a device has. The numbering is part of the wire format.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
#[repr(u8)]
pub enum DeviceKind {
    /// Host memory.
    Cpu = 0,
    /// CUDA device memory.
    Cuda = 1,
}

/// A device: a kind and an index (`cpu:0`, `cuda:3`).
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct Device {
    /// Kind of memory.
    pub kind: DeviceKind,
    /// Index among devices of that kind.
    pub index: u32,
}

impl Device {
    /// Host memory, `cpu:0` (the only CPU device).
    pub const CPU: Self = Self {
        kind: DeviceKind::Cpu,
        index: 0,
    };

    /// Encoded length: a kind byte and a `u32` index.
    pub const WIRE_LEN: usize = 5;

    /// The CUDA device `cuda:index`.
    pub const fn cuda(index: u32) -> Self {
        Self {
            kind: DeviceKind::Cuda,
            index,
        }
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let kind = match r.u8()? {
            0 => DeviceKind::Cpu,
            1 => DeviceKind::Cuda,
            other => {
                return Err(DecodeError::InvalidTag {
                    field: "device kind",
                    value: u32::from(other),
                });
            }
        };
        let index = r.u32()?;
        Ok(Self { kind, index })
    }

    pub(crate) fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u8(match self.kind {
            DeviceKind::Cpu => 0,
            DeviceKind::Cuda => 1,
        })?;
        w.u32(self.index)
    }

    pub(crate) fn decode_option(r: &mut Reader<'_>) -> Result<Option<Self>, DecodeError> {
        match r.u8()? {
            0 => Ok(None),
            1 => Self::decode(r).map(Some),
            other => Err(DecodeError::InvalidTag {
                field: "option",
                value: u32::from(other),
            }),
        }
    }

    pub(crate) fn encode_option(v: Option<&Self>, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        match v {
            None => w.u8(0),
            Some(d) => {
                w.u8(1)?;
                d.encode(w)
            }
        }
    }

    pub(crate) const fn option_len(v: Option<&Self>) -> usize {
        match v {
            None => 1,
            Some(_) => 1 + Self::WIRE_LEN,
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        };
        write!(f, "{kind}:{}", self.index)
    }
}
