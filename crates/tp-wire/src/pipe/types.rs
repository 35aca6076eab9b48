//! The pipe's identifiers, inputs, outputs and errors.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::time::Duration;

use super::negotiate::NegotiationError;
use crate::allocation::AllocationError;
use crate::device::Device;
use crate::error::{DecodeError, EncodeError};
use crate::limits::Limits;
use crate::packet::{CloseReason, Descriptor, OwnedDeviceDescriptor, RegistrationId};

/// A connection of one pipe, numbered by the pipe. The initial connection is `ConnId(0)`.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct ConnId(pub u32);

/// An operation (write, or read: descriptor then data), unique within one pipe.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct OpId(pub u64);

/// A selected channel of one pipe: its index in selection order.
#[derive(Clone, Copy, Debug, Eq, Hash, Ord, PartialEq, PartialOrd)]
pub struct ChannelId(pub u32);

/// Which end of a channel this pipe is (mirrors TensorPipe's `Endpoint`).
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum Endpoint {
    /// The client end (it opened the connections).
    Connect,
    /// The server end (it accepted them).
    Listen,
}

/// How a connection failed, as the driver saw it.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum IoErrorKind {
    /// The peer closed the connection (end of stream).
    Eof,
    /// The connection was reset or broke.
    Reset,
    /// A connection attempt failed.
    ConnectFailed,
    /// The driver gave up waiting.
    TimedOut,
    /// Any other failure.
    Other,
}

impl fmt::Display for IoErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Eof => "end of stream",
            Self::Reset => "connection reset",
            Self::ConnectFailed => "connect failed",
            Self::TimedOut => "timed out",
            Self::Other => "i/o error",
        })
    }
}

/// A protocol rule the peer broke.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum PeerMisbehaved {
    /// A frame of a kind that is not allowed at this point.
    UnexpectedFrame {
        /// The kind byte.
        kind: u8,
    },
    /// The brochure answer differs from the choice the client computed.
    InconsistentSelection,
    /// The answer chose a version outside the client's range.
    BadVersion(u8),
    /// A frame header's version differs from the negotiated one.
    VersionChanged(u8),
    /// A descriptor imposes a target device for which no channel reaches the source.
    NoChannelForTarget {
        /// The imposed target (on the reader's side).
        target: Device,
        /// The sender's source device.
        source: Device,
    },
    /// A descriptor reply does not match its message.
    BadDescriptorReply,
}

impl fmt::Display for PeerMisbehaved {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnexpectedFrame { kind } => write!(f, "unexpected frame of kind {kind}"),
            Self::InconsistentSelection => {
                f.write_str("brochure answer disagrees with the negotiation rules")
            }
            Self::BadVersion(v) => {
                write!(f, "answer chose protocol version {v}, outside our range")
            }
            Self::VersionChanged(v) => write!(
                f,
                "frame of version {v} after another version was negotiated"
            ),
            Self::NoChannelForTarget { target, source } => {
                write!(
                    f,
                    "descriptor targets {target} but no channel joins it to {source}"
                )
            }
            Self::BadDescriptorReply => f.write_str("descriptor reply does not match its message"),
        }
    }
}

/// Why a pipe, or one of its operations, failed.
///
/// The first error that is not specific to one operation is *sticky*: the pipe closes and
/// every pending and later operation completes with it.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum PipeError {
    /// The pipe was closed locally.
    Closed,
    /// The peer said goodbye.
    PeerClosed {
        /// Its reason.
        reason: CloseReason,
        /// Its detail message.
        message: String,
    },
    /// A connection failed.
    Connection {
        /// Which.
        conn: ConnId,
        /// How.
        kind: IoErrorKind,
    },
    /// A channel operation failed.
    Channel {
        /// Which channel.
        channel: ChannelId,
        /// How.
        kind: IoErrorKind,
    },
    /// The peer sent bytes that do not decode.
    Decode {
        /// On which connection.
        conn: ConnId,
        /// What was wrong.
        error: DecodeError,
    },
    /// The peer broke a protocol rule.
    Peer(PeerMisbehaved),
    /// The handshake found nothing in common.
    Negotiation(NegotiationError),
    /// The handshake did not complete within [`PipeConfig::handshake_timeout`].
    HandshakeTimeout,
    /// A local value did not fit the wire format (a name or descriptor over 4 GiB).
    Encode(EncodeError),
    /// Operation-specific, not sticky: no selected channel joins a tensor's source device
    /// to its target device. Nothing of the message was sent.
    NoChannel {
        /// Index of the tensor.
        tensor: usize,
        /// The local device.
        local: Device,
        /// The remote device.
        remote: Device,
    },
}

