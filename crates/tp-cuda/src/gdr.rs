//! cuda_gdr: GPUDirect RDMA — the NIC reads GPU memory directly, no host staging.
//!
//! **Viability.** The probe checks, in order, what the original checks (tensorpipe.md
//! §4.10), so that the reason given is the first thing a machine lacks:
//! 1. the CUDA driver and at least one GPU;
//! 2. NVIDIA's peer-memory kernel module (`/sys/kernel/mm/memory_peers/nv_mem/version`
//!    or `/sys/module/nvidia_peermem/version`);
//! 3. an RDMA device (libibverbs, with this crate's `ibv` feature), then, for every
//!    GPU, a NIC that opens (see *Which NIC* below);
//! 4. every GPU's BAR1 window (`resource1` of its PCI device) spans its whole memory,
//!    or registering large tensors with the NIC fails.
//!
//! **Which NIC.** Each GPU is served by one NIC: by default the one nearest to it on
//! the PCIe tree (the longest shared sysfs path, as the original chose; see
//! [`NicChoice`]), or the ones `TP_CUDA_GDR_NICS` names (one per GPU, or one for all;
//! `TP_IBV_DEVICE` also names one for all). `TP_IBV_PORT` and `TP_IBV_GID_INDEX` apply
//! to every NIC, as for the ibv transport. Only the NICs some GPU uses are opened, at
//! most [`MAX_NICS`]; the pairing is logged at debug level.
//!
//! **Data path** (with the `ibv` feature). The sender does not push: the receiver
//! pulls with one-sided RDMA reads, on tp-channel's handoff protocol (as cma pulls with
//! `process_vm_readv`). Per channel, a reliable-connected queue pair for every pair
//! of NICs (ours × theirs, as the original's mesh): at channel creation each side sends
//! its NIC count, then its queue pairs' setup records (the ibv transport's 64-byte
//! [`SetupInfo`], [`MeshSetup`]) on connection 0, connects each queue pair to its
//! counterpart, and both confirm with a one-byte frame. Then per tensor:
//! - sender: waits until its stream has finished producing the buffer, registers the
//!   whole CUDA allocation containing it with its GPU's NIC (cached, see below), and
//!   sends a [`GdrDescriptor`] — that NIC's index, address, length and remote key — on
//!   connection 0;
//! - receiver: waits until its stream has finished with the destination (the NIC
//!   writes outside any stream), registers the destination's allocation with its GPU's
//!   NIC, reads the span through the queue pair between that NIC and the sender's, in
//!   requests of at most the port's largest message with as many outstanding as
//!   the queue pair allows ([`ReadPlan`](tp_transport::ibv::read::ReadPlan)), flushes
//!   the NIC's writes to the GPU (`cuFlushGPUDirectRDMAWrites`) so that work enqueued on
//!   the consumer's stream afterwards sees them, and acknowledges on connection 1; the
//!   sender then has its buffer back.
//!
//! The mesh costs a channel between two machines with eight NICs in use each 64 queue
//! pairs per side, each with its own completion queue and channel (a file descriptor);
//! naming fewer NICs (`TP_CUDA_GDR_NICS`) holds fewer.
//!
//! **Registrations** are cached per GPU allocation, keyed by the driver's buffer id
//! (never reused, so a freed allocation's stale entry is never taken for a new one at
//! the same address), at most [`CudaGdrConfig::registrations`] of them, the least
//! recently used dropped first; a registration (which can take milliseconds) runs
//! outside the cache's lock. The original cached every allocation it ever saw.
//!
//! **Trust.** A peer that has a remote key can read the whole registered allocation,
//! not only the tensor it was offered, for as long as the registration is cached (read
//! only: the key grants no writes). As in the original, use cuda_gdr between processes
//! that trust each other.
//!
//! **Blocking.** As cma's pull, the read runs on the channel's I/O thread and blocks
//! it until the read completes, fails or [`CudaGdrConfig::read_timeout`] passes (it
//! sleeps on the queue pair's completion channel; nothing busy-polls — the original
//! spun a thread per context). A failed read breaks its queue pair: the channel
//! closes, its pending operations fail.
//!
//! **Not run here.** No machine this project has run on has an RDMA NIC, so this path
//! has been compiled and its pieces tested (the read plan against an in-order queue
//! pair model, the descriptor and setup codecs by proptest and fuzzing), never executed end to
//! end; where the hardware exists, the CUDA channel conformance suite and
//! `tp bench channel --channel cuda_gdr` exercise it. The NIC pairing is tested
//! against a fake sysfs tree.

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_channel::{BoxChannel, ChannelContext, ChannelError, Device, Endpoint};
use tp_transport::BoxConnection;
use tp_transport::ibv::proto::{SETUP_LEN, SetupInfo};

