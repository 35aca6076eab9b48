//! cuda_ipc: GPU tensors between processes of one machine, by one device-to-device
//! copy out of the sender's own buffer, mapped through CUDA IPC.
//!
//! Per tensor:
//!
//! - **Sender**: finds the allocation the buffer lies in and its IPC memory handle
//!   (`cuIpcGetMemHandle`, kept per allocation in the context), waits until the work
//!   enqueued on the buffer's stream before the send is done (the producer), and writes
//!   a [`TensorDescriptor`] on connection 0: the allocation's driver id, its handle, the
//!   buffer's offset in it and its length. The send completes when the receiver's
//!   acknowledgement (one byte on connection 1) says the bytes were copied out; until
//!   then the buffer is read in place, and — like every buffer in flight — must not be
//!   written.
//! - **Receiver**: reads the descriptor, maps the peer's allocation into the
//!   destination GPU's context (`cuIpcOpenMemHandle`; the last
//!   [`CudaIpcConfig::mappings`] mappings are kept per channel), checks the range
//!   against the mapping's real size, copies into the buffer on the buffer's stream,
//!   waits until that copy is done and acknowledges. The next receive may start as
//!   soon as the copy is enqueued; acknowledgements go out in order.
//!
//! Both waits query an event on the host (`driver::finished`): an interprocess event
//! waited on by the GPU cost about 60 µs per wait on an H200 (BENCHMARKS.md, tp-cuda),
//! more than copying 64 MiB takes there.
//!
//! Why user buffers are exported, unlike the original (tensorpipe.md §4.9, §5.6, which
//! copied every chunk twice through an IPC-shared staging outbox): one copy instead of
//! two, and no per-chunk round trip. The original's concerns are handled so:
//! - *Handles name the allocation's base*: the descriptor carries the offset.
//! - *A handle may already be open in the receiver*: drivers since CUDA 11.1 count
//!   opens of one handle in a process.
//! - *Open handles keep memory alive after its owner frees it*: at most
//!   [`CudaIpcConfig::mappings`] of a peer's allocations stay mapped per channel,
//!   least recently used closed first, and every mapping closes with its channel.
//! - *Not all memory can be exported* (`cuMemCreate`, stream-ordered pools): such a
//!   send fails with the driver's error, and the sender tells the receiver, whose
//!   receive fails too (a [`TensorDescriptor::Unexportable`]); cuda_basic moves such
//!   tensors.
//!
//! Everything from the peer is checked: the descriptor's length against the receive
//! buffer, the range against the mapped allocation's size as the local driver reports
//! it, and the driver validates handles.
//!
//! # Sharing one GPU between processes
//! Two processes on one GPU have a context each, and without NVIDIA's MPS the GPU
//! switches between them by time slices: on an H200 that put ~150–190 µs into every
//! transfer, whatever its size (64 MiB moved at 0.18 of a device-to-device copy). With
//! the MPS control daemon running (`nvidia-cuda-mps-control -d`) the same ping-pong
//! reached 0.75 (BENCHMARKS.md, tp-cuda). Run it where processes exchange tensors on a
//! shared GPU.
//!
//! Descriptor: `cuda_ipc:<boot id>:<pid>:<GPU uuid>:<uuids of the GPUs it can reach
//! peer to peer>`. Two GPUs can talk when the boot id is the same, the processes
//! differ (a process cannot open its own IPC handles), and the GPUs are the same or
//! each can reach the other.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_channel::kit::{Children, Close, Ops, boot_id, le_bytes};
use tp_channel::{
    BoxChannel, Channel, ChannelContext, ChannelError, Device, Endpoint, RecvBuf, RecvDone,
    SendBuf, SendDone,
};
use tp_transport::BoxConnection;
use tp_transport::order::{Order, Turn};

use crate::buffer::{Gpu, recv_gpu, send_gpu};
use crate::driver::{self, CudaError, MappedMem};

