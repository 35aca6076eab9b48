//! [`Pipe`]: [`tp_wire`]'s sans-IO pipe driven over real transports and channels.
//!
//! A pipe is two parts: the state machine ([`tp_wire::pipe::Pipe`]), which decides
//! everything, and this driver, which does what it asks. All of a pipe's I/O runs as
//! tasks on its [`Context`]'s runtime thread, so the pipe works
//! whatever executor (if any) the user awaits its futures on.
//!
//! - Each connection has one task running two loops: writes (frames, payload bytes,
//!   close) and reads (frames, payload bytes), each in the order the state machine
//!   asked for them. A read or write is first polled once where the state machine asks
//!   for it, when nothing is queued on that side (a frame goes out together with the
//!   payloads that follow it); only what must wait is queued on the task. Every payload
//!   action is reported back exactly once, also after a failure (the state machine
//!   needs that to know the user's memory is free). A frame that must wait on a
//!   connection whose bytes can be looked for (shm) is *watched* instead: the pipe's
//!   waiting futures look for it themselves, and the task steps in only if they stop
//!   (see `FrameWatch`).
//! - When a channel has all its connections, their tasks hand the connections over
//!   once every pipe write queued on them was issued, and the channel is created on
//!   them; channel operations wait for that, then run in the order asked.
//! - User operations complete through their results' slots in the pipe's core (no
//!   channel or boxed future per operation): [`Pipe::write`] hands the message back
//!   with the result; [`Pipe::read_descriptor`] gives the descriptor; [`Pipe::read`]
//!   fills and hands back an [`Allocation`]. The tasks waiting for them are woken once
//!   the core's lock is released.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Poll, Waker};
use std::time::Duration;

use futures::FutureExt;
use futures::channel::oneshot;
use futures::future::{BoxFuture, join, join_all};
use tp_channel::{BoxChannel, ChannelError, Device, RecvBuf, SendBuf};
use tp_transport::{BoxConnection, TransportError};
use tp_wire::frame::{FrameHeader, HEADER_LEN};
use tp_wire::packet::{Descriptor, Payload as WirePayload, Tensor as WireTensor};
use tp_wire::pipe::{
    ChannelId, ChannelOp, ConnId, Event, Io, IoErrorKind, OpId, Pipe as WirePipe, PipeError,
};
use tp_wire::{Instant, Limits};

use crate::context::Context;

mod act_queue;

/// A payload: bytes the pipe writes on its primary connection.
#[derive(Debug, Default)]
pub struct Payload {
    /// The bytes.
    pub data: Vec<u8>,
    /// Opaque metadata the reader sees in the descriptor.
    pub metadata: Vec<u8>,
}

/// A tensor: bytes a channel moves.
pub struct Tensor {
    /// The bytes (host memory, or a device buffer such as `tp-cuda`'s `CudaBuffer`).
    pub data: Box<dyn SendBuf>,
    /// Where the reader must put them, if the writer decides.
    pub target_device: Option<Device>,
    /// Opaque metadata the reader sees in the descriptor.
    pub metadata: Vec<u8>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("len", &self.data.byte_len())
            .field("device", &self.data.device())
            .field("target_device", &self.target_device)
            .finish_non_exhaustive()
    }
}

/// A message: metadata, payloads and tensors.
#[derive(Debug, Default)]
pub struct Message {
    /// Opaque metadata.
    pub metadata: Vec<u8>,
    /// Payloads, in order.
    pub payloads: Vec<Payload>,
    /// Tensors, in order.
    pub tensors: Vec<Tensor>,
}

