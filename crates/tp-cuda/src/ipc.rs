//! cuda_ipc: GPU tensors between processes of one machine, through a staging *outbox*
//! shared by CUDA IPC.
//!
//! User buffers are never exported (tensorpipe.md §5.6: a buffer may already have an
//! open handle, open handles keep freed memory alive, handles name the allocation's
//! base). Instead each context owns, per GPU, an outbox of [`CudaIpcConfig::slots`]
//! slots of [`CudaIpcConfig::slot_size`] bytes of device memory, with one interprocess
//! event per slot. A tensor moves in slot-sized chunks:
//!
//! - **Sender**, per chunk: take a free slot; on the buffer's stream, wait for the
//!   slot's event (the previous reader is done), copy buffer → slot, record the event;
//!   write a descriptor on connection 0 — `{device, slot, length}` and, the first time a
//!   device's outbox is used on this channel, the outbox: its id, slot size and count,
//!   memory handle and event handles. The slot is free again when the receiver's
//!   acknowledgement (one byte on connection 1) arrives; the send completes when all
//!   its chunks are acknowledged.
//! - **Receiver**, per chunk: read the descriptor; map the sender's outbox (once per
//!   channel and local GPU); on the buffer's stream, wait for the slot's event, copy
//!   slot → buffer, record the event (so the sender's next copy into the slot waits
//!   for this one); acknowledge. The receive completes once every chunk's copy is
//!   enqueued: its bytes are there for work enqueued on the stream afterwards.
//!
//! Nothing waits on the host. Everything from the peer is checked: the slot index and
//! length against the outbox the peer declared, the declared outbox against limits
//! ([`MAX_SLOTS`], the chunk it must hold), and the driver validates handles.
//!
//! Descriptor: `cuda_ipc:<boot id>:<pid>:<GPU uuid>:<uuids of the GPUs it can reach
//! peer to peer>`. Two GPUs can talk when the boot id is the same, the processes
//! differ (a process cannot open its own IPC handles), and the GPUs are the same or
//! each can reach the other.
//!
//! Every chunk is copied twice (into the outbox, out of it), so the channel moves at
//! most about half of one device-to-device copy's bandwidth.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::{BoxFuture, Either, select};
use futures::stream::{FuturesOrdered, StreamExt};
use tp_channel::kit::{Children, Close, Ops, boot_id, le_bytes};
use tp_channel::{
    BoxChannel, Channel, ChannelContext, ChannelError, Device, Endpoint, RecvBuf, RecvDone,
    SendBuf, SendDone,
};
use tp_transport::BoxConnection;
use tp_transport::order::Order;

use crate::buffer::{Gpu, recv_gpu, send_gpu};
use crate::driver::{self, CudaError, DeviceMem, Event, MappedMem};

/// The most slots a peer's outbox may declare.
pub const MAX_SLOTS: u32 = 64;

/// Settings of a cuda_ipc context.
#[derive(Clone, Copy, Debug)]
pub struct CudaIpcConfig {
    /// Bytes per slot (the chunk size). Default 8 MiB, as the original.
    pub slot_size: usize,
    /// Slots per GPU. Default 4.
    pub slots: u32,
}

impl Default for CudaIpcConfig {
    fn default() -> Self {
        Self {
            slot_size: 8 << 20,
            slots: 4,
        }
    }
}

/// One GPU's outbox.
#[derive(Debug)]
struct Outbox {
    mem: DeviceMem,
    events: Vec<Event>,
    slot_size: usize,
    /// What a receiver needs to map it (sent once per channel).
    info: OutboxInfo,
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    slots: VecDeque<u32>,
    waiters: VecDeque<oneshot::Sender<u32>>,
}

