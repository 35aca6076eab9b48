//! The devices an agent's tensors can live on here, and receive buffers on them.
//!
//! A received tensor lands where the sender's device map (or, for a reply, its reverse)
//! says. CPU tensors land in `Vec<u8>`s; GPU tensors (feature `cuda`) in
//! [`tp_cuda::CudaBuffer`]s allocated on the target GPU and ordered by one stream per
//! GPU that this agent creates on first use and every such buffer keeps alive.

#[cfg(feature = "cuda")]
use std::collections::HashMap;
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex, PoisonError};

use tp_channel::{Device, RecvBuf};
use tp_wire::DeviceKind;

/// This process's devices, and the streams the agent receives GPU tensors on.
#[derive(Debug, Default)]
pub(crate) struct Devices {
    /// How many GPUs the driver shows (0 without one, or without feature `cuda`).
    gpus: u32,
    #[cfg(feature = "cuda")]
    streams: Mutex<HashMap<u32, Arc<tp_cuda::OwnedStream>>>,
}

impl Devices {
    /// Looks for GPUs (never panics without a driver: [`tp_cuda::available`] checks).
    pub(crate) fn probe() -> Self {
        #[cfg(feature = "cuda")]
        let gpus = tp_cuda::available().map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX));
        #[cfg(not(feature = "cuda"))]
        let gpus = 0;
        Self {
            gpus,
            #[cfg(feature = "cuda")]
            streams: Mutex::default(),
        }
    }

    /// Every local device: the CPU, then `cuda:0..N`.
    pub(crate) fn local(&self) -> Vec<Device> {
        std::iter::once(Device::CPU)
            .chain((0..self.gpus).map(Device::cuda))
            .collect()
    }

    /// A zeroed receive buffer of `len` bytes on `device`.
    ///
    /// # Errors
    /// `device` is not a device of this process, or the GPU allocation failed.
    pub(crate) fn alloc(&self, device: Device, len: usize) -> Result<Box<dyn RecvBuf>, String> {
        match device.kind {
            DeviceKind::Cpu if device.index == 0 => Ok(Box::new(vec![0u8; len])),
            DeviceKind::Cuda if device.index < self.gpus => self.alloc_gpu(device.index, len),
            _ => Err(format!(
                "a tensor is headed for {device}, which this worker does not have (its \
                 devices: {}); check the sender's device map",
                self.local()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    #[cfg(feature = "cuda")]
    fn alloc_gpu(&self, index: u32, len: usize) -> Result<Box<dyn RecvBuf>, String> {
        let stream = {
            let mut streams = self.streams.lock().unwrap_or_else(PoisonError::into_inner);
            match streams.get(&index) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(tp_cuda::OwnedStream::new(index).map_err(|e| e.to_string())?);
                    streams.insert(index, s.clone());
                    s
                }
            }
        };
        tp_cuda::CudaBuffer::alloc_on(len, stream)
            .map(|b| Box::new(b) as Box<dyn RecvBuf>)
            .map_err(|e| format!("a tensor of {len} B on cuda:{index}: {e}"))
    }

    #[cfg(not(feature = "cuda"))]
    #[allow(clippy::unused_self)]
    fn alloc_gpu(&self, index: u32, _len: usize) -> Result<Box<dyn RecvBuf>, String> {
        Err(format!("cuda:{index}: this build has no CUDA support"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_is_always_here_and_a_missing_device_is_a_clear_error() {
        let d = Devices::probe();
        assert_eq!(d.local()[0], Device::CPU);
        let b = d.alloc(Device::CPU, 5).unwrap();
        assert_eq!(b.byte_len(), 5);
        let far = Device::cuda(d.gpus + 1);
        let e = d.alloc(far, 1).err().unwrap();
        assert!(e.contains(&format!("headed for {far}")), "{e}");
        assert!(e.contains("device map"), "{e}");
    }
}
