//! The verbs calls of the ibv transport — its only unsafe code.
//!
//! [`ibverbs`] finds the devices (and so decides viability); the data path needs what
//! its safe API does not offer — RDMA write-with-immediate, completion channels for
//! sleeping instead of busy-polling, registration of our own buffers — so this module
//! calls the same library through `ibverbs-sys`, the bindings `ibverbs` itself is built
//! on. Each object owns its verbs handle and releases it on drop, in the order verbs
//! requires (queue pair before its completion queue and memory regions).
//!
//! Thread safety: libibverbs objects may be used from any thread, and every mutable use
//! here goes through `&mut self` or a caller's mutex.

use std::alloc::Layout;
use std::ffi::CStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use ibverbs_sys as ffi;

/// Page alignment for registered buffers.
const ALIGN: usize = 4096;

/// What a verbs call returned on failure.
fn last_error(call: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{call}: {e}"))
}

fn errno_error(call: &str, errno: i32) -> io::Error {
    let e = io::Error::from_raw_os_error(errno);
    io::Error::new(e.kind(), format!("{call}: {e}"))
}

/// Lists the RDMA devices by name. An error (ENOSYS: no kernel support) or an empty list
/// means the transport is not viable.
pub(crate) fn device_names() -> io::Result<Vec<String>> {
    let list = ibverbs::devices()?;
    Ok(list
        .iter()
        .map(|d| {
            d.name()
                .map_or_else(|| "?".to_string(), |n| n.to_string_lossy().into_owned())
        })
        .collect())
}

/// Where on a device a transport lives.
#[derive(Clone, Debug)]
pub(crate) struct DeviceChoice {
    /// Device name; `None` takes the first.
    pub(crate) name: Option<String>,
    /// Port number (from 1).
    pub(crate) port: u8,
    /// GID table index (RoCE needs a GID; InfiniBand uses it only across subnets).
    pub(crate) gid_index: u8,
}

/// An open device: its context, one protection domain, and what the port reported.
pub(crate) struct Device {
    ctx: NonNull<ffi::ibv_context>,
    pd: NonNull<ffi::ibv_pd>,
    pub(crate) name: String,
    pub(crate) port: u8,
    pub(crate) lid: u16,
    pub(crate) active_mtu: u32,
    pub(crate) max_message: u32,
    pub(crate) gid_index: u8,
    pub(crate) gid: [u8; 16],
    /// RDMA reads a queue pair may have outstanding, as initiator and as responder
    /// (the device's `max_qp_init_rd_atom` and `max_qp_rd_atom`, the smaller, at least 1).
    pub(crate) max_rd_atomic: u8,
}

// SAFETY: libibverbs contexts and protection domains are thread-safe; `Device` hands out
// no interior references.
unsafe impl Send for Device {}
// SAFETY: as above; every method takes `&self` and only calls thread-safe verbs.
unsafe impl Sync for Device {}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("lid", &self.lid)
            .finish_non_exhaustive()
    }
}

/// The device list, freed on drop.
struct DeviceList {
    list: NonNull<*mut ffi::ibv_device>,
    len: usize,
}

impl DeviceList {
    fn get() -> io::Result<Self> {
        let mut n: i32 = 0;
        // SAFETY: `n` is a valid out-pointer; the list is freed in `Drop`.
        let list = unsafe { ffi::ibv_get_device_list(&raw mut n) };
        let list = NonNull::new(list).ok_or_else(|| last_error("ibv_get_device_list"))?;
        Ok(Self {
            list,
            len: usize::try_from(n).unwrap_or(0),
        })
    }

    fn device(&self, i: usize) -> Option<*mut ffi::ibv_device> {
        if i >= self.len {
            return None;
        }
        // SAFETY: `i < len`, and the list holds `len` device pointers.
        let dev = unsafe { *self.list.as_ptr().wrapping_add(i) };
        (!dev.is_null()).then_some(dev)
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from `ibv_get_device_list` and is freed once.
        unsafe { ffi::ibv_free_device_list(self.list.as_ptr()) };
    }
}

