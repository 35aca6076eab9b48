//! mpt's lane loops: one I/O thread per lane index, each with its own poller.
//!
//! Lane `i` of every mpt channel of a context is driven by the context's loop `i mod T`,
//! where `T` is the lane count or the number of CPUs if fewer, so the lanes of one
//! tensor are written and read by as many threads at once — the original's layout
//! (one libuv loop per lane), without more threads than cores: on 2 vCPUs, 4 lanes
//! on 2 loops moved 16 MiB 5% faster than on 4. Lanes driven by one thread add socket
//! buffers but no copying: loopback TCP is bound by the kernel's copies on both ends,
//! and a thread can do one copy at a time (measured: 2 lanes on one thread moved
//! 16 MiB at one connection's speed, on 2 and on 16 cores).
//!
//! A part (one lane's slice of one tensor) is queued on its lane in tensor order, and
//! who moves it depends on the tensor's size ([`MptConfig::threads_above`]):
//! - **a small tensor** is moved by the task that waits for it, as the pipe's other
//!   I/O is: its parts are tried at once, again and again for up to tcp's begun-read
//!   spin (20 µs since bytes last moved), and then whenever async-io reports the
//!   socket ready. A hop to a lane thread and back would cost two thread wake-ups,
//!   more than striping saves on a tensor of a megabyte or less. A part that finds
//!   others queued ahead of it is left to the loop, which moves the queue in order;
//!   and a task that stops waiting (its future dropped) hands its parts to the loops.
//! - **a large tensor** is moved by the loops: each lane's thread wakes on its
//!   socket's readiness and reads or writes until the kernel says "not now", so the
//!   lanes' copies run on as many cores at once. A loop never blocks in a read or
//!   write, so one thread serves the lane `i` of any number of channels.
//!
//! [`MptConfig::threads_above`]: super::MptConfig::threads_above
//!
//! Safety: a part carries a raw pointer into its tensor's buffer, which a
//! [`Transfer`] owns until every part is done, failed or dropped — the waiting future
//! may be dropped meanwhile and the buffer still stays. A part's bytes are touched
//! only under its socket's lock, by the one thread that holds it, and parts of one
//! tensor are disjoint.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use async_io::Async;
use futures::task::AtomicWaker;
use polling::{Event, Events, Poller};
use tp_transport::TransportError;

use crate::{RecvBuf, SendBuf};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The buffer of one tensor while its parts are in flight.
pub(super) enum Held {
    /// A send's buffer.
    Send(Box<dyn SendBuf>),
    /// A receive's buffer.
    Recv(Box<dyn RecvBuf>),
}

/// One tensor's transfer across the lanes: owns the buffer until every part is over.
pub(super) struct Transfer {
    held: Mutex<Option<Held>>,
    dir: Dir,
    /// Parts not yet over, plus one for the caller while it queues them.
    left: AtomicUsize,
    error: Mutex<Option<TransportError>>,
    waker: AtomicWaker,
}

impl Transfer {
    /// Stripes `held`'s bytes across `lanes` — slice `i` of [`bounds`] on lane `i` —
    /// behind the parts already queued there; the caller then waits with
    /// [`Transfer::finish`]. A tensor of at most `caller_up_to` bytes is moved by the
    /// caller's task where nothing is queued ahead of it (see the module docs).
    pub(super) fn start(held: Held, lanes: &[Lane], caller_up_to: usize) -> Arc<Self> {
        let dir = match held {
            Held::Send(_) => Dir::Send,
            Held::Recv(_) => Dir::Recv,
        };
        let t = Arc::new(Self {
            held: Mutex::new(Some(held)),
            dir,
            left: AtomicUsize::new(lanes.len() + 1),
            error: Mutex::new(None),
            waker: AtomicWaker::new(),
        });
        let (ptr, len) = match &mut *lock(&t.held) {
            Some(Held::Send(b)) => {
                let s = b.bytes();
                (s.as_ptr().cast_mut(), s.len())
            }
            Some(Held::Recv(b)) => {
                let s = b.bytes_mut();
                (s.as_mut_ptr(), s.len())
            }
            None => (std::ptr::null_mut(), 0),
        };
        let by_caller = len <= caller_up_to;
        for (i, lane) in lanes.iter().enumerate() {
            let (a, b) = bounds(len, i, lanes.len());
            if a == b {
                t.part_done(Ok(()));
            } else {
                let part = Part {
                    // In bounds: `a < b <= len`.
                    ptr: ptr.wrapping_add(a),
                    len: b - a,
                    done: 0,
                    by_loop: !by_caller,
                    transfer: t.clone(),
                };
                lane.queue(part);
            }
        }
        t.part_done(Ok(()));
        t
    }

