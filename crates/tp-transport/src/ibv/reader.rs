//! One-sided RDMA reads for other crates (cuda_gdr): a device, memory registered with
//! it, and a queue pair that pulls a span of the peer's registered memory.
//!
//! The transport's own connections write into rings; a channel that moves large
//! buffers wants the NIC to pull them straight from the sender's memory instead. This
//! is that path, in three pieces:
//! - [`RdmaDevice`]: the device (chosen as the transport chooses: [`IbvConfig`]).
//! - [`MemoryRegion`]: memory the caller owns — host or, with NVIDIA's peer-memory
//!   module, GPU — registered for local writes and remote reads.
//! - [`RdmaReader`]: a reliable-connected queue pair. The two ends exchange
//!   [`RdmaReader::setup`] records (the ibv transport's [`SetupInfo`] layout; its inbox
//!   fields are zero, with capacity 1) over any connection, [`connect`](RdmaReader::connect),
//!   and then either end may [`read`](RdmaReader::read) from memory the other
//!   registered and announced. A [`ReadPlan`] splits each read.
//!
//! `read` blocks the calling thread until the read completes, fails, or its timeout
//! passes — it sleeps on the queue pair's completion channel, it does not spin. A
//! failed or timed-out read puts the queue pair in the error state: the reader is
//! finished, as a broken connection is.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::proto::SetupInfo;
use super::read::ReadPlan;
use super::transport::IbvConfig;
pub use super::verbs::MemoryRegion;
use super::verbs::{Completion, Device, QueuePair, RemoteQp};

/// An open RDMA device (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct RdmaDevice {
    dev: Arc<Device>,
}

impl RdmaDevice {
    /// Opens the device, port and GID index `config` names (the first device when it
    /// names none).
    ///
    /// # Errors
    /// Why no device could be used: no RDMA support, no such device, port down.
    pub fn open(config: &IbvConfig) -> Result<Self, String> {
        let dev = super::transport::open_device(config)?;
        Ok(Self { dev: Arc::new(dev) })
    }

    /// The names of this machine's RDMA devices, as [`IbvConfig::device`] takes them.
    ///
    /// # Errors
    /// No RDMA support (the kernel's or libibverbs').
    pub fn names() -> io::Result<Vec<String>> {
        super::verbs::device_names()
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.dev.name
    }

    pub(super) fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

/// Where to read from: a span of the peer's registered memory.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct RemoteSpan {
    /// Address in the peer's memory.
    pub addr: u64,
    /// Bytes.
    pub len: u64,
    /// The peer's key for the region containing the span.
    pub rkey: u32,
}

struct State {
    qp: QueuePair,
    /// Id of the next plan's first request.
    next_id: u64,
    /// Largest request both ends accept (known once connected).
    max_message: u32,
    failed: bool,
}

/// A queue pair that reads the peer's registered memory (see the [module docs](self)).
pub struct RdmaReader {
    state: Mutex<State>,
    psn: u32,
    dev: Arc<Device>,
}

impl std::fmt::Debug for RdmaReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdmaReader")
            .field("device", &self.dev.name)
            .finish_non_exhaustive()
    }
}

/// Send-queue depth: at most `rd_atomic` reads are outstanding, far below this.
const SEND_DEPTH: u32 = 64;