fn device_name(dev: *mut ffi::ibv_device) -> String {
    // SAFETY: `dev` is a live entry of a device list.
    let name = unsafe { ffi::ibv_get_device_name(dev) };
    if name.is_null() {
        return "?".to_string();
    }
    // SAFETY: libibverbs returns a NUL-terminated name owned by the device entry.
    let name = unsafe { CStr::from_ptr(name) };
    name.to_string_lossy().into_owned()
}

impl Device {
    /// Opens the chosen device and checks that its port is up.
    pub(crate) fn open(choice: &DeviceChoice) -> io::Result<Self> {
        let list = DeviceList::get()?;
        let mut found = None;
        for i in 0..list.len {
            let Some(dev) = list.device(i) else { continue };
            let name = device_name(dev);
            if choice.name.as_deref().is_none_or(|want| want == name) {
                found = Some((dev, name));
                break;
            }
        }
        let (dev, name) = found.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                match &choice.name {
                    Some(n) => format!("no RDMA device named {n}"),
                    None => "no RDMA device".to_string(),
                },
            )
        })?;
        // SAFETY: `dev` is a live entry of `list`, which outlives this call.
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        let ctx = NonNull::new(ctx).ok_or_else(|| last_error("ibv_open_device"))?;
        let closer = CloseOnError(Some(ctx));

        let mut attr = ffi::ibv_port_attr::default();
        // SAFETY: `ctx` is open; the compat struct is a prefix of `ibv_port_attr`, which is
        // what the C macro `ibv_query_port` passes too.
        let errno = unsafe {
            ffi::ibv_query_port(
                ctx.as_ptr(),
                choice.port,
                (&raw mut attr).cast::<ffi::_compat_ibv_port_attr>(),
            )
        };
        if errno != 0 {
            return Err(errno_error("ibv_query_port", errno));
        }
        if attr.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(io::Error::other(format!(
                "port {} of {name} is not active",
                choice.port
            )));
        }
        let mut gid = ffi::ibv_gid::default();
        // SAFETY: `ctx` is open and `gid` is a valid out-pointer.
        let errno = unsafe {
            ffi::ibv_query_gid(
                ctx.as_ptr(),
                choice.port,
                i32::from(choice.gid_index),
                &raw mut gid,
            )
        };
        if errno != 0 {
            return Err(errno_error("ibv_query_gid", errno));
        }
        // SAFETY: every bit pattern of the union is a valid `[u8; 16]`.
        let gid = unsafe { gid.raw };
        let mut dattr = ffi::ibv_device_attr::default();
        // SAFETY: `ctx` is open and `dattr` is a valid out-pointer.
        let errno = unsafe { ffi::ibv_query_device(ctx.as_ptr(), &raw mut dattr) };
        if errno != 0 {
            return Err(errno_error("ibv_query_device", errno));
        }
        let max_rd_atomic = dattr
            .max_qp_rd_atom
            .min(dattr.max_qp_init_rd_atom)
            .clamp(1, i32::from(u8::MAX));
        // SAFETY: `ctx` is open.
        let pd = unsafe { ffi::ibv_alloc_pd(ctx.as_ptr()) };
        let pd = NonNull::new(pd).ok_or_else(|| last_error("ibv_alloc_pd"))?;
        std::mem::forget(closer);
        Ok(Self {
            ctx,
            pd,
            name,
            port: choice.port,
            lid: attr.lid,
            active_mtu: attr.active_mtu,
            max_message: attr.max_msg_sz,
            gid_index: choice.gid_index,
            gid,
            max_rd_atomic: u8::try_from(max_rd_atomic).unwrap_or(1),
        })
    }
}

/// Closes a device context on an early return from [`Device::open`].
struct CloseOnError(Option<NonNull<ffi::ibv_context>>);

