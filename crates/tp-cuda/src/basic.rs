//! cuda_basic: GPU tensors staged through host memory over a CPU channel.
//!
//! Wraps any CPU channel (basic by default): every tensor is cut into chunks of
//! [`CudaBasicConfig::chunk`] bytes (both ends cut alike: they know the length), each
//! moved by one send/receive of the CPU channel.
//! - **Send from a GPU**: each chunk is copied device → pinned host slot on the
//!   buffer's stream (so after the producer's work), and handed to the CPU channel once
//!   the copy is done (an event on the stream, queried: `driver::finished`). Up to
//!   [`CudaBasicConfig::depth`] chunks are in flight, so copies overlap the network.
//! - **Receive into a GPU**: each chunk arrives in a pinned slot and is copied host →
//!   device on the buffer's stream; the receive completes once the copies are done.
//! - A CPU end copies between its buffer and the chunks.
//!
//! - **Shared staging** ([`staging`]): when both ends are on one machine, the chunks
//!   skip the CPU channel: each side's outbox of [`CudaBasicConfig::staging_slots`]
//!   slots lives in shared memory that both processes map and register with the GPU,
//!   so the sender's GPU copies into the slot and the receiver's GPU copies out of the
//!   same pages — no CPU copy. Set up by the channel's first operation over two
//!   connections of the channel's own; where it cannot be (another machine, another
//!   pid namespace, no access to the peer's fds, or `TP_CUDA_BASIC_STAGING=0`), the
//!   channel stages through the CPU channel as above.
//!
//! Descriptor: `cuda_basic:cpu:<CPU channel's descriptor>` for `cpu:0` and
//! `cuda_basic:cuda:<…>` for every GPU. Two ends can talk when the CPU channel's
//! descriptors can and **not both are CPU** (CPU ↔ CPU is the CPU channels' job).
//! Pinned slots are kept in a pool per context and reused (allocating page-locked
//! memory is slow and synchronizes the device).

use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::{BoxFuture, ready};
use futures::stream::{FuturesOrdered, StreamExt};
use tp_channel::kit::{Children, Close, Ops};
use tp_channel::{
    BoxChannel, Channel, ChannelContext, ChannelError, Device, Endpoint, RecvBuf, RecvDone,
    SendBuf, SendDone,
};
use tp_transport::BoxConnection;
use tp_transport::order::Order;

use crate::buffer::{Gpu, recv_gpu, send_gpu};
use crate::driver::{self, CudaError, Pinned};

#[allow(unsafe_code)]
mod region;
pub mod staging;

use staging::{Dst, LazyStaging, Src, Want};

/// Settings of a cuda_basic context.
#[derive(Clone, Copy, Debug)]
pub struct CudaBasicConfig {
    /// Chunk size in bytes; both ends must agree (the original's 1 MiB by default).
    pub chunk: usize,
    /// Chunks in flight per operation. Default 4.
    pub depth: usize,
    /// Pinned slots kept for reuse. Default 16.
    pub pool: usize,
    /// Slots of this side's shared staging outbox; 0 stages every chunk through the CPU
    /// channel. Default 4, or `TP_CUDA_BASIC_STAGING` when it is a number up to
    /// [`staging::MAX_SLOTS`] (0 turns shared staging off, to compare the two paths).
    pub staging_slots: u32,
    /// Bytes per shared staging slot (a multiple of 4096, at most 64 MiB): the chunk
    /// size of this side's sends when staging is shared. Default 2 MiB. The outbox
    /// (`staging_slots × staging_slot_len`, 8 MiB by default) is page-locked from the
    /// channel's first operation to its end, in both processes' views of the same pages
    /// (16 MiB per channel and process with both directions' outboxes).
    pub staging_slot_len: usize,
}

impl Default for CudaBasicConfig {
    fn default() -> Self {
        Self {
            chunk: 1 << 20,
            depth: 4,
            pool: 16,
            staging_slots: std::env::var("TP_CUDA_BASIC_STAGING")
                .ok()
                .and_then(|v| v.parse().ok())
                .filter(|&slots| slots <= staging::MAX_SLOTS)
                .unwrap_or(4),
            staging_slot_len: 2 << 20,
        }
    }
}

const PREFIX_CPU: &[u8] = b"cuda_basic:cpu:";
const PREFIX_CUDA: &[u8] = b"cuda_basic:cuda:";