impl RdmaReader {
    /// A queue pair on `dev`, not yet connected.
    ///
    /// # Errors
    /// The device's refusal.
    pub fn new(dev: &RdmaDevice) -> io::Result<Self> {
        let qp = QueuePair::for_reads(&dev.dev, SEND_DEPTH)?;
        let psn = super::transport::initial_psn(qp.qpn());
        Ok(Self {
            state: Mutex::new(State {
                qp,
                next_id: 0,
                max_message: dev.dev.max_message,
                failed: false,
            }),
            psn,
            dev: dev.dev.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Our half of the setup, for the peer's [`connect`](Self::connect).
    pub fn setup(&self) -> SetupInfo {
        SetupInfo {
            lid: self.dev.lid,
            mtu: u8::try_from(self.dev.active_mtu).unwrap_or(0),
            qpn: self.lock().qp.qpn(),
            gid: self.dev.gid,
            inbox_addr: 0,
            inbox_rkey: 0,
            psn: self.psn,
            inbox_capacity: 1,
            max_message: self.dev.max_message,
        }
    }

    /// Connects to the peer whose [`setup`](Self::setup) record is `theirs`. Neither
    /// end may read before both have connected (exchange a "ready" message after this).
    ///
    /// # Errors
    /// The device's refusal (an unreachable address, a bad queue pair number).
    pub fn connect(&self, theirs: &SetupInfo) -> io::Result<()> {
        let mut st = self.lock();
        st.qp.connect(self.psn, &RemoteQp::from(theirs))?;
        st.max_message = st.max_message.min(theirs.max_message).max(1);
        Ok(())
    }

    /// Reads `from` into `into` at `offset`, blocking until done or `timeout` passes.
    ///
    /// # Errors
    /// A span outside `into` (nothing is posted), a failed request (the peer's key or
    /// span was wrong, the peer is gone), a timeout, or a reader that failed before.
    /// Every error but the first leaves the queue pair in the error state.
    pub fn read(
        &self,
        into: &MemoryRegion,
        offset: u64,
        from: RemoteSpan,
        timeout: Duration,
    ) -> io::Result<()> {
        let local = into.addr().checked_add(offset);
        if local.is_none_or(|a| !into.covers(a, from.len)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read span outside the local region",
            ));
        }
        // A timeout too long to represent waits without one.
        let deadline = Instant::now().checked_add(timeout);
        let mut st = self.lock();
        if st.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "an earlier read on this queue pair failed",
            ));
        }
        let window = u32::from(st.qp.rd_atomic());
        let mut plan = ReadPlan::new(from.len, st.max_message, window, st.next_id)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        st.next_id = plan.next_first_id();
        let r = drive(&mut st.qp, &mut plan, into, offset, from, deadline);
        if r.is_err() {
            st.failed = true;
            st.qp.set_error();
        }
        r
    }

    /// Puts the queue pair in the error state: the peer's reads of our memory fail
    /// from now on, and so do ours.
    pub fn close(&self) {
        let mut st = self.lock();
        st.failed = true;
        st.qp.set_error();
    }
}

/// Posts the plan's requests and reaps their completions until it is done.
fn drive(
    qp: &mut QueuePair,
    plan: &mut ReadPlan,
    into: &MemoryRegion,
    offset: u64,
    from: RemoteSpan,
    deadline: Option<Instant>,
) -> io::Result<()> {
    let mut done = Vec::new();
    let mut armed = false;
    while !plan.is_done() {
        while let Some(req) = plan.next_request() {
            qp.post_read(
                into,
                offset.wrapping_add(req.offset),
                req.len,
                from.addr.wrapping_add(req.offset),
                from.rkey,
                req.wr_id,
            )?;
        }
        done.clear();
        qp.poll(&mut done, 32)?;
        for c in &done {
            match c {
                Completion::Sent { wr_id } => plan
                    .complete(*wr_id)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?,
                Completion::Failed { wr_id, status } => {
                    return Err(io::Error::other(format!(
                        "RDMA read {wr_id} failed: {status}"
                    )));
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected completion on a read queue pair: {other:?}"),
                    ));
                }
            }
        }
        if !done.is_empty() {
            armed = false;
            continue;
        }
        if !armed {
            // A completion that lands between the poll above and arming raises no
            // event, so poll once more before sleeping.
            qp.arm()?;
            armed = true;
            continue;
        }
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "RDMA read of {} bytes: {} requests still outstanding at the deadline",
                    from.len,
                    plan.outstanding()
                ),
            ));
        }
        let ts = left.and_then(|l| rustix::event::Timespec::try_from(l).ok());
        let fd = qp.fd();
        let mut fds = [rustix::event::PollFd::new(
            &fd,
            rustix::event::PollFlags::IN,
        )];
        match rustix::event::poll(&mut fds, ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        qp.take_events();
        armed = false;
    }
    Ok(())
}