impl Drop for CloseOnError {
    fn drop(&mut self) {
        if let Some(ctx) = self.0.take() {
            // SAFETY: the context is open and nothing else refers to it yet.
            unsafe { ffi::ibv_close_device(ctx.as_ptr()) };
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every region and queue pair holds an `Arc<Device>`, so none is left.
        unsafe { ffi::ibv_dealloc_pd(self.pd.as_ptr()) };
        // SAFETY: as above; the context is closed once.
        unsafe { ffi::ibv_close_device(self.ctx.as_ptr()) };
    }
}

/// A registration with the device's protection domain, deregistered on drop.
struct Mr {
    mr: NonNull<ffi::ibv_mr>,
    _dev: Arc<Device>,
}

impl Mr {
    /// Registers `len` bytes at `addr` with `access`.
    ///
    /// # Safety
    /// `addr..addr + len` must stay allocated until the registration is dropped.
    unsafe fn new(
        dev: &Arc<Device>,
        addr: *mut std::ffi::c_void,
        len: usize,
        access: ffi::ibv_access_flags,
    ) -> io::Result<Self> {
        // SAFETY: the caller keeps the memory allocated while registered; the protection
        // domain is live (`dev` is held).
        let mr = unsafe {
            ffi::ibv_reg_mr(
                dev.pd.as_ptr(),
                addr,
                len,
                i32::try_from(access.0).unwrap_or(i32::MAX),
            )
        };
        let mr = NonNull::new(mr).ok_or_else(|| last_error("ibv_reg_mr"))?;
        Ok(Self {
            mr,
            _dev: dev.clone(),
        })
    }

