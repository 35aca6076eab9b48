//! The TCP transport (the original's "uv").
//!
//! Addresses are `host:port`: `127.0.0.1:5000`, `[::1]:0`, `example.com:80`; a bare IP
//! (`10.0.0.1`, `::1`) means port 0, and port 0 asks the OS for an ephemeral port, which
//! [`Listener::address`](crate::Listener::address) then reports. An empty address listens on the guessed address
//! ([`guess_address`]). Every connection sets `TCP_NODELAY`.
//!
//! A read of less than [`READ_AHEAD`] bytes asks the socket for up to that many and keeps
//! what it did not need for the reads after it, so a frame's header, its body and the
//! small payloads behind it come in one system call; larger reads land directly in the
//! caller's buffer. The socket is read only while a read is pending: a reader that stops
//! reading leaves the bytes in the kernel (beyond at most [`READ_AHEAD`] of them) and the
//! writer's window fills (backpressure).
//!
//! A peer that closes, resets or vanishes shows up as [`TransportError::Eof`].
//!
//! A read spins on the socket for a while before it parks on the reactor when its bytes
//! are not there yet: a parked thread on a VM takes tens of microseconds to wake
//! (baseline.md), and an answer already on its way is then seen at once.
//! - A read that **waits for a message to begin** (a small read with nothing held: the
//!   next frame's header) spins up to [`WAIT_SPIN`] = 100 µs — as long as such spins
//!   pay. One that misses (the peer took longer: a think time, a large message's
//!   transfer) makes the connection's next waits park at once, and every
//!   [`PROBE_EVERY`]-th spins again to see whether answers come quickly once more; a
//!   read of [`LARGE_READ`] bytes or more stops the spin the same way. On an idle VM a
//!   small round trip fell from 63–72 to 11–15 µs (both ends spin; BENCHMARKS.md).
//! - A read that **has begun** — the rest of a payload or tensor whose first bytes came —
//!   and the first bytes of a read of [`READ_AHEAD`] up to [`LARGE_READ`] bytes (a
//!   payload or tensor the frame before it announced) spin up to [`MID_READ_SPIN`] =
//!   20 µs: the sender is writing them now. (A 1 MiB payload's round trip fell from
//!   458–507 to 254–267 µs; a 64 KiB tensor's from 70–80 to 41–46 µs.)
//! - The first bytes of a read of [`LARGE_READ`] bytes or more park at once: they
//!   stream in while the reader sleeps (spinning for them measured slower at 1 MiB).
//!
//! A spin gives its core to any other thread that wants it between two tries
//! (`sched_yield`), so on a machine whose other cores are busy it does not hold up the
//! very answer it waits for, and it yields to the executor's other tasks with
//! [`crate::spin::yield_for_io`], so their sockets are still looked at. `TP_TCP_SPIN_US`
//! and `TP_TCP_MID_SPIN_US` (microseconds, at most 1000) change the two budgets; 0 turns
//! a spin off, and a process limited to one CPU never spins (the writer could not run
//! meanwhile).
//!
//! A connection whose peer is on this host (loopback, or this host's own address) gets
//! a bounded send buffer, [`LOCAL_SEND_BUFFER`] (about 1 MiB in flight), instead of the
//! kernel's autotuned one: large loopback transfers ran about 1.5× faster so (a 64 MiB
//! round trip 20–22 ms instead of 31–34). `TP_TCP_SNDBUF` (bytes) changes it; 0 leaves
//! the autotuning. A connection to another host keeps the autotuned buffer.
//!
//! Host names are resolved with the system resolver (blocking, once per call).

use std::io::{self, IoSlice};
use std::net::{
    IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener as StdListener, TcpStream, ToSocketAddrs,
};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use async_io::Async;
use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};

use crate::listener::{Accepted, Acceptor};
use crate::ordered::{Ordered, Stream};
use crate::registry::{Closable, Registry};
use crate::{BoxConnection, BoxListener, Transport, TransportError};

/// The domain descriptor: any two TCP contexts can try to reach each other.
pub const DOMAIN_DESCRIPTOR: &[u8] = b"tcp:*";

/// A TCP transport context.
#[derive(Clone, Default)]
pub struct TcpTransport {
    ctx: Arc<Registry>,
}