use crate::driver;

#[cfg_attr(not(feature = "ibv"), allow(dead_code))]
mod cache;
#[cfg_attr(not(feature = "ibv"), allow(dead_code))]
mod topology;
pub use topology::NicChoice;

/// What a cuda_gdr sender announces for one tensor on connection 0.
///
/// | bytes | field |
/// |---|---|
/// | 0 | kind: 0 = readable, 1 = unavailable |
/// | 1 | readable only: index of the sender's NIC that registered it (its order in the setup) |
/// | 2..10 | address in the sender's GPU memory, u64 LE |
/// | 10..18 | length in bytes, u64 LE |
/// | 18..22 | remote key of the registration covering it, u32 LE |
///
/// *Unavailable* (one byte) says the sender could not expose the buffer to its NIC
/// (the reason is in its log); the receiver fails that transfer.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum GdrDescriptor {
    /// The receiver may read `len` bytes at `addr` with `rkey`, through the queue pair
    /// that reaches the sender's NIC `nic`.
    Readable {
        /// The sender's NIC the registration belongs to (below the sender's NIC count).
        nic: u8,
        /// Address in the sender's GPU memory.
        addr: u64,
        /// Length in bytes.
        len: u64,
        /// Remote key of the registration covering the span.
        rkey: u32,
    },
    /// The sender could not expose its buffer.
    Unavailable,
}

impl GdrDescriptor {
    /// Length of an encoded readable descriptor (the longest).
    pub const MAX_LEN: usize = 22;

    /// The encoding (see the table above).
    pub fn encode(&self) -> Vec<u8> {
        match *self {
            Self::Readable {
                nic,
                addr,
                len,
                rkey,
            } => {
                let mut d = Vec::with_capacity(Self::MAX_LEN);
                d.extend_from_slice(&[0, nic]);
                d.extend_from_slice(&addr.to_le_bytes());
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&rkey.to_le_bytes());
                d
            }
            Self::Unavailable => vec![1],
        }
    }

    /// Decodes what a peer sent.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`] for an unknown kind or a length other than the kind's.
    /// (Whether `nic` names one of the peer's NICs is the channel's check: it knows
    /// how many the peer set up.)
    pub fn decode(d: &[u8]) -> Result<Self, ChannelError> {
        match (d.first(), d.len()) {
            (Some(0), Self::MAX_LEN) => Ok(Self::Readable {
                nic: d[1],
                addr: u64::from_le_bytes(tp_channel::kit::le_bytes(d, 2)?),
                len: u64::from_le_bytes(tp_channel::kit::le_bytes(d, 10)?),
                rkey: u32::from_le_bytes(tp_channel::kit::le_bytes(d, 18)?),
            }),
            (Some(1), 1) => Ok(Self::Unavailable),
            (Some(k @ (0 | 1)), n) => Err(ChannelError::protocol(format!(
                "cuda_gdr descriptor of kind {k} is {n} bytes"
            ))),
            (Some(k), _) => Err(ChannelError::protocol(format!(
                "cuda_gdr descriptor of unknown kind {k}"
            ))),
            (None, _) => Err(ChannelError::protocol("empty cuda_gdr descriptor")),
        }
    }
}

/// Most NICs one cuda_gdr context uses, and accepts a peer announcing: every channel
/// holds a queue pair per (our NIC, their NIC) pair.
pub const MAX_NICS: usize = 16;

/// cuda_gdr's channel setup as each side sends it on connection 0: first a one-byte
/// frame with its NIC count, then one frame of 64-byte queue pair records
/// ([`SetupInfo`]), one per (its NIC `i`, the peer's NIC `j`), `i` major.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct MeshSetup {
    /// The sender's NIC count (1..=[`MAX_NICS`]).
    pub nics: usize,
    /// The receiver's NIC count, as the sender learnt it.
    pub peer_nics: usize,
    /// `nics × peer_nics` records; record `i * peer_nics + j` is the sender's queue pair
    /// on its NIC `i` for the receiver's NIC `j`.
    pub records: Vec<SetupInfo>,
}

