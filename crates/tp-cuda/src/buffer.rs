//! [`CudaBuffer`]: a tensor's bytes in GPU memory, with the stream its producer and
//! consumer use.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use tp_channel::{ChannelError, Device, RecvBuf, SendBuf};

use crate::driver::{self, CudaError, DeviceMem, OwnedStream, RawStream};

/// Bytes in the memory of GPU `cuda:N`, and the stream that orders work on them.
///
/// Channels respect the stream: a send reads the bytes only after the work enqueued on
/// it before the send, and a receive's bytes are visible to work enqueued on it after
/// the receive completes. The buffer owns its memory when made by
/// [`CudaBuffer::alloc`]; [`CudaBuffer::from_raw`] wraps memory owned elsewhere (a
/// framework's allocator), with an optional owner kept alive alongside.
pub struct CudaBuffer {
    addr: u64,
    len: usize,
    device: u32,
    stream: RawStream,
    _owner: Option<Box<dyn Any + Send + Sync>>,
}

impl fmt::Debug for CudaBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("device", &self.device)
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("stream", &self.stream)
            .finish()
    }
}

impl CudaBuffer {
    /// Allocates `len` bytes on GPU `device`, ordered by `stream`.
    ///
    /// # Errors
    /// No driver, no such device, or the allocation failed.
    pub fn alloc(device: u32, len: usize, stream: RawStream) -> Result<Self, CudaError> {
        let mem = DeviceMem::new(device, len)?;
        Ok(Self {
            addr: mem.addr,
            len,
            device,
            stream,
            _owner: Some(Box::new(mem)),
        })
    }

    /// Allocates `len` bytes on `stream`'s GPU, ordered by `stream`, which the buffer
    /// keeps alive (a receiver that hands buffers to code it does not control, such as
    /// the RPC agent, uses this).
    ///
    /// # Errors
    /// No driver, or the allocation failed.
    pub fn alloc_on(len: usize, stream: Arc<OwnedStream>) -> Result<Self, CudaError> {
        let device = stream.device();
        let mem = DeviceMem::new(device, len)?;
        Ok(Self {
            addr: mem.addr,
            len,
            device,
            stream: stream.raw(),
            _owner: Some(Box::new((mem, stream))),
        })
    }

    /// Wraps `len` bytes at device address `addr`; `owner` (if any) is dropped with the
    /// buffer. Checks with the driver that `addr` is memory of GPU `device`.
    ///
    /// # Safety
    /// `addr..addr + len` must be device memory that stays allocated while this buffer
    /// (or a channel holding it) lives, and `stream` a stream of that device that stays
    /// alive as long.
    ///
    /// # Errors
    /// The driver does not know `addr` as memory of `device`.
    #[allow(unsafe_code)]
    pub unsafe fn from_raw(
        addr: u64,
        len: usize,
        device: u32,
        stream: RawStream,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<Self, CudaError> {
        match driver::pointer_device(addr)? {
            Some(d) if d == device => Ok(Self {
                addr,
                len,
                device,
                stream,
                _owner: owner,
            }),
            other => Err(CudaError {
                op: "CudaBuffer::from_raw",
                message: format!("{addr:#x} is not memory of cuda:{device} (driver: {other:?})"),
            }),
        }
    }

    /// The device address.
    pub const fn addr(&self) -> u64 {
        self.addr
    }

    /// The length in bytes.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no bytes.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The GPU's index (`cuda:N`).
    pub const fn device_index(&self) -> u32 {
        self.device
    }

    /// The stream.
    pub const fn stream(&self) -> RawStream {
        self.stream
    }

    /// Copies `src` (exactly [`CudaBuffer::len`] bytes) in, and waits until it is there.
    ///
    /// # Errors
    /// A length mismatch or the driver's error.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<(), CudaError> {
        if src.len() != self.len {
            return Err(CudaError {
                op: "copy_from_host",
                message: format!("{} bytes into a buffer of {}", src.len(), self.len),
            });
        }
        // Through pinned memory: a pageable source would make the copy synchronous in
        // ways that depend on the driver.
        let mut pinned = driver::Pinned::new(self.device, self.len)?;
        pinned.bytes_mut().copy_from_slice(src);
        driver::copy_async(self.device, self.addr, pinned.addr(), self.len, self.stream)?;
        driver::synchronize(self.device, self.stream)
    }