impl std::fmt::Debug for TcpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpTransport")
            .field("closed", &self.ctx.is_closed())
            .finish()
    }
}

impl TcpTransport {
    /// Creates a context.
    pub fn new() -> Self {
        Self::default()
    }
}

/// Where a guessed address came from.
#[non_exhaustive]
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum AddressSource {
    /// The interface named by `TP_SOCKET_IFNAME`.
    Interface(String),
    /// The machine's host name, resolved.
    Hostname(String),
    /// Nothing better was found: `127.0.0.1`, reachable from this machine only.
    Loopback,
}

/// Guesses the address other machines can reach this one at, as the original does:
/// the interface named by `TP_SOCKET_IFNAME`, else the first bindable address of the
/// host name, else `127.0.0.1` (with a warning).
pub fn guess_address() -> (IpAddr, AddressSource) {
    if let Ok(name) = std::env::var("TP_SOCKET_IFNAME") {
        match interface_address(&name) {
            Some(ip) => return (ip, AddressSource::Interface(name)),
            None => {
                tracing::warn!(interface = %name, "TP_SOCKET_IFNAME names no interface with an address; guessing instead")
            }
        }
    }
    if let Some((ip, host)) = hostname_address() {
        return (ip, AddressSource::Hostname(host));
    }
    tracing::warn!(
        "no address found for this host; using 127.0.0.1, reachable from this machine only"
    );
    (IpAddr::V4(Ipv4Addr::LOCALHOST), AddressSource::Loopback)
}

/// The address of interface `name`, IPv4 preferred.
pub fn interface_address(name: &str) -> Option<IpAddr> {
    let addrs = if_addrs::get_if_addrs().ok()?;
    let mut mine: Vec<IpAddr> = addrs
        .into_iter()
        .filter(|a| a.name == name)
        .map(|a| a.ip())
        .collect();
    mine.sort_by_key(|ip| !ip.is_ipv4());
    mine.into_iter().next()
}

fn hostname_address() -> Option<(IpAddr, String)> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|h| !h.is_empty())?;
    let ip = (host.as_str(), 0)
        .to_socket_addrs()
        .ok()?
        .find(|sa| StdListener::bind(*sa).is_ok())?
        .ip();
    Some((ip, host))
}

/// Parses a TCP address; see the module docs for the accepted forms.
///
/// # Errors
/// [`TransportError::BadAddress`].
pub fn parse_address(address: &str) -> Result<SocketAddr, TransportError> {
    if address.is_empty() {
        return Ok(SocketAddr::new(guess_address().0, 0));
    }
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return Ok(sa);
    }
    let bare = address
        .strip_prefix('[')
        .and_then(|a| a.strip_suffix(']'))
        .unwrap_or(address);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 0));
    }
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| TransportError::bad_address(address, "expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| TransportError::bad_address(address, "port must be a number in 0..=65535"))?;
    (host, port)
        .to_socket_addrs()
        .map_err(|e| TransportError::bad_address(address, e))?
        .next()
        .ok_or_else(|| TransportError::bad_address(address, "host name resolves to no address"))
}

impl Transport for TcpTransport {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn viability(&self) -> Result<(), TransportError> {
        Ok(())
    }

    fn domain_descriptor(&self) -> &[u8] {
        DOMAIN_DESCRIPTOR
    }

    fn listen(&self, address: &str) -> Result<BoxListener, TransportError> {
        if self.ctx.is_closed() {
            return Err(TransportError::Closed);
        }
        let (listener, local) = bind(address)?;
        Ok(crate::listener::listener(
            &self.ctx,
            "tcp",
            local.to_string(),
            TcpAcceptor(listener),
        ))
    }

    fn connect(&self, address: &str) -> BoxFuture<'static, Result<BoxConnection, TransportError>> {
        let ctx = self.ctx.clone();
        let parsed = parse_address(address);
        async move {
            let sa = parsed?;
            if sa.port() == 0 {
                return Err(TransportError::bad_address(
                    &sa.to_string(),
                    "cannot connect to port 0",
                ));
            }
            if ctx.is_closed() {
                return Err(TransportError::Closed);
            }
            let stream = Async::<TcpStream>::connect(sa)
                .await
                .map_err(|e| TransportError::io("connect", e))?;
            let conn = TcpConnection::new(stream)?;
            ctx.adopt(Arc::downgrade(&conn.inner) as Weak<dyn Closable>);
            Ok(Box::new(conn) as BoxConnection)
        }
        .boxed()
    }

    fn close(&self) {
        self.ctx.close_all();
    }
}

