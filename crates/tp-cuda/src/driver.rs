//! The CUDA driver API, as far as the channels need it: every `unsafe` call of this
//! crate is here, each wrapped in a safe function or an owning type.
//!
//! libcuda is loaded at run time (cudarc's dynamic loading). cudarc *panics* when a
//! function is called and the library is missing, so [`driver`] checks that the
//! library is there before the first call, and everything else goes through it: on a
//! machine without a driver, nothing here is ever called.
//!
//! Every call runs with the device's primary context pushed on the calling thread and
//! popped afterwards ([`on_device`]): no call creates a context on a device it was not
//! meant for (tensorpipe.md §5.6), and the thread's own current context is left as it
//! was. Primary contexts are retained once, on first use of each device, and kept for
//! the life of the process.

use std::ffi::{c_uint, c_void};
use std::fmt;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cudarc::driver::sys;

/// A failed driver call: what was being done and the driver's error.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct CudaError {
    /// The call.
    pub op: &'static str,
    /// The driver's error name (`CUDA_ERROR_...`), or why the call could not be made.
    pub message: String,
}

impl fmt::Display for CudaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.op, self.message)
    }
}

impl std::error::Error for CudaError {}

impl From<CudaError> for tp_channel::ChannelError {
    fn from(e: CudaError) -> Self {
        Self::device(e.op, e.message)
    }
}

fn check(op: &'static str, r: sys::CUresult) -> Result<(), CudaError> {
    r.result().map_err(|e| CudaError {
        op,
        message: format!("{e:?}"),
    })
}

/// A raw driver handle (context, stream, event): a pointer the driver owns.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
struct Handle(usize);

/// One GPU as the driver reports it.
#[derive(Debug)]
pub(crate) struct DeviceInfo {
    dev: sys::CUdevice,
    /// The device's UUID: global, unlike ordinals (which `CUDA_VISIBLE_DEVICES` renumbers).
    pub(crate) uuid: [u8; 16],
    /// Unified virtual addressing (every device since 2011; the channels rely on it).
    pub(crate) unified_addressing: bool,
    /// `CU_COMPUTEMODE_DEFAULT`: other processes may create contexts on it (cuda_ipc).
    pub(crate) default_compute_mode: bool,
    /// PCI `domain:bus:device`, to pair a GPU with its nearest NIC (cuda_gdr).
    pub(crate) pci: (i32, i32, i32),
    /// Total memory in bytes.
    pub(crate) total_mem: usize,
    /// The product name (`cuDeviceGetName`).
    pub(crate) name: String,
    /// Whether this process's contexts on it are shared through the MPS daemon
    /// (`CU_DEVICE_ATTRIBUTE_MPS_ENABLED`); `None` where the driver does not say.
    /// Without MPS, the GPU switches between processes' contexts, which cuda_ipc's
    /// transfers pay for (BENCHMARKS.md).
    pub(crate) mps: Option<bool>,
    ctx: OnceLock<Result<Handle, CudaError>>,
}

/// The loaded driver and its devices.
#[derive(Debug)]
pub(crate) struct Driver {
    pub(crate) devices: Vec<DeviceInfo>,
    /// `cuDriverGetVersion`: 1000 × major + 10 × minor of the CUDA API it supports.
    pub(crate) version: i32,
}

/// The driver, probed once per process: `Err` says why CUDA cannot be used here.
pub(crate) fn driver() -> Result<&'static Driver, String> {
    static DRIVER: OnceLock<Result<Driver, String>> = OnceLock::new();
    DRIVER.get_or_init(probe).as_ref().map_err(Clone::clone)
}