    /// One part (or the caller's queuing) is over.
    fn part_done(&self, r: Result<(), TransportError>) {
        if let Err(e) = r {
            lock(&self.error).get_or_insert(e);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
    }

    /// Ready once every part is over; wakes `cx` when that happens.
    fn poll_over(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.waker.register(cx.waker());
        if self.left.load(Ordering::Acquire) == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Moves this transfer's caller-driven parts until every part is over; hands back
    /// the buffer and the first error. Dropped before that, it hands its parts to the
    /// lane loops, which finish them (the buffer stays with the transfer until then).
    pub(super) async fn finish(
        self: &Arc<Self>,
        lanes: &[Lane],
    ) -> (Held, Result<(), TransportError>) {
        let mut hand_over = HandOver {
            transfer: self,
            lanes,
        };
        let spin = tp_transport::tcp::begun_read_spin();
        let mut since_moved: Option<std::time::Instant> = None;
        loop {
            let mut moved = false;
            let waiting: Vec<&Lane> = lanes
                .iter()
                .filter(|l| {
                    let (waits, m) = l.drive(self);
                    moved |= m;
                    waits
                })
                .collect();
            if waiting.is_empty() {
                break;
            }
            // The peer is moving this tensor now: spin for its next bytes (or room) as a
            // tcp read that has begun does, giving the core and the executor away between
            // tries, before parking on readiness — a parked thread takes tens of µs to
            // wake on a VM. A caller that only looks does not spin.
            if tp_transport::spin::allowed() {
                if moved {
                    since_moved = None;
                }
                if tp_transport::spin::pause(&mut since_moved, spin).await {
                    continue;
                }
            }
            since_moved = None;
            futures::future::poll_fn(|cx| {
                if waiting
                    .iter()
                    .any(|l| l.poll_ready(self.dir, cx).is_ready())
                {
                    Poll::Ready(())
                } else {
                    self.poll_over(cx)
                }
            })
            .await;
        }
        // No part of ours is left at a queue's head for us to move: the rest is the
        // loops'.
        hand_over.lanes = &[];
        futures::future::poll_fn(|cx| self.poll_over(cx)).await;
        let held = lock(&self.held).take();
        let r = lock(&self.error).take().map_or(Ok(()), Err);
        // `finish` runs once per transfer, after every part; the buffer is there.
        (
            held.unwrap_or_else(|| unreachable!("a transfer's buffer taken twice")),
            r,
        )
    }
}

/// Hands a transfer's caller-driven parts to the loops when its `finish` is dropped.
struct HandOver<'a> {
    transfer: &'a Arc<Transfer>,
    lanes: &'a [Lane],
}

impl Drop for HandOver<'_> {
    fn drop(&mut self) {
        for lane in self.lanes {
            lane.hand_over(self.transfer);
        }
    }
}

/// Slice `i` of `n` of a `len`-byte tensor: `[len·i/n, len·(i+1)/n)`.
pub(super) fn bounds(len: usize, i: usize, n: usize) -> (usize, usize) {
    let at = |k: usize| (len as u128 * k as u128 / n as u128) as usize;
    (at(i), at(i + 1))
}

/// A lane's slice of one tensor.
struct Part {
    ptr: *mut u8,
    len: usize,
    done: usize,
    /// Moved by the lane's loop; else by the task waiting for the transfer, which
    /// waits on the socket's readiness itself (no thread hop for a small tensor).
    by_loop: bool,
    transfer: Arc<Transfer>,
}

// SAFETY: `ptr` points into the buffer `transfer` owns; the part is used by one thread
// at a time (under its socket's lock), and its bytes are no other part's.
unsafe impl Send for Part {}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dir {
    Send,
    Recv,
}

