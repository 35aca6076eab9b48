//! What calls carry ([`RpcMessage`]), what handlers see ([`Request`]) and return
//! ([`Reply`]), how either travels in a pipe message (`tp_wire::rpc`), and why a call
//! failed ([`CallError`]).

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures::future::BoxFuture;
use tp_channel::{Device, RecvBuf, SendBuf};
use tp_wire::rpc::{RpcHeader, RpcKind, decode_source_device, encode_source_device};

use super::devices::Devices;
use crate::pipe::{Allocation, Message, OpError, Payload, Pipe, Tensor};

/// A tensor in a call or reply: its bytes, in host memory or (feature `cuda`) in a
/// GPU's.
///
/// Device maps ([`AgentOptions::device_maps`](super::AgentOptions::device_maps)) decide
/// where the peer puts a tensor; a received GPU tensor is a [`tp_cuda::CudaBuffer`]
/// on the mapped GPU, ordered by a stream the agent owns for that GPU (its
/// [`stream`](tp_cuda::CudaBuffer::stream)): the bytes are there for work enqueued on
/// that stream, which the buffer keeps alive.
#[derive(Debug)]
#[non_exhaustive]
pub enum RpcTensor {
    /// Host memory.
    Cpu(Vec<u8>),
    /// GPU memory, ordered by the buffer's stream: a send reads it after the work
    /// enqueued on that stream before the call.
    #[cfg(feature = "cuda")]
    Cuda(tp_cuda::CudaBuffer),
}

impl RpcTensor {
    /// A CPU tensor.
    pub fn cpu(data: Vec<u8>) -> Self {
        Self::Cpu(data)
    }

    /// Where the bytes are.
    pub fn device(&self) -> Device {
        match self {
            Self::Cpu(_) => Device::CPU,
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => Device::cuda(b.device_index()),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            Self::Cpu(v) => v.len(),
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => b.len(),
        }
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of a CPU tensor.
    pub fn as_cpu(&self) -> Option<&[u8]> {
        match self {
            Self::Cpu(v) => Some(v),
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => None,
        }
    }

    /// The bytes of a CPU tensor, to change.
    pub fn as_cpu_mut(&mut self) -> Option<&mut Vec<u8>> {
        match self {
            Self::Cpu(v) => Some(v),
            #[cfg(feature = "cuda")]
            Self::Cuda(_) => None,
        }
    }

    /// The buffer of a GPU tensor.
    #[cfg(feature = "cuda")]
    pub fn as_cuda(&self) -> Option<&tp_cuda::CudaBuffer> {
        match self {
            Self::Cuda(b) => Some(b),
            Self::Cpu(_) => None,
        }
    }

    /// The buffer of a GPU tensor, to change.
    #[cfg(feature = "cuda")]
    pub fn as_cuda_mut(&mut self) -> Option<&mut tp_cuda::CudaBuffer> {
        match self {
            Self::Cuda(b) => Some(b),
            Self::Cpu(_) => None,
        }
    }

    /// For a pipe message.
    fn into_send(self) -> Box<dyn SendBuf> {
        match self {
            Self::Cpu(v) => Box::new(v),
            #[cfg(feature = "cuda")]
            Self::Cuda(b) => Box::new(b),
        }
    }

    /// From a buffer the agent allocated (see `Devices::alloc`).
    fn from_recv(buf: Box<dyn RecvBuf>) -> Self {
        let any: Box<dyn std::any::Any> = buf;
        #[cfg(feature = "cuda")]
        let any = match any.downcast::<tp_cuda::CudaBuffer>() {
            Ok(b) => return Self::Cuda(*b),
            Err(any) => any,
        };
        match any.downcast::<Vec<u8>>() {
            Ok(v) => Self::Cpu(*v),
            // The agent allocates only these two kinds.
            Err(_) => Self::Cpu(Vec::new()),
        }
    }
}

/// A call's or a reply's content: opaque bytes (the caller's own serialization) and
/// tensors.
#[derive(Debug, Default)]
pub struct RpcMessage {
    /// The bytes.
    pub payload: Vec<u8>,
    /// The tensors, in order.
    pub tensors: Vec<RpcTensor>,
}

impl RpcMessage {
    /// A message of `payload` and no tensors.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Self {
            payload: payload.into(),
            tensors: Vec::new(),
        }
    }

    /// Adds a tensor.
    #[must_use]
    pub fn with_tensor(mut self, tensor: RpcTensor) -> Self {
        self.tensors.push(tensor);
        self
    }

    /// Bytes of payload and tensors together.
    pub fn len(&self) -> u64 {
        let tensors: usize = self.tensors.iter().map(RpcTensor::len).sum();
        (self.payload.len() + tensors) as u64
    }

    /// Whether there are no bytes at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy, when every tensor is in host memory (`None` if one is on a GPU: copying
    /// device memory is the caller's business, on its own stream).
    pub fn try_clone(&self) -> Option<Self> {
        Some(Self {
            payload: self.payload.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|t| t.as_cpu().map(|b| RpcTensor::Cpu(b.to_vec())))
                .collect::<Option<_>>()?,
        })
    }

    /// Each tensor's device, in order.
    pub fn devices(&self) -> impl Iterator<Item = Device> + '_ {
        self.tensors.iter().map(RpcTensor::device)
    }
}