fn probe() -> Result<Driver, String> {
    // SAFETY: only looks for the library (dlopen); calls nothing in it.
    let present = unsafe { sys::is_culib_present() };
    if !present {
        return Err("libcuda (the NVIDIA driver) is not installed on this machine".to_string());
    }
    // SAFETY: the library is present; cuInit takes no pointers.
    let r = unsafe { sys::cuInit(0) };
    check("cuInit", r).map_err(|e| e.to_string())?;
    let mut count = 0;
    // SAFETY: `count` is a valid place for the result.
    let r = unsafe { sys::cuDeviceGetCount(&raw mut count) };
    check("cuDeviceGetCount", r).map_err(|e| e.to_string())?;
    if count <= 0 {
        return Err("the driver sees no GPU".to_string());
    }
    let devices = (0..count)
        .map(device_info)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let mut version = 0;
    // SAFETY: `version` is a valid place for the result.
    let r = unsafe { sys::cuDriverGetVersion(&raw mut version) };
    check("cuDriverGetVersion", r).map_err(|e| e.to_string())?;
    Ok(Driver { devices, version })
}

fn attribute(dev: sys::CUdevice, attr: sys::CUdevice_attribute) -> Result<i32, CudaError> {
    let mut v = 0;
    // SAFETY: `v` is a valid place for the result; `dev` came from cuDeviceGet.
    let r = unsafe { sys::cuDeviceGetAttribute(&raw mut v, attr, dev) };
    check("cuDeviceGetAttribute", r)?;
    Ok(v)
}

