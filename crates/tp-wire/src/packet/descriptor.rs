//! [`DescriptorRepr`] (announces a message) and [`DescriptorReplyRepr`] (the reader's
//! choice of target devices).

#[cfg(feature = "alloc")]
use alloc::vec::Vec;

use super::{Element, Packet, Seq};
use crate::codec::{Reader, Writer, bytes_len};
use crate::device::Device;
use crate::error::{DecodeError, EncodeError, Limit};
use crate::frame::FrameKind;
use crate::limits::Limits;

/// One payload of a message: its length and metadata.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct PayloadDesc<'a> {
    /// Length in bytes of the payload data that follows the descriptor.
    pub length: u64,
    /// Opaque metadata.
    pub metadata: &'a [u8],
}

impl<'a> Element<'a> for PayloadDesc<'a> {
    const MIN_LEN: usize = 12;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            length: r.u64()?,
            metadata: r.bytes(Limit::MetadataLen, limits.max_metadata_len)?,
        })
    }

    fn wire_len(&self) -> usize {
        bytes_len(self.metadata.len()).saturating_add(8)
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.length)?;
        w.bytes("payload metadata", self.metadata)
    }
}

/// One tensor of a message: its length, where it lives, where it must go, and metadata.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct TensorDesc<'a> {
    /// Length in bytes.
    pub length: u64,
    /// The sender's device holding the tensor.
    pub source_device: Device,
    /// The receiver's device it must land on, when the sender imposes one.
    pub target_device: Option<Device>,
    /// Opaque metadata.
    pub metadata: &'a [u8],
}

impl<'a> Element<'a> for TensorDesc<'a> {
    const MIN_LEN: usize = 8 + Device::WIRE_LEN + 1 + 4;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            length: r.u64()?,
            source_device: Device::decode(r)?,
            target_device: Device::decode_option(r)?,
            metadata: r.bytes(Limit::MetadataLen, limits.max_metadata_len)?,
        })
    }

    fn wire_len(&self) -> usize {
        Device::option_len(self.target_device.as_ref())
            .saturating_add(8)
            .saturating_add(Device::WIRE_LEN)
            .saturating_add(bytes_len(self.metadata.len()))
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u64(self.length)?;
        self.source_device.encode(w)?;
        Device::encode_option(self.target_device.as_ref(), w)?;
        w.bytes("tensor metadata", self.metadata)
    }
}

/// What a writer announces before a message's data: metadata, payloads, tensors.
///
/// Parsing checks each count and metadata length against [`Limits`] and the sum of all
/// payload and tensor lengths against [`Limits::max_message_len`].
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct DescriptorRepr<'a> {
    /// Message metadata.
    pub metadata: &'a [u8],
    /// The payloads, in order.
    pub payloads: Seq<'a, PayloadDesc<'a>>,
    /// The tensors, in order.
    pub tensors: Seq<'a, TensorDesc<'a>>,
}

impl DescriptorRepr<'_> {
    /// Sums the lengths of all payloads and tensors (`None` on overflow).
    pub fn total_len(&self) -> Option<u64> {
        let p = self
            .payloads
            .iter()
            .try_fold(0u64, |acc, p| acc.checked_add(p.length))?;
        self.tensors
            .iter()
            .try_fold(p, |acc, t| acc.checked_add(t.length))
    }

    /// Returns `true` when some tensor has no target device, so the reader must reply
    /// with a [`DescriptorReplyRepr`].
    pub fn needs_reply(&self) -> bool {
        self.tensors.iter().any(|t| t.target_device.is_none())
    }
}

impl<'a> Packet<'a> for DescriptorRepr<'a> {
    const KIND: FrameKind = FrameKind::Descriptor;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        let d = Self {
            metadata: r.bytes(Limit::MetadataLen, limits.max_metadata_len)?,
            payloads: Seq::decode(r, Limit::Payloads, limits.max_payloads, limits)?,
            tensors: Seq::decode(r, Limit::Tensors, limits.max_tensors, limits)?,
        };
        match d.total_len() {
            Some(total) if total <= limits.max_message_len => Ok(d),
            total => Err(DecodeError::LimitExceeded {
                limit: Limit::MessageLen,
                value: total.unwrap_or(u64::MAX),
                max: limits.max_message_len,
            }),
        }
    }

    fn buffer_len(&self) -> usize {
        bytes_len(self.metadata.len())
            .saturating_add(self.payloads.wire_len())
            .saturating_add(self.tensors.wire_len())
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes("message metadata", self.metadata)?;
        self.payloads.encode("payload count", w)?;
        self.tensors.encode("tensor count", w)
    }
}

impl<'a> Element<'a> for Device {
    const MIN_LEN: usize = Self::WIRE_LEN;

    fn decode(r: &mut Reader<'a>, _limits: &Limits) -> Result<Self, DecodeError> {
        Self::decode(r)
    }

    fn wire_len(&self) -> usize {
        Self::WIRE_LEN
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        Self::encode(self, w)
    }
}