/// Binds a listening socket on a `host:port` address (see [`parse_address`]); returns it
/// with the address actually bound.
pub(crate) fn bind(address: &str) -> Result<(Async<StdListener>, SocketAddr), TransportError> {
    let sa = parse_address(address)?;
    let listener = Async::<StdListener>::bind(sa).map_err(|e| TransportError::io("bind", e))?;
    let local = listener
        .get_ref()
        .local_addr()
        .map_err(|e| TransportError::io("getsockname", e))?;
    Ok((listener, local))
}

struct TcpAcceptor(Async<StdListener>);

impl Acceptor for TcpAcceptor {
    async fn accept(&self) -> Result<Option<Accepted>, TransportError> {
        let (stream, _) = self
            .0
            .accept()
            .await
            .map_err(|e| TransportError::io("accept", e))?;
        let conn = TcpConnection::new(stream)?;
        let closable = Arc::downgrade(&conn.inner) as Weak<dyn Closable>;
        Ok(Some(Accepted {
            conn: Box::new(conn),
            closable,
        }))
    }
}

/// The most a small read asks the socket for ahead of what it needs.
pub const READ_AHEAD: usize = 8 << 10;

/// The raw byte stream under a [`TcpConnection`].
#[derive(Debug)]
struct TcpIo {
    stream: Async<TcpStream>,
    spin: Spin,
    /// Bytes read from the socket that no read has taken yet (reads never overlap:
    /// `Ordered` runs them one at a time).
    ahead: Mutex<Ahead>,
}

/// Read-ahead bytes: `buf[start..end]`. `buf` is allocated on the first small read.
#[derive(Default)]
struct Ahead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl std::fmt::Debug for Ahead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ahead").field("held", &self.held()).finish()
    }
}

impl Ahead {
    /// Moves as many held bytes as fit into `dst`; returns how many.
    fn take(&mut self, dst: &mut [u8]) -> usize {
        let held = self.buf.get(self.start..self.end).unwrap_or_default();
        let n = held.len().min(dst.len());
        if let (Some(to), Some(from)) = (dst.get_mut(..n), held.get(..n)) {
            to.copy_from_slice(from);
        }
        self.start += n;
        n
    }

    fn held(&self) -> usize {
        self.end - self.start
    }
}

impl TcpIo {
    fn ahead(&self) -> std::sync::MutexGuard<'_, Ahead> {
        self.ahead.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// One read from the socket into `buf`, spinning first as [`Spin`] says for a read
    /// that `waits` so.
    ///
    /// Between two tries the spin yields the core (to other threads) and the executor
    /// (to other tasks, and soon to the reactor: [`crate::spin::yield_for_io`]), so
    /// neither waits for the spin to end.
    async fn read_some(&self, buf: &mut [u8], waits: Waits) -> io::Result<usize> {
        use std::io::Read;
        let budget = self.spin.plan(waits);
        if !budget.is_zero() {
            let mut start = None;
            loop {
                match self.stream.get_ref().read(buf) {
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    other => {
                        if start.is_some() {
                            self.spin.caught(waits, true);
                        }
                        return other;
                    }
                }
                // A caller that only looks (`without_spinning`) neither starts the clock
                // nor gives the core away: the spin begins where the read is awaited
                // for real.
                if !crate::spin::allowed() {
                    crate::spin::yield_for_io().await;
                } else if !crate::spin::pause(&mut start, budget).await {
                    self.spin.caught(waits, false);
                    break;
                }
            }
        }
        // Park on the reactor until the socket is readable.
        (&self.stream).read(buf).await
    }
}

/// A peer that closes, resets or vanishes is the end of the stream.
fn map_io(op: &'static str, e: io::Error) -> TransportError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::ConnectionReset => TransportError::Eof,
        _ => TransportError::io(op, e),
    }
}