    /// Copies the bytes out, after the work enqueued on the stream so far.
    ///
    /// # Errors
    /// The driver's error.
    pub fn to_host(&self) -> Result<Vec<u8>, CudaError> {
        let pinned = driver::Pinned::new(self.device, self.len)?;
        driver::copy_async(self.device, pinned.addr(), self.addr, self.len, self.stream)?;
        driver::synchronize(self.device, self.stream)?;
        Ok(pinned.bytes().to_vec())
    }

    /// Enqueues a fill of every byte with `value` on the stream.
    ///
    /// # Errors
    /// The driver's error.
    pub fn fill_async(&mut self, value: u8) -> Result<(), CudaError> {
        driver::memset_async(self.device, self.addr, value, self.len, self.stream)
    }

    /// Waits until the work enqueued on the stream so far is done.
    ///
    /// # Errors
    /// The driver's error.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        driver::synchronize(self.device, self.stream)
    }
}

impl SendBuf for CudaBuffer {
    fn bytes(&self) -> &[u8] {
        &[]
    }

    fn device(&self) -> Device {
        Device::cuda(self.device)
    }

    fn byte_len(&self) -> usize {
        self.len
    }
}

impl RecvBuf for CudaBuffer {
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut []
    }

    fn bytes(&self) -> &[u8] {
        &[]
    }

    fn device(&self) -> Device {
        Device::cuda(self.device)
    }

    fn byte_len(&self) -> usize {
        self.len
    }
}

/// Where an operation's bytes lie on a GPU: a copy of a [`CudaBuffer`]'s fields (the
/// buffer itself stays with the operation, which hands it back).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gpu {
    pub(crate) device: u32,
    pub(crate) addr: u64,
    pub(crate) len: usize,
    pub(crate) stream: RawStream,
}

/// The GPU side of a buffer on `device`: `Ok(None)` for host memory, `Ok(Some(..))` for
/// a [`CudaBuffer`], [`ChannelError::UnsupportedDevice`] for any other device memory.
fn gpu_of(
    channel: &'static str,
    device: Device,
    buf: &dyn Any,
) -> Result<Option<Gpu>, ChannelError> {
    if device == Device::CPU {
        return Ok(None);
    }
    buf.downcast_ref::<CudaBuffer>()
        .map(|b| {
            Some(Gpu {
                device: b.device,
                addr: b.addr,
                len: b.len,
                stream: b.stream,
            })
        })
        .ok_or(ChannelError::UnsupportedDevice { channel, device })
}

/// [`gpu_of`] for a send buffer.
pub(crate) fn send_gpu(
    channel: &'static str,
    buf: &dyn SendBuf,
) -> Result<Option<Gpu>, ChannelError> {
    gpu_of(channel, buf.device(), buf)
}

/// [`gpu_of`] for a receive buffer.
pub(crate) fn recv_gpu(
    channel: &'static str,
    buf: &dyn RecvBuf,
) -> Result<Option<Gpu>, ChannelError> {
    gpu_of(channel, buf.device(), buf)
}

/// The [`CudaBuffer`] behind a send buffer, if it is one.
pub(crate) fn send_cuda(buf: &dyn SendBuf) -> Option<&CudaBuffer> {
    let any: &dyn Any = buf;
    any.downcast_ref()
}

/// The [`CudaBuffer`] behind a receive buffer, if it is one.
pub(crate) fn recv_cuda(buf: &mut dyn RecvBuf) -> Option<&mut CudaBuffer> {
    let any: &mut dyn Any = buf;
    any.downcast_mut()
}

/// The [`CudaBuffer`] behind a receive buffer, checked to hold exactly the `announced`
/// bytes a peer's descriptor says are coming.
///
/// # Errors
/// [`ChannelError::UnsupportedDevice`] for anything but a `CudaBuffer`,
/// [`ChannelError::LengthMismatch`] for another length.
pub(crate) fn recv_cuda_sized<'a>(
    channel: &'static str,
    dst: &'a mut dyn RecvBuf,
    announced: u64,
) -> Result<&'a mut CudaBuffer, ChannelError> {
    let device = dst.device();
    let dst = recv_cuda(dst).ok_or(ChannelError::UnsupportedDevice { channel, device })?;
    if announced != dst.len() as u64 {
        return Err(ChannelError::LengthMismatch {
            expected: dst.len() as u64,
            announced,
        });
    }
    Ok(dst)
}