impl Outbox {
    fn new(device: u32, config: CudaIpcConfig) -> Result<Self, CudaError> {
        let len = config.slot_size * config.slots as usize;
        let mem = DeviceMem::new(device, len)?;
        let events = (0..config.slots)
            .map(|_| Event::new(device, true))
            .collect::<Result<Vec<_>, _>>()?;
        let id = {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one((
                std::process::id(),
                device,
                std::time::SystemTime::now(),
            ))
        };
        let info = OutboxInfo {
            id,
            slot_size: config.slot_size as u64,
            mem: mem.ipc_handle()?,
            events: events
                .iter()
                .map(Event::ipc_handle)
                .collect::<Result<_, _>>()?,
        };
        Ok(Self {
            mem,
            events,
            slot_size: config.slot_size,
            info,
            free: Mutex::new(Free {
                slots: (0..config.slots).collect(),
                waiters: VecDeque::new(),
            }),
        })
    }

    /// A free slot, first come first served.
    fn acquire(self: &Arc<Self>) -> Acquire {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let (tx, rx) = oneshot::channel();
        match free.slots.pop_front() {
            Some(slot) => {
                let _ = tx.send(slot);
            }
            None => free.waiters.push_back(tx),
        }
        Acquire {
            rx,
            outbox: self.clone(),
        }
    }

    fn release(&self, slot: u32) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        let mut slot = slot;
        while let Some(w) = free.waiters.pop_front() {
            match w.send(slot) {
                Ok(()) => return,
                Err(back) => slot = back,
            }
        }
        free.slots.push_back(slot);
    }
}

/// A slot being waited for; dropped before use, it goes back to the outbox.
struct Acquire {
    rx: oneshot::Receiver<u32>,
    outbox: Arc<Outbox>,
}

impl Future for Acquire {
    type Output = Option<u32>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<u32>> {
        self.rx.poll_unpin(cx).map(Result::ok)
    }
}

impl Drop for Acquire {
    fn drop(&mut self) {
        self.rx.close();
        if let Ok(Some(slot)) = self.rx.try_recv() {
            self.outbox.release(slot);
        }
    }
}

/// An outbox, as its owner declares it to a peer: enough to map it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct OutboxInfo {
    /// Tells outboxes apart: a new id for the same GPU means the peer's context was
    /// replaced, and an old mapping must go.
    pub id: u64,
    /// Bytes per slot; never 0.
    pub slot_size: u64,
    /// `cuIpcGetMemHandle` of the outbox's memory (`slots × slot_size` bytes).
    pub mem: [u8; 64],
    /// `cuIpcGetEventHandle` of each slot's event: 1 to [`MAX_SLOTS`] of them.
    pub events: Vec<[u8; 64]>,
}

/// One chunk of a tensor, sender → receiver on connection 0 (docs/wire.md §9).
///
/// Byte by byte, little-endian: `device u32 | slot u32 | len u64 | has_outbox u8`, then
/// when `has_outbox` is 1 the [`OutboxInfo`]: `id u64 | slot_size u64 | slots u32 |
/// mem handle [64] | event handle [64] × slots`. Nothing else may follow.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ChunkDescriptor {
    /// The sender's GPU (whose outbox holds the chunk).
    pub device: u32,
    /// The slot.
    pub slot: u32,
    /// The chunk's length in bytes.
    pub len: u64,
    /// The sender's outbox, the first time this channel uses it.
    pub outbox: Option<OutboxInfo>,
}

impl ChunkDescriptor {
    /// Bytes before the outbox.
    const HEAD: usize = 17;
    /// An outbox's bytes before its event handles.
    const OUTBOX_HEAD: usize = 8 + 8 + 4 + 64;
    /// The longest valid encoding (an outbox of [`MAX_SLOTS`] slots): the limit a
    /// receiver reads a frame under.
    pub const MAX_LEN: u64 = (Self::HEAD + Self::OUTBOX_HEAD) as u64 + 64 * MAX_SLOTS as u64;