/// The cuda_basic channel context.
#[derive(Debug)]
pub struct CudaBasicContext {
    cpu: Arc<dyn ChannelContext>,
    viable: Result<usize, String>,
    config: CudaBasicConfig,
    pool: Arc<SlotPool>,
    children: Arc<Children>,
}

impl CudaBasicContext {
    /// A context staging over `cpu` (a CPU channel context, e.g. basic).
    pub fn new(cpu: Arc<dyn ChannelContext>, config: CudaBasicConfig) -> Self {
        let viable = (|| {
            if config.chunk == 0 || config.depth == 0 {
                return Err("chunk and depth must be at least 1".to_string());
            }
            if !staging::fits(config.staging_slots, config.staging_slot_len) {
                return Err(format!(
                    "{} staging slots of {} bytes: at most {} slots, of 4 KiB to 64 MiB, \
                     a multiple of 4 KiB",
                    config.staging_slots,
                    config.staging_slot_len,
                    staging::MAX_SLOTS
                ));
            }
            let drv = driver::driver()?;
            cpu.viability().map_err(|e| e.to_string())?;
            if !cpu
                .device_descriptors()
                .iter()
                .any(|(d, _)| *d == Device::CPU)
            {
                return Err(format!("{} moves no CPU memory", cpu.name()));
            }
            Ok(drv.devices.len())
        })();
        if let Err(why) = &viable {
            tracing::info!(channel = "cuda_basic", reason = why, "channel not viable");
        }
        Self {
            cpu,
            viable,
            config,
            pool: Arc::new(SlotPool {
                free: Mutex::default(),
                cap: config.pool,
            }),
            children: Arc::default(),
        }
    }

    /// Splits a descriptor into (is a GPU, the CPU channel's descriptor).
    fn split(d: &[u8]) -> Option<(bool, &[u8])> {
        d.strip_prefix(PREFIX_CUDA)
            .map(|rest| (true, rest))
            .or_else(|| d.strip_prefix(PREFIX_CPU).map(|rest| (false, rest)))
    }
}

impl ChannelContext for CudaBasicContext {
    fn name(&self) -> &'static str {
        "cuda_basic"
    }

    fn viability(&self) -> Result<(), ChannelError> {
        self.viable
            .as_ref()
            .map(drop)
            .map_err(|why| ChannelError::not_viable("cuda_basic", why))
    }

    fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        let Ok(gpus) = self.viable else {
            return Vec::new();
        };
        let Some((_, cpu)) = self
            .cpu
            .device_descriptors()
            .into_iter()
            .find(|(d, _)| *d == Device::CPU)
        else {
            return Vec::new();
        };
        let with = |prefix: &[u8]| [prefix, &cpu].concat();
        std::iter::once((Device::CPU, with(PREFIX_CPU)))
            .chain((0..gpus).map(|i| (Device::cuda(i as u32), with(PREFIX_CUDA))))
            .collect()
    }

    fn can_communicate_with_remote(&self, local: &[u8], remote: &[u8]) -> bool {
        match (Self::split(local), Self::split(remote)) {
            (Some((gpu_a, a)), Some((gpu_b, b))) => {
                (gpu_a || gpu_b) && self.cpu.can_communicate_with_remote(a, b)
            }
            _ => false,
        }
    }

    fn connections_needed(&self) -> usize {
        // The CPU channel's, then two for shared staging (used or not, so that both
        // ends count alike whatever their settings).
        self.cpu.connections_needed() + 2
    }

    fn create_channel(
        &self,
        conns: Vec<BoxConnection>,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        let ready = self.viability();
        let mut conns = conns;
        let staging_conns = conns.split_off(conns.len().saturating_sub(2));
        let cpu = self.cpu.create_channel(conns, endpoint);
        let children = self.children.clone();
        let config = self.config;
        let pool = self.pool.clone();
        async move {
            ready?;
            if children.is_closed() {
                return Err(ChannelError::Closed);
            }
            let staging_conns: [BoxConnection; 2] = staging_conns.try_into().map_err(|_| {
                ChannelError::protocol("cuda_basic needs its two staging connections")
            })?;
            let cpu = cpu.await?;
            let want = Want {
                slots: config.staging_slots,
                slot_len: config.staging_slot_len,
                // Registered through the first GPU's context, portable to all.
                gpu: Some(0),
            };
            let staging = LazyStaging::new(staging_conns, want);
            let inner = Arc::new(Inner {
                cpu: Arc::from(cpu),
                staging,
                ops: Ops::default(),
                config,
                pool,
            });
            children.adopt(Arc::downgrade(&inner) as std::sync::Weak<dyn Close>);
            Ok(Box::new(CudaBasicChannel { inner }) as BoxChannel)
        }
        .boxed()
    }

    fn close(&self) {
        self.children.close_all();
    }
}