fn device_info(ordinal: i32) -> Result<DeviceInfo, CudaError> {
    use sys::CUdevice_attribute as A;
    let mut dev = 0;
    // SAFETY: `dev` is a valid place for the result.
    let r = unsafe { sys::cuDeviceGet(&raw mut dev, ordinal) };
    check("cuDeviceGet", r)?;
    let mut uuid = sys::CUuuid { bytes: [0; 16] };
    // SAFETY: `uuid` is a valid place for the result.
    let r = unsafe { sys::cuDeviceGetUuid_v2(&raw mut uuid, dev) };
    check("cuDeviceGetUuid", r)?;
    let mut total = 0usize;
    // SAFETY: `total` is a valid place for the result.
    let r = unsafe { sys::cuDeviceTotalMem_v2(&raw mut total, dev) };
    check("cuDeviceTotalMem", r)?;
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: `name` has room for the 256 bytes the call is allowed to write.
    let r = unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 256, dev) };
    check("cuDeviceGetName", r)?;
    let name: Vec<u8> = name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(DeviceInfo {
        dev,
        uuid: uuid.bytes.map(|b| b as u8),
        unified_addressing: attribute(dev, A::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)? == 1,
        default_compute_mode: attribute(dev, A::CU_DEVICE_ATTRIBUTE_COMPUTE_MODE)? == 0,
        pci: (
            attribute(dev, A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
            attribute(dev, A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
            attribute(dev, A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?,
        ),
        total_mem: total,
        name: String::from_utf8_lossy(&name).into_owned(),
        mps: attribute(dev, A::CU_DEVICE_ATTRIBUTE_MPS_ENABLED)
            .ok()
            .map(|v| v == 1),
        ctx: OnceLock::new(),
    })
}

impl Driver {
    fn device(&self, index: u32) -> Result<&DeviceInfo, CudaError> {
        self.devices.get(index as usize).ok_or_else(|| CudaError {
            op: "device lookup",
            message: format!(
                "cuda:{index} does not exist here ({} GPUs)",
                self.devices.len()
            ),
        })
    }

    /// The primary context of device `index`, retained on first use.
    fn context(&self, index: u32) -> Result<Handle, CudaError> {
        let info = self.device(index)?;
        info.ctx
            .get_or_init(|| {
                let mut ctx: sys::CUcontext = std::ptr::null_mut();
                // SAFETY: `ctx` is a valid place for the result; `info.dev` came from
                // cuDeviceGet. The context is retained for the life of the process.
                let r = unsafe { sys::cuDevicePrimaryCtxRetain(&raw mut ctx, info.dev) };
                check("cuDevicePrimaryCtxRetain", r).map(|()| Handle(ctx as usize))
            })
            .clone()
    }

    /// Whether device `a` can read and write device `b`'s memory directly.
    pub(crate) fn can_access_peer(&self, a: u32, b: u32) -> bool {
        if a == b {
            return true;
        }
        let (Ok(da), Ok(db)) = (self.device(a), self.device(b)) else {
            return false;
        };
        let mut can = 0;
        // SAFETY: `can` is a valid place for the result; both devices are real.
        let r = unsafe { sys::cuDeviceCanAccessPeer(&raw mut can, da.dev, db.dev) };
        check("cuDeviceCanAccessPeer", r).is_ok() && can == 1
    }
}

/// Runs `f` with device `index`'s primary context current on this thread.
pub(crate) fn on_device<R>(
    index: u32,
    f: impl FnOnce() -> Result<R, CudaError>,
) -> Result<R, CudaError> {
    let drv = driver().map_err(|message| CudaError {
        op: "loading the CUDA driver",
        message,
    })?;
    let ctx = drv.context(index)?;
    // SAFETY: `ctx` is a retained primary context, never released.
    let r = unsafe { sys::cuCtxPushCurrent_v2(ctx.0 as sys::CUcontext) };
    check("cuCtxPushCurrent", r)?;
    let out = f();
    let mut popped: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: pops the context pushed above; `popped` is a valid place for it.
    let r = unsafe { sys::cuCtxPopCurrent_v2(&raw mut popped) };
    let popped_ok = check("cuCtxPopCurrent", r);
    let out = out?;
    popped_ok?;
    Ok(out)
}

/// A stream handle as users pass it (`CUstream` as an integer; 0 = the legacy default
/// stream). The channels only enqueue work on it; they never destroy it.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Hash)]
pub struct RawStream(pub usize);

impl RawStream {
    fn get(self) -> sys::CUstream {
        self.0 as sys::CUstream
    }
}

/// A stream this crate created (non-blocking), destroyed on drop.
#[derive(Debug)]
pub struct OwnedStream {
    device: u32,
    raw: RawStream,
}

impl OwnedStream {
    /// Creates a stream on device `index`.
    ///
    /// # Errors
    /// No driver, no such device, or the driver's error.
    pub fn new(index: u32) -> Result<Self, CudaError> {
        on_device(index, || {
            let mut s: sys::CUstream = std::ptr::null_mut();
            // SAFETY: `s` is a valid place for the result; a context is current.
            let r = unsafe {
                sys::cuStreamCreate(
                    &raw mut s,
                    sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint,
                )
            };
            check("cuStreamCreate", r)?;
            Ok(Self {
                device: index,
                raw: RawStream(s as usize),
            })
        })
    }

    /// The handle, for buffers.
    pub const fn raw(&self) -> RawStream {
        self.raw
    }

    /// The GPU's index (`cuda:N`).
    pub const fn device(&self) -> u32 {
        self.device
    }

    /// Waits until everything enqueued on the stream is done.
    ///
    /// # Errors
    /// The driver's error (an earlier asynchronous failure shows here).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        synchronize(self.device, self.raw)
    }
}

impl Drop for OwnedStream {
    fn drop(&mut self) {
        let raw = self.raw;
        let _ = on_device(self.device, || {
            // SAFETY: the stream was created by `new` and is destroyed once; work still
            // queued on it completes first (the driver defers the release).
            let r = unsafe { sys::cuStreamDestroy_v2(raw.get()) };
            check("cuStreamDestroy", r)
        });
    }
}

/// Waits on the host until `stream` is idle.
pub(crate) fn synchronize(device: u32, stream: RawStream) -> Result<(), CudaError> {
    on_device(device, || {
        // SAFETY: `stream` is a live stream of this context (the caller's promise
        // behind `CudaBuffer::from_raw`, or one of ours).
        let r = unsafe { sys::cuStreamSynchronize(stream.get()) };
        check("cuStreamSynchronize", r)
    })
}

/// An event, destroyed on drop (pending work keeps what it needs).
#[derive(Debug)]
pub(crate) struct Event {
    device: u32,
    raw: Handle,
}

impl Event {
    /// A new event without timing (the cheapest kind: recorded and queried only).
    pub(crate) fn new(device: u32) -> Result<Self, CudaError> {
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint;
        on_device(device, || {
            let mut e: sys::CUevent = std::ptr::null_mut();
            // SAFETY: `e` is a valid place for the result; a context is current.
            let r = unsafe { sys::cuEventCreate(&raw mut e, flags) };
            check("cuEventCreate", r)?;
            Ok(Self {
                device,
                raw: Handle(e as usize),
            })
        })
    }

    fn get(&self) -> sys::CUevent {
        self.raw.0 as sys::CUevent
    }

    /// Records the event at the current end of `stream`.
    pub(crate) fn record(&self, stream: RawStream) -> Result<(), CudaError> {
        on_device(self.device, || {
            // SAFETY: the event is alive (owned by self); the stream is live.
            let r = unsafe { sys::cuEventRecord(self.get(), stream.get()) };
            check("cuEventRecord", r)
        })
    }

    /// Whether the work before the event's last record is done (`Ok(false)`: not yet).
    ///
    /// # Errors
    /// The driver's error, which includes a failure of that work.
    pub(crate) fn query(&self) -> Result<bool, CudaError> {
        on_device(self.device, || {
            // SAFETY: the event is alive (owned by self).
            done("cuEventQuery", unsafe { sys::cuEventQuery(self.get()) })
        })
    }

    /// Makes later work on `stream` (of device `device`) wait for the event.
    pub(crate) fn wait_on(&self, device: u32, stream: RawStream) -> Result<(), CudaError> {
        on_device(device, || {
            // SAFETY: the event is alive; the stream is live.
            let r = unsafe { sys::cuStreamWaitEvent(stream.get(), self.get(), 0) };
            check("cuStreamWaitEvent", r)
        })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        let raw = self.raw;
        let _ = on_device(self.device, || {
            // SAFETY: the event is destroyed once; work recorded on it completes first.
            let r = unsafe { sys::cuEventDestroy_v2(raw.0 as sys::CUevent) };
            check("cuEventDestroy", r)
        });
    }
}

/// Enqueues a copy of `len` bytes from `src` to `dst` on `stream` (of device
/// `device`). Either address may be device memory of any GPU or pinned host memory:
/// with unified addressing the driver tells them apart.
///
/// The caller keeps both ranges alive and untouched until the stream passes the copy.
pub(crate) fn copy_async(
    device: u32,
    dst: u64,
    src: u64,
    len: usize,
    stream: RawStream,
) -> Result<(), CudaError> {
    if len == 0 {
        return Ok(());
    }
    on_device(device, || {
        // SAFETY: the caller guarantees both ranges are `len` bytes of live memory that
        // stay alive until the copy is done (see above); the stream is live.
        let r = unsafe { sys::cuMemcpyAsync(dst, src, len, stream.get()) };
        check("cuMemcpyAsync", r)
    })
}

/// Fills `len` bytes at `dst` with `value`, in stream order.
pub(crate) fn memset_async(
    device: u32,
    dst: u64,
    value: u8,
    len: usize,
    stream: RawStream,
) -> Result<(), CudaError> {
    on_device(device, || {
        // SAFETY: the caller guarantees `len` bytes of device memory at `dst`.
        let r = unsafe { sys::cuMemsetD8Async(dst, value, len, stream.get()) };
        check("cuMemsetD8Async", r)
    })
}

/// How long [`finished`] re-checks its event between the executor's other tasks before
/// it starts to nap: most copies the channels wait for (a chunk of a few MiB) end
/// within it.
const POLL_SPIN: Duration = Duration::from_micros(100);
/// The first nap after [`POLL_SPIN`]; each later one doubles, up to [`POLL_NAP_MAX`].
const POLL_NAP_MIN: Duration = Duration::from_micros(20);
/// The longest nap: how late, at most, a long copy's end is noticed.
const POLL_NAP_MAX: Duration = Duration::from_micros(250);

/// A future that resolves once everything enqueued on `stream` so far is done, or
/// with the driver's error if that work failed (a failed stream never leaves a waiter
/// hanging).
///
/// An event is recorded on the stream now and queried until it completes: back to
/// back (yielding to the executor's other tasks between queries) for
/// [`POLL_SPIN`], then with naps that grow to [`POLL_NAP_MAX`]. Waiting through the
/// driver's stream callback instead took a median of 143 µs for a 1 MiB copy of about
/// 20 µs on an H200 (BENCHMARKS.md, tp-cuda), and a callback holds up the stream's
/// later work until it returns.
pub(crate) fn finished(
    device: u32,
    stream: RawStream,
) -> Result<impl Future<Output = Result<(), CudaError>> + Send + 'static, CudaError> {
    // Work already done needs no event (a send's producer usually finished long ago).
    let event = if stream_idle(device, stream)? {
        None
    } else {
        let event = Event::new(device)?;
        event.record(stream)?;
        Some(event)
    };
    Ok(async move {
        let Some(event) = event else {
            return Ok(());
        };
        let start = Instant::now();
        let mut nap = POLL_NAP_MIN;
        while !event.query()? {
            if start.elapsed() < POLL_SPIN {
                tp_transport::spin::yield_once().await;
            } else {
                async_io::Timer::after(nap).await;
                nap = (nap * 2).min(POLL_NAP_MAX);
            }
        }
        Ok(())
    })
}

