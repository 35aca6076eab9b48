//! cuda_gdr: GPUDirect RDMA — the NIC reads and writes GPU memory directly.
//!
//! **Status: the viability probe is real; the data path is not written yet**, so the
//! context always reports `is_viable() == false` and is never chosen. The probe checks,
//! in order, what the original checks (tensorpipe.md §4.10), so that the reason given
//! is the first thing a machine lacks:
//! 1. the CUDA driver and at least one GPU;
//! 2. NVIDIA's peer-memory kernel module (`/sys/kernel/mm/memory_peers/nv_mem/version`
//!    or `/sys/module/nvidia_peermem/version`);
//! 3. an RDMA device (`ibverbs`, with this crate's `ibv` feature);
//! 4. every GPU's BAR1 window (`resource1` of its PCI device) spans its whole memory,
//!    or registering large tensors with the NIC fails.

use futures::FutureExt;
use futures::future::BoxFuture;
use tp_channel::{BoxChannel, ChannelContext, ChannelError, Device, Endpoint};
use tp_transport::BoxConnection;

use crate::driver;

/// The cuda_gdr channel context (see the [module docs](self) for its status).
#[derive(Debug)]
pub struct CudaGdrContext {
    why_not: String,
}

impl Default for CudaGdrContext {
    fn default() -> Self {
        Self::new()
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

#[cfg(feature = "ibv")]
fn rdma_devices() -> Result<usize, String> {
    ibverbs::devices()
        .map(|l| l.len())
        .map_err(|e| format!("no RDMA devices: {e}"))
}

#[cfg(not(feature = "ibv"))]
fn rdma_devices() -> Result<usize, String> {
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

fn probe() -> String {
    let drv = match driver::driver() {
        Ok(d) => d,
        Err(why) => return why,
    };
    if !peer_memory_module() {
        return "NVIDIA's peer-memory kernel module (nvidia-peermem / nv_mem) is not loaded"
            .to_string();
    }
    match rdma_devices() {
        Ok(0) => return "no RDMA devices".to_string(),
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
    "the cuda_gdr data path is not implemented yet (the machine has what it needs)".to_string()
}

impl CudaGdrContext {
    /// Probes the machine.
    pub fn new() -> Self {
        let why_not = probe();
        tracing::info!(channel = "cuda_gdr", reason = %why_not, "channel not viable");
        Self { why_not }
    }
}

impl ChannelContext for CudaGdrContext {
    fn name(&self) -> &'static str {
        "cuda_gdr"
    }

    fn viability(&self) -> Result<(), ChannelError> {
        Err(ChannelError::not_viable("cuda_gdr", &self.why_not))
    }

    fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        Vec::new()
    }

    fn connections_needed(&self) -> usize {
        0
    }

    fn create_channel(
        &self,
        _conns: Vec<BoxConnection>,
        _endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        let e = ChannelError::not_viable("cuda_gdr", &self.why_not);
        async move { Err(e) }.boxed()
    }

    fn close(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_says_why_it_is_not_viable() {
        let ctx = CudaGdrContext::new();
        let e = ctx.viability().unwrap_err().to_string();
        assert!(e.starts_with("channel cuda_gdr is not viable: "), "{e}");
        assert!(ctx.device_descriptors().is_empty());
        eprintln!("cuda_gdr: {e}");
    }
}