impl PipeError {
    /// The reason this side gives the peer in its goodbye, if it should send one.
    pub(crate) const fn goodbye_reason(&self) -> Option<CloseReason> {
        match self {
            Self::Closed | Self::Encode(_) => Some(CloseReason::Normal),
            Self::Decode {
                error: DecodeError::LimitExceeded { .. },
                ..
            } => Some(CloseReason::LimitExceeded),
            Self::Decode { .. } | Self::Peer(_) => Some(CloseReason::ProtocolViolation),
            Self::Negotiation(NegotiationError::NoCommonVersion { .. }) => {
                Some(CloseReason::VersionMismatch)
            }
            Self::Negotiation(NegotiationError::NoCommonTransport) => {
                Some(CloseReason::NoCommonTransport)
            }
            Self::Negotiation(_) => Some(CloseReason::ProtocolViolation),
            Self::HandshakeTimeout => Some(CloseReason::HandshakeTimeout),
            Self::PeerClosed { .. }
            | Self::Connection { .. }
            | Self::Channel { .. }
            | Self::NoChannel { .. } => None,
        }
    }
}

impl fmt::Display for PipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Closed => f.write_str("pipe closed"),
            Self::PeerClosed { reason, message } => {
                write!(f, "peer closed the pipe: {reason}: {message}")
            }
            Self::Connection { conn, kind } => write!(f, "connection {} failed: {kind}", conn.0),
            Self::Channel { channel, kind } => write!(f, "channel {} failed: {kind}", channel.0),
            Self::Decode { conn, error } => {
                write!(f, "bad frame on connection {}: {error}", conn.0)
            }
            Self::Peer(p) => write!(f, "peer broke the protocol: {p}"),
            Self::Negotiation(n) => write!(f, "handshake failed: {n}"),
            Self::HandshakeTimeout => f.write_str("handshake timed out"),
            Self::Encode(e) => write!(f, "cannot encode: {e}"),
            Self::NoChannel {
                tensor,
                local,
                remote,
            } => {
                write!(f, "no channel joins {local} to {remote} (tensor {tensor})")
            }
        }
    }
}

impl core::error::Error for PipeError {}

/// A command the pipe refused; nothing changed and no event will follow for it.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum CommandError {
    /// No operation with this id awaits `read`.
    UnknownOp(OpId),
    /// The operation's descriptor is not ready, failed, or was already read.
    NotAwaitingRead(OpId),
    /// An earlier message must be read first (reads happen in order).
    NotFirstInLine(OpId),
    /// The allocation does not match the descriptor.
    Allocation(AllocationError),
    /// No selected channel joins an allocated tensor's device to its source device.
    NoChannel {
        /// Index of the tensor.
        tensor: usize,
        /// The local (allocated) device.
        local: Device,
        /// The sender's device.
        remote: Device,
    },
    /// The message cannot be encoded.
    Encode(EncodeError),
    /// The message breaks the pipe's [`Limits`] (the peer would refuse it).
    ExceedsLimits(DecodeError),
    /// No connection with this registration id is awaited.
    UnknownRegistration(RegistrationId),
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownOp(op) => write!(f, "no read operation {}", op.0),
            Self::NotAwaitingRead(op) => write!(f, "operation {} is not awaiting read", op.0),
            Self::NotFirstInLine(op) => {
                write!(f, "operation {} is not the next message to read", op.0)
            }
            Self::Allocation(e) => write!(f, "allocation does not match the descriptor: {e}"),
            Self::NoChannel {
                tensor,
                local,
                remote,
            } => {
                write!(f, "no channel joins {local} to {remote} (tensor {tensor})")
            }
            Self::Encode(e) => write!(f, "cannot encode the message: {e}"),
            Self::ExceedsLimits(e) => write!(f, "message exceeds the limits: {e}"),
            Self::UnknownRegistration(id) => write!(f, "no pipe awaits a connection with id {id}"),
        }
    }
}

impl core::error::Error for CommandError {}

/// Settings of one pipe.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct PipeConfig {
    /// Limits on what the peer may send.
    pub limits: Limits,
    /// How long the handshake may take before the pipe fails (`None`: forever).
    pub handshake_timeout: Option<Duration>,
}