    /// The bytes.
    pub fn encode(&self) -> Vec<u8> {
        let outbox_len = self
            .outbox
            .as_ref()
            .map_or(0, |o| Self::OUTBOX_HEAD + 64 * o.events.len());
        let mut d = Vec::with_capacity(Self::HEAD + outbox_len);
        d.extend_from_slice(&self.device.to_le_bytes());
        d.extend_from_slice(&self.slot.to_le_bytes());
        d.extend_from_slice(&self.len.to_le_bytes());
        d.push(u8::from(self.outbox.is_some()));
        if let Some(o) = &self.outbox {
            d.extend_from_slice(&o.id.to_le_bytes());
            d.extend_from_slice(&o.slot_size.to_le_bytes());
            d.extend_from_slice(&(o.events.len() as u32).to_le_bytes());
            d.extend_from_slice(&o.mem);
            for e in &o.events {
                d.extend_from_slice(e);
            }
        }
        d
    }

    /// Parses a peer's descriptor. The slot count is checked against [`MAX_SLOTS`]
    /// before anything is allocated.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`]: truncated, trailing bytes, a flag other than 0 or 1,
    /// an outbox of 0 or more than [`MAX_SLOTS`] slots, or of 0-byte slots.
    pub fn decode(d: &[u8]) -> Result<Self, ChannelError> {
        let device = u32::from_le_bytes(le_bytes(d, 0)?);
        let slot = u32::from_le_bytes(le_bytes(d, 4)?);
        let len = u64::from_le_bytes(le_bytes(d, 8)?);
        let (outbox, end) = match d.get(16) {
            Some(0) => (None, Self::HEAD),
            Some(1) => {
                let o = &d[Self::HEAD..];
                let id = u64::from_le_bytes(le_bytes(o, 0)?);
                let slot_size = u64::from_le_bytes(le_bytes(o, 8)?);
                let slots = u32::from_le_bytes(le_bytes(o, 16)?);
                if slots == 0 || slots > MAX_SLOTS || slot_size == 0 {
                    return Err(ChannelError::protocol(format!(
                        "cuda_ipc: an outbox of {slots} slots of {slot_size} B"
                    )));
                }
                let mem = le_bytes::<64>(o, 20)?;
                let events = (0..slots as usize)
                    .map(|i| le_bytes::<64>(o, Self::OUTBOX_HEAD + 64 * i))
                    .collect::<Result<Vec<_>, _>>()?;
                let end = Self::HEAD + Self::OUTBOX_HEAD + 64 * slots as usize;
                let info = OutboxInfo {
                    id,
                    slot_size,
                    mem,
                    events,
                };
                (Some(info), end)
            }
            _ => return Err(ChannelError::protocol("cuda_ipc: bad descriptor flag")),
        };
        if d.len() != end {
            return Err(ChannelError::protocol(
                "cuda_ipc: descriptor of the wrong size",
            ));
        }
        Ok(Self {
            device,
            slot,
            len,
            outbox,
        })
    }
}

/// A peer's outbox mapped into one local GPU's context.
#[derive(Debug)]
struct Mapped {
    mem: MappedMem,
    events: Vec<Event>,
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
    outboxes: Mutex<HashMap<u32, Arc<Outbox>>>,
}