impl MeshSetup {
    /// The NIC count frame.
    pub fn encode_count(nics: usize) -> [u8; 1] {
        [u8::try_from(nics).unwrap_or(u8::MAX)]
    }

    /// Decodes a peer's NIC count frame.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`] unless it is one byte from 1 to [`MAX_NICS`].
    pub fn decode_count(frame: &[u8]) -> Result<usize, ChannelError> {
        match frame {
            [n] if (1..=MAX_NICS).contains(&usize::from(*n)) => Ok(usize::from(*n)),
            _ => Err(ChannelError::protocol(format!(
                "cuda_gdr: a NIC count frame must be one byte from 1 to {MAX_NICS}, got {frame:?}"
            ))),
        }
    }

    /// Length of the records frame between `nics` and `peer_nics` NICs: the bound a
    /// receiver reads it under.
    pub const fn records_len(nics: usize, peer_nics: usize) -> usize {
        nics.saturating_mul(peer_nics).saturating_mul(SETUP_LEN)
    }

    /// The records frame.
    pub fn encode_records(&self) -> Vec<u8> {
        self.records.iter().flat_map(SetupInfo::encode).collect()
    }

    /// Decodes a peer's records frame, the peer having announced `nics` NICs and we
    /// `peer_nics`.
    ///
    /// # Errors
    /// [`ChannelError::Protocol`] for a count outside 1..=[`MAX_NICS`], a frame of
    /// another length than the counts give, or a malformed record.
    pub fn decode_records(
        frame: &[u8],
        nics: usize,
        peer_nics: usize,
    ) -> Result<Self, ChannelError> {
        let counts = 1..=MAX_NICS;
        if !counts.contains(&nics) || !counts.contains(&peer_nics) {
            return Err(ChannelError::protocol(format!(
                "cuda_gdr: queue pair records for {nics} × {peer_nics} NICs (1 to {MAX_NICS} each)"
            )));
        }
        if frame.len() != Self::records_len(nics, peer_nics) {
            return Err(ChannelError::protocol(format!(
                "cuda_gdr: {} bytes of queue pair records for {nics} × {peer_nics} NICs",
                frame.len()
            )));
        }
        let records = frame
            .chunks_exact(SETUP_LEN)
            .map(SetupInfo::decode)
            .collect::<Result<_, _>>()
            .map_err(|e| ChannelError::protocol(format!("cuda_gdr setup: {e}")))?;
        Ok(Self {
            nics,
            peer_nics,
            records,
        })
    }
}

/// How cuda_gdr behaves.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CudaGdrConfig {
    /// How long one tensor's read may take before the channel gives up on its peer
    /// (and closes). Default 10 s.
    pub read_timeout: Duration,
    /// GPU allocations kept registered with the NIC, per context. Default 64.
    pub registrations: usize,
    /// Which NIC each GPU uses. Default: [`NicChoice::from_env`] (the nearest NIC to
    /// each GPU unless `TP_CUDA_GDR_NICS` or `TP_IBV_DEVICE` names them).
    pub nics: NicChoice,
}

impl Default for CudaGdrConfig {
    fn default() -> Self {
        Self {
            read_timeout: Duration::from_secs(10),
            registrations: 64,
            nics: NicChoice::from_env(),
        }
    }
}

fn peer_memory_module() -> bool {
    [
        "/sys/kernel/mm/memory_peers/nv_mem/version",
        "/sys/kernel/mm/memory_peers/nvidia-peermem/version",
        "/sys/module/nvidia_peermem/version",
    ]
    .iter()
    .any(|p| std::path::Path::new(p).exists())
}

/// The RDMA devices' names.
#[cfg(feature = "ibv")]
fn rdma_device_names() -> Result<Vec<String>, String> {
    tp_transport::ibv::RdmaDevice::names().map_err(|e| format!("no RDMA devices: {e}"))
}

#[cfg(not(feature = "ibv"))]
fn rdma_device_names() -> Result<Vec<String>, String> {
    Err("tp-cuda was built without the `ibv` feature".to_string())
}