/// Whether everything enqueued on `stream` is done (`cuStreamQuery`, answered on the
/// host).
fn stream_idle(device: u32, stream: RawStream) -> Result<bool, CudaError> {
    on_device(device, || {
        // SAFETY: `stream` is a live stream of this context.
        done("cuStreamQuery", unsafe { sys::cuStreamQuery(stream.get()) })
    })
}

/// A query's answer: `Ok(false)` for "not yet", `Ok(true)` for done, else the error
/// (which includes a failure of the work queried).
fn done(op: &'static str, r: sys::CUresult) -> Result<bool, CudaError> {
    match r {
        sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
        r => check(op, r).map(|()| true),
    }
}

/// Page-locked host memory, which the GPU's copy engines reach directly.
pub(crate) struct Pinned {
    ptr: Handle,
    len: usize,
    /// The device whose context allocated it (portable: usable from every context).
    device: u32,
}

impl fmt::Debug for Pinned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pinned").field("len", &self.len).finish()
    }
}

impl Pinned {
    pub(crate) fn new(device: u32, len: usize) -> Result<Self, CudaError> {
        on_device(device, || {
            let mut p: *mut c_void = std::ptr::null_mut();
            // SAFETY: `p` is a valid place for the result; a context is current.
            let r = unsafe {
                sys::cuMemHostAlloc(&raw mut p, len.max(1), sys::CU_MEMHOSTALLOC_PORTABLE)
            };
            check("cuMemHostAlloc", r)?;
            Ok(Self {
                ptr: Handle(p as usize),
                len,
                device,
            })
        })
    }