/// What broke a socket, kept so later parts fail the same way.
#[derive(Clone, Copy)]
enum Broken {
    Closed,
    Eof,
    /// The OS error's code where it has one, else its kind.
    Io(io::ErrorKind, Option<i32>),
}

impl Broken {
    fn from_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset => Self::Eof,
            k => Self::Io(k, e.raw_os_error()),
        }
    }

    fn error(self, dir: Dir) -> TransportError {
        match self {
            Self::Closed => TransportError::Closed,
            Self::Eof => TransportError::Eof,
            Self::Io(kind, code) => TransportError::Io {
                op: if dir == Dir::Send { "write" } else { "read" },
                source: code.map_or_else(|| kind.into(), io::Error::from_raw_os_error),
            },
        }
    }
}

#[derive(Default)]
struct SockState {
    sends: VecDeque<Part>,
    recvs: VecDeque<Part>,
    broken: Option<Broken>,
    /// The socket's `SO_RCVLOWAT` as last set; 0 stands for the kernel's default (1).
    lowat: usize,
}

impl SockState {
    /// The queue of `dir`.
    fn queue(&mut self, dir: Dir) -> &mut VecDeque<Part> {
        match dir {
            Dir::Send => &mut self.sends,
            Dir::Recv => &mut self.recvs,
        }
    }
}

/// How much a lane loop lets arrive before its thread wakes to read (`SO_RCVLOWAT`),
/// while more than twice that is still to come for the part it reads.
///
/// Waking at every 64 KiB the sender's kernel delivers kept four threads (two lanes'
/// readers and writers) trading two cores; waking once per megabyte lets the writers
/// run meanwhile. 16 MiB over 2 lanes went from 5.2-5.5 to 6.0-7.0 GB/s on 2 vCPUs
/// (marks of 1-2 MiB alike; 128 KiB no gain; 8 MiB lower). The last 2 MiB of a part
/// wake at every arrival again: waiting for a whole tail and then copying it alone
/// made 2 MiB tensors (1 MiB a lane) slower than with no mark at all. The kernel
/// reports a socket readable anyway when its receive window runs out.
///
/// A lane to this host has a bounded send buffer at both ends
/// ([`tp_transport::tcp::local_send_buffer`]: about 1 MiB in flight, less its
/// bookkeeping), so its mark is that bound (512 KiB) instead: a mark near what can be
/// in flight woke the reader late, and 16 MiB over 4 lanes took 5.7–6.4 ms with a
/// 1 MiB mark against 4.1–4.7 with 512 KiB (2 lanes 4.4–5.4 against 3.9–4.6).
const LOWAT_CAP: usize = 1 << 20;

/// A lane's socket, registered with its loop's poller under `key`.
struct Sock {
    key: usize,
    /// The most `SO_RCVLOWAT` is set to ([`LOWAT_CAP`], or a bounded send buffer).
    lowat_cap: usize,
    /// Registered with async-io's reactor too, for the parts a task moves.
    stream: Async<TcpStream>,
    state: Mutex<SockState>,
}

/// Parts that are over, completed after the socket's lock is released.
type Over = Vec<(Arc<Transfer>, Result<(), TransportError>)>;