/// Where a read puts a message: one buffer per payload and per tensor, each exactly as
/// long as the descriptor says.
#[derive(Default)]
pub struct Allocation {
    /// Payload buffers.
    pub payloads: Vec<Vec<u8>>,
    /// Tensor buffers.
    pub tensors: Vec<Box<dyn RecvBuf>>,
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Allocation")
            .field(
                "payloads",
                &self.payloads.iter().map(Vec::len).collect::<Vec<_>>(),
            )
            .field(
                "tensors",
                &self
                    .tensors
                    .iter()
                    .map(|t| t.byte_len())
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Allocation {
    /// Zeroed heap buffers for every payload and tensor of `descriptor`.
    pub fn for_descriptor(descriptor: &Descriptor) -> Self {
        let heap = |_: &WireTensor, len: usize| -> Result<Box<dyn RecvBuf>, Infallible> {
            Ok(Box::new(vec![0u8; len]))
        };
        match Self::with_tensors(descriptor, heap) {
            Ok(a) => a,
            Err(never) => match never {},
        }
    }

    /// Zeroed heap buffers for the payloads, and for each tensor what `alloc` makes of
    /// it and its length (a buffer on its `target_device`, say); the first error stops.
    ///
    /// # Errors
    /// `alloc`'s.
    pub fn with_tensors<E>(
        descriptor: &Descriptor,
        mut alloc: impl FnMut(&WireTensor, usize) -> Result<Box<dyn RecvBuf>, E>,
    ) -> Result<Self, E> {
        let len = |n: u64| usize::try_from(n).unwrap_or(0);
        Ok(Self {
            payloads: descriptor
                .payloads
                .iter()
                .map(|p| vec![0u8; len(p.length)])
                .collect(),
            tensors: descriptor
                .tensors
                .iter()
                .map(|t| alloc(t, len(t.length)))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// A message's descriptor, ready to be read with [`Pipe::read`].
#[derive(Debug)]
pub struct Incoming {
    /// What the message holds.
    pub descriptor: Descriptor,
    op: OpId,
}

/// Lengths and devices, for the state machine's checks of an allocation.
struct Shape {
    len: usize,
    device: Device,
}

impl tp_wire::allocation::Buffer for Shape {
    fn len(&self) -> usize {
        self.len
    }

    fn device(&self) -> Device {
        self.device
    }
}

enum WriteAct {
    Frame(Vec<u8>),
    Payload {
        op: OpId,
        index: usize,
    },
    Close,
    /// Hand the connection over (to a channel) once earlier writes were issued.
    Release(oneshot::Sender<BoxConnection>),
    /// A write started inline that must wait: finish it before any later write.
    Continue(BoxFuture<'static, ()>),
}

enum ReadAct {
    Frame,
    /// Frame watch `id` started (see [`FrameWatch`]): read its frame if the futures
    /// stop looking for it. Not counted busy until then, so that they may read it.
    Watch(u64),
    Payload {
        op: OpId,
        index: usize,
        len: u64,
    },
    Release,
    /// A read started inline that must wait: finish it, before any later read (a
    /// frame is two reads, header then body, and nothing may come between them).
    Continue(BoxFuture<'static, ()>),
}

struct ConnHandle {
    writes: act_queue::Sender<WriteAct>,
    reads: act_queue::Sender<ReadAct>,
    /// The connection, once it exists: reads and writes are started inline through it.
    conn: Option<Arc<BoxConnection>>,
    /// Read actions queued for (or being done by) the connection's task; a read is
    /// started inline only when this is zero, so reads stay in order.
    reads_busy: Arc<AtomicUsize>,
    /// The same for write actions.
    writes_busy: Arc<AtomicUsize>,
}

/// Which half of a connection an inline operation uses.
#[derive(Clone, Copy)]
enum Side {
    Read,
    Write,
}

impl ConnHandle {
    fn busy(&self, side: Side) -> &AtomicUsize {
        match side {
            Side::Read => &self.reads_busy,
            Side::Write => &self.writes_busy,
        }
    }

    /// Queues a read action on the connection's task (counted busy until done); hands
    /// it back if the task is gone.
    fn queue_read(&self, act: ReadAct) -> Result<(), ReadAct> {
        queue(&self.reads, &self.reads_busy, act)
    }

    /// The same for a write action.
    fn queue_write(&self, act: WriteAct) -> Result<(), WriteAct> {
        queue(&self.writes, &self.writes_busy, act)
    }

    /// Queues what is left of an inline operation on its side, after everything queued
    /// there; hands it back if the connection's task is gone.
    fn queue_rest(
        &self,
        side: Side,
        rest: BoxFuture<'static, ()>,
    ) -> Option<BoxFuture<'static, ()>> {
        match side {
            Side::Read => match self.queue_read(ReadAct::Continue(rest)) {
                Err(ReadAct::Continue(rest)) => Some(rest),
                _ => None,
            },
            Side::Write => match self.queue_write(WriteAct::Continue(rest)) {
                Err(WriteAct::Continue(rest)) => Some(rest),
                _ => None,
            },
        }
    }
}

fn queue<A>(tx: &act_queue::Sender<A>, busy: &AtomicUsize, act: A) -> Result<(), A> {
    busy.fetch_add(1, Ordering::AcqRel);
    tx.send(act).inspect_err(|_| {
        busy.fetch_sub(1, Ordering::AcqRel);
    })
}

enum ChanSlot {
    Pending(VecDeque<ChannelOp>),
    Ready(Arc<BoxChannel>),
    Failed,
}

/// A tensor of a write: its buffer (out while a channel holds it), target, metadata.
type HeldTensor = (Option<Box<dyn SendBuf>>, Option<Device>, Vec<u8>);

struct WriteSlot {
    metadata: Vec<u8>,
    /// Each payload's bytes (out while a write holds them) and metadata.
    payloads: Vec<(Vec<u8>, Vec<u8>)>,
    tensors: Vec<HeldTensor>,
}

struct ReadSlot {
    payloads: Vec<Option<Vec<u8>>>,
    tensors: Vec<Option<Box<dyn RecvBuf>>>,
}

/// Hashes the ids this process numbers itself (operations, connections, channels): a
/// multiply spreads them over the table, with none of SipHash's cost. No peer chooses
/// these ids, so there is nothing to flood.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0.rotate_left(8) ^ u64::from(b));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n.into());
    }

    fn write_u64(&mut self, n: u64) {
        // Fibonacci hashing: the high bits, which the table's control bytes use, vary.
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// A map keyed by one of this process's own ids.
type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;

struct Core {
    pipe: WirePipe,
    conns: IdMap<ConnId, ConnHandle>,
    channels: IdMap<ChannelId, ChanSlot>,
    writes: Slots<WriteSlot>,
    reads: Slots<ReadSlot>,
    /// Where each user operation's result waits for its future, by kind.
    write_results: Results<WriteResult>,
    read_results: Results<ReadResult>,
    descriptor_results: Results<DescriptorResult>,
    /// The deadline a timer task waits for, and the handle that ends it.
    timer: Option<(Instant, futures::future::AbortHandle)>,
    closed: Option<PipeError>,
    /// The buffer of the last frame read now, kept for the next one (if small).
    spare_frame: Vec<u8>,
    /// The payloads that go out with a frame, gathered by [`Shared::pump`].
    send_batch: Vec<(OpId, usize)>,
    /// The frame read the pipe's waiting futures look for, if any.
    frame_watch: Option<FrameWatch>,
    /// Watches started so far: numbers them.
    watches: u64,
    /// The task of the future that last looked for a watched frame: the connection's
    /// task wakes it to look again (a future never wakes itself from its own poll,
    /// which an executor that polls inside `wake` could not take).
    frame_looker: Option<Waker>,
}

/// A frame read, not there yet when asked for, on a connection whose bytes can be looked
/// for ([`tp_transport::Connection::reads_now`]: shm), left to the pipe's futures.
///
/// Queued on the connection's task, such a read costs a hop between tasks once its
/// bytes come: the task reads the frame and wakes the future waiting for what it
/// completes, which runs only after the task yields. A future that waits looks for the
/// bytes itself instead, in bursts like the task's spin ([`look_for_frame`]), reads the
/// frame in the poll that sees them and returns its result from that poll.
///
/// The connection's task is told too ([`ReadAct::Watch`], not counted busy). While the
/// watch lasts it wakes the last future to look after each of that future's bursts, so
/// that it looks again once the thread's other tasks ran; it takes the read over,
/// counted, once the watch is [`WATCH_FOR`] old or anything is queued behind the frame:
/// a frame nobody waits for is still read, at most that much later. Both sides decide
/// under the core's lock, so exactly one of them reads the frame.
struct FrameWatch {
    conn: ConnId,
    id: u64,
    /// When the watch started.
    since: std::time::Instant,
}

/// How long futures may look for a watched frame; then its connection's task reads it
/// (and, on shm, spins and then parks as the transport does). A small message's reply
/// comes within a few microseconds; a later one gains nothing from the looks.
const WATCH_FOR: Duration = Duration::from_micros(20);
/// One look of a waiting future lasts this long before it lets its thread's other
/// tasks run (as the shm transport's spin bursts do).
const WATCH_BURST: Duration = Duration::from_micros(4);
/// Looks between two readings of the clock.
const LOOKS_PER_CLOCK: u32 = 16;

/// The largest frame buffer kept for reuse; a larger one is freed after its frame.
const SPARE_FRAME_MAX: usize = 64 << 10;

pub(crate) struct Shared {
    core: Mutex<Core>,
    pool: crate::runtime::Runtime,
    ctx: Arc<Context>,
    limits: Limits,
    /// Server: where this pipe's registration ids are routed from.
    router: Option<Arc<crate::listener::Router>>,
}

/// One end of a pipe.
///
/// Its operations' futures may be awaited on any executor. Over shm, a future polled
/// while the frame it waits for is not there yet looks for it for up to 4 µs before it
/// returns `Pending` (and is woken to look again, for up to 20 µs in all): a reply
/// that comes within that time completes the operation in the poll that sees it, with
/// no wake-up in between.
pub struct Pipe {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("remote_name", &self.remote_name())
            .field("transport", &self.transport())
            .finish()
    }
}

fn kind_of(e: &TransportError) -> IoErrorKind {
    match e {
        TransportError::Eof => IoErrorKind::Eof,
        TransportError::Broken => IoErrorKind::Reset,
        _ => IoErrorKind::Other,
    }
}

impl Shared {
    pub(crate) fn new(
        pipe: WirePipe,
        ctx: Arc<Context>,
        router: Option<Arc<crate::listener::Router>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            core: Mutex::new(Core {
                pipe,
                conns: IdMap::default(),
                channels: IdMap::default(),
                writes: Slots::default(),
                reads: Slots::default(),
                write_results: Results::default(),
                read_results: Results::default(),
                descriptor_results: Results::default(),
                timer: None,
                closed: None,
                spare_frame: Vec::new(),
                frame_watch: None,
                watches: 0,
                frame_looker: None,
                send_batch: Vec::new(),
            }),
            pool: ctx.pool().clone(),
            limits: ctx.pipe_config().limits,
            ctx,
            router,
        })
    }

    /// Client: starts the pipe's first connection.
    pub(crate) fn connect_primary(
        self: &Arc<Self>,
        connect: BoxFuture<'static, Result<BoxConnection, TransportError>>,
    ) {
        let mut core = self.lock();
        self.start_conn(&mut core, ConnId(0), connect);
        self.pump(&mut core);
    }

    /// Server: a connection presented registration id `id`; it joins this pipe.
    pub(crate) fn attach_requested(
        self: &Arc<Self>,
        id: tp_wire::packet::RegistrationId,
        conn: BoxConnection,
    ) {
        let mut core = self.lock();
        match core.pipe.handle_requested_connection(id) {
            Ok(cid) => self.start_conn(&mut core, cid, async move { Ok(conn) }.boxed()),
            Err(e) => tracing::warn!(error = %e, "pipe: refused a requested connection"),
        }
        self.pump(&mut core);
    }

    fn lock(&self) -> CoreGuard<'_> {
        CoreGuard(Some(
            self.core.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    fn now(&self) -> Instant {
        self.ctx.now()
    }

    /// Applies `f` to the state machine, then does what it asks.
    pub(crate) fn input(self: &Arc<Self>, f: impl FnOnce(&mut WirePipe)) {
        let mut core = self.lock();
        f(&mut core.pipe);
        self.pump(&mut core);
    }

    /// Starts the tasks of a connection that exists already (conn 0, or a requested one
    /// the listener routed here).
    pub(crate) fn attach(self: &Arc<Self>, id: ConnId, conn: BoxConnection) {
        let mut core = self.lock();
        self.start_conn(&mut core, id, async move { Ok(conn) }.boxed());
        self.pump(&mut core);
    }

    fn start_conn(
        self: &Arc<Self>,
        core: &mut Core,
        id: ConnId,
        conn: BoxFuture<'static, Result<BoxConnection, TransportError>>,
    ) {
        let (wtx, wrx) = act_queue::queue();
        let (rtx, rrx) = act_queue::queue();
        let reads_busy = Arc::new(AtomicUsize::new(0));
        let writes_busy = Arc::new(AtomicUsize::new(0));
        core.conns.insert(
            id,
            ConnHandle {
                writes: wtx,
                reads: rtx,
                conn: None,
                reads_busy: reads_busy.clone(),
                writes_busy: writes_busy.clone(),
            },
        );
        let me = self.clone();
        self.pool.spawn_ok(async move {
            me.run_conn(id, conn, (wrx, writes_busy), (rrx, reads_busy))
                .await;
        });
    }

    async fn run_conn(
        self: Arc<Self>,
        id: ConnId,
        conn: BoxFuture<'static, Result<BoxConnection, TransportError>>,
        (writes, writes_busy): (act_queue::Receiver<WriteAct>, Arc<AtomicUsize>),
        (reads, reads_busy): (act_queue::Receiver<ReadAct>, Arc<AtomicUsize>),
    ) {
        let conn = match conn.await {
            Ok(c) => {
                let c = Arc::new(c);
                if let Some(h) = self.lock().conns.get_mut(&id) {
                    h.conn = Some(c.clone());
                }
                Some(c)
            }
            Err(e) => {
                tracing::debug!(conn = id.0, error = %e, "pipe: connect failed");
                self.input(|p| p.handle_connection_error(id, IoErrorKind::ConnectFailed));
                None
            }
        };
        let (release, ()) = join(
            self.write_loop(id, conn.as_deref(), writes, &writes_busy),
            self.read_loop(id, conn.as_deref(), reads, &reads_busy),
        )
        .await;
        if let (Some(tx), Some(conn)) = (release, conn) {
            // The core dropped its handle, and its clone, when it asked for the
            // release; an inline read may still hold one for a moment, so share.
            let _ = tx.send(Box::new(SharedConn(conn)) as BoxConnection);
        }
    }

    async fn write_loop(
        self: &Arc<Self>,
        id: ConnId,
        conn: Option<&BoxConnection>,
        mut acts: act_queue::Receiver<WriteAct>,
        busy: &AtomicUsize,
    ) -> Option<oneshot::Sender<BoxConnection>> {
        let mut failed = conn.is_none();
        while let Some(act) = acts.next().await {
            let _done = Done(busy);
            match act {
                WriteAct::Frame(frame) => {
                    if let (false, Some(c)) = (failed, conn)
                        && let Err(e) = c.write(&[&frame]).await
                    {
                        failed = true;
                        self.input(|p| p.handle_connection_error(id, kind_of(&e)));
                    }
                }
                WriteAct::Payload { op, index } => {
                    let data = take_payload(&mut self.lock(), op, index);
                    let r = match (failed, conn, &data) {
                        (false, Some(c), Some(d)) => c.write(&[d]).await.map_err(|e| kind_of(&e)),
                        _ => Err(IoErrorKind::Other),
                    };
                    if r.is_err() {
                        failed = true;
                    }
                    let mut core = self.lock();
                    if let Some(d) = data {
                        put_payload(&mut core, op, index, d);
                    }
                    let _ = core.pipe.handle_payload_done(op, r);
                    self.pump(&mut core);
                }
                WriteAct::Close => {
                    if let Some(c) = conn {
                        c.close();
                    }
                    failed = true;
                }
                WriteAct::Release(tx) => return Some(tx),
                WriteAct::Continue(rest) => rest.await,
            }
        }
        None
    }

    /// Waits while futures look for the frame of watch `id`; `true` once this task
    /// takes the read over (counted busy from then on), `false` if a future read it.
    async fn take_watch(&self, id: u64, busy: &AtomicUsize) -> bool {
        loop {
            let looker = {
                let mut core = self.lock();
                let Some(w) = core.frame_watch.as_ref().filter(|w| w.id == id) else {
                    return false;
                };
                if busy.load(Ordering::Acquire) > 0 || w.since.elapsed() >= WATCH_FOR {
                    // Under the core's lock: a future's next look sees the watch gone
                    // and the connection busy.
                    core.frame_watch = None;
                    busy.fetch_add(1, Ordering::AcqRel);
                    return true;
                }
                core.frame_looker.take()
            };
            // Outside the lock: the looker may be polled right inside `wake`.
            if let Some(w) = looker {
                w.wake();
            }
            tp_transport::spin::yield_once().await;
        }
    }

    async fn read_loop(
        self: &Arc<Self>,
        id: ConnId,
        conn: Option<&BoxConnection>,
        mut acts: act_queue::Receiver<ReadAct>,
        busy: &AtomicUsize,
    ) {
        let mut failed = conn.is_none();
        // The buffer frames are read into here, kept from one to the next.
        let mut buf = Vec::new();
        while let Some(act) = acts.next().await {
            // A watch was not counted when queued: `take_watch` counts it once this task
            // takes its read over; a future may have read it instead.
            if let ReadAct::Watch(watch) = act
                && !self.take_watch(watch, busy).await
            {
                continue;
            }
            let _done = Done(busy);
            match act {
                ReadAct::Frame | ReadAct::Watch(_) => {
                    let Some(c) = conn.filter(|_| !failed) else {
                        continue;
                    };
                    match read_frame(c, &self.limits, std::mem::take(&mut buf)).await {
                        Ok(frame) => {
                            self.input(|p| p.handle_frame(id, &frame));
                            if frame.capacity() <= SPARE_FRAME_MAX {
                                buf = frame;
                            }
                        }
                        Err(kind) => {
                            failed = true;
                            self.input(|p| p.handle_connection_error(id, kind));
                        }
                    }
                }
                ReadAct::Payload { op, index, len } => {
                    let buf = self
                        .lock()
                        .reads
                        .get_mut(&op)
                        .and_then(|r| r.payloads.get_mut(index))
                        .and_then(Option::take);
                    let (buf, r) = match (failed, conn, buf) {
                        (false, Some(c), Some(mut b)) if b.len() as u64 == len => {
                            let r = c.read_exact(&mut b).await.map_err(|e| kind_of(&e));
                            (Some(b), r)
                        }
                        (_, _, b) => (b, Err(IoErrorKind::Other)),
                    };
                    if r.is_err() {
                        failed = true;
                    }
                    let mut core = self.lock();
                    if let (Some(b), Some(slot)) = (
                        buf,
                        core.reads
                            .get_mut(&op)
                            .and_then(|s| s.payloads.get_mut(index)),
                    ) {
                        *slot = Some(b);
                    }
                    let _ = core.pipe.handle_payload_done(op, r);
                    self.pump(&mut core);
                }
                ReadAct::Continue(rest) => rest.await,
                ReadAct::Release => return,
            }
        }
    }

    /// Does everything the state machine asks for now.
    fn pump(self: &Arc<Self>, core: &mut Core) {
        loop {
            let mut progressed = false;
            let mut next = None;
            while let Some(io) = next.take().or_else(|| core.pipe.poll_io()) {
                progressed = true;
                let Io::Send { conn, frame } = io else {
                    self.do_io(core, io);
                    continue;
                };
                // The payloads that follow a frame on its connection go out with it, as
                // one write. (The list's buffer is kept for the next frame.)
                let mut payloads = std::mem::take(&mut core.send_batch);
                payloads.clear();
                loop {
                    match core.pipe.poll_io() {
                        Some(Io::SendPayload {
                            conn: c, op, index, ..
                        }) if c == conn => payloads.push((op, index)),
                        other => {
                            next = other;
                            break;
                        }
                    }
                }
                self.send(core, conn, Some(frame), &payloads);
                core.send_batch = payloads;
            }
            while let Some(op) = core.pipe.poll_channel_op() {
                progressed = true;
                self.do_channel_op(core, op);
            }
            while let Some(ev) = core.pipe.poll_event() {
                progressed = true;
                self.on_event(core, ev);
            }
            if !progressed {
                break;
            }
        }
        let deadline = core.pipe.poll_timeout();
        if deadline != core.timer.as_ref().map(|t| t.0) {
            // A timer the state machine no longer wants is ended, not left to fire: a
            // pending timer makes every sleep of the runtime thread set a timerfd.
            if let Some((_, old)) = core.timer.take() {
                old.abort();
            }
            if let Some(at) = deadline {
                let me = self.clone();
                let wait =
                    Duration::from_nanos(at.as_nanos().saturating_sub(self.now().as_nanos()));
                let (timer, handle) = futures::future::abortable(async move {
                    async_io::Timer::after(wait).await;
                    let now = me.now();
                    me.input(|p| p.handle_timeout(now));
                });
                core.timer = Some((at, handle));
                self.pool.spawn_ok(timer.map(|_| ()));
            }
        }
    }

    fn do_io(self: &Arc<Self>, core: &mut Core, io: Io) {
        match io {
            Io::Connect {
                conn,
                transport,
                address,
            } => {
                let connect = match self.ctx.transport(&transport) {
                    Some(t) => t.connect(&address),
                    None => async move { Err(TransportError::Closed) }.boxed(),
                };
                self.start_conn(core, conn, connect);
            }
            Io::Send { conn, frame } => self.send(core, conn, Some(frame), &[]),
            Io::SendPayload {
                conn, op, index, ..
            } => self.send(core, conn, None, &[(op, index)]),
            Io::Close { conn } => send_to(core, conn, WriteAct::Close),
            Io::RecvFrame { conn } => self.recv_frame(core, conn),
            Io::RecvPayload {
                conn,
                op,
                index,
                len,
            } => self.recv_payload(core, conn, op, index, len),
        }
    }

    /// Reads a frame: now if its bytes are there; its body inline if only the header
    /// was (nothing may come between the two); else watched by the pipe's futures, or on
    /// the connection's task.
    fn recv_frame(self: &Arc<Self>, core: &mut Core, conn: ConnId) {
        if self.frame_now(core, conn) {
            return;
        }
        let Some(h) = core.conns.get(&conn) else {
            return;
        };
        // Watched only where looking can find the bytes, with nothing queued ahead on
        // the task (the futures may read only when it is idle), one frame at a time.
        let watch = core.frame_watch.is_none()
            && h.conn.as_ref().is_some_and(|c| c.reads_now())
            && h.busy(Side::Read).load(Ordering::Acquire) == 0;
        let queued = if watch {
            let id = core.watches.wrapping_add(1);
            let sent = h.reads.send(ReadAct::Watch(id)).is_ok();
            if sent {
                core.watches = id;
                core.frame_watch = Some(FrameWatch {
                    conn,
                    id,
                    since: std::time::Instant::now(),
                });
            }
            sent
        } else {
            h.queue_read(ReadAct::Frame).is_ok()
        };
        if !queued {
            // The connection's task is gone: the frame can never be read.
            finish_frame(core, conn, Err(IoErrorKind::Other));
        }
    }

    /// Reads a frame from `conn` if its bytes are there: all of it now, or its body
    /// inline if only the header was. `false`, having read nothing, if none was there.
    fn frame_now(self: &Arc<Self>, core: &mut Core, conn: ConnId) -> bool {
        let spare = std::mem::take(&mut core.spare_frame);
        match read_frame_now(&core.conns, conn, &self.limits, spare) {
            Now::Done(r) => finish_frame(core, conn, r),
            Now::Partly(mut frame) => {
                // The header was there, the body is not yet: the body is the next read
                // on this connection, ahead of anything issued later.
                let Some(c) = inline_conn(core, conn, Side::Read) else {
                    finish_frame(core, conn, Err(IoErrorKind::Other));
                    return true;
                };
                let io = async move {
                    c.read_exact(frame.get_mut(HEADER_LEN..).unwrap_or_default())
                        .await
                        .map(|()| frame)
                        .map_err(|e| kind_of(&e))
                };
                self.inline(core, conn, Side::Read, io.boxed(), move |core, r| {
                    finish_frame(core, conn, r);
                });
            }
            Now::Nothing(spare) => {
                core.spare_frame = spare;
                return false;
            }
        }
        true
    }

    /// Reads payload `index` of read `op` into its buffer: now if the bytes are there;
    /// else inline or on the connection's task, as [`Shared::recv_frame`] does.
    fn recv_payload(
        self: &Arc<Self>,
        core: &mut Core,
        conn: ConnId,
        op: OpId,
        index: usize,
        len: u64,
    ) {
        if let Some(c) = idle_conn(&core.conns, conn, Side::Read)
            && let Some(b) = core
                .reads
                .get_mut(&op)
                .and_then(|r| r.payloads.get_mut(index))
                .and_then(Option::as_mut)
            && b.len() as u64 == len
            && c.try_read_exact(b)
        {
            let _ = core.pipe.handle_payload_done(op, Ok(()));
            return;
        }
        let buf = match inline_conn(core, conn, Side::Read) {
            Some(c) => core
                .reads
                .get_mut(&op)
                .and_then(|r| r.payloads.get_mut(index))
                .and_then(Option::take)
                .map(|b| (c, b)),
            None => None,
        };
        if let Some((c, mut b)) = buf {
            let io = async move {
                let r = if b.len() as u64 == len {
                    c.read_exact(&mut b).await.map_err(|e| kind_of(&e))
                } else {
                    Err(IoErrorKind::Other)
                };
                (b, r)
            }
            .boxed();
            self.inline(core, conn, Side::Read, io, move |core, (b, r)| {
                if let Some(slot) = core
                    .reads
                    .get_mut(&op)
                    .and_then(|s| s.payloads.get_mut(index))
                {
                    *slot = Some(b);
                }
                if let Err(kind) = r {
                    core.pipe.handle_connection_error(conn, kind);
                }
                let _ = core.pipe.handle_payload_done(op, r);
            });
        } else {
            let queued = core
                .conns
                .get(&conn)
                .map(|h| h.queue_read(ReadAct::Payload { op, index, len }));
            if !matches!(queued, Some(Ok(()))) {
                let _ = core.pipe.handle_payload_done(op, Err(IoErrorKind::Other));
            }
        }
    }

    /// Writes `frame` (if any) and then the payloads `(op, index)` on connection `conn`:
    /// inline, as one write, when nothing is queued on its writing side; else queued on
    /// the connection's task, one action each. Every payload is reported done once.
    fn send(
        self: &Arc<Self>,
        core: &mut Core,
        conn: ConnId,
        frame: Option<Vec<u8>>,
        payloads: &[(OpId, usize)],
    ) {
        if try_send_now(core, conn, frame.as_deref(), payloads) {
            if let Some(frame) = frame {
                core.pipe.recycle_frame(frame);
            }
            for &(op, _) in payloads {
                let _ = core.pipe.handle_payload_done(op, Ok(()));
            }
            return;
        }
        let Some(c) = inline_conn(core, conn, Side::Write) else {
            if let Some(frame) = frame {
                send_to(core, conn, WriteAct::Frame(frame));
            }
            for &(op, index) in payloads {
                send_to(core, conn, WriteAct::Payload { op, index });
            }
            return;
        };
        // The payloads' bytes travel with the write and come back to their slots when it
        // finishes, before the state machine hears of it: a completed message goes back
        // to the user whole, without a copy. A payload without a slot fails on its own.
        let mut data = Vec::with_capacity(payloads.len());
        for &(op, index) in payloads {
            match take_payload(core, op, index) {
                Some(d) => data.push((op, index, d)),
                None => {
                    let _ = core.pipe.handle_payload_done(op, Err(IoErrorKind::Other));
                }
            }
        }
        let io = async move {
            let r = {
                let mut bufs: Vec<&[u8]> = Vec::with_capacity(1 + data.len());
                bufs.extend(frame.as_deref());
                bufs.extend(data.iter().map(|(_, _, d)| d.as_slice()));
                c.write(&bufs).await.map_err(|e| kind_of(&e))
            };
            (frame, data, r)
        };
        self.inline(
            core,
            conn,
            Side::Write,
            io.boxed(),
            move |core, (frame, data, r)| {
                if let Some(frame) = frame {
                    if let Err(kind) = r {
                        core.pipe.handle_connection_error(conn, kind);
                    }
                    core.pipe.recycle_frame(frame);
                }
                for (op, index, d) in data {
                    put_payload(core, op, index, d);
                    let _ = core.pipe.handle_payload_done(op, r);
                }
            },
        );
    }

    /// Starts `io` on connection `conn` right here, where the state machine asked for
    /// it: if it finishes at once (the bytes were there, or fit), `finish` runs now and
    /// no task is woken; if not, the connection's task finishes it before later
    /// operations of its side.
    fn inline<T: Send + 'static>(
        self: &Arc<Self>,
        core: &mut Core,
        conn: ConnId,
        side: Side,
        mut io: BoxFuture<'static, T>,
        finish: impl FnOnce(&mut Core, T) + Send + 'static,
    ) {
        let waker = futures::task::noop_waker();
        // Only a look: the bytes are there or the connection's task waits for them.
        let polled = tp_transport::spin::without_spinning(|| {
            io.poll_unpin(&mut std::task::Context::from_waker(&waker))
        });
        match polled {
            Poll::Ready(v) => finish(core, v),
            Poll::Pending => {
                let me = self.clone();
                let rest = async move {
                    let v = io.await;
                    let mut core = me.lock();
                    finish(&mut core, v);
                    me.pump(&mut core);
                }
                .boxed();
                // Its turn on the connection is taken: it must run to the end (that is
                // how its result is reported), on the connection's task if there is
                // one, else on its own.
                let rest = match core.conns.get(&conn) {
                    Some(h) => h.queue_rest(side, rest),
                    None => Some(rest),
                };
                if let Some(rest) = rest {
                    self.pool.spawn_ok(rest);
                }
            }
        }
    }

    fn do_channel_op(self: &Arc<Self>, core: &mut Core, op: ChannelOp) {
        let channel = match op {
            ChannelOp::Send { channel, .. }
            | ChannelOp::Recv { channel, .. }
            | ChannelOp::Close { channel } => channel,
        };
        match core
            .channels
            .entry(channel)
            .or_insert_with(|| ChanSlot::Pending(VecDeque::new()))
        {
            ChanSlot::Pending(q) => q.push_back(op),
            ChanSlot::Ready(ch) => {
                let ch = ch.clone();
                self.issue(core, &ch, op);
            }
            ChanSlot::Failed => fail_channel_op(core, op),
        }
    }

    /// Starts a channel operation now (the channel queues it in call order).
    fn issue(self: &Arc<Self>, core: &mut Core, ch: &Arc<BoxChannel>, op: ChannelOp) {
        match op {
            ChannelOp::Send {
                channel,
                op,
                tensor,
                ..
            } => {
                let buf = core
                    .writes
                    .get_mut(&op)
                    .and_then(|w| w.tensors.get_mut(tensor))
                    .and_then(|t| t.0.take());
                let Some(buf) = buf else {
                    let _ = core
                        .pipe
                        .handle_channel_done(channel, op, Err(IoErrorKind::Other));
                    return;
                };
                let fut = ch.send(buf);
                let me = self.clone();
                self.pool.spawn_ok(async move {
                    let (buf, r) = fut.await;
                    let mut core = me.lock();
                    if let Some(t) = core
                        .writes
                        .get_mut(&op)
                        .and_then(|w| w.tensors.get_mut(tensor))
                    {
                        t.0 = Some(buf);
                    }
                    let _ = core.pipe.handle_channel_done(
                        channel,
                        op,
                        r.map_err(|e: ChannelError| e.kind()),
                    );
                    me.pump(&mut core);
                });
            }
            ChannelOp::Recv {
                channel,
                op,
                tensor,
                ..
            } => {
                let buf = core
                    .reads
                    .get_mut(&op)
                    .and_then(|r| r.tensors.get_mut(tensor))
                    .and_then(Option::take);
                let Some(buf) = buf else {
                    let _ = core
                        .pipe
                        .handle_channel_done(channel, op, Err(IoErrorKind::Other));
                    return;
                };
                let fut = ch.recv(buf);
                let me = self.clone();
                self.pool.spawn_ok(async move {
                    let (buf, r) = fut.await;
                    let mut core = me.lock();
                    if let Some(t) = core
                        .reads
                        .get_mut(&op)
                        .and_then(|w| w.tensors.get_mut(tensor))
                    {
                        *t = Some(buf);
                    }
                    let _ = core.pipe.handle_channel_done(
                        channel,
                        op,
                        r.map_err(|e: ChannelError| e.kind()),
                    );
                    me.pump(&mut core);
                });
            }
            ChannelOp::Close { .. } => ch.close(),
        }
    }

    fn on_event(self: &Arc<Self>, core: &mut Core, ev: Event) {
        match ev {
            Event::ConnectionsRequested { ids } => {
                if let Some(router) = &self.router {
                    router.expect(&ids, Arc::downgrade(self));
                }
            }
            Event::ChannelReady {
                channel,
                name,
                conns,
                endpoint,
            } => {
                let mut handed = Vec::new();
                for id in &conns {
                    if let Some(h) = core.conns.remove(id) {
                        let (tx, rx) = oneshot::channel();
                        let _ = h.queue_read(ReadAct::Release);
                        let _ = h.queue_write(WriteAct::Release(tx));
                        handed.push(rx);
                    }
                }
                core.channels
                    .entry(channel)
                    .or_insert_with(|| ChanSlot::Pending(VecDeque::new()));
                let ctx = self.ctx.channel(&name).cloned();
                let me = self.clone();
                let expected = conns.len();
                self.pool.spawn_ok(async move {
                    let got: Vec<BoxConnection> = join_all(handed)
                        .await
                        .into_iter()
                        .filter_map(Result::ok)
                        .collect();
                    let made = match ctx {
                        Some(ctx) if got.len() == expected => {
                            ctx.create_channel(got, endpoint).await.ok()
                        }
                        _ => None,
                    };
                    let mut core = me.lock();
                    let pending = match core.channels.remove(&channel) {
                        Some(ChanSlot::Pending(q)) => q,
                        _ => VecDeque::new(),
                    };
                    match made {
                        Some(ch) => {
                            let ch = Arc::new(ch);
                            core.channels.insert(channel, ChanSlot::Ready(ch.clone()));
                            for op in pending {
                                me.issue(&mut core, &ch, op);
                            }
                        }
                        None => {
                            tracing::warn!(channel = name, "pipe: channel setup failed");
                            core.channels.insert(channel, ChanSlot::Failed);
                            for op in pending {
                                fail_channel_op(&mut core, op);
                            }
                        }
                    }
                    me.pump(&mut core);
                });
            }
            Event::Established { transport, .. } => {
                tracing::debug!(transport, "pipe established");
            }
            Event::DescriptorReady { op, result } => {
                let result = result
                    .map(|descriptor| Incoming { descriptor, op })
                    .map_err(OpError::Pipe);
                core.descriptor_results.complete(op, result);
            }
            Event::ReadDone { op, result } => {
                if let Some(slot) = core.reads.remove(&op) {
                    let alloc = Allocation {
                        payloads: slot
                            .payloads
                            .into_iter()
                            .map(Option::unwrap_or_default)
                            .collect(),
                        tensors: slot
                            .tensors
                            .into_iter()
                            .map(|t| t.unwrap_or_else(|| Box::new(Vec::new())))
                            .collect(),
                    };
                    core.read_results
                        .complete(op, (alloc, result.map_err(OpError::Pipe)));
                }
            }
            Event::WriteDone { op, result } => {
                if let Some(mut slot) = core.writes.remove(&op) {
                    let msg = Message {
                        metadata: std::mem::take(&mut slot.metadata),
                        payloads: slot
                            .payloads
                            .into_iter()
                            .map(|(data, metadata)| Payload { data, metadata })
                            .collect(),
                        tensors: slot
                            .tensors
                            .into_iter()
                            .map(|(data, target_device, metadata)| Tensor {
                                data: data.unwrap_or_else(|| Box::new(Vec::new())),
                                target_device,
                                metadata,
                            })
                            .collect(),
                    };
                    core.write_results
                        .complete(op, (msg, result.map_err(OpError::Pipe)));
                }
            }
            Event::Closed { error } => {
                tracing::debug!(%error, "pipe closed");
                core.closed = Some(error);
                for slot in core.channels.values() {
                    if let ChanSlot::Ready(ch) = slot {
                        ch.close();
                    }
                }
                for h in core.conns.values() {
                    let _ = h.queue_write(WriteAct::Close);
                }
                // Let the connection tasks go: they finish what is queued (every
                // payload action is still reported) and end, so a closed pipe holds no
                // task on the I/O thread even while the user keeps its handle.
                core.conns.clear();
            }
        }
    }
}

/// The connection to start an operation on inline, if it exists and nothing is queued
/// on that side of it.
fn inline_conn(core: &Core, id: ConnId, side: Side) -> Option<Arc<BoxConnection>> {
    idle_conn(&core.conns, id, side).cloned()
}

/// [`inline_conn`], borrowed: for an operation done now, within the call.
fn idle_conn(
    conns: &IdMap<ConnId, ConnHandle>,
    id: ConnId,
    side: Side,
) -> Option<&Arc<BoxConnection>> {
    let h = conns.get(&id)?;
    if h.busy(side).load(Ordering::Acquire) == 0 {
        h.conn.as_ref()
    } else {
        None
    }
}

/// Writes `frame` and the payloads `(op, index)` that follow it on connection `id` now,
/// as one write, if the connection takes them without waiting (see
/// [`tp_transport::Connection::try_write`]); returns `false`, having written nothing,
/// otherwise.
fn try_send_now(core: &Core, id: ConnId, frame: Option<&[u8]>, payloads: &[(OpId, usize)]) -> bool {
    let Some(c) = idle_conn(&core.conns, id, Side::Write) else {
        return false;
    };
    // A frame and a few payloads, gathered on the stack; more go the other way.
    let mut bufs: [&[u8]; 8] = [&[]; 8];
    let mut n = 0;
    let datas = payloads.iter().map(|&(op, index)| {
        core.writes
            .get(&op)
            .and_then(|w| w.payloads.get(index))
            .map(|(data, _)| data.as_slice())
    });
    for buf in frame.into_iter().map(Some).chain(datas) {
        match (buf, bufs.get_mut(n)) {
            (Some(buf), Some(slot)) => *slot = buf,
            _ => return false,
        }
        n += 1;
    }
    c.try_write(bufs.get(..n).unwrap_or_default())
}

/// Counts a queued read done when dropped.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Takes payload `index` of write `op` out of its slot, for a write to hold.
fn take_payload(core: &mut Core, op: OpId, index: usize) -> Option<Vec<u8>> {
    let slot = core.writes.get_mut(&op)?.payloads.get_mut(index)?;
    Some(std::mem::take(&mut slot.0))
}

/// Puts back what [`take_payload`] took, once the write is done with it.
fn put_payload(core: &mut Core, op: OpId, index: usize, data: Vec<u8>) {
    if let Some(slot) = core
        .writes
        .get_mut(&op)
        .and_then(|w| w.payloads.get_mut(index))
    {
        slot.0 = data;
    }
}

fn send_to(core: &mut Core, conn: ConnId, act: WriteAct) {
    match core.conns.get(&conn) {
        Some(h) => {
            if let Err(WriteAct::Payload { op, .. }) = h.queue_write(act) {
                let _ = core.pipe.handle_payload_done(op, Err(IoErrorKind::Other));
            }
        }
        None => {
            if let WriteAct::Payload { op, .. } = act {
                let _ = core.pipe.handle_payload_done(op, Err(IoErrorKind::Other));
            }
        }
    }
}

fn fail_channel_op(core: &mut Core, op: ChannelOp) {
    match op {
        ChannelOp::Send { channel, op, .. } | ChannelOp::Recv { channel, op, .. } => {
            let _ = core
                .pipe
                .handle_channel_done(channel, op, Err(IoErrorKind::Other));
        }
        ChannelOp::Close { .. } => {}
    }
}

/// Reads one frame: the header (checked against `limits` before the body is
/// allocated), then the body.
pub(crate) async fn read_first_frame(
    conn: &BoxConnection,
    limits: &Limits,
) -> Result<Vec<u8>, IoErrorKind> {
    read_frame(conn, limits, Vec::new()).await
}

/// [`read_first_frame`], into `buf`'s room.
async fn read_frame(
    conn: &BoxConnection,
    limits: &Limits,
    buf: Vec<u8>,
) -> Result<Vec<u8>, IoErrorKind> {
    let mut header = [0u8; HEADER_LEN];
    conn.read_exact(&mut header)
        .await
        .map_err(|e| kind_of(&e))?;
    let mut frame = frame_for(&header, limits, buf)?;
    // The body usually came with the header: take it now, without a second future.
    let body = frame.get_mut(HEADER_LEN..).unwrap_or_default();
    if !conn.try_read_exact(body) {
        conn.read_exact(body).await.map_err(|e| kind_of(&e))?;
    }
    Ok(frame)
}

/// The frame `header` announces, header included, its body zeroed to be read into; in
/// `buf`, whatever it held, if its room suffices.
///
/// A header the limits refuse comes back alone, with no body to read: the state machine
/// fails the pipe with the reason.
fn frame_for(
    header: &[u8; HEADER_LEN],
    limits: &Limits,
    mut buf: Vec<u8>,
) -> Result<Vec<u8>, IoErrorKind> {
    buf.clear();
    let Ok(parsed) = FrameHeader::parse(header, limits) else {
        buf.extend_from_slice(header);
        return Ok(buf);
    };
    // The header passed the limits: the body's length is bounded, allocate it once.
    let body = usize::try_from(parsed.body_len).map_err(|_| IoErrorKind::Other)?;
    let len = HEADER_LEN.saturating_add(body);
    buf.reserve_exact(len);
    buf.extend_from_slice(header);
    buf.resize(len, 0);
    Ok(buf)
}

/// How much of an operation tried now got done.
enum Now<T, P> {
    /// All of it, with this outcome.
    Done(T),
    /// A first part; the rest must wait.
    Partly(P),
    /// None of it; what was lent to it comes back.
    Nothing(P),
}

/// Hands a frame read from `conn` (or the failure to read it) to the state machine;
/// keeps its buffer for the next frame read now.
fn finish_frame(core: &mut Core, conn: ConnId, r: Result<Vec<u8>, IoErrorKind>) {
    match r {
        Ok(frame) => {
            core.pipe.handle_frame(conn, &frame);
            if frame.capacity() <= SPARE_FRAME_MAX && core.spare_frame.capacity() == 0 {
                core.spare_frame = frame;
            }
        }
        Err(kind) => core.pipe.handle_connection_error(conn, kind),
    }
}

/// Reads a frame from connection `id` now, as far as its bytes are there (see
/// [`tp_transport::Connection::try_read_exact`]), into `buf`'s room.
fn read_frame_now(
    conns: &IdMap<ConnId, ConnHandle>,
    id: ConnId,
    limits: &Limits,
    buf: Vec<u8>,
) -> Now<Result<Vec<u8>, IoErrorKind>, Vec<u8>> {
    let Some(c) = idle_conn(conns, id, Side::Read) else {
        return Now::Nothing(buf);
    };
    let mut header = [0u8; HEADER_LEN];
    if !c.try_read_exact(&mut header) {
        return Now::Nothing(buf);
    }
    let mut frame = match frame_for(&header, limits, buf) {
        Ok(frame) => frame,
        Err(kind) => return Now::Done(Err(kind)),
    };
    if c.try_read_exact(frame.get_mut(HEADER_LEN..).unwrap_or_default()) {
        Now::Done(Ok(frame))
    } else {
        Now::Partly(frame)
    }
}

/// What [`Pipe::write`] completes with: the message, handed back, and the outcome.
pub type WriteResult = (Message, Result<(), OpError>);
/// What [`Pipe::read`] completes with: the buffers, handed back, and the outcome.
pub type ReadResult = (Allocation, Result<(), OpError>);
/// What [`Pipe::read_descriptor`] completes with.
pub type DescriptorResult = Result<Incoming, OpError>;

/// A user operation's result, kept in the pipe's core until its future takes it: no
/// channel and no boxed future per operation.
struct Completion<T> {
    result: Option<T>,
    /// The task to wake when `result` arrives.
    waker: Option<Waker>,
}

impl<T> Default for Completion<T> {
    fn default() -> Self {
        Self {
            result: None,
            waker: None,
        }
    }
}

/// The buffers of one kind of operation while the pipe uses them, by operation. The
/// operation being issued sits beside the map until its command's pump is over: one
/// that pump finishes (a small message over shm) never enters the map.
struct Slots<V> {
    map: IdMap<OpId, V>,
    issuing: Option<(OpId, V)>,
}

impl<V> Default for Slots<V> {
    fn default() -> Self {
        Self {
            map: IdMap::default(),
            issuing: None,
        }
    }
}

impl<V> Slots<V> {
    /// Files `op`'s buffers as the operation being issued.
    fn issue(&mut self, op: OpId, slot: V) {
        self.settle();
        self.issuing = Some((op, slot));
    }

    /// Moves the issued operation's buffers into the map, if still held.
    fn settle(&mut self) {
        if let Some((op, slot)) = self.issuing.take() {
            self.map.insert(op, slot);
        }
    }

    fn get(&self, op: &OpId) -> Option<&V> {
        match &self.issuing {
            Some((o, slot)) if o == op => Some(slot),
            _ => self.map.get(op),
        }
    }

    fn get_mut(&mut self, op: &OpId) -> Option<&mut V> {
        match &mut self.issuing {
            Some((o, slot)) if o == op => Some(slot),
            _ => self.map.get_mut(op),
        }
    }

    fn remove(&mut self, op: &OpId) -> Option<V> {
        if matches!(&self.issuing, Some((o, _)) if o == op) {
            return self.issuing.take().map(|(_, slot)| slot);
        }
        self.map.remove(op)
    }
}

/// Where one kind of operation's results wait for their futures.
///
/// Like [`Slots`], the operation being issued stays out of the map; unlike it, only
/// its id is held until a result comes (`Slots<Completion<T>>` would carry an empty
/// completion through every command: ~2% more instructions per small message).
struct Results<T> {
    /// Operations whose futures wait, by id.
    waiting: IdMap<OpId, Completion<T>>,
    /// The operation whose command is running its pump: a result for it lands in
    /// `issued`, and its future starts complete, never entering `waiting`.
    issuing: Option<OpId>,
    issued: Option<T>,
}

impl<T> Default for Results<T> {
    fn default() -> Self {
        Self {
            waiting: IdMap::default(),
            issuing: None,
            issued: None,
        }
    }
}

impl<T> Results<T> {
    /// Records `op`'s result and wakes its future — after the core's lock is released
    /// (see [`CoreGuard`]). A future that was dropped left no entry: the result is
    /// dropped.
    fn complete(&mut self, op: OpId, result: T) {
        if self.issuing == Some(op) {
            self.issued = Some(result);
            return;
        }
        if let Some(c) = self.waiting.get_mut(&op) {
            c.result = Some(result);
            let mut waker = c.waker.take();
            // Deferred, unless this thread's locals are being torn down: then wake now.
            let _ = DEFERRED_WAKES.try_with(|d| d.borrow_mut().extend(waker.take()));
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

thread_local! {
    /// Wakers of completed operations, woken when the core's lock is released: a waker
    /// may run its task's poll right away, and that poll takes the lock.
    static DEFERRED_WAKES: std::cell::RefCell<Vec<Waker>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The locked core; wakes the futures completed under it once unlocked.
struct CoreGuard<'a>(Option<MutexGuard<'a, Core>>);

impl std::ops::Deref for CoreGuard<'_> {
    type Target = Core;

    fn deref(&self) -> &Core {
        // Only `Drop` empties it.
        self.0.as_deref().unwrap_or_else(|| unreachable!())
    }
}

impl std::ops::DerefMut for CoreGuard<'_> {
    fn deref_mut(&mut self) -> &mut Core {
        self.0.as_deref_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for CoreGuard<'_> {
    fn drop(&mut self) {
        drop(self.0.take());
        // One at a time, the list borrowed only to pop: a woken task may run here and
        // complete operations of its own. The list keeps its capacity: no allocation
        // once warm.
        while let Some(w) = DEFERRED_WAKES
            .try_with(|d| d.borrow_mut().pop())
            .ok()
            .flatten()
        {
            w.wake();
        }
    }
}

/// Which [`Results`] of the core hold a kind of operation's results.
trait OpKind: Sized + Send + Unpin + 'static {
    fn results(core: &mut Core) -> &mut Results<Self>;

    fn table(core: &mut Core) -> &mut IdMap<OpId, Completion<Self>> {
        &mut Self::results(core).waiting
    }
}

impl OpKind for WriteResult {
    fn results(core: &mut Core) -> &mut Results<Self> {
        &mut core.write_results
    }
}

impl OpKind for ReadResult {
    fn results(core: &mut Core) -> &mut Results<Self> {
        &mut core.read_results
    }
}

impl OpKind for DescriptorResult {
    fn results(core: &mut Core) -> &mut Results<Self> {
        &mut core.descriptor_results
    }
}

/// The future of a user operation: its result when the core has it.
enum OpFuture<T: OpKind> {
    /// Refused before it started.
    Ready(Option<T>),
    /// Waiting in the core; dropping it withdraws the entry.
    Waiting {
        shared: Arc<Shared>,
        op: OpId,
    },
    Done,
}

impl<T: OpKind> OpFuture<T> {
    fn ready(result: T) -> Self {
        Self::Ready(Some(result))
    }

    /// Marks `op` as the operation being issued, before its command's pump: see
    /// [`OpFuture::after_pump`].
    fn issuing(core: &mut Core, op: OpId) {
        let r = T::results(core);
        r.issuing = Some(op);
        r.issued = None;
    }

    /// The future of operation `op`, marked by [`OpFuture::issuing`] before the pump
    /// that just ran: already complete if that pump finished it (a small message over
    /// shm, a descriptor already there), so neither a table entry nor the first poll's
    /// lock is needed; else waiting, with its entry made now — under the same lock, so
    /// no result can come between.
    fn after_pump(shared: &Arc<Shared>, core: &mut Core, op: OpId) -> Self {
        let r = T::results(core);
        r.issuing = None;
        if let Some(result) = r.issued.take() {
            return Self::ready(result);
        }
        r.waiting.insert(op, Completion::default());
        Self::Waiting {
            shared: shared.clone(),
            op,
        }
    }
}

impl<T: OpKind> Future for OpFuture<T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<T> {
        let this = self.get_mut();
        let result = match this {
            Self::Ready(r) => r.take(),
            Self::Waiting { shared, op } => {
                let mut core = shared.lock();
                if let Some(r) = take_result(&mut core, *op) {
                    Some(r)
                } else if let Some(c) = T::table(&mut core).get_mut(op) {
                    if !c.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        c.waker = Some(cx.waker().clone());
                    }
                    if core.frame_watch.is_none() {
                        return Poll::Pending;
                    }
                    drop(core);
                    match look_for_frame::<T>(shared, *op, cx) {
                        Some(r) => Some(r),
                        None => return Poll::Pending,
                    }
                } else {
                    None
                }
            }
            Self::Done => None,
        };
        *this = Self::Done;
        // Every entry is made before its operation can complete and leaves only here
        // or on drop, so `None` means polled again after completing: a caller's bug.
        match result {
            Some(r) => Poll::Ready(r),
            None => panic!("a pipe operation's future was polled after it completed"),
        }
    }
}

/// Looks for the bytes of the pipe's watched frame for one burst ([`WATCH_BURST`]) and
/// reads the frame once they are there, for the whole pipe (see [`FrameWatch`]).
/// Returns `op`'s result as soon as anything completed it. At the burst's end it leaves
/// `cx`'s waker for the connection's task to wake, to look again after the thread's
/// other tasks ran — unless the futures' time to look is over (the task reads the
/// frame then, and the operation's own waker is woken when it completes).
fn look_for_frame<T: OpKind>(
    shared: &Arc<Shared>,
    op: OpId,
    cx: &mut std::task::Context<'_>,
) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        for _ in 0..LOOKS_PER_CLOCK {
            let mut core = shared.lock();
            let Some(conn) = core.frame_watch.as_ref().map(|w| w.conn) else {
                // Read, here or by the connection's task.
                return take_result(&mut core, op);
            };
            if shared.frame_now(&mut core, conn) {
                core.frame_watch = None;
                // What this completes does not wake this very task for `op`: its result
                // is taken right here (an executor that polls inside `wake` would
                // re-enter this poll).
                let own = T::table(&mut core)
                    .get_mut(&op)
                    .and_then(|c| c.waker.take());
                // Which may watch the next frame.
                shared.pump(&mut core);
                if let Some(r) = take_result(&mut core, op) {
                    return Some(r);
                }
                if let Some(c) = T::table(&mut core).get_mut(&op) {
                    c.waker = own;
                }
                continue;
            }
            drop(core);
            std::hint::spin_loop();
        }
        if start.elapsed() >= WATCH_BURST {
            break;
        }
    }
    let mut core = shared.lock();
    if core
        .frame_watch
        .as_ref()
        .is_some_and(|w| w.since.elapsed() < WATCH_FOR)
        && !core
            .frame_looker
            .as_ref()
            .is_some_and(|l| l.will_wake(cx.waker()))
    {
        core.frame_looker = Some(cx.waker().clone());
    }
    take_result(&mut core, op)
}

/// Takes `op`'s result out of its table, if it is there.
fn take_result<T: OpKind>(core: &mut Core, op: OpId) -> Option<T> {
    let table = T::table(core);
    let r = table.get_mut(&op)?.result.take()?;
    table.remove(&op);
    Some(r)
}

impl<T: OpKind> Drop for OpFuture<T> {
    fn drop(&mut self) {
        if let Self::Waiting { shared, op } = self {
            T::table(&mut shared.lock()).remove(op);
        }
    }
}

/// Why a pipe operation failed.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum OpError {
    /// The pipe failed or was closed (the first error, sticky).
    Pipe(PipeError),
    /// The operation itself was refused (a message over the limits, an allocation that
    /// does not fit its descriptor); the pipe goes on.
    Command(tp_wire::pipe::CommandError),
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pipe(e) => write!(f, "pipe failed: {e}"),
            Self::Command(e) => write!(f, "refused: {e}"),
        }
    }
}

