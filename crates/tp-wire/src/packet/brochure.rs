//! The handshake: [`BrochureRepr`] (the client's offer) and [`BrochureAnswerRepr`] (the
//! server's offer and choice).

#[cfg(feature = "alloc")]
use alloc::{string::String, string::ToString, vec::Vec};

use super::{Element, Packet, RegistrationId, Seq};
use crate::codec::{Reader, Writer, bytes_len};
use crate::device::Device;
use crate::error::{DecodeError, EncodeError, Limit};
use crate::frame::FrameKind;
use crate::limits::Limits;

/// A transport a side offers: its name, its priority and its domain descriptor.
///
/// Two sides can use a transport when both offer it with byte-equal domain descriptors.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct TransportOffer<'a> {
    /// Registered name (`tcp`, `shm`, `ibv`).
    pub name: &'a str,
    /// Higher is preferred.
    pub priority: i64,
    /// Identifies the domain the transport can reach (for shm: boot id and namespace).
    pub domain_descriptor: &'a [u8],
}

impl<'a> Element<'a> for TransportOffer<'a> {
    const MIN_LEN: usize = 4 + 8 + 4;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.str(limits.max_string_len)?,
            priority: r.i64()?,
            domain_descriptor: r.bytes(Limit::StringLen, limits.max_string_len)?,
        })
    }

    fn wire_len(&self) -> usize {
        bytes_len(self.name.len())
            .saturating_add(8)
            .saturating_add(bytes_len(self.domain_descriptor.len()))
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes("transport name", self.name.as_bytes())?;
        w.i64(self.priority)?;
        w.bytes("domain descriptor", self.domain_descriptor)
    }
}

/// A channel's descriptor for one local device.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct DeviceDescriptor<'a> {
    /// The device.
    pub device: Device,
    /// What the channel needs the peer to match for this device.
    pub descriptor: &'a [u8],
}

impl<'a> Element<'a> for DeviceDescriptor<'a> {
    const MIN_LEN: usize = Device::WIRE_LEN + 4;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            device: Device::decode(r)?,
            descriptor: r.bytes(Limit::StringLen, limits.max_string_len)?,
        })
    }

    fn wire_len(&self) -> usize {
        bytes_len(self.descriptor.len()).saturating_add(Device::WIRE_LEN)
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.device.encode(w)?;
        w.bytes("device descriptor", self.descriptor)
    }
}

/// A channel a side offers: its name, priority and one descriptor per device.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ChannelOffer<'a> {
    /// Registered name (`basic`, `cma`, `cuda_ipc`, ...).
    pub name: &'a str,
    /// Higher is preferred.
    pub priority: i64,
    /// One descriptor per device the channel serves.
    pub devices: Seq<'a, DeviceDescriptor<'a>>,
}

impl<'a> Element<'a> for ChannelOffer<'a> {
    const MIN_LEN: usize = 4 + 8 + 4;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            name: r.str(limits.max_string_len)?,
            priority: r.i64()?,
            devices: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
        })
    }

    fn wire_len(&self) -> usize {
        bytes_len(self.name.len())
            .saturating_add(8)
            .saturating_add(self.devices.wire_len())
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes("channel name", self.name.as_bytes())?;
        w.i64(self.priority)?;
        self.devices.encode("device count", w)
    }
}

/// The client's offer: the versions it speaks, its transports and its channels.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct BrochureRepr<'a> {
    /// Lowest protocol version the client speaks.
    pub min_version: u8,
    /// Highest protocol version the client speaks.
    pub max_version: u8,
    /// Every viable transport.
    pub transports: Seq<'a, TransportOffer<'a>>,
    /// Every viable channel.
    pub channels: Seq<'a, ChannelOffer<'a>>,
}

impl<'a> Packet<'a> for BrochureRepr<'a> {
    const KIND: FrameKind = FrameKind::Brochure;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            min_version: r.u8()?,
            max_version: r.u8()?,
            transports: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
            channels: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
        })
    }

    fn buffer_len(&self) -> usize {
        self.transports
            .wire_len()
            .saturating_add(self.channels.wire_len())
            .saturating_add(2)
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u8(self.min_version)?;
        w.u8(self.max_version)?;
        self.transports.encode("transport count", w)?;
        self.channels.encode("channel count", w)
    }
}