/// Settings of a cuda_ipc context.
#[derive(Clone, Copy, Debug)]
pub struct CudaIpcConfig {
    /// A peer's allocations kept mapped per channel (at least 1). Default 8. A mapping
    /// keeps the peer's memory allocated even after the peer frees it, until it is
    /// closed here.
    pub mappings: usize,
}

impl Default for CudaIpcConfig {
    fn default() -> Self {
        Self { mappings: 8 }
    }
}

/// The most allocations a context remembers the IPC handle of; past it, the memory is
/// forgotten and handles are asked for again.
const MAX_EXPORTS: usize = 4096;

/// One tensor, sender → receiver on connection 0 (docs/wire.md §9).
///
/// Byte by byte, little-endian: a kind byte, then for `0` (exported) `buffer id u64 |
/// offset u64 | len u64 | memory handle [64]`; `1` (unexportable) ends there. Nothing
/// else may follow.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum TensorDescriptor {
    /// The sender's buffer, readable through the allocation's IPC handle.
    Exported {
        /// The driver's id of the sender's allocation (never reused by that process):
        /// the key a receiver keeps its mapping under.
        buffer_id: u64,
        /// The buffer's start within the allocation.
        offset: u64,
        /// The buffer's length in bytes.
        len: u64,
        /// `cuIpcGetMemHandle` of the allocation.
        handle: [u8; 64],
    },
    /// The sender's memory has no IPC handle; the matching receive fails.
    Unexportable,
}

impl TensorDescriptor {
    const EXPORTED: u8 = 0;
    const UNEXPORTABLE: u8 = 1;
    /// The longest encoding: the limit a receiver reads a frame under.
    pub const MAX_LEN: u64 = 1 + 24 + 64;

    /// The bytes.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Self::Exported {
                buffer_id,
                offset,
                len,
                handle,
            } => {
                let mut d = Vec::with_capacity(Self::MAX_LEN as usize);
                d.push(Self::EXPORTED);
                d.extend_from_slice(&buffer_id.to_le_bytes());
                d.extend_from_slice(&offset.to_le_bytes());
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(handle);
                d
            }
            Self::Unexportable => vec![Self::UNEXPORTABLE],
        }
    }

    /// Parses a peer's descriptor.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`]: empty, an unknown kind, truncated, or trailing bytes.
    pub fn decode(d: &[u8]) -> Result<Self, ChannelError> {
        let (decoded, end) = match d.first() {
            Some(&Self::EXPORTED) => {
                let b = &d[1..];
                let exported = Self::Exported {
                    buffer_id: u64::from_le_bytes(le_bytes(b, 0)?),
                    offset: u64::from_le_bytes(le_bytes(b, 8)?),
                    len: u64::from_le_bytes(le_bytes(b, 16)?),
                    handle: le_bytes::<64>(b, 24)?,
                };
                (exported, Self::MAX_LEN as usize)
            }
            Some(&Self::UNEXPORTABLE) => (Self::Unexportable, 1),
            _ => return Err(ChannelError::protocol("cuda_ipc: bad descriptor kind")),
        };
        if d.len() != end {
            return Err(ChannelError::protocol(
                "cuda_ipc: descriptor of the wrong size",
            ));
        }
        Ok(decoded)
    }
}

/// What a cuda_ipc descriptor says.
struct Identity<'a> {
    boot: &'a str,
    pid: &'a str,
    uuid: &'a str,
    peers: Vec<&'a str>,
}