    fn lkey(&self) -> u32 {
        // SAFETY: `mr` is registered until drop; the field is written once by libibverbs.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    fn rkey(&self) -> u32 {
        // SAFETY: as in `lkey`.
        unsafe { (*self.mr.as_ptr()).rkey }
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered in `new`, deregistered once. The queue pairs that used it
        // were destroyed before, or their requests waited for (the owners' duty).
        unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

// SAFETY: a memory region handle is usable from any thread; we only read its keys.
unsafe impl Send for Mr {}
// SAFETY: as above.
unsafe impl Sync for Mr {}

/// Page-aligned zeroed bytes we own, freed on drop.
struct Alloc {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Drop for Alloc {
    fn drop(&mut self) {
        // SAFETY: allocated in `Region::new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

/// A buffer of our own, registered with the device.
pub(crate) struct Region {
    // Field order is drop order: deregister, then free.
    mr: Mr,
    mem: Alloc,
}

// SAFETY: the buffer is plain memory we own; copies in and out go through raw pointers
// under the caller's synchronisation.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

impl Region {
    /// Allocates `len` zeroed, page-aligned bytes and registers them; `remote_write` lets
    /// the peer RDMA-write into them.
    pub(crate) fn new(dev: &Arc<Device>, len: usize, remote_write: bool) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        let mem = Alloc { ptr, layout };
        let mut access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            access |= ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE;
        }
        // SAFETY: `mem` is our allocation; the region drops `mr` before it.
        let mr = unsafe { Mr::new(dev, ptr.as_ptr().cast(), layout.size(), access) }?;
        Ok(Self { mr, mem })
    }

    pub(crate) fn len(&self) -> usize {
        self.mem.layout.size()
    }

    pub(crate) fn addr(&self) -> u64 {
        self.mem.ptr.as_ptr() as u64
    }

    pub(crate) fn rkey(&self) -> u32 {
        self.mr.rkey()
    }

    /// Copies `src` in at `offset`, wrapping around the end (a ring). Bytes beyond the
    /// region are not copied.
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) {
        let len = self.len();
        let offset = offset % len;
        let (head, tail) = src.split_at(src.len().min(len - offset));
        let tail = tail.get(..tail.len().min(offset)).unwrap_or_default();
        let base = self.mem.ptr.as_ptr();
        // SAFETY: `offset + head.len() <= len`; `src` cannot overlap memory we own.
        unsafe { ptr::copy_nonoverlapping(head.as_ptr(), base.wrapping_add(offset), head.len()) };
        // SAFETY: `tail.len() <= offset <= len`, from the start of the region.
        unsafe { ptr::copy_nonoverlapping(tail.as_ptr(), base, tail.len()) };
    }

    /// Copies out into `dst` from `offset`, wrapping around the end.
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        let len = self.len();
        let offset = offset % len;
        let (head, tail) = dst.split_at_mut(dst.len().min(len - offset));
        let tail_len = tail.len().min(offset);
        let tail = tail.get_mut(..tail_len).unwrap_or_default();
        let base = self.mem.ptr.as_ptr();
        // SAFETY: `offset + head.len() <= len`; `dst` cannot overlap memory we own.
        unsafe {
            ptr::copy_nonoverlapping(base.wrapping_add(offset), head.as_mut_ptr(), head.len())
        };
        // SAFETY: `tail.len() <= offset <= len`, from the start of the region.
        unsafe { ptr::copy_nonoverlapping(base, tail.as_mut_ptr(), tail.len()) };
    }
}

/// Memory the caller owns — host memory, or GPU memory where NVIDIA's peer-memory
/// module is loaded — registered with an [`RdmaDevice`](super::RdmaDevice) for local
/// writes and remote reads; deregistered on drop.
pub struct MemoryRegion {
    mr: Mr,
    addr: u64,
    len: usize,
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl MemoryRegion {
    /// Registers `len` bytes at `addr`.
    ///
    /// # Safety
    /// `addr..addr + len` must stay allocated until the region is dropped. While a
    /// read into it is in progress, nothing else may use the bytes being read.
    ///
    /// # Errors
    /// The device's refusal (unpinnable memory, no peer-memory support, limits).
    pub unsafe fn register(dev: &super::RdmaDevice, addr: u64, len: usize) -> io::Result<Self> {
        let access = ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        // SAFETY: the caller's contract is `Mr::new`'s.
        let mr = unsafe { Mr::new(dev.device(), addr as *mut std::ffi::c_void, len, access) }?;
        Ok(Self { mr, addr, len })
    }

    /// Start of the registered span.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length of the registered span.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the span is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `addr..addr + len` lies inside the region.
    pub fn covers(&self, addr: u64, len: u64) -> bool {
        addr >= self.addr
            && addr
                .checked_add(len)
                .is_some_and(|end| end <= self.addr.saturating_add(self.len as u64))
    }

    /// The key a peer needs to read this memory.
    pub fn rkey(&self) -> u32 {
        self.mr.rkey()
    }
}

/// What a work completion reported.
#[derive(Clone, Debug, Eq, PartialEq)]
pub(crate) enum Completion {
    /// A send-queue request (write, read or ack) finished.
    Sent {
        /// The request's id.
        wr_id: u64,
    },
    /// The peer's RDMA write-with-immediate landed in our inbox.
    Landed {
        /// Its immediate value: the byte count.
        imm: u32,
    },
    /// The peer's send-with-immediate (an acknowledgement) arrived.
    Acked {
        /// Its immediate value: the bytes the peer consumed.
        imm: u32,
    },
    /// A request failed (or was flushed by an error state).
    Failed {
        /// The request's id.
        wr_id: u64,
        /// libibverbs' description of the status.
        status: String,
    },
}

/// The peer's half of a connection's setup.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RemoteQp {
    pub(crate) qpn: u32,
    pub(crate) psn: u32,
    pub(crate) lid: u16,
    pub(crate) gid: [u8; 16],
    pub(crate) mtu: u32,
}

impl From<&super::proto::SetupInfo> for RemoteQp {
    fn from(theirs: &super::proto::SetupInfo) -> Self {
        Self {
            qpn: theirs.qpn,
            psn: theirs.psn,
            lid: theirs.lid,
            gid: theirs.gid,
            mtu: u32::from(theirs.mtu),
        }
    }
}

/// One connection's queue pair, with its own completion queue and channel.
pub(crate) struct QueuePair {
    qp: NonNull<ffi::ibv_qp>,
    cq: NonNull<ffi::ibv_cq>,
    channel: NonNull<ffi::ibv_comp_channel>,
    events_to_ack: u32,
    /// Outstanding RDMA reads allowed, as initiator and responder.
    rd_atomic: u8,
    dev: Arc<Device>,
}

// SAFETY: verbs objects may be used from any thread; mutation goes through `&mut self`.
unsafe impl Send for QueuePair {}
// SAFETY: the `&self` methods are thread-safe verbs (post, poll, notify).
unsafe impl Sync for QueuePair {}

impl QueuePair {
    /// Creates an RC queue pair in the INIT state, allowing remote writes.
    pub(crate) fn new(dev: &Arc<Device>, send_depth: u32, recv_depth: u32) -> io::Result<Self> {
        Self::create(
            dev,
            send_depth,
            recv_depth,
            ffi::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE,
            1,
        )
    }