/// Pinned slots for reuse.
#[derive(Debug)]
struct SlotPool {
    free: Mutex<Vec<Pinned>>,
    cap: usize,
}

impl SlotPool {
    fn take(&self, device: u32, len: usize) -> Result<Pinned, CudaError> {
        let reused = self
            .free
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match reused {
            Some(p) => Ok(p),
            None => Pinned::new(device, len),
        }
    }

    fn put(&self, p: Pinned) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < self.cap {
            free.push(p);
        }
    }
}

/// One chunk's memory: pinned for a GPU end, plain for a CPU end.
enum Mem {
    Pinned(Pinned),
    Heap(Vec<u8>),
}

/// A chunk as the CPU channel sees it: `len` bytes of its memory.
struct Chunk {
    mem: Mem,
    len: usize,
}

impl Chunk {
    fn full(&self) -> &[u8] {
        match &self.mem {
            Mem::Pinned(p) => p.bytes(),
            Mem::Heap(v) => v,
        }
    }

    fn addr(&self) -> u64 {
        match &self.mem {
            Mem::Pinned(p) => p.addr(),
            Mem::Heap(v) => v.as_ptr() as u64,
        }
    }
}

impl SendBuf for Chunk {
    fn bytes(&self) -> &[u8] {
        self.full().get(..self.len).unwrap_or_default()
    }
}

impl RecvBuf for Chunk {
    fn bytes_mut(&mut self) -> &mut [u8] {
        let full = match &mut self.mem {
            Mem::Pinned(p) => p.bytes_mut(),
            Mem::Heap(v) => v,
        };
        full.get_mut(..self.len).unwrap_or_default()
    }

    fn bytes(&self) -> &[u8] {
        self.full().get(..self.len).unwrap_or_default()
    }
}

struct Inner {
    cpu: Arc<dyn Channel>,
    /// Shared staging, set up by the first operation; used when both ends mapped each
    /// other's outbox.
    staging: LazyStaging,
    ops: Ops,
    config: CudaBasicConfig,
    pool: Arc<SlotPool>,
}

impl Close for Inner {
    fn close(&self) {
        if self.ops.mark_closed() {
            self.cpu.close();
            self.staging.close();
        }
    }
}

impl Inner {
    fn chunks(&self, len: usize) -> impl Iterator<Item = (usize, usize)> + use<> {
        let chunk = self.config.chunk;
        (0..len)
            .step_by(chunk)
            .map(move |off| (off, chunk.min(len - off)))
    }

    /// A chunk of `len` bytes: pinned (from the pool) for a GPU end.
    fn chunk(&self, gpu: Option<Gpu>, len: usize) -> Result<Chunk, ChannelError> {
        let mem = match gpu {
            Some(g) => Mem::Pinned(self.pool.take(g.device, self.config.chunk)?),
            None => Mem::Heap(vec![0u8; len]),
        };
        Ok(Chunk { mem, len })
    }

    fn recycle(&self, chunk: Box<dyn SendBuf>) {
        let any: Box<dyn std::any::Any> = chunk;
        if let Ok(c) = any.downcast::<Chunk>()
            && let Mem::Pinned(p) = c.mem
        {
            self.pool.put(p);
        }
    }

    fn recycle_recv(&self, chunk: Chunk) {
        if let Mem::Pinned(p) = chunk.mem {
            self.pool.put(p);
        }
    }

