//! cuda_gdr's data path over libibverbs (the `ibv` feature): the context's NICs and
//! registration cache, the per-channel mesh of queue pairs, and the handoff fetch that
//! reads a tensor with RDMA (see the [parent module](super) for the protocol).

use std::path::Path;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_channel::kit::{Fetch, HandoffContext};
use tp_channel::{BoxChannel, ChannelError, Device, RecvBuf, SendBuf};
use tp_transport::BoxConnection;
use tp_transport::ibv::{IbvConfig, MemoryRegion, RdmaDevice, RdmaReader, RemoteSpan};
use tp_wire::device::DeviceKind;

use super::{CudaGdrConfig, GdrDescriptor, MAX_NICS, MeshSetup, NicChoice, cache, topology};
use crate::buffer::{recv_cuda_sized, send_cuda};
use crate::driver;

/// The RDMA devices this context uses, and which serves which GPU.
#[derive(Debug)]
struct Nics {
    /// Only the NICs some GPU uses, in name order: the indices the setup and the
    /// descriptors speak of.
    devices: Vec<RdmaDevice>,
    /// Per GPU, in CUDA's order, an index into `devices`.
    of_gpu: Vec<usize>,
}

impl Nics {
    /// Pairs every GPU with a NIC (`choice`, see [`topology`]) and opens those used.
    fn open(choice: &NicChoice, gpus: &[driver::DeviceInfo]) -> Result<Self, String> {
        let mut names = super::rdma_device_names()?;
        names.sort();
        let sysfs = Path::new("/sys");
        let places: Vec<_> = gpus
            .iter()
            .map(|g| topology::gpu_path(sysfs, g.pci))
            .collect();
        let nics: Vec<_> = names
            .iter()
            .map(|n| (n.clone(), topology::nic_path(sysfs, n)))
            .collect();
        let chosen = topology::assign(choice, &places, &nics)?;
        let mut used = chosen.clone();
        used.sort_unstable();
        used.dedup();
        if used.len() > MAX_NICS {
            return Err(format!(
                "the GPUs would use {} NICs; cuda_gdr uses at most {MAX_NICS} (name fewer in TP_CUDA_GDR_NICS)",
                used.len()
            ));
        }
        let devices = used
            .iter()
            .map(|&i| {
                RdmaDevice::open(&IbvConfig {
                    device: Some(names[i].clone()),
                    ..IbvConfig::default()
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let of_gpu = chosen
            .iter()
            .map(|c| used.iter().position(|u| u == c).unwrap_or(0))
            .collect::<Vec<_>>();
        for (gpu, &nic) in of_gpu.iter().enumerate() {
            tracing::debug!(
                channel = "cuda_gdr",
                gpu,
                nic = devices[nic].name(),
                pcie_place_known = places[gpu].is_some(),
                "GPU paired with a NIC"
            );
        }
        Ok(Self { devices, of_gpu })
    }

    /// The index and device of the NIC that serves GPU `gpu`.
    fn of_gpu(&self, gpu: u32) -> Result<(usize, &RdmaDevice), ChannelError> {
        self.of_gpu
            .get(gpu as usize)
            .and_then(|&i| Some((i, self.devices.get(i)?)))
            .ok_or_else(|| ChannelError::device("cuda_gdr", format!("no NIC serves cuda:{gpu}")))
    }
}

/// A context whose machine has everything cuda_gdr needs.
#[derive(Debug)]
pub(super) struct Ready {
    core: Arc<HandoffContext>,
    nics: Arc<Nics>,
    registrations: Arc<Registrations>,
    config: CudaGdrConfig,
}

impl Ready {
    pub(super) fn open(config: CudaGdrConfig) -> Result<Self, String> {
        let gpus = &driver::driver()?.devices;
        let nics = Arc::new(Nics::open(&config.nics, gpus)?);
        // Any GPU of ours can read from or be read by any GPU of a peer that has
        // cuda_gdr (the original's "*").
        let descriptors = (0..gpus.len())
            .map(|i| (Device::cuda(i as u32), b"*".to_vec()))
            .collect();
        tracing::debug!(
            channel = "cuda_gdr",
            nics = nics.devices.len(),
            gpus = gpus.len(),
            "cuda_gdr ready"
        );
        Ok(Self {
            core: Arc::new(HandoffContext::with_devices("cuda_gdr", Ok(descriptors))),
            registrations: Arc::new(Registrations::new(nics.clone(), config.registrations)),
            nics,
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
        let nics = self.nics.clone();
        let registrations = self.registrations.clone();
        let timeout = self.config.read_timeout;
        async move {
            let conn = conns
                .first()
                .ok_or_else(|| ChannelError::protocol("cuda_gdr needs two connections"))?;
            // A queue pair per (our NIC, their NIC): a tensor is read by the NIC of the
            // GPU it lands on, from the NIC of the GPU it leaves.
            let ours = nics.devices.len();
            conn.write_frame(&MeshSetup::encode_count(ours)).await?;
            let theirs = MeshSetup::decode_count(&conn.read_frame(1).await?)?;
            let readers = nics
                .devices
                .iter()
                .flat_map(|d| (0..theirs).map(move |_| RdmaReader::new(d)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ChannelError::io("create queue pair", e))?;
            let mesh = MeshSetup {
                nics: ours,
                peer_nics: theirs,
                records: readers.iter().map(RdmaReader::setup).collect(),
            };
            conn.write_frame(&mesh.encode_records()).await?;
            let frame = conn
                .read_frame(MeshSetup::records_len(theirs, ours) as u64)
                .await?;
            let peer = MeshSetup::decode_records(&frame, theirs, ours)?;
            for (k, reader) in readers.iter().enumerate() {
                // Ours on NIC i for their NIC j meets theirs on NIC j for our NIC i.
                let (i, j) = (k / theirs, k % theirs);
                let record = peer
                    .records
                    .get(j * ours + i)
                    .ok_or_else(|| ChannelError::protocol("cuda_gdr: setup record missing"))?;
                reader
                    .connect(record)
                    .map_err(|e| ChannelError::io("connect queue pair", e))?;
            }
            // Neither side reads before the other's queue pairs can answer.
            conn.write_frame(&[1]).await?;
            if conn.read_frame(1).await? != [1] {
                return Err(ChannelError::protocol("cuda_gdr: malformed ready frame"));
            }
            let fetch = RdmaRead {
                readers,
                peer_nics: theirs,
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

/// GPU allocations registered with their GPU's NIC ([`cache::Lru`]).
#[derive(Debug)]
struct Registrations {
    nics: Arc<Nics>,
    cache: cache::Lru<MemoryRegion>,
}

impl Registrations {
    fn new(nics: Arc<Nics>, capacity: usize) -> Self {
        Self {
            nics,
            cache: cache::Lru::new(capacity),
        }
    }

    /// The registration of the allocation holding `addr..addr + len` on GPU `gpu`, with
    /// the index of the NIC it is registered with (each GPU has one).
    fn get(
        &self,
        gpu: u32,
        addr: u64,
        len: usize,
    ) -> Result<(usize, Arc<MemoryRegion>), ChannelError> {
        let (nic, device) = self.nics.of_gpu(gpu)?;
        let alloc = driver::allocation_of(gpu, addr)?;
        let region = self
            .cache
            .get((gpu, alloc.buffer_id), || register(device, alloc))?;
        if !region.covers(addr, len as u64) {
            return Err(ChannelError::protocol(format!(
                "cuda_gdr: {len} bytes at {addr:#x} overrun their allocation"
            )));
        }
        Ok((nic, region))
    }
}

#[allow(unsafe_code)]
fn register(device: &RdmaDevice, alloc: driver::Allocation) -> Result<MemoryRegion, ChannelError> {
    // SAFETY: the span is a whole GPU allocation the driver just reported; the CPU
    // never dereferences it through the region, and the NIC only writes into it
    // for reads this process posts into a receive buffer it holds. An allocation
    // freed while registered is invalidated by the peer-memory module (further
    // accesses fail), and the cache never hands its entry out again: lookups go by
    // buffer id, which the driver never reuses.
    unsafe { MemoryRegion::register(device, alloc.base, alloc.size) }
        .map_err(|e| ChannelError::io("register GPU memory with the NIC", e))
}

/// The handoff fetch: the receiver reads the sender's GPU memory.
struct RdmaRead {
    /// Ours on NIC `i` for the peer's NIC `j` at `i * peer_nics + j`.
    readers: Vec<RdmaReader>,
    peer_nics: usize,
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
        let (nic, region) = self
            .registrations
            .get(b.device_index(), b.addr(), b.len())?;
        let d = GdrDescriptor::Readable {
            nic: u8::try_from(nic).unwrap_or(u8::MAX),
            addr: b.addr(),
            len: b.len() as u64,
            rkey: region.rkey(),
        };
        Ok((d, region))
    }
}

impl Drop for RdmaRead {
    fn drop(&mut self) {
        for reader in &self.readers {
            reader.close();
        }
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
        let (theirs, addr, len, rkey) = match GdrDescriptor::decode(d)? {
            GdrDescriptor::Readable {
                nic,
                addr,
                len,
                rkey,
            } => (usize::from(nic), addr, len, rkey),
            GdrDescriptor::Unavailable => {
                return Err(ChannelError::device(
                    "cuda_gdr",
                    "the sender could not expose its buffer to its NIC (see its log)",
                ));
            }
        };
        if theirs >= self.peer_nics {
            return Err(ChannelError::protocol(format!(
                "cuda_gdr: a descriptor names the peer's NIC {theirs} of {}",
                self.peer_nics
            )));
        }
        let dst = recv_cuda_sized("cuda_gdr", dst, len)?;
        // The NIC writes outside any stream: the consumer's earlier work on the
        // destination must be done first.
        driver::synchronize(dst.device_index(), dst.stream())?;
        let (ours, region) = self
            .registrations
            .get(dst.device_index(), dst.addr(), dst.len())?;
        let reader = self
            .readers
            .get(ours * self.peer_nics + theirs)
            .ok_or_else(|| ChannelError::device("cuda_gdr", "no queue pair for this NIC pair"))?;
        reader
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