    /// Creates an RC queue pair in the INIT state for one-sided reads: the peer may
    /// read memory we registered, and we read the peer's, with as many reads
    /// outstanding as the device allows.
    pub(crate) fn for_reads(dev: &Arc<Device>, send_depth: u32) -> io::Result<Self> {
        Self::create(
            dev,
            send_depth,
            1,
            ffi::ibv_access_flags::IBV_ACCESS_REMOTE_READ,
            dev.max_rd_atomic,
        )
    }

    fn create(
        dev: &Arc<Device>,
        send_depth: u32,
        recv_depth: u32,
        remote: ffi::ibv_access_flags,
        rd_atomic: u8,
    ) -> io::Result<Self> {
        // SAFETY: the context is open.
        let channel = unsafe { ffi::ibv_create_comp_channel(dev.ctx.as_ptr()) };
        let channel = NonNull::new(channel).ok_or_else(|| last_error("ibv_create_comp_channel"))?;
        let mut this = Self {
            qp: NonNull::dangling(),
            cq: NonNull::dangling(),
            channel,
            events_to_ack: 0,
            rd_atomic: rd_atomic.max(1),
            dev: dev.clone(),
        };
        rustix::io::ioctl_fionbio(this.fd(), true).map_err(io::Error::from)?;
        let cqe = i32::try_from(send_depth.saturating_add(recv_depth)).unwrap_or(i32::MAX);
        // SAFETY: the context and channel are live; no cq_context is used.
        let cq = unsafe {
            ffi::ibv_create_cq(dev.ctx.as_ptr(), cqe, ptr::null_mut(), channel.as_ptr(), 0)
        };
        // On an early return, `Drop` releases what exists so far.
        this.cq = NonNull::new(cq).ok_or_else(|| last_error("ibv_create_cq"))?;
        let mut init = ffi::ibv_qp_init_attr {
            qp_context: ptr::null_mut(),
            send_cq: cq,
            recv_cq: cq,
            srq: ptr::null_mut(),
            cap: ffi::ibv_qp_cap {
                max_send_wr: send_depth,
                max_recv_wr: recv_depth,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: the protection domain and CQ are live; `init` is a valid attribute set.
        let qp = unsafe { ffi::ibv_create_qp(dev.pd.as_ptr(), &raw mut init) };
        this.qp = NonNull::new(qp).ok_or_else(|| last_error("ibv_create_qp"))?;
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_INIT,
            pkey_index: 0,
            port_num: dev.port,
            qp_access_flags: (ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE | remote).0,
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_PKEY_INDEX
            | ffi::ibv_qp_attr_mask::IBV_QP_PORT
            | ffi::ibv_qp_attr_mask::IBV_QP_ACCESS_FLAGS;
        this.modify(&mut attr, mask, "ibv_modify_qp(INIT)")?;
        Ok(this)
    }

    fn modify(
        &self,
        attr: &mut ffi::ibv_qp_attr,
        mask: ffi::ibv_qp_attr_mask,
        call: &str,
    ) -> io::Result<()> {
        // SAFETY: the queue pair is live; `attr` is valid for the fields in `mask`.
        let errno = unsafe {
            ffi::ibv_modify_qp(
                self.qp.as_ptr(),
                attr,
                i32::try_from(mask.0).unwrap_or(i32::MAX),
            )
        };
        if errno == 0 {
            Ok(())
        } else {
            Err(errno_error(call, errno))
        }
    }

    /// The queue pair number the peer connects to.
    pub(crate) fn qpn(&self) -> u32 {
        // SAFETY: the queue pair is live; `qp_num` is fixed at creation.
        unsafe { (*self.qp.as_ptr()).qp_num }
    }

    /// Connects to the peer: INIT → RTR → RTS, with the original's timers (RNR timer
    /// ≈10 ms, timeout ≈67 ms, 7 retries, infinite RNR retries).
    pub(crate) fn connect(&self, local_psn: u32, remote: &RemoteQp) -> io::Result<()> {
        let mut rtr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTR,
            path_mtu: remote.mtu.min(self.dev.active_mtu),
            dest_qp_num: remote.qpn,
            rq_psn: remote.psn,
            max_dest_rd_atomic: self.rd_atomic,
            min_rnr_timer: 20,
            ah_attr: ffi::ibv_ah_attr {
                dlid: remote.lid,
                sl: 0,
                src_path_bits: 0,
                port_num: self.dev.port,
                ..Default::default()
            },
            ..Default::default()
        };
        // No LID (RoCE), or a GID given: route globally.
        if remote.lid == 0 || remote.gid != [0; 16] {
            rtr.ah_attr.is_global = 1;
            rtr.ah_attr.grh.dgid = ffi::ibv_gid { raw: remote.gid };
            rtr.ah_attr.grh.sgid_index = self.dev.gid_index;
            rtr.ah_attr.grh.hop_limit = 64;
        }
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_AV
            | ffi::ibv_qp_attr_mask::IBV_QP_PATH_MTU
            | ffi::ibv_qp_attr_mask::IBV_QP_DEST_QPN
            | ffi::ibv_qp_attr_mask::IBV_QP_RQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_DEST_RD_ATOMIC
            | ffi::ibv_qp_attr_mask::IBV_QP_MIN_RNR_TIMER;
        self.modify(&mut rtr, mask, "ibv_modify_qp(RTR)")?;
        let mut rts = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_RTS,
            sq_psn: local_psn,
            timeout: 14,
            retry_cnt: 7,
            rnr_retry: 7,
            max_rd_atomic: self.rd_atomic,
            ..Default::default()
        };
        let mask = ffi::ibv_qp_attr_mask::IBV_QP_STATE
            | ffi::ibv_qp_attr_mask::IBV_QP_SQ_PSN
            | ffi::ibv_qp_attr_mask::IBV_QP_TIMEOUT
            | ffi::ibv_qp_attr_mask::IBV_QP_RETRY_CNT
            | ffi::ibv_qp_attr_mask::IBV_QP_RNR_RETRY
            | ffi::ibv_qp_attr_mask::IBV_QP_MAX_QP_RD_ATOMIC;
        self.modify(&mut rts, mask, "ibv_modify_qp(RTS)")
    }