    pub(crate) const fn addr(&self) -> u64 {
        self.ptr.0 as u64
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        // SAFETY: `len` bytes were allocated at `ptr` and live as long as `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.0 as *const u8, self.len) }
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.0 as *mut u8, self.len) }
    }
}

// SAFETY: page-locked host memory is plain memory owned by this value alone.
unsafe impl Send for Pinned {}
// SAFETY: shared access only reads (`bytes`).
unsafe impl Sync for Pinned {}

impl Drop for Pinned {
    fn drop(&mut self) {
        let p = self.ptr;
        let _ = on_device(self.device, || {
            // SAFETY: allocated by cuMemHostAlloc in `new`, freed once.
            let r = unsafe { sys::cuMemFreeHost(p.0 as *mut c_void) };
            check("cuMemFreeHost", r)
        });
    }
}

/// Host memory this process mapped (not allocated by CUDA), page-locked and made
/// reachable by every context's copy engines (`cuMemHostRegister`, portable) until
/// dropped. cuda_basic registers its shared staging slots this way.
pub(crate) struct HostRegistration {
    ptr: Handle,
    device: u32,
}

impl fmt::Debug for HostRegistration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostRegistration").finish_non_exhaustive()
    }
}

impl HostRegistration {
    /// Registers `len` bytes at `ptr` (page aligned), with `device`'s context current.
    ///
    /// # Safety
    /// `ptr..ptr + len` is a mapping of this process that stays mapped until the
    /// registration is dropped.
    pub(crate) unsafe fn new(device: u32, ptr: *mut u8, len: usize) -> Result<Self, CudaError> {
        on_device(device, || {
            // SAFETY: the caller vouches for the mapping; a context is current.
            let r = unsafe {
                sys::cuMemHostRegister_v2(ptr.cast(), len, sys::CU_MEMHOSTREGISTER_PORTABLE)
            };
            check("cuMemHostRegister", r)?;
            Ok(Self {
                ptr: Handle(ptr as usize),
                device,
            })
        })
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        let p = self.ptr;
        let _ = on_device(self.device, || {
            // SAFETY: registered in `new`, unregistered once, while still mapped.
            let r = unsafe { sys::cuMemHostUnregister(p.0 as *mut c_void) };
            check("cuMemHostUnregister", r)
        });
    }
}