/// A call, as its handler sees it.
#[derive(Debug)]
pub struct Request {
    /// The caller's worker name.
    pub from: String,
    /// The caller's id for this call.
    pub id: u64,
    /// What it sent (tensors on the devices the caller's device map chose).
    pub message: RpcMessage,
}

/// What a handler says: at once, or later (an async handler; the future runs on the
/// worker pool without holding a thread while it waits). An `Err` travels back to the
/// caller as [`CallError::Remote`].
pub enum Reply {
    /// The answer.
    Ready(Result<RpcMessage, String>),
    /// The answer, once this future is done.
    Later(BoxFuture<'static, Result<RpcMessage, String>>),
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ready(r) => f.debug_tuple("Ready").field(r).finish(),
            Self::Later(_) => f.write_str("Later(..)"),
        }
    }
}

impl From<Result<RpcMessage, String>> for Reply {
    fn from(r: Result<RpcMessage, String>) -> Self {
        Self::Ready(r)
    }
}

impl From<RpcMessage> for Reply {
    fn from(m: RpcMessage) -> Self {
        Self::Ready(Ok(m))
    }
}

/// Runs requests. Any `Fn(Request) -> Reply` closure is one.
pub trait Handler: Send + Sync + 'static {
    /// Answers one request; runs on a worker-pool thread.
    fn handle(&self, request: Request) -> Reply;
}

impl<F: Fn(Request) -> Reply + Send + Sync + 'static> Handler for F {
    fn handle(&self, request: Request) -> Reply {
        self(request)
    }
}

/// Why a call failed.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum CallError {
    /// The agent is shut down, or shutting down past the point of new calls.
    NotRunning {
        /// This worker.
        worker: String,
    },
    /// No worker of that name is in the group.
    UnknownPeer {
        /// This worker.
        worker: String,
        /// This worker's rank.
        rank: u32,
        /// The name asked for.
        peer: String,
    },
    /// The peer left the (dynamic) group.
    PeerLeft {
        /// The peer.
        peer: String,
    },
    /// A tensor's device has no mapping to the peer.
    NoDeviceMap {
        /// The peer.
        peer: String,
        /// The tensor's device.
        device: Device,
    },
    /// A handler's reply tensor is on a device the request did not use.
    BadReplyDevice {
        /// The device.
        device: Device,
        /// The devices the request's tensors arrived on.
        allowed: Vec<Device>,
    },
    /// No reply within the call's timeout (the callee is not told; a late reply is
    /// dropped).
    Timeout {
        /// The call's id.
        id: u64,
        /// The peer.
        peer: String,
        /// The timeout.
        timeout: Duration,
    },
    /// The pipe to the peer failed or could not be opened; the next call opens a new
    /// one.
    Pipe {
        /// The call's id.
        id: u64,
        /// The peer.
        peer: String,
        /// The URL the pipe went to.
        url: String,
        /// What failed.
        error: String,
    },
    /// The pipe refused the message (over its limits, or no channel for a tensor's
    /// devices).
    Refused {
        /// The peer.
        peer: String,
        /// Why.
        error: String,
    },
    /// The handler failed (or panicked); its text.
    Remote {
        /// The peer.
        peer: String,
        /// What the handler said.
        message: String,
    },
    /// The agent was shut down (not gracefully) while the call was pending.
    Shutdown {
        /// The call's id.
        id: u64,
        /// The peer.
        peer: String,
    },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRunning { worker } => write!(
                f,
                "RPC is no longer running on worker {worker:?}: it was shut down"
            ),
            Self::UnknownPeer { worker, rank, peer } => write!(
                f,
                "name:{worker},rank:{rank} could not find destination name {peer}"
            ),
            Self::PeerLeft { peer } => write!(f, "worker {peer:?} has left the RPC group"),
            Self::NoDeviceMap { peer, device } => write!(
                f,
                "tensor on {device} cannot be sent to {peer:?}: only CPU tensors are sent by \
                 default; move it to the CPU or set a device map for {peer:?} \
                 (AgentOptions::device_maps). Request device mapping is not available for \
                 destination {peer:?}"
            ),
            Self::BadReplyDevice { device, allowed } => {
                let allowed: Vec<String> = allowed.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "RPC detected that a user-function output tensor is on device {device}, \
                     which is not one of the input tensor devices: [{}]",
                    allowed.join(", ")
                )
            }
            Self::Timeout { id, peer, timeout } => write!(
                f,
                "RPC call {id} to {peer:?} ran for more than the set timeout ({} ms) and was \
                 marked failed (the callee is not told and may still run it)",
                timeout.as_millis()
            ),
            Self::Pipe {
                id,
                peer,
                url,
                error,
            } => {
                write!(
                    f,
                    "RPC call {id} to {peer:?} failed: the pipe to {url} failed: {error}"
                )?;
                if ["connect", "refused", "unreachable"]
                    .iter()
                    .any(|w| error.contains(w))
                {
                    write!(
                        f,
                        " (is {url} where {peer:?} listens? A worker publishes the address \
                         it guessed; set TP_SOCKET_IFNAME on it to choose the interface)"
                    )?;
                }
                Ok(())
            }
            Self::Refused { peer, error } => {
                write!(f, "RPC call to {peer:?} refused by the pipe: {error}")
            }
            Self::Remote { peer, message } => {
                write!(f, "the handler on {peer:?} failed: {message}")
            }
            Self::Shutdown { id, peer } => write!(
                f,
                "RPC call {id} to {peer:?} was pending when this agent shut down"
            ),
        }
    }
}

