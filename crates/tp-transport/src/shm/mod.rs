//! The shared-memory transport (Linux): two processes of one machine exchange bytes
//! through rings in shared memory.
//!
//! **Bootstrap.** A listener binds an abstract Unix socket (`shm://<name>`; an empty
//! name picks a unique one, reported by [`Listener::address`](crate::Listener::address)). Each side of a new
//! connection checks the peer's credentials (`SO_PEERCRED`: same uid unless
//! [`PeerCheck::AnyUid`]), creates its *inbox* — a [`ring`] in a memfd segment, mode 0600,
//! sealed against resizing — and two eventfds, and sends all three with `SCM_RIGHTS` in
//! one message. The peer's inbox becomes this side's outbox.
//!
//! **Data.** A write copies into the outbox ring and wakes the peer's reader only if it
//! is parked; a read copies out of the inbox. Either side, finding nothing to do, spins
//! for [`ShmConfig::spin`] and then parks on its eventfd (Dekker-style flags in the ring
//! header make sure no wake-up is lost), so an idle connection costs no CPU. Messages
//! larger than the ring stream through it while the reader drains it, so the writer's and
//! the reader's copies overlap. A read of [`STREAM_FROM`] bytes or more stores into its
//! buffer with streaming (non-temporal) stores: a buffer that large would not stay in
//! the cache anyway, and ordinary stores would first fetch every line they overwrite.
//!
//! **Failure.** After the bootstrap the socket carries nothing: it only tells when the
//! peer is gone. A peer that closes or dies turns every pending operation into
//! [`TransportError::Eof`] once its remaining bytes are read.
//!
//! **Domain.** The descriptor is `shm:<boot id>:<network namespace>`, so shm is never
//! chosen across machines or namespaces (abstract sockets are per network namespace).

#[allow(unsafe_code)]
pub mod ring;
#[allow(unsafe_code)]
mod segment;

use std::future::poll_fn;
use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_io::Async;
use futures::FutureExt;
use futures::future::BoxFuture;
use rustix::event::EventfdFlags;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use self::ring::{Consumer, Producer};
use self::segment::Mapped;
pub use self::segment::{MAX_SEGMENT, Segment};
use crate::listener::{Accepted, Acceptor};
use crate::ordered::{Ordered, Stream};
use crate::registry::{Closable, Registry};
use crate::signal::Signal;
use crate::{BoxConnection, BoxListener, Transport, TransportError};

/// Who may connect.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum PeerCheck {
    /// Only processes of the same user (the default).
    SameUid,
    /// Anyone who can reach the abstract socket (it has no file permissions).
    AnyUid,
}

/// Settings of an shm context.
#[derive(Clone, Copy, Debug)]
pub struct ShmConfig {
    /// Bytes of each ring (a power of two, at least 64). Default 2 MiB.
    pub ring_capacity: usize,
    /// Who may connect.
    pub peer_check: PeerCheck,
    /// How long an operation spins before it parks on its eventfd. Default 200 µs: longer
    /// than a round trip of a few hundred KiB, so a busy connection rarely sleeps, while an
    /// idle one spins once per wait and then sleeps. After the first 20 µs the spin
    /// offers its core to other threads (`sched_yield`) every 4 µs, so a long wait does
    /// not hold a core that the peer's work could use.
    pub spin: Duration,
}

impl Default for ShmConfig {
    fn default() -> Self {
        Self {
            ring_capacity: 2 << 20,
            peer_check: PeerCheck::SameUid,
            spin: Duration::from_micros(200),
        }
    }
}

/// The most a write copies into the ring before publishing it to the reader.
const PUBLISH_CHUNK: usize = 64 << 10;

/// Reads of at least this many bytes store into their destination with streaming
/// stores ([`ring::Dest::Streaming`]). Measured on a 2-vCPU VM with 32 MiB of L3
/// (BENCHMARKS.md, session 18): transport round trips of 64 MiB 11.2–14.6 → 7.4–8.8 ms
/// and of 16 MiB 2.0–2.6 → 1.8–1.9 ms, while at 4 and 8 MiB ordinary stores won (a
/// destination that still fits the cache is read back sooner from there).
pub const STREAM_FROM: usize = 16 << 20;

/// The hello each side sends: magic, version, ring capacity; fds ride along.
const HELLO_MAGIC: u64 = u64::from_le_bytes(*b"tpSHMv01");