impl Stream for TcpIo {
    async fn read_into(&self, buf: &mut [u8]) -> Result<(), TransportError> {
        let large = buf.len() >= LARGE_READ;
        if large {
            self.spin.large_read();
        }
        let mut done = self.ahead().take(buf);
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or_default();
            let direct = rest.len() >= READ_AHEAD;
            let waits = match (done > 0, direct) {
                (true, _) => Waits::Rest,
                (false, false) => Waits::Start,
                // The first bytes of a read below LARGE_READ are on their way (the frame
                // before it announced it): spin for them as for a begun read's rest.
                (false, true) if !large => Waits::Rest,
                (false, true) => Waits::Bulk,
            };
            let got = if direct {
                let got = self.read_some(rest, waits).await;
                done += *got.as_ref().unwrap_or(&0);
                got
            } else {
                // A small read: ask for up to READ_AHEAD and keep the rest. The (empty)
                // buffer is taken out while the read waits; a read dropped meanwhile
                // breaks the connection anyway (`Ordered`), so nothing held is lost.
                let mut ahead = std::mem::take(&mut *self.ahead());
                ahead.buf.resize(READ_AHEAD, 0);
                let got = self.read_some(&mut ahead.buf, waits).await;
                (ahead.start, ahead.end) = (0, *got.as_ref().unwrap_or(&0));
                done += ahead.take(rest);
                *self.ahead() = ahead;
                got
            };
            match got {
                Ok(0) => return Err(TransportError::Eof),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(map_io("read", e)),
            }
        }
        Ok(())
    }

    /// Bytes already read ahead only: never a system call.
    const NOW: bool = true;

    fn try_read_into(&self, buf: &mut [u8]) -> bool {
        let mut ahead = self.ahead();
        if ahead.held() < buf.len() {
            return false;
        }
        ahead.take(buf);
        true
    }

    async fn write_from(&self, bufs: &[&[u8]]) -> Result<(), TransportError> {
        let mut bufs: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
        while !bufs.is_empty() {
            let slices: Vec<IoSlice<'_>> = bufs.iter().take(64).map(|b| IoSlice::new(b)).collect();
            let mut n = match (&self.stream).write_vectored(&slices).await {
                Ok(0) => return Err(map_io("write", io::ErrorKind::WriteZero.into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(map_io("write", e)),
            };
            while n > 0 {
                let Some(first) = bufs.first_mut() else { break };
                if n >= first.len() {
                    n -= first.len();
                    bufs.remove(0);
                } else {
                    *first = first.get(n..).unwrap_or_default();
                    n = 0;
                }
            }
        }
        Ok(())
    }

    fn shutdown(&self) {
        // Wakes every pending read and write with an error; ignore "not connected".
        let _ = self.stream.get_ref().shutdown(Shutdown::Both);
    }
}

/// How long a read that has begun spins for its next bytes before it parks, unless
/// `TP_TCP_MID_SPIN_US` says otherwise (see the module docs), or the process may use
/// only one CPU (then it parks at once).
pub const MID_READ_SPIN: std::time::Duration = std::time::Duration::from_micros(20);

/// Whether this process may run on one CPU only (asked once: `available_parallelism`
/// reads cgroup files).
fn one_cpu() -> bool {
    static ONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONE.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() == 1))
}

/// How long a read that waits for a message to begin spins before it parks, unless
/// `TP_TCP_SPIN_US` says otherwise (see the module docs).
pub const WAIT_SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// A read at least this large makes the connection's next waits for a message park at
/// once (until a probe, [`PROBE_EVERY`]): a peer exchanging such messages answers after
/// a transfer of its own, and a spin through it measured slower (BENCHMARKS.md).
pub const LARGE_READ: usize = 256 << 10;

/// After a wait's spin missed, waits park at once until this many have passed since; the
/// next spins again (a probe).
pub const PROBE_EVERY: u32 = 16;

/// What a read from the socket waits for; it decides how long the read spins ([`Spin`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Waits {
    /// The first bytes of a small read: typically the next message's header, which
    /// comes as soon as the peer answers.
    Start,
    /// The first bytes of a read of [`LARGE_READ`] bytes or more (a payload or tensor
    /// announced before it): it parks at once, and its bytes stream in while it sleeps.
    Bulk,
    /// More bytes of a read that already has some, or the first of a read of
    /// [`READ_AHEAD`] to [`LARGE_READ`] bytes: the peer is writing them now.
    Rest,
}

