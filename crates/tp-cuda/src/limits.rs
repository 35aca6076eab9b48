//! The copy bandwidths the CUDA channels are judged against (`tp bench limits`, and
//! the limit column of `tp bench channel --channel cuda_*`), measured by the driver's
//! own `cuMemcpyAsync` on one stream.

use std::time::Instant;

use crate::driver::{self, CudaError, DeviceMem, OwnedStream, Pinned};

/// Which copy.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Copy {
    /// Device memory to device memory of one GPU (cuda_xth's and cuda_ipc's ceiling).
    DeviceToDevice,
    /// Pinned host memory to device memory (cuda_basic's ceiling).
    HostToDevice,
    /// Device memory to pinned host memory.
    DeviceToHost,
}

/// GB/s (10⁹ bytes per second) of `copy` of `size` bytes on GPU `device`: one copy to
/// warm up, then `reps` back to back on one stream, timed on the host from the first
/// enqueue to the end of a synchronize.
///
/// # Errors
/// No driver, no such device, an allocation or a copy failed.
pub fn copy_gbps(device: u32, copy: Copy, size: usize, reps: usize) -> Result<f64, CudaError> {
    let size = size.max(1);
    let stream = OwnedStream::new(device)?;
    let dev = DeviceMem::new(device, size)?;
    // The other end: a second device buffer, or pinned host memory.
    let other_dev = match copy {
        Copy::DeviceToDevice => Some(DeviceMem::new(device, size)?),
        _ => None,
    };
    let host = match copy {
        Copy::DeviceToDevice => None,
        _ => Some(Pinned::new(device, size)?),
    };
    let other = other_dev
        .as_ref()
        .map(|d| d.addr)
        .or(host.as_ref().map(Pinned::addr))
        .unwrap_or(dev.addr);
    let (src, dst) = match copy {
        Copy::DeviceToDevice | Copy::DeviceToHost => (dev.addr, other),
        Copy::HostToDevice => (other, dev.addr),
    };
    driver::copy_async(device, dst, src, size, stream.raw())?;
    stream.synchronize()?;
    let reps = reps.max(1);
    let t = Instant::now();
    for _ in 0..reps {
        driver::copy_async(device, dst, src, size, stream.raw())?;
    }
    stream.synchronize()?;
    Ok((size * reps) as f64 / t.elapsed().as_secs_f64().max(1e-12) / 1e9)
}

/// The GPU's name, driver version and whether MPS serves it, for benchmark records.
///
/// # Errors
/// No driver or no such device.
pub fn describe(device: u32) -> Result<String, String> {
    let d = driver::driver()?;
    let info = d
        .devices
        .get(device as usize)
        .ok_or_else(|| format!("no cuda:{device} (the driver sees {})", d.devices.len()))?;
    let mps = match info.mps {
        Some(true) => "MPS on",
        Some(false) => "MPS off",
        None => "MPS unknown",
    };
    Ok(format!(
        "cuda:{device} {} ({} MiB), driver supports CUDA {}.{}, {mps}",
        info.name,
        info.total_mem >> 20,
        d.version / 1000,
        d.version % 1000 / 10
    ))
}