fn identity(d: &[u8]) -> Option<Identity<'_>> {
    let s = std::str::from_utf8(d).ok()?;
    let mut f = s.strip_prefix("cuda_ipc:")?.split(':');
    let (boot, pid, uuid, peers) = (f.next()?, f.next()?, f.next()?, f.next()?);
    if f.next().is_some() {
        return None;
    }
    Some(Identity {
        boot,
        pid,
        uuid,
        peers: peers.split(',').filter(|p| !p.is_empty()).collect(),
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cuda_ipc channel context.
#[derive(Debug)]
pub struct CudaIpcContext {
    descriptors: Result<Vec<(Device, Vec<u8>)>, String>,
    shared: Arc<Shared>,
    children: Arc<Children>,
}

#[derive(Debug)]
struct Shared {
    config: CudaIpcConfig,
    /// IPC handles of this process's allocations, by the driver's allocation id.
    exports: Mutex<HashMap<u64, [u8; 64]>>,
}

impl Shared {
    /// What a peer needs to read `len` bytes at `addr` on `device`.
    fn export(&self, device: u32, addr: u64, len: usize) -> Result<TensorDescriptor, CudaError> {
        let alloc = driver::allocation(device, addr)?;
        let handle = {
            let mut exports = self.exports.lock().unwrap_or_else(PoisonError::into_inner);
            match exports.get(&alloc.buffer_id) {
                Some(h) => *h,
                None => {
                    let h = driver::export(device, alloc.base)?;
                    if exports.len() >= MAX_EXPORTS {
                        exports.clear();
                    }
                    exports.insert(alloc.buffer_id, h);
                    h
                }
            }
        };
        Ok(TensorDescriptor::Exported {
            buffer_id: alloc.buffer_id,
            offset: addr - alloc.base,
            len: len as u64,
            handle,
        })
    }
}

impl Default for CudaIpcContext {
    fn default() -> Self {
        Self::new(CudaIpcConfig::default())
    }
}

impl CudaIpcContext {
    /// Probes the driver and describes every GPU.
    pub fn new(config: CudaIpcConfig) -> Self {
        let descriptors = (|| {
            if config.mappings == 0 {
                return Err("0 mappings per channel (at least 1)".to_string());
            }
            let drv = driver::driver()?;
            for (i, d) in drv.devices.iter().enumerate() {
                if !d.unified_addressing {
                    return Err(format!("cuda:{i} lacks unified addressing"));
                }
                if !d.default_compute_mode {
                    return Err(format!("cuda:{i} is not in the default compute mode"));
                }
            }
            let boot = boot_id()?;
            let pid = std::process::id();
            let n = drv.devices.len() as u32;
            Ok((0..n)
                .map(|i| {
                    let peers: Vec<String> = (0..n)
                        .filter(|&j| j != i && drv.can_access_peer(i, j))
                        .map(|j| hex(&drv.devices[j as usize].uuid))
                        .collect();
                    let d = format!(
                        "cuda_ipc:{boot}:{pid}:{}:{}",
                        hex(&drv.devices[i as usize].uuid),
                        peers.join(",")
                    );
                    (Device::cuda(i), d.into_bytes())
                })
                .collect())
        })();
        if let Err(why) = &descriptors {
            tracing::info!(channel = "cuda_ipc", reason = why, "channel not viable");
        }
        Self {
            descriptors,
            shared: Arc::new(Shared {
                config,
                exports: Mutex::default(),
            }),
            children: Arc::default(),
        }
    }
}

/// Tells the user, once per process and where it applies, what a GPU without MPS costs
/// cuda_ipc: the two processes' contexts take turns on the GPU, and every transfer
/// waits for a switch (BENCHMARKS.md: ~0.4 ms per round trip on an H200 whatever the
/// size; 28 µs at 1 MiB with the daemon).
fn say_once_if_mps_is_off() {
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        let Ok(drv) = driver::driver() else { return };
        let off: Vec<String> = (0..drv.devices.len())
            .filter(|&i| drv.devices[i].mps == Some(false))
            .map(|i| format!("cuda:{i}"))
            .collect();
        if !off.is_empty() {
            tracing::info!(
                channel = "cuda_ipc",
                gpus = %off.join(","),
                "no MPS daemon serves these GPUs: each cuda_ipc transfer waits for the GPU to \
                 switch between the two processes' contexts (hundreds of µs); start \
                 `nvidia-cuda-mps-control -d` where processes exchange tensors on a GPU"
            );
        }
    });
}