    async fn send(&self, buf: &dyn SendBuf, gpu: Option<Gpu>) -> Result<(), ChannelError> {
        if let Some(staging) = self.staging.get().await? {
            let src = gpu.map_or_else(|| Src::Cpu(buf.bytes()), Src::Gpu);
            return staging.send(src, buf.byte_len()).await;
        }
        let order = Order::default();
        let mut inflight = FuturesOrdered::new();
        for (off, n) in self.chunks(buf.byte_len()) {
            if inflight.len() >= self.config.depth
                && let Some(done) = inflight.next().await
            {
                self.recycle(done?);
            }
            let mut chunk = self.chunk(gpu, n)?;
            let copied: BoxFuture<'static, Result<(), CudaError>> = match gpu {
                Some(g) => {
                    driver::copy_async(g.device, chunk.addr(), g.addr + off as u64, n, g.stream)?;
                    driver::finished(g.device, g.stream)?.boxed()
                }
                None => {
                    let src = buf.bytes().get(off..off + n).unwrap_or_default();
                    chunk.bytes_mut().copy_from_slice(src);
                    ready(Ok(())).boxed()
                }
            };
            let turn = order.turn();
            let cpu = self.cpu.clone();
            inflight.push_back(async move {
                copied.await?;
                // Chunks reach the CPU channel in order, whichever copy ends first.
                turn.ready().await;
                let sent = cpu.send(Box::new(chunk));
                drop(turn);
                let (chunk, r) = sent.await;
                r.map(|()| chunk)
            });
        }
        while let Some(done) = inflight.next().await {
            self.recycle(done?);
        }
        Ok(())
    }

    async fn recv(&self, buf: &mut dyn RecvBuf, gpu: Option<Gpu>) -> Result<(), ChannelError> {
        if let Some(staging) = self.staging.get().await? {
            let len = buf.byte_len();
            let dst = match gpu {
                Some(g) => Dst::Gpu(g),
                None => Dst::Cpu(buf.bytes_mut()),
            };
            return staging.recv(dst, len).await;
        }
        let mut inflight = FuturesOrdered::new();
        let chunks: Vec<_> = self.chunks(buf.byte_len()).collect();
        for (off, n) in chunks {
            if inflight.len() >= self.config.depth
                && let Some(done) = inflight.next().await
            {
                self.land(buf, done?);
            }
            let chunk = self.chunk(gpu, n)?;
            let received = self.cpu.recv(Box::new(chunk));
            inflight.push_back(async move {
                let (chunk, r) = received.await;
                r?;
                let any: Box<dyn std::any::Any> = chunk;
                let chunk = *any
                    .downcast::<Chunk>()
                    .map_err(|_| ChannelError::protocol("cuda_basic: a foreign chunk"))?;
                if let Some(g) = gpu {
                    driver::copy_async(
                        g.device,
                        g.addr + off as u64,
                        chunk.addr(),
                        chunk.len,
                        g.stream,
                    )?;
                    driver::finished(g.device, g.stream)?.await?;
                }
                Ok::<_, ChannelError>((chunk, off))
            });
        }
        while let Some(done) = inflight.next().await {
            self.land(buf, done?);
        }
        Ok(())
    }

    /// A chunk that arrived (and, for a GPU end, was copied on): a CPU end copies it
    /// into place; the slot goes back to the pool.
    fn land(&self, buf: &mut dyn RecvBuf, (chunk, off): (Chunk, usize)) {
        if buf.device() == Device::CPU
            && let Some(dst) = buf.bytes_mut().get_mut(off..off + chunk.len)
        {
            dst.copy_from_slice(SendBuf::bytes(&chunk));
        }
        self.recycle_recv(chunk);
    }
}

/// A cuda_basic channel.
struct CudaBasicChannel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaBasicChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBasicChannel")
            .field("closed", &self.inner.ops.is_closed())
            .finish()
    }
}

