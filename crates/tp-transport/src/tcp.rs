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
//! A read that has begun — the rest of a payload or tensor whose length the frame before
//! it announced — spins on the socket for up to [`MID_READ_SPIN`] before parking when
//! its next bytes are not there yet: the sender is in the middle of writing them, and a
//! parked thread on a VM takes tens of microseconds to wake. (A 1 MiB payload's round
//! trip fell from 458–507 to 254–267 µs.) `TP_TCP_MID_SPIN_US=<µs>` changes that budget;
//! 0 turns it off, and so does a process limited to one CPU, where the writer could not
//! run meanwhile. By default no read spins while it waits for a message to begin.
//!
//! `TP_TCP_SPIN_US=<µs>` makes every read spin that long on the socket before parking on
//! the reactor: much lower latency on an otherwise idle machine, worse on a busy one (see
//! BENCHMARKS.md). Off by default.
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

    /// One read from the socket into `buf`, spinning first as [`Spin`] says; `begun`:
    /// this read continues one that already has some of its bytes.
    async fn read_some(&self, buf: &mut [u8], begun: bool) -> io::Result<usize> {
        // Spin on the non-blocking socket before parking on the reactor: bytes already
        // on their way arrive without a sleep and a wake-up.
        match self.spin.read(self.stream.get_ref(), buf, begun) {
            Some(r) => r,
            None => (&self.stream).read(buf).await,
        }
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
        let mut done = self.ahead().take(buf);
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or_default();
            let got = if rest.len() >= READ_AHEAD {
                let got = self.read_some(rest, done > 0).await;
                done += *got.as_ref().unwrap_or(&0);
                got
            } else {
                // A small read: ask for up to READ_AHEAD and keep the rest. The (empty)
                // buffer is taken out while the read waits; a read dropped meanwhile
                // breaks the connection anyway (`Ordered`), so nothing held is lost.
                let mut ahead = std::mem::take(&mut *self.ahead());
                ahead.buf.resize(READ_AHEAD, 0);
                let got = self.read_some(&mut ahead.buf, done > 0).await;
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

/// Spinning before a read parks on the reactor.
///
/// On an idle VM a parked thread takes tens of microseconds to wake (baseline.md). A read
/// that has begun spins for [`MID_READ_SPIN`] (`TP_TCP_MID_SPIN_US`): its bytes are in
/// the middle of being written, and the spin ends as soon as they come. Any other read
/// spins only when `TP_TCP_SPIN_US` asks (default off): a reply already on its way then
/// arrives several-fold sooner on an idle machine (BENCHMARKS.md), but a message that is
/// not coming yet costs the whole budget of CPU, and on a busy machine the peer may need
/// that core.
#[derive(Debug)]
struct Spin {
    /// For any read (`TP_TCP_SPIN_US`).
    budget: std::time::Duration,
    /// For a read that has begun (`TP_TCP_MID_SPIN_US`).
    begun: std::time::Duration,
}

impl Spin {
    fn from_env() -> Self {
        let us = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(|us| std::time::Duration::from_micros(us.min(1_000)))
        };
        Self {
            budget: us("TP_TCP_SPIN_US").unwrap_or_default(),
            begun: us("TP_TCP_MID_SPIN_US").unwrap_or_else(|| {
                // With one CPU the writer cannot run while this reader spins: the spin
                // would only delay the bytes it waits for.
                if one_cpu() {
                    std::time::Duration::ZERO
                } else {
                    MID_READ_SPIN
                }
            }),
        }
    }

    /// Tries non-blocking reads within the budget (the larger one when the read has
    /// `begun`); `None` when nothing arrived (park).
    fn read(&self, stream: &TcpStream, buf: &mut [u8], begun: bool) -> Option<io::Result<usize>> {
        use std::io::Read;
        let budget = if begun {
            self.budget.max(self.begun)
        } else {
            self.budget
        };
        if budget.is_zero() || !crate::spin::allowed() {
            return None;
        }
        let start = std::time::Instant::now();
        loop {
            match (&*stream).read(buf) {
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                other => return Some(other),
            }
            if start.elapsed() >= budget {
                return None;
            }
            std::hint::spin_loop();
        }
    }
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

    /// A connected pair over loopback: (client, server).
    async fn pair() -> (BoxConnection, BoxConnection) {
        use crate::Transport;
        let t = TcpTransport::new();
        let listener = t.listen("127.0.0.1:0").unwrap();
        let (c, s) = futures::future::join(t.connect(listener.address()), listener.accept()).await;
        (c.unwrap(), s.unwrap())
    }

    /// A small read takes what came with it into the read-ahead; the reads after it
    /// get those bytes first, now (`try_read_exact`) or as the start of a large read.
    #[test]
    fn small_reads_keep_what_came_with_them_for_the_reads_after() {
        futures::executor::block_on(async {
            let (c, s) = pair().await;
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

    /// A read that has begun and then finds the socket empty spins, gives up after its
    /// budget and parks; the rest, written long after, still completes it, in order.
    #[test]
    fn a_begun_read_whose_rest_comes_late_parks_and_completes() {
        futures::executor::block_on(async {
            let (c, s) = pair().await;
            let big: Vec<u8> = (0..4 * READ_AHEAD).map(|i| (i % 253) as u8).collect();
            let (first, rest) = big.split_at(big.len() / 2 + 7);
            let mut got = vec![0u8; big.len()];
            let late = async {
                c.write(&[first]).await.unwrap();
                // Far beyond MID_READ_SPIN: the reader has parked by now.
                async_io::Timer::after(std::time::Duration::from_millis(30)).await;
                c.write(&[rest]).await.unwrap();
            };
            let (_, r) = futures::future::join(late, s.read_exact(&mut got)).await;
            r.unwrap();
            assert!(got == big, "both halves, in order");
        });
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