impl Sock {
    /// Moves the queue of `dir` forward — only while `only`'s part is at its head, if
    /// given — until it is empty or the socket says "not now"; an error breaks the
    /// socket and fails every part of both queues.
    fn pump(&self, st: &mut SockState, dir: Dir, only: Option<&Arc<Transfer>>, over: &mut Over) {
        if st.broken.is_some() {
            return;
        }
        let queue = st.queue(dir);
        while let Some(part) = queue.front_mut() {
            if only.is_some_and(|t| !Arc::ptr_eq(t, &part.transfer)) {
                return;
            }
            let rest = part.len - part.done;
            // `part.ptr..+len` lies in the buffer `part.transfer` owns until this part is
            // over; only this thread touches it now (we hold the socket's lock) and no
            // other part covers these bytes. A send's buffer is only read.
            let at = part.ptr.wrapping_add(part.done);
            let mut stream: &TcpStream = self.stream.get_ref();
            let r = match dir {
                // SAFETY: see above; `at..at + rest` is the part's unsent tail.
                Dir::Send => stream.write(unsafe { std::slice::from_raw_parts(at, rest) }),
                // SAFETY: see above; `at..at + rest` is the part's unfilled tail.
                Dir::Recv => stream.read(unsafe { std::slice::from_raw_parts_mut(at, rest) }),
            };
            match r {
                Ok(0) if rest > 0 => {
                    return self.fail(st, Broken::Eof, over);
                }
                Ok(n) => {
                    part.done += n;
                    if part.done == part.len
                        && let Some(p) = queue.pop_front()
                    {
                        over.push((p.transfer, Ok(())));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(st, Broken::from_io(&e), over),
            }
        }
    }

    /// Breaks the socket: every queued part fails with `why`, later ones at once.
    fn fail(&self, st: &mut SockState, why: Broken, over: &mut Over) {
        st.broken.get_or_insert(why);
        let why = st.broken.unwrap_or(why);
        over.extend(
            st.sends
                .drain(..)
                .map(|p| (p.transfer, Err(why.error(Dir::Send)))),
        );
        over.extend(
            st.recvs
                .drain(..)
                .map(|p| (p.transfer, Err(why.error(Dir::Recv)))),
        );
        let _ = self.stream.get_ref().shutdown(Shutdown::Both);
    }

    /// Asks the loop's poller for the readiness that the parts at the queues' heads
    /// wait for, where the loop moves them (one-shot); sets how much the socket
    /// gathers before it reports readable (`lowat_cap` during a loop's long part,
    /// else one byte: a task waits for any byte).
    fn arm(&self, st: &mut SockState, poller: &Poller) {
        let loops = |q: &VecDeque<Part>| q.front().is_some_and(|p| p.by_loop);
        if st.broken.is_some() {
            return;
        }
        let lowat = match st.recvs.front() {
            Some(p) if p.by_loop && p.len - p.done > 2 * self.lowat_cap => self.lowat_cap,
            _ => 0,
        };
        if lowat != st.lowat {
            st.lowat = lowat;
            // Only a hint: the reads are the same without it.
            let _ = set_rcvlowat(self.stream.get_ref(), lowat.max(1));
        }
        if !(loops(&st.recvs) || loops(&st.sends)) {
            return;
        }
        let mut interest = Event::none(self.key);
        interest.readable = loops(&st.recvs);
        interest.writable = loops(&st.sends);
        // Fails only once the socket was taken off the poller (the lane dropped).
        let _ = poller.modify(self.stream.get_ref(), interest);
    }
}

/// `setsockopt(SO_RCVLOWAT)`: the socket reports readable once `bytes` are there
/// (capped by the kernel at half the receive buffer).
fn set_rcvlowat(stream: &TcpStream, bytes: usize) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: a valid socket descriptor (borrowed from `stream`) and a pointer to an
    // int the call reads `size_of::<c_int>()` bytes of.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn complete(over: Over) {
    for (t, r) in over {
        t.part_done(r);
    }
}

/// One lane loop: a poller, the sockets on it, and its thread.
struct Loop {
    poller: Poller,
    socks: Mutex<HashMap<usize, Arc<Sock>>>,
    stop: AtomicBool,
}

impl Loop {
    fn run(&self) {
        let mut events = Events::new();
        while !self.stop.load(Ordering::Acquire) {
            events.clear();
            if let Err(e) = self.poller.wait(&mut events, None)
                && e.kind() != io::ErrorKind::Interrupted
            {
                tracing::error!(error = %e, "mpt: a lane loop's poller failed; its lanes close");
                break;
            }
            for ev in events.iter() {
                let Some(sock) = lock(&self.socks).get(&ev.key).cloned() else {
                    continue;
                };
                let mut over = Over::new();
                let mut st = lock(&sock.state);
                if ev.readable {
                    sock.pump(&mut st, Dir::Recv, None, &mut over);
                }
                if ev.writable {
                    sock.pump(&mut st, Dir::Send, None, &mut over);
                }
                sock.arm(&mut st, &self.poller);
                drop(st);
                complete(over);
            }
        }
        self.stop.store(true, Ordering::Release);
        let socks: Vec<_> = lock(&self.socks).drain().map(|(_, s)| s).collect();
        for sock in socks {
            let _ = self.poller.delete(sock.stream.get_ref());
            let mut over = Over::new();
            sock.fail(&mut lock(&sock.state), Broken::Closed, &mut over);
            complete(over);
        }
    }
}

/// A context's lane loops.
pub(super) struct Loops {
    loops: Vec<Arc<Loop>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Loops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loops")
            .field("loops", &self.loops.len())
            .finish()
    }
}

