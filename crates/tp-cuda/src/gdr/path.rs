//! cuda_gdr's data path over libibverbs (the `ibv` feature): the context's device and
//! registration cache, the per-channel queue pair setup, and the handoff fetch that
//! reads a tensor with RDMA (see the [parent module](super) for the protocol).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_channel::kit::{Fetch, HandoffContext};
use tp_channel::{BoxChannel, ChannelError, Device, RecvBuf, SendBuf};
use tp_transport::BoxConnection;
use tp_transport::ibv::proto::{SETUP_LEN, SetupInfo};
use tp_transport::ibv::{IbvConfig, MemoryRegion, RdmaDevice, RdmaReader, RemoteSpan};
use tp_wire::device::DeviceKind;

use super::{CudaGdrConfig, GdrDescriptor};
use crate::buffer::{recv_cuda_sized, send_cuda};
use crate::driver;

/// A context whose machine has everything cuda_gdr needs.
#[derive(Debug)]
pub(super) struct Ready {
    core: Arc<HandoffContext>,
    device: RdmaDevice,
    registrations: Arc<Registrations>,
    config: CudaGdrConfig,
}

impl Ready {
    pub(super) fn open(config: CudaGdrConfig) -> Result<Self, String> {
        let gpus = driver::driver()?.devices.len();
        let device = RdmaDevice::open(&IbvConfig::default())?;
        // Any GPU of ours can read from or be read by any GPU of a peer that has
        // cuda_gdr (the original's "*").
        let descriptors = (0..gpus)
            .map(|i| (Device::cuda(i as u32), b"*".to_vec()))
            .collect();
        tracing::debug!(
            channel = "cuda_gdr",
            nic = device.name(),
            gpus,
            "cuda_gdr ready"
        );
        Ok(Self {
            core: Arc::new(HandoffContext::with_devices("cuda_gdr", Ok(descriptors))),
            registrations: Arc::new(Registrations::new(device.clone(), config.registrations)),
            device,
            config,
        })
    }

    pub(super) fn viability(&self) -> Result<(), ChannelError> {
        self.core.viability()
    }

    pub(super) fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        self.core.device_descriptors()
    }

    pub(super) fn create(
        &self,
        conns: Vec<BoxConnection>,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        let core = self.core.clone();
        let device = self.device.clone();
        let registrations = self.registrations.clone();
        let timeout = self.config.read_timeout;
        async move {
            let conn = conns
                .first()
                .ok_or_else(|| ChannelError::protocol("cuda_gdr needs two connections"))?;
            let reader =
                RdmaReader::new(&device).map_err(|e| ChannelError::io("create queue pair", e))?;
            conn.write_frame(&reader.setup().encode()).await?;
            let theirs = conn.read_frame(SETUP_LEN as u64).await?;
            let theirs = SetupInfo::decode(&theirs)
                .map_err(|e| ChannelError::protocol(format!("cuda_gdr setup: {e}")))?;
            reader
                .connect(&theirs)
                .map_err(|e| ChannelError::io("connect queue pair", e))?;
            // Neither side reads before the other's queue pair can answer.
            conn.write_frame(&[1]).await?;
            if conn.read_frame(1).await? != [1] {
                return Err(ChannelError::protocol("cuda_gdr: malformed ready frame"));
            }
            let fetch = RdmaRead {
                reader,
                registrations,
                timeout,
            };
            core.create(fetch, conns).await
        }
        .boxed()
    }

    pub(super) fn close(&self) {
        self.core.close();
    }
}

/// GPU allocations registered with the NIC, least recently used first.
#[derive(Debug)]
struct Registrations {
    device: RdmaDevice,
    capacity: usize,
    entries: Mutex<VecDeque<Entry>>,
}

#[derive(Debug)]
struct Entry {
    gpu: u32,
    buffer_id: u64,
    region: Arc<MemoryRegion>,
}

impl Registrations {
    fn new(device: RdmaDevice, capacity: usize) -> Self {
        Self {
            device,
            capacity: capacity.max(1),
            entries: Mutex::default(),
        }
    }

    /// The registration of the allocation holding `addr..addr + len` on GPU `gpu`.
    fn get(&self, gpu: u32, addr: u64, len: usize) -> Result<Arc<MemoryRegion>, ChannelError> {
        let alloc = driver::allocation_of(gpu, addr)?;
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        let hit = entries
            .iter()
            .position(|e| e.gpu == gpu && e.buffer_id == alloc.buffer_id);
        let region = match hit.and_then(|i| entries.remove(i)) {
            Some(e) => e.region,
            None => Arc::new(self.register(alloc)?),
        };
        if !region.covers(addr, len as u64) {
            return Err(ChannelError::protocol(format!(
                "cuda_gdr: {len} bytes at {addr:#x} overrun their allocation"
            )));
        }
        entries.push_back(Entry {
            gpu,
            buffer_id: alloc.buffer_id,
            region: region.clone(),
        });
        while entries.len() > self.capacity {
            // A transfer still using an evicted region holds its own `Arc`.
            entries.pop_front();
        }
        Ok(region)
    }