impl std::error::Error for CallError {}

/// A decoded RPC message, its tensors already where the pipe put them.
pub(crate) struct Received {
    pub(crate) header: RpcHeader,
    pub(crate) message: RpcMessage,
    /// Each tensor's device at the sender (for a reply's reverse mapping).
    pub(crate) sources: Vec<Device>,
}

/// Why a message could not be read.
pub(crate) enum ReadError {
    /// The pipe failed (or was closed).
    Pipe(OpError),
    /// The peer broke the framing or a limit; the pipe was closed.
    Malformed(String),
    /// A tensor could not be placed (a device this worker lacks, a failed GPU
    /// allocation); the pipe was closed.
    Placement(String),
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Pipe(e) => e.fmt(f),
            Self::Malformed(why) => write!(f, "malformed RPC message: {why}"),
            Self::Placement(why) => write!(f, "cannot place a received tensor: {why}"),
        }
    }
}

/// A pipe message for `header` and `msg`, each tensor headed for `targets[i]`.
pub(crate) fn to_pipe(header: RpcHeader, msg: RpcMessage, targets: &[Device]) -> Message {
    Message {
        metadata: header.encode().to_vec(),
        payloads: vec![Payload {
            data: msg.payload,
            metadata: Vec::new(),
        }],
        tensors: msg
            .tensors
            .into_iter()
            .zip(targets)
            .map(|(t, &target)| Tensor {
                metadata: encode_source_device(t.device()).to_vec(),
                data: t.into_send(),
                target_device: Some(target),
            })
            .collect(),
    }
}