/// The reader's answer to a descriptor with tensors lacking a target device: the device
/// it allocated for each of them, in tensor order.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct DescriptorReplyRepr<'a> {
    /// One device per tensor that had no `target_device`, in order.
    pub target_devices: Seq<'a, Device>,
}

impl<'a> Packet<'a> for DescriptorReplyRepr<'a> {
    const KIND: FrameKind = FrameKind::DescriptorReply;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            target_devices: Seq::decode(r, Limit::Tensors, limits.max_tensors, limits)?,
        })
    }

    fn buffer_len(&self) -> usize {
        self.target_devices.wire_len()
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.target_devices.encode("target device count", w)
    }
}

/// Owned form of [`PayloadDesc`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, Eq, Hash, PartialEq)]
pub struct Payload {
    /// Length in bytes.
    pub length: u64,
    /// Opaque metadata.
    pub metadata: Vec<u8>,
}

/// Owned form of [`TensorDesc`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Tensor {
    /// Length in bytes.
    pub length: u64,
    /// The sender's device.
    pub source_device: Device,
    /// The device the sender imposes on the receiver, if any.
    pub target_device: Option<Device>,
    /// Opaque metadata.
    pub metadata: Vec<u8>,
}

/// Owned form of [`DescriptorRepr`]: what [`Pipe`](crate::pipe::Pipe) hands a reader.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, Eq, Hash, PartialEq)]
pub struct Descriptor {
    /// Message metadata.
    pub metadata: Vec<u8>,
    /// The payloads, in order.
    pub payloads: Vec<Payload>,
    /// The tensors, in order.
    pub tensors: Vec<Tensor>,
}

#[cfg(feature = "alloc")]
impl Descriptor {
    /// Calls `f` with the borrowed view of this descriptor (the element slices it needs
    /// live only for the call).
    pub fn with_repr<R>(&self, f: impl FnOnce(&DescriptorRepr<'_>) -> R) -> R {
        fn payload(p: &Payload) -> PayloadDesc<'_> {
            PayloadDesc {
                length: p.length,
                metadata: &p.metadata,
            }
        }
        fn tensor(t: &Tensor) -> TensorDesc<'_> {
            TensorDesc {
                length: t.length,
                source_device: t.source_device,
                target_device: t.target_device,
                metadata: &t.metadata,
            }
        }
        let repr = |payloads: &[PayloadDesc<'_>], tensors: &[TensorDesc<'_>]| {
            f(&DescriptorRepr {
                metadata: &self.metadata,
                payloads: Seq::Slice(payloads),
                tensors: Seq::Slice(tensors),
            })
        };
        // A message with a few payloads and tensors (the common, small one) builds its
        // views on the stack: encoding and checking it allocates nothing.
        let mut few_payloads = heapless::Vec::<PayloadDesc<'_>, INLINE_VIEWS>::new();
        let mut few_tensors = heapless::Vec::<TensorDesc<'_>, INLINE_VIEWS>::new();
        let fits = self
            .payloads
            .iter()
            .all(|p| few_payloads.push(payload(p)).is_ok())
            && self
                .tensors
                .iter()
                .all(|t| few_tensors.push(tensor(t)).is_ok());
        if fits {
            return repr(&few_payloads, &few_tensors);
        }
        let payloads: Vec<PayloadDesc<'_>> = self.payloads.iter().map(payload).collect();
        let tensors: Vec<TensorDesc<'_>> = self.tensors.iter().map(tensor).collect();
        repr(&payloads, &tensors)
    }
}

/// How many payload (and tensor) views [`Descriptor::with_repr`] keeps on the stack.
#[cfg(feature = "alloc")]
const INLINE_VIEWS: usize = 4;

#[cfg(feature = "alloc")]
impl DescriptorRepr<'_> {
    /// Copies into the owned form (allocates only what the parsed bytes hold).
    pub fn to_owned(&self) -> Descriptor {
        Descriptor {
            metadata: self.metadata.to_vec(),
            payloads: self
                .payloads
                .iter()
                .map(|p| Payload {
                    length: p.length,
                    metadata: p.metadata.to_vec(),
                })
                .collect(),
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor {
                    length: t.length,
                    source_device: t.source_device,
                    target_device: t.target_device,
                    metadata: t.metadata.to_vec(),
                })
                .collect(),
        }
    }
}

/// Owned form of [`DescriptorReplyRepr`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, Eq, Hash, PartialEq)]
pub struct DescriptorReply {
    /// One device per tensor that had no target device, in order.
    pub target_devices: Vec<Device>,
}

#[cfg(feature = "alloc")]
impl DescriptorReply {
    /// Borrows as the encodable view.
    pub fn as_repr(&self) -> DescriptorReplyRepr<'_> {
        DescriptorReplyRepr {
            target_devices: Seq::Slice(&self.target_devices),
        }
    }
}

#[cfg(feature = "alloc")]
impl DescriptorReplyRepr<'_> {
    /// Copies into the owned form.
    pub fn to_owned(&self) -> DescriptorReply {
        DescriptorReply {
            target_devices: self.target_devices.iter().collect(),
        }
    }
}