    #[allow(unsafe_code)]
    fn register(&self, alloc: driver::Allocation) -> Result<MemoryRegion, ChannelError> {
        // SAFETY: the span is a whole GPU allocation the driver just reported; the CPU
        // never dereferences it through the region, and the NIC only writes into it
        // for reads this process posts into a receive buffer it holds. An allocation
        // freed while registered is invalidated by the peer-memory module (further
        // accesses fail), and the cache never hands its entry out again: lookups go by
        // buffer id, which the driver never reuses.
        unsafe { MemoryRegion::register(&self.device, alloc.base, alloc.size) }
            .map_err(|e| ChannelError::io("register GPU memory with the NIC", e))
    }
}

/// The handoff fetch: the receiver reads the sender's GPU memory.
struct RdmaRead {
    reader: RdmaReader,
    registrations: Arc<Registrations>,
    timeout: std::time::Duration,
}

/// A send in flight: the buffer and the registration the peer reads through.
struct Exposed {
    buf: Box<dyn SendBuf>,
    _region: Option<Arc<MemoryRegion>>,
}

impl RdmaRead {
    /// Waits for the producer, registers the buffer and describes it.
    fn expose(
        &self,
        buf: &dyn SendBuf,
    ) -> Result<(GdrDescriptor, Arc<MemoryRegion>), ChannelError> {
        let b = send_cuda(buf).ok_or(ChannelError::UnsupportedDevice {
            channel: "cuda_gdr",
            device: buf.device(),
        })?;
        // The NIC reads outside any stream: the producer's work must be done first.
        driver::synchronize(b.device_index(), b.stream())?;
        let region = self
            .registrations
            .get(b.device_index(), b.addr(), b.len())?;
        let d = GdrDescriptor::Readable {
            addr: b.addr(),
            len: b.len() as u64,
            rkey: region.rkey(),
        };
        Ok((d, region))
    }
}

impl Drop for RdmaRead {
    fn drop(&mut self) {
        self.reader.close();
    }
}

impl Fetch for RdmaRead {
    type Held = Exposed;

    fn accepts(&self, device: Device) -> bool {
        device.kind == DeviceKind::Cuda
    }

    fn publish(&self, buf: Box<dyn SendBuf>) -> (Vec<u8>, Exposed) {
        match self.expose(&*buf) {
            Ok((d, region)) => (
                d.encode(),
                Exposed {
                    buf,
                    _region: Some(region),
                },
            ),
            Err(e) => {
                tracing::warn!(channel = "cuda_gdr", error = %e, "cannot expose a send buffer to the NIC");
                (
                    GdrDescriptor::Unavailable.encode(),
                    Exposed { buf, _region: None },
                )
            }
        }
    }

    fn take_back(&self, held: Exposed) -> Box<dyn SendBuf> {
        held.buf
    }

    fn abandon(&self, held: Exposed) {
        // The peer may be reading these bytes right now; freeing the buffer would let
        // it read reused memory and report success. Leak it, as cma does.
        tracing::warn!(
            bytes = held.buf.byte_len(),
            "cuda_gdr: a send was abandoned mid-flight; its buffer is leaked"
        );
        std::mem::forget(held);
    }

    fn fetch(&self, d: &[u8], dst: &mut dyn RecvBuf) -> Result<(), ChannelError> {
        let (addr, len, rkey) = match GdrDescriptor::decode(d)? {
            GdrDescriptor::Readable { addr, len, rkey } => (addr, len, rkey),
            GdrDescriptor::Unavailable => {
                return Err(ChannelError::device(
                    "cuda_gdr",
                    "the sender could not expose its buffer to its NIC (see its log)",
                ));
            }
        };
        let dst = recv_cuda_sized("cuda_gdr", dst, len)?;
        // The NIC writes outside any stream: the consumer's earlier work on the
        // destination must be done first.
        driver::synchronize(dst.device_index(), dst.stream())?;
        let region = self
            .registrations
            .get(dst.device_index(), dst.addr(), dst.len())?;
        self.reader
            .read(
                &region,
                dst.addr() - region.addr(),
                RemoteSpan { addr, len, rkey },
                self.timeout,
            )
            .map_err(|e| ChannelError::io("RDMA read", e))?;
        // Work enqueued on the consumer's stream from now on sees the bytes.
        driver::flush_rdma_writes(dst.device_index())?;
        Ok(())
    }
}