/// Device memory this crate allocated, freed on drop.
#[derive(Debug)]
pub(crate) struct DeviceMem {
    pub(crate) addr: u64,
    pub(crate) device: u32,
}

impl DeviceMem {
    pub(crate) fn new(device: u32, len: usize) -> Result<Self, CudaError> {
        on_device(device, || {
            let mut p: sys::CUdeviceptr = 0;
            // SAFETY: `p` is a valid place for the result; a context is current.
            let r = unsafe { sys::cuMemAlloc_v2(&raw mut p, len.max(1)) };
            check("cuMemAlloc", r)?;
            Ok(Self { addr: p, device })
        })
    }
}

impl Drop for DeviceMem {
    fn drop(&mut self) {
        let addr = self.addr;
        let _ = on_device(self.device, || {
            // SAFETY: allocated by cuMemAlloc in `new`, freed once; cuMemFree waits for
            // work using it.
            let r = unsafe { sys::cuMemFree_v2(addr) };
            check("cuMemFree", r)
        });
    }
}

/// The IPC handle another process maps the allocation at `base` (on `device`) by.
///
/// # Errors
/// The driver's: `base` is not the start of a `cuMemAlloc` allocation (memory from
/// `cuMemCreate` or a stream-ordered pool has no such handle).
pub(crate) fn export(device: u32, base: u64) -> Result<[u8; 64], CudaError> {
    on_device(device, || {
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `h` is a valid place for the result; the driver validates `base`.
        let r = unsafe { sys::cuIpcGetMemHandle(&raw mut h, base) };
        check("cuIpcGetMemHandle", r)?;
        Ok(h.reserved.map(|b| b as u8))
    })
}

/// Another process's device memory, mapped here through its IPC handle; unmapped on
/// drop.
#[derive(Debug)]
pub(crate) struct MappedMem {
    pub(crate) addr: u64,
    /// The mapped allocation's size, as this process's driver reports it.
    pub(crate) size: usize,
    device: u32,
}

impl MappedMem {
    pub(crate) fn open(device: u32, handle: &[u8; 64]) -> Result<Self, CudaError> {
        on_device(device, || {
            let h = sys::CUipcMemHandle {
                reserved: handle.map(|b| b as std::ffi::c_char),
            };
            let mut p: sys::CUdeviceptr = 0;
            // SAFETY: `p` is a valid place for the result; the driver validates the
            // handle (a bad one is an error).
            let r = unsafe {
                sys::cuIpcOpenMemHandle_v2(
                    &raw mut p,
                    h,
                    sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as c_uint,
                )
            };
            check("cuIpcOpenMemHandle", r)?;
            // Owned from here: unmapped on drop if the size cannot be read.
            let mut mapped = Self {
                addr: p,
                size: 0,
                device,
            };
            mapped.size = address_range(p)?.1;
            Ok(mapped)
        })
    }
}