impl ChannelContext for CudaIpcContext {
    fn name(&self) -> &'static str {
        "cuda_ipc"
    }

    fn viability(&self) -> Result<(), ChannelError> {
        self.descriptors
            .as_ref()
            .map(drop)
            .map_err(|why| ChannelError::not_viable("cuda_ipc", why))
    }

    fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        self.descriptors.clone().unwrap_or_default()
    }

    fn can_communicate_with_remote(&self, local: &[u8], remote: &[u8]) -> bool {
        let (Some(a), Some(b)) = (identity(local), identity(remote)) else {
            return false;
        };
        a.boot == b.boot
            && a.pid != b.pid
            && (a.uuid == b.uuid || (a.peers.contains(&b.uuid) && b.peers.contains(&a.uuid)))
    }

    fn connections_needed(&self) -> usize {
        2
    }

    fn create_channel(
        &self,
        conns: Vec<BoxConnection>,
        _endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        let ready = self.viability();
        let shared = self.shared.clone();
        let children = self.children.clone();
        async move {
            ready?;
            if children.is_closed() {
                return Err(ChannelError::Closed);
            }
            say_once_if_mps_is_off();
            let [descriptors, acks]: [BoxConnection; 2] =
                conns.try_into().map_err(|c: Vec<_>| {
                    ChannelError::protocol(format!("cuda_ipc needs 2 connections, got {}", c.len()))
                })?;
            let inner = Arc::new(Inner {
                shared,
                descriptors,
                acks,
                ops: Ops::default(),
                ack_reads: Order::default(),
                ack_writes: Order::default(),
                mappings: Mutex::default(),
            });
            children.adopt(Arc::downgrade(&inner) as std::sync::Weak<dyn Close>);
            Ok(Box::new(CudaIpcChannel { inner }) as BoxChannel)
        }
        .boxed()
    }

    fn close(&self) {
        self.children.close_all();
    }
}

/// A peer's allocation mapped into one of our GPUs' contexts.
#[derive(Debug)]
struct Mapping {
    buffer_id: u64,
    device: u32,
    mem: Arc<MappedMem>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Connection 0: tensor descriptors, sender → receiver.
    descriptors: BoxConnection,
    /// Connection 1: one byte per tensor, receiver → sender (0: copied).
    acks: BoxConnection,
    ops: Ops,
    /// Sends read their acknowledgements in the order they wrote descriptors.
    ack_reads: Order,
    /// Receives write theirs in the order they read descriptors.
    ack_writes: Order,
    /// The peer's allocations mapped here, least recently used first.
    mappings: Mutex<VecDeque<Mapping>>,
}

impl Close for Inner {
    fn close(&self) {
        if self.ops.mark_closed() {
            self.descriptors.close();
            self.acks.close();
            // Unmapped once the copies still holding them are done.
            self.mappings
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }
}

impl Inner {
    async fn send(&self, gpu: Gpu, turn: Turn) -> Result<(), ChannelError> {
        let Gpu {
            device,
            addr,
            len,
            stream,
        } = gpu;
        if len == 0 {
            return Ok(());
        }
        let exported = self.shared.export(device, addr, len);
        // The receiver reads outside our stream: the producer's work must be done.
        driver::finished(device, stream)?.await?;
        let frame = exported
            .as_ref()
            .map_or(TensorDescriptor::Unexportable, Clone::clone)
            .encode();
        let ack_turn = self.ack_reads.turn();
        self.descriptors.write_frame(&frame).await?;
        // The next send may write its descriptor.
        drop(turn);
        exported?;
        ack_turn.ready().await;
        let mut ack = [0u8; 1];
        let r = self.acks.read_exact(&mut ack).await;
        drop(ack_turn);
        match (r, ack) {
            (Ok(()), [0]) => Ok(()),
            (Ok(()), [b]) => Err(ChannelError::protocol(format!(
                "cuda_ipc: the receiver could not copy the tensor ({b})"
            ))),
            (Err(e), _) => Err(e.into()),
        }
    }