/// A connection's spinning before a read parks on the reactor (see the module docs).
#[derive(Debug)]
struct Spin {
    /// For a read waiting for a message to begin (`TP_TCP_SPIN_US`).
    wait: std::time::Duration,
    /// For a read that has begun (`TP_TCP_MID_SPIN_US`).
    begun: std::time::Duration,
    /// Waits for a message since the last wait's spin missed (or a large read); 0 while
    /// the last spin caught its bytes. From 1 up to [`PROBE_EVERY`] they park at once.
    parked: std::sync::atomic::AtomicU32,
}

/// A spin budget from the environment variable `name` (microseconds, at most 1000),
/// else `default` — or none where the process may use one CPU only: the writer could
/// not run while the reader spins, so a spin would only delay the bytes it waits for.
fn spin_budget(name: &str, default: std::time::Duration) -> std::time::Duration {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|us| std::time::Duration::from_micros(us.min(1_000)))
        .unwrap_or_else(|| {
            if one_cpu() {
                std::time::Duration::ZERO
            } else {
                default
            }
        })
}

/// How long a read that has begun spins for its next bytes before it parks:
/// [`MID_READ_SPIN`], or `TP_TCP_MID_SPIN_US`, or none on one CPU (see the module
/// docs). mpt's lanes spin as long for the parts of a tensor their task moves. Read
/// once.
pub fn begun_read_spin() -> std::time::Duration {
    static BUDGET: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| spin_budget("TP_TCP_MID_SPIN_US", MID_READ_SPIN))
}

/// How long a read waiting for a message to begin spins: [`WAIT_SPIN`], or
/// `TP_TCP_SPIN_US`, or none on one CPU. Read once, as the other budgets.
fn waiting_read_spin() -> std::time::Duration {
    static BUDGET: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| spin_budget("TP_TCP_SPIN_US", WAIT_SPIN))
}

impl Spin {
    fn from_env() -> Self {
        Self {
            wait: waiting_read_spin(),
            begun: begun_read_spin(),
            parked: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// How long a read that `waits` for its bytes may spin.
    fn plan(&self, waits: Waits) -> std::time::Duration {
        use std::sync::atomic::Ordering::Relaxed;
        match waits {
            Waits::Rest => return self.begun,
            Waits::Bulk => return std::time::Duration::ZERO,
            Waits::Start => {}
        }
        match self.parked.load(Relaxed) {
            0 => self.wait,
            n if n >= PROBE_EVERY => {
                self.parked.store(1, Relaxed);
                self.wait
            }
            n => {
                self.parked.store(n + 1, Relaxed);
                std::time::Duration::ZERO
            }
        }
    }

    /// A large message passed: the next waits park (until a probe), as after a miss.
    fn large_read(&self) {
        self.parked.store(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Records whether a spin caught its bytes.
    fn caught(&self, waits: Waits, caught: bool) {
        if waits == Waits::Start {
            self.parked
                .store(u32::from(!caught), std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// The send buffer (`SO_SNDBUF`) of a connection whose peer is on this host, unless
/// `TP_TCP_SNDBUF` says otherwise ([`local_send_buffer`]). Linux doubles the value for
/// its bookkeeping, so about 1 MiB of a connection's data is in flight at most (the
/// kernel caps the value at `net.core.wmem_max` first: 4 MiB on these machines, often
/// 208 KiB elsewhere).
///
/// Over loopback a large transfer ran far faster with its queued bytes bounded this
/// way than with the kernel's autotuned buffer (up to 4 MiB here): 64 MiB round trips
/// took 20–22 ms instead of 31–34, 1 MiB ones 225 µs instead of 360 (BENCHMARKS.md) —
/// presumably because the bytes in flight then stay in the caches between the
/// sender's copy and the receiver's. Half the size was slower; from 1.125 MiB in
/// flight on, no faster than autotuning. A connection to another host keeps the
/// autotuned buffer: a bounded one would cap its throughput at the buffer per round
/// trip.
pub const LOCAL_SEND_BUFFER: usize = 512 << 10;

/// The send buffer for connections to this host: `TP_TCP_SNDBUF` (bytes; 0 leaves
/// the kernel's autotuning) if set, else [`LOCAL_SEND_BUFFER`]. Read once.
pub fn local_send_buffer() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| match std::env::var("TP_TCP_SNDBUF") {
        Err(_) => LOCAL_SEND_BUFFER,
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            tracing::warn!(value = %v, "TP_TCP_SNDBUF is not a byte count; using the default");
            LOCAL_SEND_BUFFER
        }),
    })
}

/// Sets `bytes` as the send buffer of `stream` if its peer is on this host (loopback,
/// or this host's own address) and `bytes` is not 0; returns whether it asked. The tcp
/// transport's connections and mpt's lanes get [`local_send_buffer`].
pub fn bound_send_buffer_if_local(stream: &TcpStream, bytes: usize) -> bool {
    let local = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(peer), Ok(me)) => is_local(peer, me),
        _ => false,
    };
    if bytes == 0 || !local {
        return false;
    }
    // Only a hint: the connection works the same without it.
    if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(stream, bytes) {
        tracing::debug!(error = %e, "could not bound a local TCP connection's send buffer");
    }
    true
}

/// Whether a connection from `me` to `peer` stays on this host.
fn is_local(peer: SocketAddr, me: SocketAddr) -> bool {
    peer.ip().is_loopback() || peer.ip() == me.ip()
}

/// A TCP connection.
pub struct TcpConnection {
    inner: Arc<Ordered<TcpIo>>,
}

impl std::fmt::Debug for TcpConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpConnection")
            .field("peer", &self.peer_addr().ok())
            .finish()
    }
}