static NEXT_KEY: AtomicUsize = AtomicUsize::new(0);

impl Loops {
    /// Starts `n` loops, each on a thread of its own.
    pub(super) fn start(n: usize) -> io::Result<Self> {
        // Dropped on an error: the loops started so far stop.
        let mut this = Self {
            loops: Vec::with_capacity(n),
            threads: Mutex::new(Vec::with_capacity(n)),
        };
        for i in 0..n {
            let lp = Arc::new(Loop {
                poller: Poller::new()?,
                socks: Mutex::default(),
                stop: AtomicBool::new(false),
            });
            let run = lp.clone();
            this.loops.push(lp);
            let thread = std::thread::Builder::new()
                .name(format!("tp-mpt-lane-{i}"))
                .spawn(move || run.run())?;
            lock(&this.threads).push(thread);
        }
        Ok(this)
    }

    /// Puts `stream` on loop `i` (modulo the count) as a lane; a lane to this host gets
    /// tcp's bounded send buffer.
    pub(super) fn lane(&self, i: usize, stream: TcpStream) -> io::Result<Lane> {
        let lp = self.loops[i % self.loops.len()].clone();
        stream.set_nodelay(true)?;
        let bound = tp_transport::tcp::local_send_buffer();
        let lowat_cap = if tp_transport::tcp::bound_send_buffer_if_local(&stream, bound) {
            bound.min(LOWAT_CAP)
        } else {
            LOWAT_CAP
        };
        let sock = Arc::new(Sock {
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            lowat_cap,
            stream: Async::new(stream)?,
            state: Mutex::default(),
        });
        let mut socks = lock(&lp.socks);
        if lp.stop.load(Ordering::Acquire) {
            return Err(io::Error::other("mpt: the context was closed"));
        }
        // SAFETY: the socket is taken off the poller before it can close: by
        // `Lane::drop`, or by the loop when it stops — whichever removes it from `socks`
        // first deletes it; the fd lives in `sock`, which `socks` keeps until then.
        unsafe {
            lp.poller
                .add(sock.stream.get_ref(), Event::none(sock.key))?
        };
        socks.insert(sock.key, sock.clone());
        drop(socks);
        Ok(Lane { lp, sock })
    }

