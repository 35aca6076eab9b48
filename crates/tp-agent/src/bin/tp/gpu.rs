//! Buffers on a device for the tool's demo and benchmarks: `Vec<u8>` on the CPU,
//! [`tp_cuda::CudaBuffer`] on a GPU (feature `cuda`), each GPU's buffers ordered by one
//! stream of this process. Without the feature or a GPU, asking for GPU memory is a
//! clear error naming why.

use std::any::Any;

use tp_channel::{Device, RecvBuf, SendBuf};
use tp_wire::DeviceKind;

/// A send buffer on `device` holding `data`.
pub(crate) fn send_buf(device: Device, data: Vec<u8>) -> Result<Box<dyn SendBuf>, String> {
    match device.kind {
        DeviceKind::Cpu => Ok(Box::new(data)),
        DeviceKind::Cuda => cuda::filled(device.index, &data).map(|b| Box::new(b) as _),
        _ => Err(format!("{device}: not a device the tool knows")),
    }
}

/// A receive buffer of `len` bytes on `device`.
pub(crate) fn recv_buf(device: Device, len: usize) -> Result<Box<dyn RecvBuf>, String> {
    match device.kind {
        DeviceKind::Cpu => Ok(Box::new(vec![0u8; len])),
        DeviceKind::Cuda => cuda::empty(device.index, len).map(|b| Box::new(b) as _),
        _ => Err(format!("{device}: not a device the tool knows")),
    }
}

/// The bytes of one of this module's buffers (a GPU buffer is copied to the host).
pub(crate) fn contents(buf: &dyn Any) -> Result<Vec<u8>, String> {
    if let Some(v) = buf.downcast_ref::<Vec<u8>>() {
        return Ok(v.clone());
    }
    cuda::contents(buf)
}

/// Waits until a received buffer's bytes are there: a GPU buffer's stream has passed
/// the copies the receive enqueued. Host buffers are there already.
pub(crate) fn settle(buf: &dyn Any) -> Result<(), String> {
    if buf.is::<Vec<u8>>() {
        return Ok(());
    }
    cuda::settle(buf)
}

/// One of this module's buffers, received, to send it (an empty one if it is not).
pub(crate) fn to_send(buf: Box<dyn Any>) -> Box<dyn SendBuf> {
    match buf.downcast::<Vec<u8>>() {
        Ok(v) => v,
        Err(other) => cuda::to_send(other),
    }
}

/// One of this module's buffers, sent, to receive into it (an empty one if it is not).
pub(crate) fn to_recv(buf: Box<dyn Any>) -> Box<dyn RecvBuf> {
    match buf.downcast::<Vec<u8>>() {
        Ok(v) => v,
        Err(other) => cuda::to_recv(other),
    }
}

/// The channel name's device: `cuda:<gpu>` for the CUDA channels, else the CPU.
pub(crate) fn device_for(channel: &str, gpu: u32) -> Device {
    if channel.starts_with("cuda_") {
        Device::cuda(gpu)
    } else {
        Device::CPU
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::any::Any;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock, PoisonError};

    use tp_cuda::{CudaBuffer, OwnedStream};

    /// This process's stream on GPU `index`.
    fn stream(index: u32) -> Result<Arc<OwnedStream>, String> {
        static STREAMS: OnceLock<Mutex<HashMap<u32, Arc<OwnedStream>>>> = OnceLock::new();
        tp_cuda::available()?;
        let mut map = STREAMS
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = map.get(&index) {
            return Ok(s.clone());
        }
        let s = Arc::new(OwnedStream::new(index).map_err(|e| e.to_string())?);
        map.insert(index, s.clone());
        Ok(s)
    }

    pub(super) fn empty(index: u32, len: usize) -> Result<CudaBuffer, String> {
        CudaBuffer::alloc_on(len, stream(index)?).map_err(|e| e.to_string())
    }

    pub(super) fn filled(index: u32, data: &[u8]) -> Result<CudaBuffer, String> {
        let mut b = empty(index, data.len())?;
        b.copy_from_host(data).map_err(|e| e.to_string())?;
        Ok(b)
    }

    pub(super) fn contents(buf: &dyn Any) -> Result<Vec<u8>, String> {
        buf.downcast_ref::<CudaBuffer>()
            .ok_or("not a buffer of the tool's")?
            .to_host()
            .map_err(|e| e.to_string())
    }

    pub(super) fn settle(buf: &dyn Any) -> Result<(), String> {
        buf.downcast_ref::<CudaBuffer>()
            .ok_or("not a buffer of the tool's")?
            .synchronize()
            .map_err(|e| e.to_string())
    }

    pub(super) fn to_send(buf: Box<dyn Any>) -> Box<dyn tp_channel::SendBuf> {
        match buf.downcast::<CudaBuffer>() {
            Ok(b) => b,
            Err(_) => Box::new(Vec::new()),
        }
    }

    pub(super) fn to_recv(buf: Box<dyn Any>) -> Box<dyn tp_channel::RecvBuf> {
        match buf.downcast::<CudaBuffer>() {
            Ok(b) => b,
            Err(_) => Box::new(Vec::new()),
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use std::any::Any;

    const NO: &str = "this build of tp has no CUDA support (cargo feature `cuda`)";

    pub(super) fn empty(_: u32, _: usize) -> Result<Vec<u8>, String> {
        Err(NO.into())
    }

    pub(super) fn filled(_: u32, _: &[u8]) -> Result<Vec<u8>, String> {
        Err(NO.into())
    }

    pub(super) fn contents(_: &dyn Any) -> Result<Vec<u8>, String> {
        Err("not a buffer of the tool's".into())
    }

    pub(super) fn settle(_: &dyn Any) -> Result<(), String> {
        Err("not a buffer of the tool's".into())
    }

    pub(super) fn to_send(_: Box<dyn Any>) -> Box<dyn tp_channel::SendBuf> {
        Box::new(Vec::new())
    }

    pub(super) fn to_recv(_: Box<dyn Any>) -> Box<dyn tp_channel::RecvBuf> {
        Box::new(Vec::new())
    }
}