/// BAR1 size of the GPU at PCI `domain:bus:device`, from sysfs.
fn bar1(pci: (i32, i32, i32)) -> Option<u64> {
    let (domain, bus, dev) = pci;
    let path = format!("/sys/bus/pci/devices/{domain:04x}:{bus:02x}:{dev:02x}.0/resource");
    let text = std::fs::read_to_string(path).ok()?;
    // Line n is BAR n: "start end flags" in hex.
    let line = text.lines().nth(1)?;
    let mut f = line.split_whitespace();
    let start = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
    let end = u64::from_str_radix(f.next()?.trim_start_matches("0x"), 16).ok()?;
    (end > start).then(|| end - start + 1)
}

/// What the machine lacks for cuda_gdr, in the original's order; empty if nothing.
fn probe() -> String {
    let drv = match driver::driver() {
        Ok(d) => d,
        Err(why) => return why,
    };
    if !peer_memory_module() {
        return "NVIDIA's peer-memory kernel module (nvidia-peermem / nv_mem) is not loaded"
            .to_string();
    }
    match rdma_device_names() {
        Ok(names) if names.is_empty() => return "no RDMA devices".to_string(),
        Ok(_) => {}
        Err(why) => return why,
    }
    for (i, d) in drv.devices.iter().enumerate() {
        match bar1(d.pci) {
            Some(size) if size >= d.total_mem as u64 => {}
            Some(size) => {
                return format!(
                    "cuda:{i}'s BAR1 window ({size} B) is smaller than its memory ({} B)",
                    d.total_mem
                );
            }
            None => return format!("cannot read cuda:{i}'s BAR1 size from sysfs"),
        }
    }
    String::new()
}

/// The cuda_gdr channel context (see the [module docs](self)).
#[derive(Debug)]
pub struct CudaGdrContext {
    inner: Result<path::Ready, String>,
}

impl Default for CudaGdrContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CudaGdrContext {
    /// Probes the machine, with the default configuration.
    pub fn new() -> Self {
        Self::with_config(CudaGdrConfig::default())
    }

    /// Probes the machine.
    pub fn with_config(config: CudaGdrConfig) -> Self {
        let lacks = probe();
        let inner = if lacks.is_empty() {
            path::Ready::open(config)
        } else {
            Err(lacks)
        };
        if let Err(why) = &inner {
            tracing::info!(channel = "cuda_gdr", reason = %why, "channel not viable");
        }
        Self { inner }
    }
}

impl ChannelContext for CudaGdrContext {
    fn name(&self) -> &'static str {
        "cuda_gdr"
    }

    fn viability(&self) -> Result<(), ChannelError> {
        match &self.inner {
            Ok(ready) => ready.viability(),
            Err(why) => Err(ChannelError::not_viable("cuda_gdr", why)),
        }
    }

    fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        self.inner
            .as_ref()
            .map(path::Ready::device_descriptors)
            .unwrap_or_default()
    }

    fn connections_needed(&self) -> usize {
        2
    }

    fn create_channel(
        &self,
        conns: Vec<BoxConnection>,
        _endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        match &self.inner {
            Ok(ready) => ready.create(conns),
            Err(why) => {
                let e = ChannelError::not_viable("cuda_gdr", why);
                async move { Err(e) }.boxed()
            }
        }
    }

    fn close(&self) {
        if let Ok(ready) = &self.inner {
            ready.close();
        }
    }
}

/// Without the `ibv` feature there is no data path; the probe already said so.
#[cfg(not(feature = "ibv"))]
mod path {
    use super::{BoxChannel, BoxConnection, BoxFuture, ChannelError, CudaGdrConfig, Device};

    #[derive(Debug)]
    pub(super) enum Ready {}

    impl Ready {
        pub(super) fn open(_config: CudaGdrConfig) -> Result<Self, String> {
            Err("tp-cuda was built without the `ibv` feature".to_string())
        }

        pub(super) fn viability(&self) -> Result<(), ChannelError> {
            match *self {}
        }

        pub(super) fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
            match *self {}
        }

        pub(super) fn create(
            &self,
            _conns: Vec<BoxConnection>,
        ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
            match *self {}
        }

        pub(super) fn close(&self) {
            match *self {}
        }
    }
}

#[cfg(feature = "ibv")]
mod path;

#[cfg(test)]
mod tests {
    use super::*;
    use tp_wire::device::DeviceKind;