impl TcpConnection {
    fn new(stream: Async<TcpStream>) -> Result<Self, TransportError> {
        stream
            .get_ref()
            .set_nodelay(true)
            .map_err(|e| TransportError::io("set TCP_NODELAY", e))?;
        bound_send_buffer_if_local(stream.get_ref(), local_send_buffer());
        Ok(Self {
            inner: Arc::new(Ordered::new(TcpIo {
                stream,
                spin: Spin::from_env(),
                ahead: Mutex::new(Ahead::default()),
            })),
        })
    }

    /// The peer's address.
    ///
    /// # Errors
    /// The OS error of `getpeername`.
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.stream.stream.get_ref().peer_addr()
    }
}

crate::ordered::ordered_connection!(TcpConnection);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Connection;
    use std::time::Duration;

    /// A connected pair over loopback, as the concrete type (its spin state can be
    /// looked at): (client, server).
    fn pair() -> (TcpConnection, TcpConnection) {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s, _) = listener.accept().unwrap();
        let conn = |t| TcpConnection::new(Async::new(t).unwrap()).unwrap();
        (conn(c), conn(s))
    }

    #[test]
    fn parse_address_accepts_the_documented_forms() {
        assert_eq!(
            parse_address("127.0.0.1:80").unwrap(),
            "127.0.0.1:80".parse().unwrap()
        );
        assert_eq!(
            parse_address("[::1]:0").unwrap(),
            "[::1]:0".parse().unwrap()
        );
        assert_eq!(parse_address("::1").unwrap(), "[::1]:0".parse().unwrap());
        assert_eq!(parse_address("[::1]").unwrap(), "[::1]:0".parse().unwrap());
        assert_eq!(
            parse_address("10.1.2.3").unwrap(),
            "10.1.2.3:0".parse().unwrap()
        );
        assert_eq!(parse_address("localhost:7").unwrap().port(), 7);
    }

    /// A small read takes what came with it into the read-ahead; the reads after it
    /// get those bytes first, now (`try_read_exact`) or as the start of a large read.
    #[test]
    fn small_reads_keep_what_came_with_them_for_the_reads_after() {
        futures::executor::block_on(async {
            let (c, s) = pair();
            let big: Vec<u8> = (0..3 * READ_AHEAD).map(|i| (i % 251) as u8).collect();
            c.write(&[b"head", b"body", &big]).await.unwrap();
            let mut head = [0u8; 4];
            s.read_exact(&mut head).await.unwrap();
            assert_eq!(&head, b"head");
            // The body came in the same segment: held, so taken now.
            let mut body = [0u8; 4];
            assert!(s.try_read_exact(&mut body), "the body was read ahead");
            assert_eq!(&body, b"body");
            assert!(
                !s.try_read_exact(&mut [0u8; READ_AHEAD]),
                "only what is held"
            );
            let mut got = vec![0u8; big.len()];
            s.read_exact(&mut got).await.unwrap();
            assert!(got == big, "held bytes first, then the socket's, in order");
            assert!(!s.reads_now(), "tcp's bytes are not found by looking");
        });
    }

    /// A read that has begun and then finds the socket empty: the rest, written long
    /// after its spin's budget, still completes it, in order.
    #[test]
    fn a_begun_read_whose_rest_comes_late_parks_and_completes() {
        futures::executor::block_on(async {
            let (c, s) = pair();
            let big: Vec<u8> = (0..4 * READ_AHEAD).map(|i| (i % 253) as u8).collect();
            let (first, rest) = big.split_at(big.len() / 2 + 7);
            let mut got = vec![0u8; big.len()];
            let late = async {
                c.write(&[first]).await.unwrap();
                // Far beyond MID_READ_SPIN: the reader has parked by now.
                async_io::Timer::after(Duration::from_millis(30)).await;
                c.write(&[rest]).await.unwrap();
            };
            let (_, r) = futures::future::join(late, s.read_exact(&mut got)).await;
            r.unwrap();
            assert!(got == big, "both halves, in order");
        });
    }

    fn spin_of(wait_us: u64) -> Spin {
        Spin {
            wait: Duration::from_micros(wait_us),
            begun: MID_READ_SPIN,
            parked: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// A wait for a message that comes long after the spin's budget misses, parks and
    /// still completes; the connection's next waits then park at once.
    #[test]
    fn a_wait_whose_message_comes_late_parks_completes_and_stops_the_spin() {
        futures::executor::block_on(async {
            let (c, s) = pair();
            let mut got = [0u8; 8];
            let late = async {
                // Far beyond WAIT_SPIN: the reader has given up spinning by now.
                async_io::Timer::after(Duration::from_millis(20)).await;
                c.write(&[b"late msg"]).await.unwrap();
            };
            let (_, r) = futures::future::join(late, s.read_exact(&mut got)).await;
            r.unwrap();
            assert_eq!(&got, b"late msg");
            if s.inner.stream.spin.wait.is_zero() {
                return; // spinning is off here (one CPU, or TP_TCP_SPIN_US=0)
            }
            let spin = &s.inner.stream.spin;
            assert_eq!(spin.parked.load(std::sync::atomic::Ordering::Relaxed), 1);
            assert!(spin.plan(Waits::Start).is_zero(), "after a miss, park");
        });
    }

    #[test]
    fn the_spin_parks_after_a_miss_and_probes_every_sixteenth_wait() {
        let spin = spin_of(100);
        let wait = Duration::from_micros(100);
        // Fresh: spin. Reads that have begun use their own budget; large ones never spin.
        assert_eq!(spin.plan(Waits::Start), wait);
        assert_eq!(spin.plan(Waits::Rest), MID_READ_SPIN);
        assert!(spin.plan(Waits::Bulk).is_zero());
        spin.caught(Waits::Start, false);
        for i in 1..PROBE_EVERY {
            assert!(spin.plan(Waits::Start).is_zero(), "wait {i} after the miss");
            // Rest and Bulk reads neither spin for waits nor count as one.
            assert_eq!(spin.plan(Waits::Rest), MID_READ_SPIN);
            spin.caught(Waits::Rest, true);
        }
        assert_eq!(spin.plan(Waits::Start), wait, "the probe");
        spin.caught(Waits::Start, true);
        assert_eq!(
            spin.plan(Waits::Start),
            wait,
            "a caught probe keeps spinning"
        );
        assert_eq!(spin.plan(Waits::Start), wait);
        // A large message stops it as a miss does.
        spin.large_read();
        assert!(spin.plan(Waits::Start).is_zero());
        // Off: never spins for a wait.
        let off = spin_of(0);
        for _ in 0..3 * PROBE_EVERY {
            assert!(off.plan(Waits::Start).is_zero());
        }
    }

    use proptest::prelude::*;

    /// What happens to a connection's spin state between two plans.
    #[derive(Clone, Copy, Debug)]
    enum Event {
        /// A wait that spun: caught its bytes or missed.
        Spun(bool),
        /// A read of `LARGE_READ` bytes or more.
        Large,
        /// A read that has begun, or a large one's first bytes.
        Other(bool),
    }

    proptest! {
        /// Whatever happens, a wait spins right after a caught spin, and never more than
        /// `PROBE_EVERY - 1` waits in a row park without a large read between them.
        #[test]
        fn waits_spin_after_a_catch_and_at_least_every_probe(
            events in proptest::collection::vec(
                prop_oneof![
                    any::<bool>().prop_map(Event::Spun),
                    Just(Event::Large),
                    any::<bool>().prop_map(Event::Other),
                ],
                0..200,
            )
        ) {
            let spin = spin_of(100);
            let mut parked_in_a_row = 0;
            let mut caught_last = true;
            for e in events {
                let plan = spin.plan(Waits::Start);
                if plan.is_zero() {
                    parked_in_a_row += 1;
                    prop_assert!(!caught_last, "parked right after a catch");
                    prop_assert!(parked_in_a_row < PROBE_EVERY);
                } else {
                    parked_in_a_row = 0;
                }
                match e {
                    Event::Spun(c) if !plan.is_zero() => {
                        spin.caught(Waits::Start, c);
                        caught_last = c;
                    }
                    Event::Spun(_) => {}
                    Event::Large => {
                        spin.large_read();
                        parked_in_a_row = 0;
                        caught_last = false;
                    }
                    Event::Other(c) => {
                        prop_assert_eq!(spin.plan(Waits::Rest), MID_READ_SPIN);
                        prop_assert!(spin.plan(Waits::Bulk).is_zero());
                        spin.caught(Waits::Rest, c);
                    }
                }
            }
        }
    }

    #[test]
    fn connections_to_this_host_get_the_bounded_send_buffer() {
        let sndbuf = |c: &TcpConnection| {
            rustix::net::sockopt::socket_send_buffer_size(c.inner.stream.stream.get_ref()).unwrap()
        };
        // Linux caps what it is asked for at net.core.wmem_max, then doubles it (its
        // bookkeeping overhead).
        let granted = |bytes: usize| {
            let max = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
                .ok()
                .and_then(|m| m.trim().parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            2 * bytes.min(max)
        };
        let (c, s) = pair();
        if local_send_buffer() != 0 {
            assert_eq!(sndbuf(&c), granted(local_send_buffer()));
            assert_eq!(sndbuf(&s), granted(local_send_buffer()));
        }
        // 0 asks nothing: the kernel's own (autotuned) buffer stays.
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        let raw = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let before = rustix::net::sockopt::socket_send_buffer_size(&raw).unwrap();
        assert!(!bound_send_buffer_if_local(&raw, 0));
        assert_eq!(
            rustix::net::sockopt::socket_send_buffer_size(&raw).unwrap(),
            before
        );
        assert!(bound_send_buffer_if_local(&raw, 96 << 10));
        assert_eq!(
            rustix::net::sockopt::socket_send_buffer_size(&raw).unwrap(),
            granted(96 << 10)
        );
    }

    #[test]
    fn only_peers_on_this_host_are_local() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(is_local(at("127.0.0.1:5"), at("127.0.0.1:6")));
        assert!(is_local(at("127.0.0.2:5"), at("127.0.0.1:6")));
        assert!(is_local(at("[::1]:5"), at("[::1]:6")));
        // This host's own address, not loopback: still this host.
        assert!(is_local(at("10.0.0.7:5"), at("10.0.0.7:6")));
        assert!(!is_local(at("10.0.0.8:5"), at("10.0.0.7:6")));
        assert!(!is_local(at("[2001:db8::2]:5"), at("[2001:db8::1]:6")));
    }

    #[test]
    fn parse_address_rejects_bad_ports_and_garbage() {
        for bad in ["127.0.0.1:70000", "127.0.0.1:x", "nohostport", "host:-1"] {
            assert!(
                matches!(parse_address(bad), Err(TransportError::BadAddress { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn guess_address_falls_back_to_something_bindable() {
        let (ip, _) = guess_address();
        assert!(StdListener::bind(SocketAddr::new(ip, 0)).is_ok(), "{ip}");
    }

    #[test]
    fn interface_address_finds_loopback() {
        assert_eq!(
            interface_address("lo"),
            Some(IpAddr::V4(Ipv4Addr::LOCALHOST))
        );
        assert_eq!(interface_address("no-such-interface-0"), None);
    }
}