    /// The peer's allocation `buffer_id` mapped into our GPU `device`.
    fn mapped(
        &self,
        buffer_id: u64,
        device: u32,
        handle: &[u8; 64],
    ) -> Result<Arc<MappedMem>, ChannelError> {
        let mut maps = self.mappings.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = maps
            .iter()
            .position(|m| m.buffer_id == buffer_id && m.device == device)
        {
            let m = maps.remove(i).unwrap_or_else(|| unreachable!());
            let mem = m.mem.clone();
            maps.push_back(m);
            return Ok(mem);
        }
        let mem = Arc::new(MappedMem::open(device, handle)?);
        while maps.len() >= self.shared.config.mappings {
            maps.pop_front();
        }
        maps.push_back(Mapping {
            buffer_id,
            device,
            mem: mem.clone(),
        });
        Ok(mem)
    }

    /// Reads the next descriptor and enqueues the copy it describes into `gpu`;
    /// returns what must live until the copy is done.
    async fn copy_in(&self, gpu: Gpu) -> Result<Arc<MappedMem>, ChannelError> {
        let frame = self
            .descriptors
            .read_frame(TensorDescriptor::MAX_LEN)
            .await?;
        let (buffer_id, offset, n, handle) = match TensorDescriptor::decode(&frame)? {
            TensorDescriptor::Exported {
                buffer_id,
                offset,
                len,
                handle,
            } => (buffer_id, offset, len, handle),
            TensorDescriptor::Unexportable => {
                return Err(ChannelError::device(
                    "cuda_ipc",
                    "the sender's memory has no IPC handle (see its log)",
                ));
            }
        };
        if n != gpu.len as u64 {
            return Err(ChannelError::LengthMismatch {
                expected: gpu.len as u64,
                announced: n,
            });
        }
        let mem = self.mapped(buffer_id, gpu.device, &handle)?;
        if offset
            .checked_add(n)
            .is_none_or(|end| end > mem.size as u64)
        {
            return Err(ChannelError::protocol(format!(
                "cuda_ipc: {n} B at offset {offset} of a {} B allocation",
                mem.size
            )));
        }
        driver::copy_async(gpu.device, gpu.addr, mem.addr + offset, gpu.len, gpu.stream)?;
        Ok(mem)
    }

    async fn recv(&self, gpu: Gpu, turn: Turn) -> Result<(), ChannelError> {
        if gpu.len == 0 {
            return Ok(());
        }
        let copied = match self.copy_in(gpu).await {
            Ok(mem) => driver::finished(gpu.device, gpu.stream)
                .map(|done| (mem, done))
                .map_err(ChannelError::from),
            Err(e) => Err(e),
        };
        let ack_turn = self.ack_writes.turn();
        // The next receive may read its descriptor while this copy runs.
        drop(turn);
        let r = match copied {
            // The mapping stays open until the copy out of it is done.
            Ok((_mem, done)) => done.await.map_err(ChannelError::from),
            Err(e) => Err(e),
        };
        ack_turn.ready().await;
        let acked = self.acks.write(&[&[u8::from(r.is_err())]]).await;
        drop(ack_turn);
        // This receive's own error first: the acknowledgement only tells the sender.
        r?;
        acked.map_err(Into::into)
    }
}

/// A cuda_ipc channel.
struct CudaIpcChannel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaIpcChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaIpcChannel")
            .field("closed", &self.inner.ops.is_closed())
            .finish()
    }
}

/// The GPU side of an operation; host memory is not cuda_ipc's.
fn on_gpu(gpu: Result<Option<Gpu>, ChannelError>) -> Result<Gpu, ChannelError> {
    gpu?.ok_or(ChannelError::UnsupportedDevice {
        channel: "cuda_ipc",
        device: Device::CPU,
    })
}