    #[test]
    fn descriptors_have_the_documented_layout_and_refuse_the_rest() {
        let d = GdrDescriptor::Readable {
            nic: 3,
            addr: 0x0102_0304_0506_0708,
            len: 16,
            rkey: 0xaabb_ccdd,
        };
        let bytes = d.encode();
        assert_eq!(bytes.len(), GdrDescriptor::MAX_LEN);
        assert_eq!(bytes[..2], [0, 3]);
        assert_eq!(bytes[2..10], 0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(bytes[10..18], 16u64.to_le_bytes());
        assert_eq!(bytes[18..22], 0xaabb_ccddu32.to_le_bytes());
        assert_eq!(GdrDescriptor::decode(&bytes).unwrap(), d);
        assert_eq!(GdrDescriptor::Unavailable.encode(), [1]);
        assert_eq!(
            GdrDescriptor::decode(&[1]).unwrap(),
            GdrDescriptor::Unavailable
        );
        for bad in [&[][..], &[2], &[1, 0], &bytes[..21], &[0; 23]] {
            assert!(
                matches!(GdrDescriptor::decode(bad), Err(ChannelError::Protocol(_))),
                "{bad:?}"
            );
        }
    }

    fn record(qpn: u32) -> SetupInfo {
        SetupInfo {
            lid: 7,
            mtu: 5,
            qpn,
            gid: [9; 16],
            inbox_addr: 0,
            inbox_rkey: 0,
            psn: 42,
            inbox_capacity: 1,
            max_message: 1 << 30,
        }
    }

    #[test]
    fn the_mesh_setup_round_trips_and_refuses_what_does_not_fit() {
        for n in 1..=MAX_NICS {
            assert_eq!(
                MeshSetup::decode_count(&MeshSetup::encode_count(n)).unwrap(),
                n
            );
        }
        for bad in [&[][..], &[0], &[17], &[255], &[1, 1]] {
            assert!(
                matches!(MeshSetup::decode_count(bad), Err(ChannelError::Protocol(_))),
                "{bad:?}"
            );
        }
        let mesh = MeshSetup {
            nics: 2,
            peer_nics: 3,
            records: (0..6).map(record).collect(),
        };
        let frame = mesh.encode_records();
        assert_eq!(frame.len(), MeshSetup::records_len(2, 3));
        assert_eq!(MeshSetup::decode_records(&frame, 2, 3).unwrap(), mesh);
        // The right length for another shape, a record short, a record too many.
        for (bytes, nics, peer) in [
            (&frame[..], 3, 3),
            (&frame[..SETUP_LEN * 5], 2, 3),
            (&[&frame[..], &frame[..SETUP_LEN]].concat()[..], 2, 3),
        ] {
            assert!(
                MeshSetup::decode_records(bytes, nics, peer).is_err(),
                "{} bytes as {nics} × {peer}",
                bytes.len()
            );
        }
        // Counts outside the limits are refused, however long the frame.
        for (nics, peer) in [(0, 3), (2, 0), (MAX_NICS + 1, 1), (usize::MAX, usize::MAX)] {
            assert!(MeshSetup::decode_records(&frame, nics, peer).is_err());
        }
        // A malformed record anywhere fails the frame.
        let mut broken = frame;
        broken[SETUP_LEN * 4] ^= 1;
        assert!(matches!(
            MeshSetup::decode_records(&broken, 2, 3),
            Err(ChannelError::Protocol(_))
        ));
    }

    #[test]
    fn it_is_viable_with_a_descriptor_per_gpu_or_says_why_not() {
        let ctx = CudaGdrContext::new();
        match ctx.viability() {
            Ok(()) => {
                let d = ctx.device_descriptors();
                assert!(!d.is_empty());
                assert!(
                    d.iter()
                        .all(|(dev, b)| dev.kind == DeviceKind::Cuda && b == b"*")
                );
                assert_eq!(ctx.connections_needed(), 2);
                eprintln!("cuda_gdr: viable on {} GPUs", d.len());
            }
            Err(e) => {
                let e = e.to_string();
                assert!(e.starts_with("channel cuda_gdr is not viable: "), "{e}");
                assert!(!e.ends_with(": "), "a reason is given: {e}");
                assert!(ctx.device_descriptors().is_empty());
                eprintln!("cuda_gdr: {e}");
            }
        }
    }
}