impl std::error::Error for OpError {}

impl Pipe {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// The peer's context name.
    pub fn remote_name(&self) -> String {
        self.shared.lock().pipe.remote_name().to_string()
    }

    /// The transport the handshake chose, once established.
    pub fn transport(&self) -> Option<String> {
        self.shared.lock().pipe.transport().map(str::to_string)
    }

    /// The channels the handshake chose, by name.
    pub fn channel_names(&self) -> Vec<String> {
        self.shared
            .lock()
            .pipe
            .channel_names()
            .map(str::to_string)
            .collect()
    }

    /// Writes a message. Completes once every payload was written and every tensor
    /// sent (or the pipe failed), after every earlier write; hands the message back.
    pub fn write(
        &self,
        msg: Message,
    ) -> impl Future<Output = WriteResult> + Send + Unpin + 'static {
        let mut core = self.shared.lock();
        // Filled in a descriptor the pipe is done with: no allocation for a message
        // shaped like an earlier one.
        let mut desc = core.pipe.recycled_descriptor();
        desc.metadata.extend_from_slice(&msg.metadata);
        desc.payloads
            .extend(msg.payloads.iter().map(|p| WirePayload {
                length: p.data.len() as u64,
                metadata: p.metadata.clone(),
            }));
        desc.tensors.extend(msg.tensors.iter().map(|t| WireTensor {
            length: t.data.byte_len() as u64,
            source_device: t.data.device(),
            target_device: t.target_device,
            metadata: t.metadata.clone(),
        }));
        let op = match core.pipe.write(desc) {
            Ok(op) => op,
            Err(e) => return OpFuture::ready((msg, Err(OpError::Command(e)))),
        };
        OpFuture::<WriteResult>::issuing(&mut core, op);
        core.writes.issue(
            op,
            WriteSlot {
                metadata: msg.metadata,
                payloads: msg
                    .payloads
                    .into_iter()
                    .map(|p| (p.data, p.metadata))
                    .collect(),
                tensors: msg
                    .tensors
                    .into_iter()
                    .map(|t| (Some(t.data), t.target_device, t.metadata))
                    .collect(),
            },
        );
        self.shared.pump(&mut core);
        core.writes.settle();
        OpFuture::after_pump(&self.shared, &mut core, op)
    }

    /// Waits for the next message's descriptor (reads complete in order).
    ///
    /// Every message must be read: a descriptor whose future is dropped, or an
    /// [`Incoming`] dropped without [`Pipe::read`], leaves its message first in line,
    /// and later reads wait for it until the pipe closes.
    pub fn read_descriptor(
        &self,
    ) -> impl Future<Output = DescriptorResult> + Send + Unpin + 'static {
        let mut core = self.shared.lock();
        let op = core.pipe.read_descriptor();
        OpFuture::<DescriptorResult>::issuing(&mut core, op);
        self.shared.pump(&mut core);
        OpFuture::after_pump(&self.shared, &mut core, op)
    }

    /// Reads the message `incoming` describes into `alloc` (one buffer per payload and
    /// tensor, of the described lengths), and hands the buffers back.
    pub fn read(
        &self,
        incoming: Incoming,
        alloc: Allocation,
    ) -> impl Future<Output = ReadResult> + Send + Unpin + 'static {
        let tensor_shapes: Vec<Shape> = alloc
            .tensors
            .iter()
            .map(|t| Shape {
                len: t.byte_len(),
                device: t.device(),
            })
            .collect();
        let mut core = self.shared.lock();
        // Checked first: a refused allocation goes back to the caller untouched. The
        // state machine only queues its reads here; they start in `pump`, below, once
        // the buffers are in their slot.
        if let Err(e) = core.pipe.read(incoming.op, &alloc.payloads, &tensor_shapes) {
            return OpFuture::ready((alloc, Err(OpError::Command(e))));
        }
        OpFuture::<ReadResult>::issuing(&mut core, incoming.op);
        core.reads.issue(
            incoming.op,
            ReadSlot {
                payloads: alloc.payloads.into_iter().map(Some).collect(),
                tensors: alloc.tensors.into_iter().map(Some).collect(),
            },
        );
        self.shared.pump(&mut core);
        core.reads.settle();
        OpFuture::after_pump(&self.shared, &mut core, incoming.op)
    }

    /// Closes the pipe: says goodbye, fails pending operations with
    /// [`PipeError::Closed`]. Idempotent.
    pub fn close(&self) {
        self.shared.input(WirePipe::close);
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.close();
    }
}