/// An shm transport context.
pub struct ShmTransport {
    ctx: Arc<Registry>,
    config: ShmConfig,
    descriptor: Vec<u8>,
    viability: Result<(), String>,
}

impl std::fmt::Debug for ShmTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmTransport")
            .field("descriptor", &String::from_utf8_lossy(&self.descriptor))
            .field("viability", &self.viability)
            .finish()
    }
}

impl Default for ShmTransport {
    fn default() -> Self {
        Self::new(ShmConfig::default())
    }
}

fn domain() -> Result<String, String> {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| format!("cannot read the boot id: {e}"))?;
    let ns = std::fs::read_link("/proc/self/ns/net")
        .map_err(|e| format!("cannot read the network namespace: {e}"))?;
    Ok(format!("shm:{}:{}", boot.trim(), ns.display()))
}

impl ShmTransport {
    /// Creates a context; probes viability for real (a sealed memfd segment is created
    /// and mapped).
    pub fn new(config: ShmConfig) -> Self {
        let descriptor = domain();
        let viability = descriptor
            .as_ref()
            .map(|_| ())
            .map_err(Clone::clone)
            .and_then(|()| {
                Segment::create(ring::region_len(64 << 10))
                    .map(drop)
                    .map_err(|e| format!("cannot create a shared-memory segment: {e}"))
            });
        Self {
            ctx: Arc::default(),
            config,
            descriptor: descriptor.unwrap_or_default().into_bytes(),
            viability,
        }
    }

    fn usable(&self) -> Result<(), TransportError> {
        self.viability()?;
        if self.ctx.is_closed() {
            return Err(TransportError::Closed);
        }
        Ok(())
    }
}

static NAMES: AtomicU64 = AtomicU64::new(0);

fn unique_name() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "tp-{}-{}-{nanos:08x}",
        std::process::id(),
        NAMES.fetch_add(1, Ordering::Relaxed)
    )
}

impl Transport for ShmTransport {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn viability(&self) -> Result<(), TransportError> {
        self.viability
            .clone()
            .map_err(|reason| TransportError::NotViable {
                transport: "shm",
                reason,
            })
    }

    fn domain_descriptor(&self) -> &[u8] {
        &self.descriptor
    }

    fn listen(&self, address: &str) -> Result<BoxListener, TransportError> {
        self.usable()?;
        let name = if address.is_empty() {
            unique_name()
        } else {
            address.to_string()
        };
        let addr = SocketAddr::from_abstract_name(name.as_bytes())
            .map_err(|e| TransportError::bad_address(address, e))?;
        let listener = UnixListener::bind_addr(&addr).map_err(|e| TransportError::io("bind", e))?;
        let listener =
            Async::new(listener).map_err(|e| TransportError::io("register listener", e))?;
        Ok(crate::listener::listener(
            &self.ctx,
            "shm",
            name,
            ShmAcceptor {
                listener,
                config: self.config,
            },
        ))
    }

    fn connect(&self, address: &str) -> BoxFuture<'static, Result<BoxConnection, TransportError>> {
        let ctx = self.ctx.clone();
        let config = self.config;
        let ready = self.usable();
        let address = address.to_string();
        async move {
            ready?;
            if address.is_empty() {
                return Err(TransportError::bad_address(&address, "empty shm name"));
            }
            let addr = SocketAddr::from_abstract_name(address.as_bytes())
                .map_err(|e| TransportError::bad_address(&address, e))?;
            let stream =
                UnixStream::connect_addr(&addr).map_err(|e| TransportError::io("connect", e))?;
            let conn = ShmConnection::handshake(stream, config).await?;
            ctx.adopt(Arc::downgrade(&conn.inner) as Weak<dyn Closable>);
            Ok(Box::new(conn) as BoxConnection)
        }
        .boxed()
    }

    fn close(&self) {
        self.ctx.close_all();
    }
}

struct ShmAcceptor {
    listener: Async<UnixListener>,
    config: ShmConfig,
}