impl Default for PipeConfig {
    fn default() -> Self {
        Self {
            limits: Limits::DEFAULT,
            handshake_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// A transport this side offers.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LocalTransport {
    /// Registered name.
    pub name: String,
    /// Higher is preferred.
    pub priority: i64,
    /// Domain descriptor.
    pub domain_descriptor: Vec<u8>,
    /// The listening address on the server side (transports without one are not offered
    /// by a server); ignored on the client side.
    pub address: Option<String>,
}

/// A channel this side offers.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct LocalChannel {
    /// Registered name.
    pub name: String,
    /// Higher is preferred.
    pub priority: i64,
    /// How many transport connections one channel instance needs.
    pub connections: u32,
    /// One descriptor per device.
    pub devices: Vec<OwnedDeviceDescriptor>,
}

/// What this side has to offer: its name, transports and channels.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct LocalOffer {
    /// This context's name (sent to the server as the client's name).
    pub context_name: String,
    /// Viable transports.
    pub transports: Vec<LocalTransport>,
    /// Viable channels.
    pub channels: Vec<LocalChannel>,
}

/// An action on a connection, for the driver. Actions on one connection must be carried
/// out in the order they are polled.
///
/// Every `SendPayload` and `RecvPayload` gets exactly one
/// [`Pipe::handle_payload_done`](super::Pipe::handle_payload_done), success or not, even after the connection closed:
/// that is how the pipe knows the user's memory is free again.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Io {
    /// Open a new connection (client only) with `transport` to `address`.
    Connect {
        /// The new connection's id.
        conn: ConnId,
        /// Transport name.
        transport: String,
        /// Address to connect to.
        address: String,
    },
    /// Write these frame bytes.
    Send {
        /// Where.
        conn: ConnId,
        /// A complete frame.
        frame: Vec<u8>,
    },
    /// Write the bytes of payload `index` of write `op` (exactly `len` bytes, no framing).
    SendPayload {
        /// Where.
        conn: ConnId,
        /// The write.
        op: OpId,
        /// Payload index.
        index: usize,
        /// Its length.
        len: u64,
    },
    /// Read one frame (12-byte header, then its body) and pass it to
    /// [`Pipe::handle_frame`](super::Pipe::handle_frame).
    RecvFrame {
        /// Where.
        conn: ConnId,
    },
    /// Read exactly `len` bytes into payload `index` of read `op`'s allocation.
    RecvPayload {
        /// Where.
        conn: ConnId,
        /// The read.
        op: OpId,
        /// Payload index.
        index: usize,
        /// Its length.
        len: u64,
    },
    /// Close the connection (after the writes queued before this action, if it can).
    Close {
        /// Which.
        conn: ConnId,
    },
}

/// An action on a channel, for the driver. Each `Send`/`Recv` gets exactly one
/// [`Pipe::handle_channel_done`](super::Pipe::handle_channel_done); per channel, the k-th send pairs with the peer's k-th
/// receive.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum ChannelOp {
    /// Send tensor `tensor` of write `op`.
    Send {
        /// The channel.
        channel: ChannelId,
        /// The write.
        op: OpId,
        /// Tensor index.
        tensor: usize,
        /// Its length.
        len: u64,
    },
    /// Receive tensor `tensor` of read `op` into its allocated buffer.
    Recv {
        /// The channel.
        channel: ChannelId,
        /// The read.
        op: OpId,
        /// Tensor index.
        tensor: usize,
        /// Its length.
        len: u64,
    },
    /// Close the channel, failing its pending operations.
    Close {
        /// The channel.
        channel: ChannelId,
    },
}

/// Something the user or the driver must learn.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Event {
    /// Server: the listener must route connections presenting these ids to this pipe.
    ConnectionsRequested {
        /// The ids.
        ids: Vec<RegistrationId>,
    },
    /// A channel has all its connections: the driver creates it.
    ChannelReady {
        /// Its id in this pipe.
        channel: ChannelId,
        /// Its registered name.
        name: String,
        /// Its connections, in order.
        conns: Vec<ConnId>,
        /// Which end this side is.
        endpoint: Endpoint,
    },
    /// The handshake finished.
    Established {
        /// The protocol version.
        version: u8,
        /// The transport in use.
        transport: String,
    },
    /// A read's descriptor arrived (or the read failed before it did).
    DescriptorReady {
        /// The read.
        op: OpId,
        /// The descriptor, or why there is none.
        result: Result<Descriptor, PipeError>,
    },
    /// A read's payloads and tensors are all in place (or it failed).
    ReadDone {
        /// The read.
        op: OpId,
        /// Outcome.
        result: Result<(), PipeError>,
    },
    /// A write's payloads were written and its tensors sent (or it failed).
    WriteDone {
        /// The write.
        op: OpId,
        /// Outcome.
        result: Result<(), PipeError>,
    },
    /// The pipe failed or was closed; emitted once.
    Closed {
        /// The first error.
        error: PipeError,
    },
}