/// A connection shared by the pipe's tasks and, after the hand-over, a channel.
struct SharedConn(Arc<BoxConnection>);

impl std::fmt::Debug for SharedConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl tp_transport::Connection for SharedConn {
    fn write<'a>(&'a self, bufs: &'a [&'a [u8]]) -> BoxFuture<'a, Result<(), TransportError>> {
        self.0.write(bufs)
    }

    fn read_exact<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, Result<(), TransportError>> {
        self.0.read_exact(buf)
    }

    fn try_write(&self, bufs: &[&[u8]]) -> bool {
        self.0.try_write(bufs)
    }

    fn try_read_exact(&self, buf: &mut [u8]) -> bool {
        self.0.try_read_exact(buf)
    }

    fn reads_now(&self) -> bool {
        self.0.reads_now()
    }

    fn read_frame(&self, limit: u64) -> BoxFuture<'_, Result<Vec<u8>, TransportError>> {
        self.0.read_frame(limit)
    }

    fn write_frame<'a>(&'a self, body: &'a [u8]) -> BoxFuture<'a, Result<(), TransportError>> {
        self.0.write_frame(body)
    }

    fn close(&self) {
        self.0.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_find_the_issued_operation_beside_the_map_and_settle_it() {
        let mut s: Slots<&str> = Slots::default();
        s.issue(OpId(1), "one");
        assert_eq!(s.get(&OpId(1)), Some(&"one"));
        assert!(s.map.is_empty(), "issued, not filed");
        // Finished within its pump: it never enters the map.
        assert_eq!(s.remove(&OpId(1)), Some("one"));
        s.settle();
        assert!(s.map.is_empty());

        // Still pending after its pump: filed, and found there.
        s.issue(OpId(2), "two");
        *s.get_mut(&OpId(2)).unwrap() = "TWO";
        s.settle();
        assert_eq!(s.map.get(&OpId(2)), Some(&"TWO"));
        // The next one issued does not disturb it.
        s.issue(OpId(3), "three");
        assert_eq!(s.get(&OpId(2)), Some(&"TWO"));
        assert_eq!(s.remove(&OpId(2)), Some("TWO"));
        assert_eq!(s.get(&OpId(3)), Some(&"three"));
        assert_eq!(s.remove(&OpId(4)), None);
    }

    #[test]
    fn a_result_for_the_issuing_operation_skips_the_table() {
        let mut r: Results<u32> = Results {
            issuing: Some(OpId(7)),
            ..Results::default()
        };
        r.complete(OpId(7), 70);
        assert_eq!(r.issued, Some(70));
        assert!(r.waiting.is_empty());
        // Another operation's result goes to its waiting entry; none: dropped.
        r.waiting.insert(OpId(5), Completion::default());
        r.complete(OpId(5), 50);
        r.complete(OpId(6), 60);
        assert_eq!(r.waiting.get(&OpId(5)).and_then(|c| c.result), Some(50));
        assert_eq!(r.waiting.len(), 1);
    }

    /// Over shm a frame that is not there yet is watched; when no future looks for it,
    /// its connection's task reads it all the same, and its operation completes without
    /// a single poll.
    #[test]
    #[cfg(feature = "shm")]
    fn a_watched_frame_no_future_looks_for_is_read_by_the_connection_task() {
        use futures::executor::block_on;
        let server_ctx = Arc::new(Context::new("server"));
        let client_ctx = Arc::new(Context::new("client"));
        let listener = server_ctx.listen(&["shm://"]).unwrap();
        let client = client_ctx.connect(&listener.urls()[0]).unwrap();
        let server = block_on(listener.accept()).unwrap();
        let message = |b: u8| Message {
            metadata: vec![b],
            payloads: vec![Payload {
                data: vec![b; 5],
                metadata: Vec::new(),
            }],
            tensors: Vec::new(),
        };
        // One message first: both ends established.
        let (_, w) = block_on(client.write(message(9)));
        w.unwrap();
        let incoming = block_on(server.read_descriptor()).unwrap();
        let alloc = Allocation::for_descriptor(&incoming.descriptor);
        block_on(server.read(incoming, alloc)).1.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        for round in 0..3u8 {
            // The connection's task may still be finishing the last frame it read (a
            // frame is watched only when nothing is queued there).
            while server
                .shared
                .lock()
                .conns
                .values()
                .any(|h| h.reads_busy.load(Ordering::Acquire) > 0)
            {
                assert!(std::time::Instant::now() < deadline, "the task never idled");
                std::thread::sleep(Duration::from_millis(1));
            }
            // Issued, never polled: there is nothing to read yet, so it is watched (and
            // may be taken over by the task already: a watch lasts `WATCH_FOR`).
            let watches = server.shared.lock().watches;
            let descriptor = server.read_descriptor();
            let op = {
                let core = server.shared.lock();
                assert_eq!(core.watches, watches + 1, "round {round}: watched");
                let waiting = &core.descriptor_results.waiting;
                assert_eq!(waiting.len(), 1);
                *waiting.keys().next().unwrap()
            };
            let (_, w) = block_on(client.write(message(round)));
            w.unwrap();
            loop {
                let mut core = server.shared.lock();
                let done = core
                    .descriptor_results
                    .waiting
                    .get_mut(&op)
                    .is_some_and(|c| c.result.is_some());
                if done {
                    assert!(core.frame_watch.is_none());
                    break;
                }
                drop(core);
                assert!(
                    std::time::Instant::now() < deadline,
                    "round {round}: the frame was never read"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
            let incoming = block_on(descriptor).unwrap();
            assert_eq!(incoming.descriptor.metadata, vec![round]);
            let alloc = Allocation::for_descriptor(&incoming.descriptor);
            let (alloc, r) = block_on(server.read(incoming, alloc));
            r.unwrap();
            assert_eq!(alloc.payloads, vec![vec![round; 5]]);
        }
    }
}