/// The registration ids of one selected channel's connections, in connection order.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct ChannelRegistration<'a> {
    /// The channel.
    pub channel: &'a str,
    /// One id per connection the channel needs.
    pub ids: Seq<'a, RegistrationId>,
}

impl<'a> Element<'a> for ChannelRegistration<'a> {
    const MIN_LEN: usize = 8;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            channel: r.str(limits.max_string_len)?,
            ids: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
        })
    }

    fn wire_len(&self) -> usize {
        bytes_len(self.channel.len()).saturating_add(self.ids.wire_len())
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.bytes("channel name", self.channel.as_bytes())?;
        self.ids.encode("registration id count", w)
    }
}

/// The channel chosen for one (server device, client device) pair.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct DevicePairChoice<'a> {
    /// The server's device.
    pub server_device: Device,
    /// The client's device.
    pub client_device: Device,
    /// The channel that moves tensors between them.
    pub channel: &'a str,
}

impl<'a> Element<'a> for DevicePairChoice<'a> {
    const MIN_LEN: usize = 2 * Device::WIRE_LEN + 4;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            server_device: Device::decode(r)?,
            client_device: Device::decode(r)?,
            channel: r.str(limits.max_string_len)?,
        })
    }

    fn wire_len(&self) -> usize {
        bytes_len(self.channel.len()).saturating_add(2 * Device::WIRE_LEN)
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        self.server_device.encode(w)?;
        self.client_device.encode(w)?;
        w.bytes("channel name", self.channel.as_bytes())
    }
}

/// The server's answer to a brochure: its own offer, the version, transport and channels
/// it chose, and the registration ids the client's extra connections must present.
///
/// The choice is a pure function of the two offers (see
/// [`negotiate`](crate::pipe::negotiate)); the client recomputes it and closes the pipe
/// with [`CloseReason::ProtocolViolation`](super::CloseReason::ProtocolViolation) if the
/// answer differs.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct BrochureAnswerRepr<'a> {
    /// The protocol version both sides use from now on.
    pub version: u8,
    /// The server's transports (those it has a listening address for).
    pub transports: Seq<'a, TransportOffer<'a>>,
    /// The server's channels.
    pub channels: Seq<'a, ChannelOffer<'a>>,
    /// The chosen transport.
    pub transport: &'a str,
    /// The server's address on the chosen transport.
    pub address: &'a str,
    /// Present when the chosen transport differs from the one the client connected with:
    /// the id of the replacement primary connection.
    pub primary_registration: Option<RegistrationId>,
    /// The id of the descriptor-reply connection.
    pub reply_registration: RegistrationId,
    /// One entry per selected channel, in selection order.
    pub channel_registrations: Seq<'a, ChannelRegistration<'a>>,
    /// The chosen channel for every device pair that has one.
    pub pairs: Seq<'a, DevicePairChoice<'a>>,
}

impl<'a> Packet<'a> for BrochureAnswerRepr<'a> {
    const KIND: FrameKind = FrameKind::BrochureAnswer;

    fn decode(r: &mut Reader<'a>, limits: &Limits) -> Result<Self, DecodeError> {
        Ok(Self {
            version: r.u8()?,
            transports: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
            channels: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
            transport: r.str(limits.max_string_len)?,
            address: r.str(limits.max_string_len)?,
            primary_registration: match r.u8()? {
                0 => None,
                1 => Some(RegistrationId(r.u64()?)),
                other => {
                    return Err(DecodeError::InvalidTag {
                        field: "option",
                        value: u32::from(other),
                    });
                }
            },
            reply_registration: RegistrationId(r.u64()?),
            channel_registrations: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
            pairs: Seq::decode(r, Limit::ListLen, limits.max_list_len, limits)?,
        })
    }

    fn buffer_len(&self) -> usize {
        [
            1,
            self.transports.wire_len(),
            self.channels.wire_len(),
            bytes_len(self.transport.len()),
            bytes_len(self.address.len()),
            if self.primary_registration.is_some() {
                9
            } else {
                1
            },
            8,
            self.channel_registrations.wire_len(),
            self.pairs.wire_len(),
        ]
        .iter()
        .fold(0usize, |a, b| a.saturating_add(*b))
    }

    fn encode(&self, w: &mut Writer<'_>) -> Result<(), EncodeError> {
        w.u8(self.version)?;
        self.transports.encode("transport count", w)?;
        self.channels.encode("channel count", w)?;
        w.bytes("transport name", self.transport.as_bytes())?;
        w.bytes("address", self.address.as_bytes())?;
        match self.primary_registration {
            None => w.u8(0)?,
            Some(id) => {
                w.u8(1)?;
                w.u64(id.0)?;
            }
        }
        w.u64(self.reply_registration.0)?;
        self.channel_registrations
            .encode("channel registration count", w)?;
        self.pairs.encode("device pair count", w)
    }
}