    /// Moves the queue pair to the error state: outstanding requests flush with errors
    /// and the peer's next operation fails.
    pub(crate) fn set_error(&self) {
        let mut attr = ffi::ibv_qp_attr {
            qp_state: ffi::ibv_qp_state::IBV_QPS_ERR,
            ..Default::default()
        };
        let _ = self.modify(
            &mut attr,
            ffi::ibv_qp_attr_mask::IBV_QP_STATE,
            "ibv_modify_qp(ERR)",
        );
    }

    fn ops(&self) -> &ffi::ibv_context_ops {
        // SAFETY: the context outlives this queue pair (`dev` is held), and its ops table
        // is written once when the device opens.
        unsafe { &(*self.dev.ctx.as_ptr()).ops }
    }

    fn post_send(&self, wr: &mut ffi::ibv_send_wr) -> io::Result<()> {
        let post = self
            .ops()
            .post_send
            .ok_or_else(|| io::Error::other("the provider has no post_send"))?;
        let mut bad = ptr::null_mut();
        // SAFETY: the queue pair is live; `wr` and its scatter list are valid for the call
        // (libibverbs copies them); the memory they name stays registered until the
        // completion, which the caller waits for before reusing it.
        let errno = unsafe { post(self.qp.as_ptr(), wr, &raw mut bad) };
        if errno == 0 {
            Ok(())
        } else {
            Err(errno_error("ibv_post_send", errno))
        }
    }

    /// Posts an RDMA write-with-immediate of `len` bytes at `offset` of `local` into
    /// `remote_addr` (same offset of the peer's inbox); the immediate is `len`.
    pub(crate) fn post_write(
        &self,
        local: &Region,
        offset: u64,
        len: u32,
        remote_addr: u64,
        rkey: u32,
        wr_id: u64,
    ) -> io::Result<()> {
        let sge = ffi::ibv_sge {
            addr: local.addr().wrapping_add(offset),
            length: len,
            lkey: local.mr.lkey(),
        };
        let remote = (remote_addr.wrapping_add(offset), rkey);
        self.post_rdma(
            ffi::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM,
            sge,
            remote,
            len,
            wr_id,
        )
    }