impl Shared {
    fn outbox(&self, device: u32) -> Result<Arc<Outbox>, CudaError> {
        let mut map = self.outboxes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(o) = map.get(&device) {
            return Ok(o.clone());
        }
        let o = Arc::new(Outbox::new(device, self.config)?);
        map.insert(device, o.clone());
        Ok(o)
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
            if config.slots == 0 || config.slots > MAX_SLOTS || config.slot_size == 0 {
                return Err(format!(
                    "{} slots of {} B (1..={MAX_SLOTS} slots of at least 1 B)",
                    config.slots, config.slot_size
                ));
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
                outboxes: Mutex::default(),
            }),
            children: Arc::default(),
        }
    }
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
            let [descriptors, acks]: [BoxConnection; 2] =
                conns.try_into().map_err(|c: Vec<_>| {
                    ChannelError::protocol(format!("cuda_ipc needs 2 connections, got {}", c.len()))
                })?;
            let inner = Arc::new(Inner {
                shared,
                descriptors,
                acks,
                ops: Ops::default(),
                acks_order: Order::default(),
                announced: Mutex::default(),
                remote: Mutex::default(),
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

#[derive(Debug, Default)]
struct Remote {
    /// Outboxes the peer declared, by its GPU.
    infos: HashMap<u32, OutboxInfo>,
    /// Those mapped here, by (its GPU, our GPU).
    mapped: HashMap<(u32, u32), Arc<Mapped>>,
}

struct Inner {
    shared: Arc<Shared>,
    /// Connection 0: chunk descriptors, sender → receiver.
    descriptors: BoxConnection,
    /// Connection 1: one byte per chunk, receiver → sender.
    acks: BoxConnection,
    ops: Ops,
    acks_order: Order,
    /// Our GPUs whose outbox this channel's peer knows.
    announced: Mutex<HashSet<u32>>,
    remote: Mutex<Remote>,
}

impl Close for Inner {
    fn close(&self) {
        if self.ops.mark_closed() {
            self.descriptors.close();
            self.acks.close();
        }
    }
}

impl Inner {
    async fn send(&self, gpu: Gpu, turn: tp_transport::order::Turn) -> Result<(), ChannelError> {
        let Gpu {
            device,
            addr,
            len,
            stream,
        } = gpu;
        let outbox = self.shared.outbox(device)?;
        let mut inflight = FuturesOrdered::new();
        let mut off = 0;
        while off < len {
            let n = outbox.slot_size.min(len - off);
            // A slot: while waiting, this send's own acknowledgements free slots too.
            let slot = loop {
                let acquire = outbox.acquire();
                if inflight.is_empty() {
                    break acquire.await;
                }
                match select(acquire, inflight.next()).await {
                    Either::Left((slot, _)) => break slot,
                    Either::Right((done, _)) => {
                        if let Some(r) = done {
                            r?;
                        }
                    }
                }
            }
            .ok_or(ChannelError::Closed)?;
            // Back to the outbox when this send ends, however it ends: the outbox serves
            // every channel of the context, so a slot lost here would starve them.
            let held = SlotGuard {
                outbox: outbox.clone(),
                slot,
            };
            let event = &outbox.events[slot as usize];
            let slot_addr = outbox.mem.addr + u64::from(slot) * outbox.slot_size as u64;
            event.wait_on(device, stream)?;
            driver::copy_async(device, slot_addr, addr + off as u64, n, stream)?;
            event.record(stream)?;
            let first = self
                .announced
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(device);
            let frame = ChunkDescriptor {
                device,
                slot,
                len: n as u64,
                outbox: first.then(|| outbox.info.clone()),
            }
            .encode();
            let ack_turn = self.acks_order.turn();
            self.descriptors.write_frame(&frame).await?;
            inflight.push_back(async move {
                ack_turn.ready().await;
                let mut ack = [0u8; 1];
                let r = self.acks.read_exact(&mut ack).await;
                drop(ack_turn);
                drop(held);
                match (r, ack) {
                    (Ok(()), [0]) => Ok(()),
                    (Ok(()), [b]) => Err(ChannelError::protocol(format!(
                        "cuda_ipc: the receiver failed a chunk ({b})"
                    ))),
                    (Err(e), _) => Err(e.into()),
                }
            });
            off += n;
        }
        // Every descriptor is out: the next send may write its own.
        drop(turn);
        while let Some(r) = inflight.next().await {
            r?;
        }
        Ok(())
    }

    /// The peer's outbox of its GPU `remote` mapped into our GPU `local`.
    fn mapped(&self, remote: u32, local: u32) -> Result<(Arc<Mapped>, OutboxInfo), ChannelError> {
        let mut r = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
        let info =
            r.infos.get(&remote).cloned().ok_or_else(|| {
                ChannelError::protocol("cuda_ipc: a chunk from an undeclared outbox")
            })?;
        if let Some(m) = r.mapped.get(&(remote, local)) {
            return Ok((m.clone(), info));
        }
        let mem = MappedMem::open(local, &info.mem)?;
        let events = info
            .events
            .iter()
            .map(|h| Event::open_ipc(local, h))
            .collect::<Result<Vec<_>, _>>()?;
        let m = Arc::new(Mapped { mem, events });
        r.mapped.insert((remote, local), m.clone());
        Ok((m, info))
    }

    async fn recv(&self, gpu: Gpu) -> Result<(), ChannelError> {
        let Gpu {
            device,
            addr,
            len,
            stream,
        } = gpu;
        let mut off = 0usize;
        while off < len {
            let frame = self
                .descriptors
                .read_frame(ChunkDescriptor::MAX_LEN)
                .await?;
            let d = ChunkDescriptor::decode(&frame)?;
            if let Some(info) = d.outbox {
                let mut r = self.remote.lock().unwrap_or_else(PoisonError::into_inner);
                // A new outbox for that GPU (the peer's context was replaced): forget
                // the old mapping.
                if r.infos.get(&d.device).is_some_and(|old| old.id != info.id) {
                    r.mapped.retain(|(remote, _), _| *remote != d.device);
                }
                r.infos.insert(d.device, info);
            }
            let (mapped, info) = self.mapped(d.device, device)?;
            // Within usize: the chunk is at most what is left of the buffer.
            let expected = info.slot_size.min((len - off) as u64) as usize;
            if d.slot as usize >= info.events.len() || d.len != expected as u64 {
                return Err(ChannelError::protocol(format!(
                    "cuda_ipc: chunk of {} B in slot {} where {expected} B in one of {} slots \
                     was due",
                    d.len,
                    d.slot,
                    info.events.len()
                )));
            }
            let event = &mapped.events[d.slot as usize];
            let src = mapped.mem.addr + u64::from(d.slot) * info.slot_size;
            event.wait_on(device, stream)?;
            driver::copy_async(device, addr + off as u64, src, expected, stream)?;
            event.record(stream)?;
            self.acks.write(&[&[0]]).await?;
            off += expected;
        }
        Ok(())
    }
}

/// A slot taken from an outbox, given back on drop.
struct SlotGuard {
    outbox: Arc<Outbox>,
    slot: u32,
}

impl Drop for SlotGuard {
    fn drop(&mut self) {
        self.outbox.release(self.slot);
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
                Ok(gpu) => inner.recv(gpu).await,
                Err(e) => Err(e),
            };
            if r.is_err() {
                inner.close();
            }
            drop(turn);
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
        let info = OutboxInfo {
            id: 7,
            slot_size: 1 << 20,
            mem: [1; 64],
            events: vec![[2; 64], [3; 64]],
        };
        let with = ChunkDescriptor {
            device: 1,
            slot: 1,
            len: 100,
            outbox: Some(info.clone()),
        };
        let full = with.encode();
        assert_eq!(full.len(), 17 + 84 + 128);
        assert_eq!(ChunkDescriptor::decode(&full).unwrap(), with);
        let plain = ChunkDescriptor {
            device: 0,
            slot: 3,
            len: 5,
            outbox: None,
        };
        assert_eq!(ChunkDescriptor::decode(&plain.encode()).unwrap(), plain);
        // Truncated, padded, a bad flag, too many slots: protocol errors.
        let err = |d: &[u8]| matches!(ChunkDescriptor::decode(d), Err(ChannelError::Protocol(_)));
        assert!(err(&full[..full.len() - 1]));
        assert!(err(&[&full[..], &[0]].concat()));
        let mut bad = plain.encode();
        bad[16] = 9;
        assert!(err(&bad));
        let mut many = full;
        many[17 + 16..17 + 20].copy_from_slice(&(MAX_SLOTS + 1).to_le_bytes());
        assert!(err(&many));
        let max = ChunkDescriptor {
            outbox: Some(OutboxInfo {
                events: vec![[0; 64]; MAX_SLOTS as usize],
                ..info
            }),
            ..with
        };
        assert_eq!(max.encode().len() as u64, ChunkDescriptor::MAX_LEN);
    }
}