impl Acceptor for ShmAcceptor {
    async fn accept(&self) -> Result<Option<Accepted>, TransportError> {
        let (stream, _) = self
            .listener
            .accept()
            .await
            .map_err(|e| TransportError::io("accept", e))?;
        let stream = stream
            .into_inner()
            .map_err(|e| TransportError::io("accept", e))?;
        // A peer that fails the credential check or the handshake costs only its own
        // connection: the listener keeps accepting.
        match ShmConnection::handshake(stream, self.config).await {
            Ok(conn) => {
                let closable = Arc::downgrade(&conn.inner) as Weak<dyn Closable>;
                Ok(Some(Accepted {
                    conn: Box::new(conn),
                    closable,
                }))
            }
            Err(e) => {
                tracing::warn!(error = %e, "shm: refused a connection");
                Ok(None)
            }
        }
    }
}

/// How long [`ShmIo::spin_until`] checks back to back before it lets the executor run
/// its other tasks.
const SPIN_BURST: Duration = Duration::from_micros(4);

/// How long a wait spins before it offers its core to other threads between bursts.
const SPIN_BEFORE_YIELDING: Duration = Duration::from_micros(20);

/// Checks between two reads of the clock within a burst (a check is a few atomic loads;
/// a clock read costs as much as several).
const SPIN_CHECKS_PER_CLOCK: u32 = 16;

/// The rings, eventfds and socket of one connection.
struct ShmIo {
    sock: Async<UnixStream>,
    inbox: Mutex<Mapped<Consumer>>,
    outbox: Mutex<Mapped<Producer>>,
    /// This side waits here for data in its inbox.
    data_ready: Async<OwnedFd>,
    /// This side waits here for space in its outbox.
    space_ready: Async<OwnedFd>,
    /// Written to wake the peer's reader.
    peer_data_ready: OwnedFd,
    /// Written to wake the peer's writer.
    peer_space_ready: OwnedFd,
    closed: Signal,
    spin: Duration,
}

impl std::fmt::Debug for ShmIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmIo").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn signal(fd: &OwnedFd) {
    // An eventfd counter saturating is harmless: the reader only needs "non-zero".
    let _ = rustix::io::write(fd, &1u64.to_ne_bytes());
}

fn drain(fd: &Async<OwnedFd>) {
    let mut buf = [0u8; 8];
    let _ = rustix::io::read(fd.get_ref(), &mut buf);
}

impl ShmIo {
    /// True once the peer closed its socket (it sends nothing after the hello).
    fn peer_gone(&self) -> bool {
        let mut probe = [0u8; 1];
        match rustix::net::recv(
            self.sock.get_ref(),
            &mut probe,
            RecvFlags::PEEK | RecvFlags::DONTWAIT,
        ) {
            Ok((0, _)) => true,
            Ok(_) => true, // bytes after the hello: a protocol violation; treat as gone
            Err(e) => e != rustix::io::Errno::AGAIN && e != rustix::io::Errno::INTR,
        }
    }

    /// Spins until `ready` or the spin budget runs out. It checks in short bursts
    /// ([`SPIN_BURST`]) and yields to the executor between them (and, after
    /// [`SPIN_BEFORE_YIELDING`], to the OS scheduler too), so the spin holds up
    /// the other tasks of its thread (a pipe's write loop, another connection) for at
    /// most one burst: on an I/O thread shared by many connections a blocking spin would
    /// stall them all for the whole budget. Within a burst the check runs back to back,
    /// so data is seen within a cache-line transfer of its arrival rather than after a
    /// round through the executor (and, every few rounds, the reactor).
    async fn spin_until(&self, ready: impl Fn() -> bool) -> bool {
        if self.spin.is_zero() {
            return ready();
        }
        if !crate::spin::allowed() {
            // Only looking (see `crate::spin`): once, then let the caller go on.
            if ready() {
                return true;
            }
            crate::spin::yield_once().await;
        }
        let start = Instant::now();
        let burst = SPIN_BURST.min(self.spin);
        loop {
            let burst_start = Instant::now();
            loop {
                for _ in 0..SPIN_CHECKS_PER_CLOCK {
                    if ready() {
                        return true;
                    }
                    std::hint::spin_loop();
                }
                if burst_start.elapsed() >= burst {
                    break;
                }
            }
            let spun = start.elapsed();
            if spun >= self.spin {
                return false;
            }
            if spun >= SPIN_BEFORE_YIELDING {
                // A long wait: the peer is busy (a large copy, say), and on a machine
                // with few cores its helpers may be waiting for this one.
                std::thread::yield_now();
            }
            crate::spin::yield_once().await;
        }
    }