impl Channel for CudaIpcChannel {
    fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone> {
        let turn = self.inner.ops.send_turn();
        let inner = self.inner.clone();
        async move {
            match inner.ops.start(&turn, buf.byte_len()).await {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let r = match on_gpu(send_gpu("cuda_ipc", &*buf)) {
                Ok(gpu) => inner.send(gpu, turn).await,
                Err(e) => Err(e),
            };
            if r.is_err() {
                inner.close();
            }
            (buf, r)
        }
        .boxed()
    }

    fn recv(&self, buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone> {
        let turn = self.inner.ops.recv_turn();
        let inner = self.inner.clone();
        async move {
            match inner.ops.start(&turn, buf.byte_len()).await {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let r = match on_gpu(recv_gpu("cuda_ipc", &*buf)) {
                Ok(gpu) => inner.recv(gpu, turn).await,
                Err(e) => Err(e),
            };
            if r.is_err() {
                inner.close();
            }
            (buf, r)
        }
        .boxed()
    }

    fn close(&self) {
        self.inner.close();
    }
}

impl Drop for CudaIpcChannel {
    fn drop(&mut self) {
        self.inner.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(pid: u32, uuid: &str, peers: &str) -> Vec<u8> {
        format!("cuda_ipc:boot:{pid}:{uuid}:{peers}").into_bytes()
    }

    #[test]
    fn same_machine_other_process_and_reachable_gpus_only() {
        let ctx = CudaIpcContext::default();
        let same = |a: &[u8], b: &[u8]| ctx.can_communicate_with_remote(a, b);
        assert!(same(&desc(1, "aa", ""), &desc(2, "aa", "")));
        assert!(
            !same(&desc(1, "aa", ""), &desc(1, "aa", "")),
            "same process"
        );
        assert!(
            !same(&desc(1, "aa", "bb"), &desc(2, "bb", "")),
            "one-way peer"
        );
        assert!(same(&desc(1, "aa", "bb"), &desc(2, "bb", "aa")));
        assert!(
            same(&desc(2, "bb", "aa"), &desc(1, "aa", "bb")),
            "symmetric"
        );
        let other_boot = b"cuda_ipc:other:2:aa:".to_vec();
        assert!(!same(&desc(1, "aa", ""), &other_boot));
        assert!(!same(b"cuda_ipc:x", &desc(1, "aa", "")));
    }

    #[test]
    fn descriptors_round_trip_and_bad_ones_are_refused() {
        let exported = TensorDescriptor::Exported {
            buffer_id: 7,
            offset: 4096,
            len: 100,
            handle: [3; 64],
        };
        let bytes = exported.encode();
        assert_eq!(bytes.len() as u64, TensorDescriptor::MAX_LEN);
        assert_eq!(bytes[0], 0);
        assert_eq!(bytes[1..9], 7u64.to_le_bytes());
        assert_eq!(bytes[9..17], 4096u64.to_le_bytes());
        assert_eq!(bytes[17..25], 100u64.to_le_bytes());
        assert_eq!(TensorDescriptor::decode(&bytes).unwrap(), exported);
        let failed = TensorDescriptor::Unexportable.encode();
        assert_eq!(failed, [1]);
        assert_eq!(
            TensorDescriptor::decode(&failed).unwrap(),
            TensorDescriptor::Unexportable
        );
        // Empty, truncated, padded, an unknown kind: protocol errors.
        let err = |d: &[u8]| matches!(TensorDescriptor::decode(d), Err(ChannelError::Protocol(_)));
        assert!(err(&[]));
        assert!(err(&bytes[..bytes.len() - 1]));
        assert!(err(&[&bytes[..], &[0]].concat()));
        assert!(err(&[1, 0]));
        let mut bad = bytes;
        bad[0] = 2;
        assert!(err(&bad));
    }
}