    /// Reads outstanding at once this queue pair allows (at least 1).
    pub(crate) fn rd_atomic(&self) -> u8 {
        self.rd_atomic
    }

    /// Posts an RDMA read of `len` bytes from the peer's `remote_addr` (under `rkey`)
    /// into `local` at `offset`.
    ///
    /// # Errors
    /// A span outside `local`, or the provider's refusal.
    pub(crate) fn post_read(
        &self,
        local: &MemoryRegion,
        offset: u64,
        len: u32,
        remote_addr: u64,
        rkey: u32,
        wr_id: u64,
    ) -> io::Result<()> {
        let end = offset.checked_add(u64::from(len));
        if end.is_none_or(|e| e > local.len() as u64) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read span outside the registration",
            ));
        }
        let sge = ffi::ibv_sge {
            addr: local.addr().wrapping_add(offset),
            length: len,
            lkey: local.mr.lkey(),
        };
        self.post_rdma(
            ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
            sge,
            (remote_addr, rkey),
            0,
            wr_id,
        )
    }

    /// Posts one signalled one-sided request on `sge` against the peer's
    /// `(address, rkey)`; `imm` is sent only by opcodes that carry one.
    fn post_rdma(
        &self,
        opcode: ffi::ibv_wr_opcode::Type,
        mut sge: ffi::ibv_sge,
        (remote_addr, rkey): (u64, u32),
        imm: u32,
        wr_id: u64,
    ) -> io::Result<()> {
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: &raw mut sge,
            num_sge: 1,
            opcode,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            __bindgen_anon_1: ffi::ibv_send_wr__bindgen_ty_1 {
                imm_data: imm.to_be(),
            },
            wr: ffi::ibv_send_wr__bindgen_ty_2 {
                rdma: ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 { remote_addr, rkey },
            },
            qp_type: Default::default(),
            __bindgen_anon_2: Default::default(),
        };
        self.post_send(&mut wr)
    }

    /// Posts a zero-length send-with-immediate carrying `imm` (an acknowledgement).
    pub(crate) fn post_ack(&self, imm: u32, wr_id: u64) -> io::Result<()> {
        let mut wr = ffi::ibv_send_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: ptr::null_mut(),
            num_sge: 0,
            opcode: ffi::ibv_wr_opcode::IBV_WR_SEND_WITH_IMM,
            send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
            __bindgen_anon_1: ffi::ibv_send_wr__bindgen_ty_1 {
                imm_data: imm.to_be(),
            },
            wr: Default::default(),
            qp_type: Default::default(),
            __bindgen_anon_2: Default::default(),
        };
        self.post_send(&mut wr)
    }

    /// Posts a zero-length receive (consumed by the peer's write-with-immediate or ack).
    pub(crate) fn post_recv(&self, wr_id: u64) -> io::Result<()> {
        let post = self
            .ops()
            .post_recv
            .ok_or_else(|| io::Error::other("the provider has no post_recv"))?;
        let mut wr = ffi::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: ptr::null_mut(),
            num_sge: 0,
        };
        let mut bad = ptr::null_mut();
        // SAFETY: the queue pair is live; a zero-length receive names no memory.
        let errno = unsafe { post(self.qp.as_ptr(), &raw mut wr, &raw mut bad) };
        if errno == 0 {
            Ok(())
        } else {
            Err(errno_error("ibv_post_recv", errno))
        }
    }

    /// Polls up to `max` completions into `out` without blocking.
    pub(crate) fn poll(&self, out: &mut Vec<Completion>, max: usize) -> io::Result<()> {
        let poll = self
            .ops()
            .poll_cq
            .ok_or_else(|| io::Error::other("the provider has no poll_cq"))?;
        let mut wcs = [ffi::ibv_wc::default(); 32];
        let want = i32::try_from(max.min(wcs.len())).unwrap_or(0);
        // SAFETY: the CQ is live and `wcs` has room for `want` entries.
        let n = unsafe { poll(self.cq.as_ptr(), want, wcs.as_mut_ptr()) };
        let n = usize::try_from(n).map_err(|_| io::Error::other("ibv_poll_cq failed"))?;
        // Completed writes into our memory are visible once their completion is polled.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Acquire);
        for wc in wcs.iter().take(n) {
            out.push(match wc.error() {
                Some((status, vendor)) => Completion::Failed {
                    wr_id: wc.wr_id(),
                    status: format!("{} (vendor error {vendor})", status_str(status)),
                },
                None => match wc.opcode() {
                    ffi::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM => Completion::Landed {
                        imm: u32::from_be(wc.imm_data().unwrap_or(0)),
                    },
                    ffi::ibv_wc_opcode::IBV_WC_RECV => Completion::Acked {
                        imm: u32::from_be(wc.imm_data().unwrap_or(0)),
                    },
                    _ => Completion::Sent { wr_id: wc.wr_id() },
                },
            });
        }
        Ok(())
    }

    /// Asks for an event on the completion channel at the next completion. Poll once
    /// more afterwards: a completion that arrived before arming raises no event.
    pub(crate) fn arm(&self) -> io::Result<()> {
        let notify = self
            .ops()
            .req_notify_cq
            .ok_or_else(|| io::Error::other("the provider has no req_notify_cq"))?;
        // SAFETY: the CQ is live.
        let errno = unsafe { notify(self.cq.as_ptr(), 0) };
        if errno == 0 {
            Ok(())
        } else {
            Err(errno_error("ibv_req_notify_cq", errno))
        }
    }

    /// Consumes every pending channel event (the fd is non-blocking).
    pub(crate) fn take_events(&mut self) {
        loop {
            let mut cq = ptr::null_mut();
            let mut cq_ctx = ptr::null_mut();
            // SAFETY: the channel is live and non-blocking; the out-pointers are valid.
            let r = unsafe {
                ffi::ibv_get_cq_event(self.channel.as_ptr(), &raw mut cq, &raw mut cq_ctx)
            };
            if r != 0 {
                break;
            }
            self.events_to_ack = self.events_to_ack.saturating_add(1);
        }
        if self.events_to_ack >= 64 {
            self.ack_events();
        }
    }

    fn ack_events(&mut self) {
        if self.events_to_ack > 0 {
            // SAFETY: the CQ is live and these events were taken from its channel.
            unsafe { ffi::ibv_ack_cq_events(self.cq.as_ptr(), self.events_to_ack) };
            self.events_to_ack = 0;
        }
    }

    /// The completion channel's fd: readable when an armed CQ has a new completion.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel is live, and its fd stays open until the channel is
        // destroyed in `drop`, which the borrow of `self` outlives.
        let fd = unsafe { (*self.channel.as_ptr()).fd };
        // SAFETY: as above.
        unsafe { BorrowedFd::borrow_raw(fd) }
    }
}

impl Drop for QueuePair {
    /// Releases what was created, in reverse order (a dangling handle was never made).
    /// Destroying the queue pair first means the device touches none of our memory
    /// afterwards, so the regions it used may go next.
    fn drop(&mut self) {
        if self.qp != NonNull::dangling() {
            // SAFETY: created in `new`, destroyed once.
            unsafe { ffi::ibv_destroy_qp(self.qp.as_ptr()) };
        }
        if self.cq != NonNull::dangling() {
            self.ack_events();
            // SAFETY: its queue pair is gone and its events acknowledged.
            unsafe { ffi::ibv_destroy_cq(self.cq.as_ptr()) };
        }
        // SAFETY: no CQ uses the channel any more.
        unsafe { ffi::ibv_destroy_comp_channel(self.channel.as_ptr()) };
    }
}

fn status_str(status: ffi::ibv_wc_status::Type) -> String {
    // SAFETY: returns a static string for any status value.
    let s = unsafe { ffi::ibv_wc_status_str(status) };
    if s.is_null() {
        return format!("status {status}");
    }
    // SAFETY: a static NUL-terminated string.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}