    /// Sleeps until `efd` is signalled, the peer goes away, or we close.
    async fn park(&self, efd: &Async<OwnedFd>) -> Result<(), TransportError> {
        let woken = poll_fn(|cx| {
            let efd_ready = efd.poll_readable(cx).is_ready();
            let sock_ready = self.sock.poll_readable(cx).is_ready();
            if efd_ready || sock_ready {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        self.closed.or_closed(woken).await?;
        drain(efd);
        Ok(())
    }
}

impl Stream for ShmIo {
    async fn read_into(&self, buf: &mut [u8]) -> Result<(), TransportError> {
        let mut done = 0;
        let to = if buf.len() >= STREAM_FROM {
            ring::Dest::Streaming
        } else {
            ring::Dest::Cached
        };
        while done < buf.len() {
            let (n, wake) = {
                let mut inbox = lock(&self.inbox);
                let n = inbox.read_to(buf.get_mut(done..).unwrap_or_default(), to);
                (n, n > 0 && inbox.wake_producer())
            };
            if wake {
                signal(&self.peer_space_ready);
            }
            done += n;
            if n > 0 {
                continue;
            }
            if self.closed.is_fired() {
                return Err(TransportError::Closed);
            }
            let ready = || {
                let inbox = lock(&self.inbox);
                // The data's lines travel alongside `head`'s (see `prefetch_next`).
                inbox.prefetch_next();
                inbox.readable() > 0 || inbox.peer_closed()
            };
            if self.spin_until(ready).await && lock(&self.inbox).readable() > 0 {
                continue;
            }
            {
                let inbox = lock(&self.inbox);
                if inbox.readable() == 0 && inbox.peer_closed() {
                    return Err(TransportError::Eof);
                }
            }
            if self.peer_gone() {
                if lock(&self.inbox).readable() == 0 {
                    return Err(TransportError::Eof);
                }
                continue;
            }
            let sleep = lock(&self.inbox).park();
            if sleep {
                self.park(&self.data_ready).await?;
            }
        }
        Ok(())
    }

    async fn write_from(&self, bufs: &[&[u8]]) -> Result<(), TransportError> {
        for b in bufs {
            let mut off = 0;
            while off < b.len() {
                let (n, wake, peer_closed) = {
                    let mut outbox = lock(&self.outbox);
                    // Publish in pieces so the reader starts copying while we still write:
                    // the two copies overlap instead of running one after the other.
                    let end = off.saturating_add(PUBLISH_CHUNK).min(b.len());
                    let n = outbox.write(b.get(off..end).unwrap_or_default());
                    (n, n > 0 && outbox.wake_consumer(), outbox.peer_closed())
                };
                if wake {
                    signal(&self.peer_data_ready);
                }
                off += n;
                if n > 0 {
                    continue;
                }
                if self.closed.is_fired() {
                    return Err(TransportError::Closed);
                }
                if peer_closed || self.peer_gone() {
                    return Err(TransportError::Eof);
                }
                let ready = || {
                    let outbox = lock(&self.outbox);
                    outbox.writable() > 0 || outbox.peer_closed()
                };
                if self.spin_until(ready).await {
                    continue;
                }
                let sleep = lock(&self.outbox).park();
                if sleep {
                    self.park(&self.space_ready).await?;
                }
            }
        }
        Ok(())
    }

    const NOW: bool = true;
    const BY_LOOKING: bool = true;

    fn try_read_into(&self, buf: &mut [u8]) -> bool {
        let wake = {
            let mut inbox = lock(&self.inbox);
            if !inbox.read_exact_now(buf) {
                // A reader that finds nothing usually looks again (the pipe's futures
                // do, for a watched frame): its bytes' lines travel alongside `head`'s.
                inbox.prefetch_next();
                return false;
            }
            inbox.wake_producer()
        };
        if wake {
            signal(&self.peer_space_ready);
        }
        true
    }

    fn try_write_from(&self, bufs: &[&[u8]]) -> bool {
        // Larger writes go in published pieces (see `write_from`), so the reader's copy
        // overlaps the writer's.
        let total = bufs.iter().fold(0usize, |t, b| t.saturating_add(b.len()));
        if total > PUBLISH_CHUNK {
            return false;
        }
        let wake = {
            let mut outbox = lock(&self.outbox);
            if outbox.peer_closed() || !outbox.write_all(bufs) {
                return false;
            }
            outbox.wake_consumer()
        };
        if wake {
            signal(&self.peer_data_ready);
        }
        true
    }

    fn shutdown(&self) {
        lock(&self.outbox).close();
        lock(&self.inbox).close();
        self.closed.fire();
        // Wake the peer so it notices the close, and unblock anything local.
        signal(&self.peer_data_ready);
        signal(&self.peer_space_ready);
        let _ = self.sock.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// An shm connection.
pub struct ShmConnection {
    inner: Arc<Ordered<ShmIo>>,
}

impl std::fmt::Debug for ShmConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmConnection").finish_non_exhaustive()
    }
}

fn io_err(op: &'static str) -> impl Fn(rustix::io::Errno) -> TransportError {
    move |e| TransportError::io(op, e.into())
}

fn refuse(why: impl std::fmt::Display) -> TransportError {
    TransportError::io(
        "shm handshake",
        io::Error::new(io::ErrorKind::InvalidData, why.to_string()),
    )
}

impl ShmConnection {
    async fn handshake(stream: UnixStream, config: ShmConfig) -> Result<Self, TransportError> {
        let cred = rustix::net::sockopt::socket_peercred(&stream).map_err(io_err("SO_PEERCRED"))?;
        if config.peer_check == PeerCheck::SameUid && cred.uid != rustix::process::getuid() {
            return Err(refuse(format!(
                "peer uid {} is not ours",
                cred.uid.as_raw()
            )));
        }
        let sock = Async::new(stream).map_err(|e| TransportError::io("register socket", e))?;
        let capacity = config.ring_capacity;
        let inbox = Mapped::inbox(capacity).map_err(|e| TransportError::io("create ring", e))?;
        let flags = EventfdFlags::NONBLOCK | EventfdFlags::CLOEXEC;
        let data_ready = rustix::event::eventfd(0, flags).map_err(io_err("eventfd"))?;
        let space_ready = rustix::event::eventfd(0, flags).map_err(io_err("eventfd"))?;

        // Send: hello bytes + [inbox segment, data_ready, space_ready].
        let mut hello = [0u8; 16];
        hello[..8].copy_from_slice(&HELLO_MAGIC.to_le_bytes());
        hello[8..].copy_from_slice(&(capacity as u64).to_le_bytes());
        let fds = [inbox.fd().as_fd(), data_ready.as_fd(), space_ready.as_fd()];
        sock.write_with(|s| {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            control.push(SendAncillaryMessage::ScmRights(&fds));
            rustix::net::sendmsg(
                s,
                &[IoSlice::new(&hello)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
            .map_err(io::Error::from)
        })
        .await
        .map_err(|e| TransportError::io("send hello", e))?;

        // Receive the peer's.
        let mut got = [0u8; 16];
        let (n, mut peer_fds) = sock
            .read_with(|s| {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(3))];
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    s,
                    &mut [IoSliceMut::new(&mut got)],
                    &mut control,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                let mut fds: Vec<OwnedFd> = Vec::new();
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(rights) = m {
                        fds.extend(rights);
                    }
                }
                Ok((msg.bytes, fds))
            })
            .await
            .map_err(|e| TransportError::io("receive hello", e))?;
        if n == 0 {
            return Err(TransportError::Eof);
        }
        if n != 16 || got[..8] != HELLO_MAGIC.to_le_bytes() || peer_fds.len() != 3 {
            return Err(refuse("malformed hello"));
        }
        let peer_space_ready = peer_fds.pop().ok_or_else(|| refuse("missing fd"))?;
        let peer_data_ready = peer_fds.pop().ok_or_else(|| refuse("missing fd"))?;
        let outbox_fd = peer_fds.pop().ok_or_else(|| refuse("missing fd"))?;
        let outbox =
            Mapped::outbox(outbox_fd).map_err(|e| TransportError::io("map peer ring", e))?;

        let data_ready =
            Async::new(data_ready).map_err(|e| TransportError::io("register eventfd", e))?;
        let space_ready =
            Async::new(space_ready).map_err(|e| TransportError::io("register eventfd", e))?;
        Ok(Self {
            inner: Arc::new(Ordered::new(ShmIo {
                sock,
                inbox: Mutex::new(inbox),
                outbox: Mutex::new(outbox),
                data_ready,
                space_ready,
                peer_data_ready,
                peer_space_ready,
                closed: Signal::default(),
                spin: config.spin,
            })),
        })
    }
}

crate::ordered::ordered_connection!(ShmConnection);