impl Drop for MappedMem {
    fn drop(&mut self) {
        let addr = self.addr;
        let _ = on_device(self.device, || {
            // SAFETY: mapped by cuIpcOpenMemHandle in `open`, closed once.
            let r = unsafe { sys::cuIpcCloseMemHandle(addr) };
            check("cuIpcCloseMemHandle", r)
        });
    }
}

/// The device that owns the memory at `addr`, or `None` for memory no GPU owns.
pub(crate) fn pointer_device(addr: u64) -> Result<Option<u32>, CudaError> {
    driver().map_err(|message| CudaError {
        op: "loading the CUDA driver",
        message,
    })?;
    let mut ordinal: i32 = -1;
    // SAFETY: `ordinal` is a valid place for the attribute (an int); the driver
    // validates `addr` itself and fails for memory it does not know.
    let r = unsafe {
        sys::cuPointerGetAttribute(
            (&raw mut ordinal).cast::<c_void>(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            addr,
        )
    };
    match check("cuPointerGetAttribute", r) {
        Ok(()) => Ok(u32::try_from(ordinal).ok()),
        Err(_) => Ok(None),
    }
}

/// The allocation a device pointer lies in (cuda_ipc exports whole allocations,
/// cuda_gdr registers them).
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub(crate) struct Allocation {
    pub(crate) base: u64,
    pub(crate) size: usize,
    /// The driver's id of the allocation, never reused while the process lives, so a
    /// cache keyed by it cannot mistake a new allocation at a freed one's address.
    pub(crate) buffer_id: u64,
}

/// The start and size of the allocation containing `addr`, in the current context.
fn address_range(addr: u64) -> Result<(u64, usize), CudaError> {
    let mut base: sys::CUdeviceptr = 0;
    let mut size: usize = 0;
    // SAFETY: valid out-pointers; the driver validates `addr`.
    let r = unsafe { sys::cuMemGetAddressRange_v2(&raw mut base, &raw mut size, addr) };
    check("cuMemGetAddressRange", r)?;
    Ok((base, size))
}

/// The allocation containing `addr` on `device`.
pub(crate) fn allocation(device: u32, addr: u64) -> Result<Allocation, CudaError> {
    on_device(device, || {
        let (base, size) = address_range(addr)?;
        let mut buffer_id: u64 = 0;
        // SAFETY: the buffer id attribute is an unsigned long long; `buffer_id` holds one.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&raw mut buffer_id).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_BUFFER_ID,
                base,
            )
        };
        check("cuPointerGetAttribute(BUFFER_ID)", r)?;
        Ok(Allocation {
            base,
            size,
            buffer_id,
        })
    })
}

#[cfg(feature = "ibv")]
/// [`allocation`], and turns on synchronous memory operations for it, which
/// GPUDirect RDMA needs so that the NIC's accesses and CUDA's own copies of the memory
/// are ordered.
pub(crate) fn allocation_of(device: u32, addr: u64) -> Result<Allocation, CudaError> {
    let alloc = allocation(device, addr)?;
    on_device(device, || {
        let on: c_uint = 1;
        // SAFETY: the sync-memops attribute takes an unsigned int; `on` outlives the call.
        let r = unsafe {
            sys::cuPointerSetAttribute(
                (&raw const on).cast::<c_void>(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
                alloc.base,
            )
        };
        check("cuPointerSetAttribute(SYNC_MEMOPS)", r)?;
        Ok(alloc)
    })
}

#[cfg(feature = "ibv")]
/// Makes writes the NIC completed into `device`'s memory visible to work launched on
/// it afterwards.
pub(crate) fn flush_rdma_writes(device: u32) -> Result<(), CudaError> {
    on_device(device, || {
        // SAFETY: a plain driver call on the current context.
        let r = unsafe {
            sys::cuFlushGPUDirectRDMAWrites(
                sys::CUflushGPUDirectRDMAWritesTarget::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TARGET_CURRENT_CTX,
                sys::CUflushGPUDirectRDMAWritesScope::CU_FLUSH_GPU_DIRECT_RDMA_WRITES_TO_OWNER,
            )
        };
        check("cuFlushGPUDirectRDMAWrites", r)
    })
}