/// Owned form of [`TransportOffer`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct OwnedTransportOffer {
    /// Name.
    pub name: String,
    /// Priority.
    pub priority: i64,
    /// Domain descriptor.
    pub domain_descriptor: Vec<u8>,
}

/// Owned form of [`DeviceDescriptor`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct OwnedDeviceDescriptor {
    /// Device.
    pub device: Device,
    /// Descriptor.
    pub descriptor: Vec<u8>,
}

/// Owned form of [`ChannelOffer`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct OwnedChannelOffer {
    /// Name.
    pub name: String,
    /// Priority.
    pub priority: i64,
    /// Per-device descriptors.
    pub devices: Vec<OwnedDeviceDescriptor>,
}

/// Owned form of [`BrochureRepr`]: a side's offer.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct Brochure {
    /// Lowest version spoken.
    pub min_version: u8,
    /// Highest version spoken.
    pub max_version: u8,
    /// Transports.
    pub transports: Vec<OwnedTransportOffer>,
    /// Channels.
    pub channels: Vec<OwnedChannelOffer>,
}

/// Owned form of [`ChannelRegistration`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct OwnedChannelRegistration {
    /// Channel.
    pub channel: String,
    /// Ids, one per connection.
    pub ids: Vec<RegistrationId>,
}

/// Owned form of [`DevicePairChoice`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct OwnedDevicePairChoice {
    /// Server device.
    pub server_device: Device,
    /// Client device.
    pub client_device: Device,
    /// Channel.
    pub channel: String,
}

/// Owned form of [`BrochureAnswerRepr`].
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Eq, Hash, PartialEq)]
pub struct BrochureAnswer {
    /// Chosen version.
    pub version: u8,
    /// Server's transports.
    pub transports: Vec<OwnedTransportOffer>,
    /// Server's channels.
    pub channels: Vec<OwnedChannelOffer>,
    /// Chosen transport.
    pub transport: String,
    /// Server's address on it.
    pub address: String,
    /// Replacement primary connection id.
    pub primary_registration: Option<RegistrationId>,
    /// Reply connection id.
    pub reply_registration: RegistrationId,
    /// Per selected channel ids.
    pub channel_registrations: Vec<OwnedChannelRegistration>,
    /// Chosen channel per device pair.
    pub pairs: Vec<OwnedDevicePairChoice>,
}

#[cfg(feature = "alloc")]
fn transport_reprs(v: &[OwnedTransportOffer]) -> Vec<TransportOffer<'_>> {
    v.iter()
        .map(|t| TransportOffer {
            name: &t.name,
            priority: t.priority,
            domain_descriptor: &t.domain_descriptor,
        })
        .collect()
}

#[cfg(feature = "alloc")]
fn device_reprs(v: &[OwnedChannelOffer]) -> Vec<Vec<DeviceDescriptor<'_>>> {
    v.iter()
        .map(|c| {
            c.devices
                .iter()
                .map(|d| DeviceDescriptor {
                    device: d.device,
                    descriptor: &d.descriptor,
                })
                .collect()
        })
        .collect()
}

#[cfg(feature = "alloc")]
fn channel_reprs<'a>(
    v: &'a [OwnedChannelOffer],
    devices: &'a [Vec<DeviceDescriptor<'a>>],
) -> Vec<ChannelOffer<'a>> {
    v.iter()
        .zip(devices)
        .map(|(c, d)| ChannelOffer {
            name: &c.name,
            priority: c.priority,
            devices: Seq::Slice(d),
        })
        .collect()
}