/// Reads the next RPC message from `pipe`, each tensor into a buffer on its target
/// device from `devices`. Lengths are checked against `max_bytes` before anything is
/// allocated. After an error the caller must close the pipe (a malformed message, or
/// one whose tensors cannot be placed, leaves bytes that cannot be consumed without
/// their buffers); it does so after saying why, so whoever sees the pipe close can
/// find the reason already logged.
pub(crate) async fn read(
    pipe: &Pipe,
    max_bytes: u64,
    devices: &Devices,
) -> Result<Received, ReadError> {
    let incoming = pipe.read_descriptor().await.map_err(ReadError::Pipe)?;
    let d = &incoming.descriptor;
    let checked = (|| {
        let header = RpcHeader::decode(&d.metadata).map_err(|e| e.to_string())?;
        if d.payloads.len() != 1 {
            return Err(format!("{} payloads, expected 1", d.payloads.len()));
        }
        let total = d
            .payloads
            .iter()
            .map(|p| p.length)
            .chain(d.tensors.iter().map(|t| t.length))
            .try_fold(0u64, u64::checked_add)
            .unwrap_or(u64::MAX);
        if total > max_bytes {
            return Err(format!(
                "{total} bytes, over this agent's limit of {max_bytes} (AgentOptions::max_message_bytes)"
            ));
        }
        let sources = d
            .tensors
            .iter()
            .map(|t| decode_source_device(&t.metadata).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((header, sources))
    })();
    let (header, sources) = match checked {
        Ok(v) => v,
        Err(why) => {
            return Err(ReadError::Malformed(why));
        }
    };
    // Within max_bytes, which the operator chose to fit this machine.
    let placed = Allocation::with_tensors(d, |t, len| {
        devices.alloc(t.target_device.unwrap_or(Device::CPU), len)
    });
    let alloc = match placed {
        Ok(a) => a,
        Err(why) => {
            return Err(ReadError::Placement(why));
        }
    };
    let (alloc, r) = pipe.read(incoming, alloc).await;
    r.map_err(ReadError::Pipe)?;
    let mut payloads = alloc.payloads.into_iter();
    let payload = payloads.next().unwrap_or_default();
    let tensors = alloc
        .tensors
        .into_iter()
        .map(RpcTensor::from_recv)
        .collect();
    Ok(Received {
        header,
        message: RpcMessage { payload, tensors },
        sources,
    })
}

/// Where each of `msg`'s tensors goes at `peer`, by `map` (this worker's device map to
/// the peer): a mapped device goes where the map says, the CPU to the CPU.
pub(crate) fn request_targets(
    msg: &RpcMessage,
    peer: &str,
    map: Option<&BTreeMap<Device, Device>>,
) -> Result<Vec<Device>, CallError> {
    place_request(msg.devices(), peer, map)
}

/// [`request_targets`] for tensors on `devices`.
fn place_request(
    devices: impl IntoIterator<Item = Device>,
    peer: &str,
    map: Option<&BTreeMap<Device, Device>>,
) -> Result<Vec<Device>, CallError> {
    devices
        .into_iter()
        .map(|d| match map.and_then(|m| m.get(&d)) {
            Some(&to) => Ok(to),
            None if d == Device::CPU => Ok(Device::CPU),
            None => Err(CallError::NoDeviceMap {
                peer: peer.to_string(),
                device: d,
            }),
        })
        .collect()
}

/// Where each of a reply's tensors goes back to: the reverse of the request's
/// placement (the request brought caller device `sources[i]` to local `arrived[i]`), the
/// CPU to the CPU. A tensor on a device the request did not use is an error, as in
/// PyTorch.
pub(crate) fn reply_targets(
    reply: &RpcMessage,
    sources: &[Device],
    arrived: &[Device],
) -> Result<Vec<Device>, CallError> {
    place_reply(reply.devices(), sources, arrived)
}

/// [`reply_targets`] for tensors on `devices`.
fn place_reply(
    devices: impl IntoIterator<Item = Device>,
    sources: &[Device],
    arrived: &[Device],
) -> Result<Vec<Device>, CallError> {
    let back: BTreeMap<Device, Device> = arrived
        .iter()
        .copied()
        .zip(sources.iter().copied())
        .collect();
    devices
        .into_iter()
        .map(|d| match back.get(&d) {
            Some(&to) => Ok(to),
            None if d == Device::CPU => Ok(Device::CPU),
            None => Err(CallError::BadReplyDevice {
                device: d,
                allowed: back.keys().copied().collect(),
            }),
        })
        .collect()
}

/// The header of a message of `kind` for call `id`.
pub(crate) fn header(kind: RpcKind, id: u64) -> RpcHeader {
    RpcHeader { kind, id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_maps_place_requests_and_reverse_for_replies() {
        // Placement needs only the devices, so no GPU is needed to test it.
        let map = BTreeMap::from([(Device::cuda(0), Device::cuda(1))]);
        let sent = [Device::CPU, Device::cuda(0)];
        assert_eq!(
            place_request(sent, "p", Some(&map)).unwrap(),
            [Device::CPU, Device::cuda(1)]
        );
        let e = place_request(sent, "p", None).unwrap_err();
        assert!(
            e.to_string()
                .contains("only CPU tensors are sent by default"),
            "{e}"
        );
        assert!(e.to_string().contains("cuda:0"), "{e}");
        // The callee got cuda:0 → its cuda:1; a reply on cuda:1 goes back to cuda:0.
        let sources = [Device::CPU, Device::cuda(0)];
        let arrived = [Device::CPU, Device::cuda(1)];
        assert_eq!(
            place_reply([Device::cuda(1)], &sources, &arrived).unwrap(),
            [Device::cuda(0)]
        );
        let e = place_reply([Device::cuda(5)], &sources, &arrived).unwrap_err();
        assert!(
            e.to_string()
                .contains("cuda:5, which is not one of the input tensor devices: [cpu:0, cuda:1]"),
            "{e}"
        );
        // A message's tensors give their devices.
        let msg = RpcMessage::new("x").with_tensor(RpcTensor::cpu(vec![1]));
        assert_eq!(request_targets(&msg, "p", None).unwrap(), [Device::CPU]);
    }
}