    /// Stops every loop: their lanes' queued parts fail with `Closed`. Joins the
    /// threads unless called on one of them.
    pub(super) fn close(&self) {
        for lp in &self.loops {
            lp.stop.store(true, Ordering::Release);
            let _ = lp.poller.notify();
        }
        let me = std::thread::current().id();
        for t in std::mem::take(&mut *lock(&self.threads)) {
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

impl Drop for Loops {
    fn drop(&mut self) {
        self.close();
    }
}

/// One lane of one channel.
pub(super) struct Lane {
    lp: Arc<Loop>,
    sock: Arc<Sock>,
}

impl Lane {
    /// Queues `part` behind the parts queued before it on this lane. A part its task
    /// moves is tried at once, as far as the socket lets it; one that finds others
    /// ahead of it goes to the loop instead (the loop moves the queue in order).
    fn queue(&self, mut part: Part) {
        let dir = part.transfer.dir;
        let mut over = Over::new();
        let mut st = lock(&self.sock.state);
        if let Some(why) = st.broken {
            drop(st);
            return part.transfer.part_done(Err(why.error(dir)));
        }
        let queue = st.queue(dir);
        part.by_loop |= !queue.is_empty();
        let now = !part.by_loop;
        queue.push_back(part);
        if now {
            self.sock.pump(&mut st, dir, None, &mut over);
        }
        self.sock.arm(&mut st, &self.lp.poller);
        drop(st);
        complete(over);
    }

    /// Moves `t`'s part if it is at the head of its queue and the task moves it;
    /// returns whether it is still there, waiting for the socket, and whether any of
    /// its bytes moved.
    fn drive(&self, t: &Arc<Transfer>) -> (bool, bool) {
        let mut over = Over::new();
        let mut st = lock(&self.sock.state);
        let head = |st: &mut SockState| {
            st.queue(t.dir)
                .front()
                .filter(|p| !p.by_loop && Arc::ptr_eq(&p.transfer, t))
                .map(|p| p.done)
        };
        let Some(before) = head(&mut st) else {
            return (false, false);
        };
        self.sock.pump(&mut st, t.dir, Some(t), &mut over);
        let after = head(&mut st);
        self.sock.arm(&mut st, &self.lp.poller);
        drop(st);
        let moved = after != Some(before);
        complete(over);
        (after.is_some(), moved)
    }

    /// Readiness of the socket for `dir`, through async-io's reactor.
    fn poll_ready(&self, dir: Dir, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match dir {
            Dir::Send => self.sock.stream.poll_writable(cx),
            Dir::Recv => self.sock.stream.poll_readable(cx),
        }
    }

    /// Gives `t`'s parts to the loop (their task stopped waiting).
    fn hand_over(&self, t: &Arc<Transfer>) {
        let mut st = lock(&self.sock.state);
        for p in st
            .queue(t.dir)
            .iter_mut()
            .filter(|p| Arc::ptr_eq(&p.transfer, t))
        {
            p.by_loop = true;
        }
        self.sock.arm(&mut st, &self.lp.poller);
    }

    /// Closes the lane: queued parts fail with `Closed`, the peer sees the end.
    pub(super) fn close(&self) {
        let mut over = Over::new();
        self.sock
            .fail(&mut lock(&self.sock.state), Broken::Closed, &mut over);
        complete(over);
    }
}

impl Drop for Lane {
    fn drop(&mut self) {
        self.close();
        if lock(&self.lp.socks).remove(&self.sock.key).is_some() {
            let _ = self.lp.poller.delete(self.sock.stream.get_ref());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the task's spin goes by: `drive` says whether the part still waits and
    /// whether any of its bytes moved.
    #[test]
    fn drive_reports_whether_a_part_waits_and_whether_it_moved() {
        use std::io::Write;
        let loops = Loops::start(1).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut peer, _) = listener.accept().unwrap();
        let lane = loops.lane(0, stream).unwrap();
        let lanes = [lane];
        let t = Transfer::start(Held::Recv(Box::new(vec![0u8; 8])), &lanes, usize::MAX);
        let drive_until = |want: (bool, bool)| {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                let got = lanes[0].drive(&t);
                if got == want || std::time::Instant::now() > deadline {
                    return got;
                }
                if got.1 {
                    // Moved, but not all that was asked for yet: keep driving.
                    continue;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        assert_eq!(lanes[0].drive(&t), (true, false), "nothing sent yet");
        peer.write_all(b"abcd").unwrap();
        assert_eq!(drive_until((true, true)), (true, true), "half came");
        assert_eq!(lanes[0].drive(&t), (true, false), "nothing more yet");
        peer.write_all(b"efgh").unwrap();
        assert_eq!(drive_until((false, true)), (false, true), "the rest came");
        assert_eq!(lanes[0].drive(&t), (false, false), "no part left");
    }

    /// A lane to this host gets tcp's bounded send buffer (the mark is lowered only
    /// when it did), and its read mark stays below the bound.
    #[test]
    fn a_lane_to_this_host_is_bounded_and_marks_below_the_bound() {
        let loops = Loops::start(1).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let _peer = listener.accept().unwrap();
        let lane = loops.lane(0, stream).unwrap();
        let bound = tp_transport::tcp::local_send_buffer();
        if bound == 0 {
            assert_eq!(lane.sock.lowat_cap, LOWAT_CAP);
        } else {
            assert_eq!(lane.sock.lowat_cap, bound.min(LOWAT_CAP));
            assert!(
                lane.sock.lowat_cap < LOWAT_CAP,
                "the default bound is below 1 MiB"
            );
        }
    }
}