#[cfg(feature = "alloc")]
fn transports_owned(s: &Seq<'_, TransportOffer<'_>>) -> Vec<OwnedTransportOffer> {
    s.iter()
        .map(|t| OwnedTransportOffer {
            name: t.name.to_string(),
            priority: t.priority,
            domain_descriptor: t.domain_descriptor.to_vec(),
        })
        .collect()
}

#[cfg(feature = "alloc")]
fn channels_owned(s: &Seq<'_, ChannelOffer<'_>>) -> Vec<OwnedChannelOffer> {
    s.iter()
        .map(|c| OwnedChannelOffer {
            name: c.name.to_string(),
            priority: c.priority,
            devices: c
                .devices
                .iter()
                .map(|d| OwnedDeviceDescriptor {
                    device: d.device,
                    descriptor: d.descriptor.to_vec(),
                })
                .collect(),
        })
        .collect()
}

#[cfg(feature = "alloc")]
impl Brochure {
    /// Calls `f` with the borrowed view of this brochure.
    pub fn with_repr<R>(&self, f: impl FnOnce(&BrochureRepr<'_>) -> R) -> R {
        let transports = transport_reprs(&self.transports);
        let devices = device_reprs(&self.channels);
        let channels = channel_reprs(&self.channels, &devices);
        f(&BrochureRepr {
            min_version: self.min_version,
            max_version: self.max_version,
            transports: Seq::Slice(&transports),
            channels: Seq::Slice(&channels),
        })
    }
}

#[cfg(feature = "alloc")]
impl BrochureRepr<'_> {
    /// Copies into the owned form.
    pub fn to_owned(&self) -> Brochure {
        Brochure {
            min_version: self.min_version,
            max_version: self.max_version,
            transports: transports_owned(&self.transports),
            channels: channels_owned(&self.channels),
        }
    }
}

#[cfg(feature = "alloc")]
impl BrochureAnswer {
    /// Calls `f` with the borrowed view of this answer.
    pub fn with_repr<R>(&self, f: impl FnOnce(&BrochureAnswerRepr<'_>) -> R) -> R {
        let transports = transport_reprs(&self.transports);
        let devices = device_reprs(&self.channels);
        let channels = channel_reprs(&self.channels, &devices);
        let regs: Vec<ChannelRegistration<'_>> = self
            .channel_registrations
            .iter()
            .map(|c| ChannelRegistration {
                channel: &c.channel,
                ids: Seq::Slice(&c.ids),
            })
            .collect();
        let pairs: Vec<DevicePairChoice<'_>> = self
            .pairs
            .iter()
            .map(|p| DevicePairChoice {
                server_device: p.server_device,
                client_device: p.client_device,
                channel: &p.channel,
            })
            .collect();
        f(&BrochureAnswerRepr {
            version: self.version,
            transports: Seq::Slice(&transports),
            channels: Seq::Slice(&channels),
            transport: &self.transport,
            address: &self.address,
            primary_registration: self.primary_registration,
            reply_registration: self.reply_registration,
            channel_registrations: Seq::Slice(&regs),
            pairs: Seq::Slice(&pairs),
        })
    }
}

#[cfg(feature = "alloc")]
impl BrochureAnswerRepr<'_> {
    /// Copies into the owned form.
    pub fn to_owned(&self) -> BrochureAnswer {
        BrochureAnswer {
            version: self.version,
            transports: transports_owned(&self.transports),
            channels: channels_owned(&self.channels),
            transport: self.transport.to_string(),
            address: self.address.to_string(),
            primary_registration: self.primary_registration,
            reply_registration: self.reply_registration,
            channel_registrations: self
                .channel_registrations
                .iter()
                .map(|c| OwnedChannelRegistration {
                    channel: c.channel.to_string(),
                    ids: c.ids.iter().collect(),
                })
                .collect(),
            pairs: self
                .pairs
                .iter()
                .map(|p| OwnedDevicePairChoice {
                    server_device: p.server_device,
                    client_device: p.client_device,
                    channel: p.channel.to_string(),
                })
                .collect(),
        }
    }
}