impl Channel for CudaBasicChannel {
    fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone> {
        let turn = self.inner.ops.send_turn();
        let inner = self.inner.clone();
        async move {
            match inner.ops.start(&turn, buf.byte_len()).await {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let r = match send_gpu("cuda_basic", &*buf) {
                Ok(gpu) => inner.send(&*buf, gpu).await,
                Err(e) => Err(e),
            };
            if r.is_err() {
                // The peer's receive can no longer pair up with ours chunk by chunk.
                inner.close();
            }
            drop(turn);
            (buf, r)
        }
        .boxed()
    }

    fn recv(&self, mut buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone> {
        let turn = self.inner.ops.recv_turn();
        let inner = self.inner.clone();
        async move {
            match inner.ops.start(&turn, buf.byte_len()).await {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let r = match recv_gpu("cuda_basic", &*buf) {
                Ok(gpu) => inner.recv(&mut *buf, gpu).await,
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

impl Drop for CudaBasicChannel {
    fn drop(&mut self) {
        self.inner.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_to_cpu_never_matches_and_the_cpu_channel_decides_the_rest() {
        let ctx = CudaBasicContext::new(
            Arc::new(tp_channel::basic::BasicContext::new()),
            CudaBasicConfig::default(),
        );
        let cpu = [PREFIX_CPU, b"any"].concat();
        let gpu = [PREFIX_CUDA, b"any"].concat();
        let other_gpu = [PREFIX_CUDA, b"other"].concat();
        assert!(!ctx.can_communicate_with_remote(&cpu, &cpu));
        assert!(ctx.can_communicate_with_remote(&cpu, &gpu));
        assert!(ctx.can_communicate_with_remote(&gpu, &cpu));
        assert!(ctx.can_communicate_with_remote(&gpu, &gpu));
        assert!(!ctx.can_communicate_with_remote(&gpu, &other_gpu));
        assert!(!ctx.can_communicate_with_remote(b"junk", &gpu));
    }

    #[test]
    fn chunks_cover_the_tensor_exactly() {
        let (conns, _) = futures::executor::block_on(staging::tests::conns(false));
        let inner = Inner {
            cpu: Arc::new(Dummy),
            staging: LazyStaging::new(
                conns,
                Want {
                    slots: 0,
                    slot_len: 4096,
                    gpu: None,
                },
            ),
            ops: Ops::default(),
            config: CudaBasicConfig {
                chunk: 10,
                ..CudaBasicConfig::default()
            },
            pool: Arc::new(SlotPool {
                free: Mutex::default(),
                cap: 0,
            }),
        };
        let c: Vec<_> = inner.chunks(25).collect();
        assert_eq!(c, [(0, 10), (10, 10), (20, 5)]);
        assert_eq!(inner.chunks(20).count(), 2);
        assert_eq!(inner.chunks(0).count(), 0);
    }

    /// Two channels whose CPU channel fails every operation (so any operation that
    /// did not take the shared staging would fail), over fresh staging connections.
    fn staged_pair(slots: u32) -> (CudaBasicChannel, CudaBasicChannel) {
        let (ca, cb) = futures::executor::block_on(staging::tests::conns(true));
        let want = Want {
            slots,
            slot_len: 4096,
            gpu: None,
        };
        let channel = |conns| CudaBasicChannel {
            inner: Arc::new(Inner {
                cpu: Arc::new(Dummy),
                staging: LazyStaging::new(conns, want),
                ops: Ops::default(),
                config: CudaBasicConfig::default(),
                pool: Arc::new(SlotPool {
                    free: Mutex::default(),
                    cap: 0,
                }),
            }),
        };
        (channel(ca), channel(cb))
    }

    /// The first operations set the staging up — here each end's first is a send, in
    /// opposite directions — and every operation then takes it (host copies at these
    /// CPU ends: the protocol a GPU end runs); close fails what is pending.
    #[test]
    fn a_channel_sets_up_shared_staging_at_its_first_operation() {
        let (a, b) = staged_pair(2);
        let data: Vec<u8> = (0..3 * 4096 + 11).map(|i| (i % 251) as u8).collect();
        let back: Vec<u8> = data.iter().rev().copied().collect();
        futures::executor::block_on(async {
            // Sends first on both ends; the receives are issued at once too (a tensor
            // larger than the slots needs its receiver to free them).
            let sends = futures::future::join(
                a.send(Box::new(data.clone())),
                b.send(Box::new(back.clone())),
            );
            let recvs = futures::future::join(
                b.recv(Box::new(vec![0u8; data.len()])),
                a.recv(Box::new(vec![0u8; back.len()])),
            );
            let ((sent_a, sent_b), (got_b, got_a)) = futures::future::join(sends, recvs).await;
            sent_a.1.unwrap();
            sent_b.1.unwrap();
            got_a.1.unwrap();
            got_b.1.unwrap();
            assert_eq!(RecvBuf::bytes(&*got_b.0), data.as_slice());
            assert_eq!(RecvBuf::bytes(&*got_a.0), back.as_slice());
            let pending = b.recv(Box::new(vec![0u8; 10]));
            b.close();
            assert!(pending.await.1.is_err());
        });
    }

    /// With staging declined, operations go to the CPU channel (which fails them here).
    #[test]
    fn a_channel_without_shared_staging_uses_its_cpu_channel() {
        let (a, b) = staged_pair(0);
        let (sent, received) = futures::executor::block_on(futures::future::join(
            a.send(Box::new(vec![1u8; 10])),
            b.recv(Box::new(vec![0u8; 10])),
        ));
        assert!(matches!(sent.1, Err(ChannelError::Closed)), "{:?}", sent.1);
        assert!(received.1.is_err());
    }

    #[derive(Debug)]
    struct Dummy;

    impl Channel for Dummy {
        fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone> {
            ready((buf, Err(ChannelError::Closed))).boxed()
        }

        fn recv(&self, buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone> {
            ready((buf, Err(ChannelError::Closed))).boxed()
        }

        fn close(&self) {}
    }
}
