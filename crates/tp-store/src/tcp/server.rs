//! [`TcpStoreServer`]: one thread serving any number of TCPStore clients.
//!
//! The thread runs one task per connection on `async_io`'s reactor (no thread per
//! client). Each task reads whatever its client sends, hands it to the sans-IO
//! [`Server`], and queues the bytes the server produces on the connections they are
//! for; a second half of the task writes its own queue out. A connection is closed —
//! and only that one — when its bytes break the protocol or the limits, when a
//! request stays half-sent (or VALIDATE stays unsent) past
//! [`ServerConfig::request_timeout`], when it buffers more than
//! [`ServerConfig::max_request`] for one request, or when it stops reading its
//! replies past [`ServerConfig::max_output`].

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::rc::Rc;
use std::string::{String, ToString};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use std::vec::Vec;

use async_io::{Async, Timer};
use futures::channel::oneshot;
use futures::future::{Either, FutureExt, LocalBoxFuture, select};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{AsyncReadExt, AsyncWriteExt};

use crate::proto::Limits;
use crate::serve::{ClientId, Server};

/// How a server treats its clients.
#[derive(Clone, Copy, Debug)]
pub struct ServerConfig {
    /// Limits on keys, values and key counts (PyTorch's by default).
    pub limits: Limits,
    /// Most bytes one connection may buffer for a request not yet complete.
    pub max_request: usize,
    /// Most reply bytes a connection may have unsent (it is not reading).
    pub max_output: usize,
    /// How long a request may stay half-sent, and a new connection may take to send
    /// VALIDATE, before the connection is closed.
    pub request_timeout: Duration,
    /// Most connections at once; more are closed on accept.
    pub max_clients: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            limits: Limits::DEFAULT,
            max_request: 256 << 20,
            max_output: 256 << 20,
            request_timeout: Duration::from_secs(60),
            max_clients: 65_536,
        }
    }
}

/// Counters a server keeps (read them with [`TcpStoreServer::stats`]).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections closed for breaking the protocol, the limits or the timeouts.
    pub refused: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
}

/// A running TCPStore server. Dropping it stops the thread and closes every
/// connection.
#[derive(Debug)]
pub struct TcpStoreServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<ServerStats>,
}

impl TcpStoreServer {
    /// Binds `host:port` (port 0 picks one; an empty host or `"::"` binds every
    /// address, IPv6 and IPv4, falling back to `0.0.0.0`) and starts serving.
    ///
    /// # Errors
    /// The address cannot be bound, or the OS refused a thread.
    pub fn bind(host: &str, port: u16, config: ServerConfig) -> std::io::Result<Self> {
        let listener = if host.is_empty() || host == "::" {
            TcpListener::bind(("::", port)).or_else(|_| TcpListener::bind(("0.0.0.0", port)))?
        } else {
            TcpListener::bind((host, port))?
        };
        Self::serve(listener, config)
    }

    /// Serves on an already bound listener (to avoid a race for the port).
    ///
    /// # Errors
    /// The listener cannot be made non-blocking, or the OS refused a thread.
    pub fn serve(listener: TcpListener, config: ServerConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let listener = Async::new(listener)?;
        let (stop, stopped) = oneshot::channel();
        let stats = Arc::new(ServerStats::default());
        let counters = stats.clone();
        let thread = std::thread::Builder::new()
            .name(std::format!("tp-store-{}", addr.port()))
            .spawn(move || async_io::block_on(run(listener, config, counters, stopped)))?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
            stats,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The server's counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// Blocks until the server stops (never, unless it is dropped elsewhere or fails).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TcpStoreServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One connection's unsent replies.
#[derive(Default)]
struct Outbox {
    bytes: RefCell<Vec<u8>>,
    /// The writer half, waiting for bytes.
    waker: RefCell<Option<Waker>>,
    /// Over `max_output`: close.
    overflow: Cell<bool>,
}

impl Outbox {
    fn push(&self, bytes: &[u8], max: usize) {
        let mut b = self.bytes.borrow_mut();
        if b.len().saturating_add(bytes.len()) > max {
            self.overflow.set(true);
        } else {
            b.extend_from_slice(bytes);
        }
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

struct Shared {
    server: RefCell<Server>,
    outboxes: RefCell<HashMap<ClientId, Rc<Outbox>>>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
}

impl Shared {
    /// Hands every byte the server produced to its connection's writer.
    fn dispatch(&self) {
        let mut server = self.server.borrow_mut();
        let outboxes = self.outboxes.borrow();
        while let Some((id, bytes)) = server.poll_output() {
            if let Some(ob) = outboxes.get(&id) {
                ob.push(&bytes, self.config.max_output);
            }
        }
    }
}

async fn run(
    listener: Async<TcpListener>,
    config: ServerConfig,
    stats: Arc<ServerStats>,
    mut stopped: oneshot::Receiver<()>,
) {
    let shared = Rc::new(Shared {
        server: RefCell::new(Server::new(config.limits)),
        outboxes: RefCell::new(HashMap::new()),
        config,
        stats,
    });
    let mut clients: FuturesUnordered<LocalBoxFuture<'static, ()>> = FuturesUnordered::new();
    let mut next_id = 0u64;
    std::future::poll_fn(|cx| {
        if stopped.poll_unpin(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            match listener.poll_readable(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    tracing::warn!("tcp store: accept failed: {e}");
                    return Poll::Ready(());
                }
                Poll::Pending => break,
            }
            match listener.get_ref().accept() {
                Ok((stream, peer)) => {
                    shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
                    if clients.len() >= shared.config.max_clients {
                        tracing::warn!(%peer, "tcp store: too many clients; connection closed");
                        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    next_id += 1;
                    match Async::new(stream) {
                        Ok(stream) => clients.push(
                            client(ClientId(next_id), stream, peer, shared.clone()).boxed_local(),
                        ),
                        Err(e) => tracing::warn!("tcp store: {e}"),
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::debug!("tcp store: accept: {e}"),
            }
        }
        while let Poll::Ready(Some(())) = clients.poll_next_unpin(cx) {}
        Poll::Pending
    })
    .await;
}

/// Why a connection ended.
enum End {
    Closed,
    Refused(String),
}

async fn client(id: ClientId, stream: Async<TcpStream>, peer: SocketAddr, shared: Rc<Shared>) {
    let _ = stream.get_ref().set_nodelay(true);
    let outbox = Rc::new(Outbox::default());
    shared.outboxes.borrow_mut().insert(id, outbox.clone());
    shared.server.borrow_mut().connect(id);
    shared.stats.open.fetch_add(1, Ordering::Relaxed);
    let stream = Rc::new(stream);
    let reader = read_half(id, &stream, &shared).boxed_local();
    let writer = write_half(&stream, &outbox).boxed_local();
    let end = match select(reader, writer).await {
        Either::Left((end, _)) | Either::Right((end, _)) => end,
    };
    if let End::Refused(why) = end {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%peer, "tcp store: connection closed: {why}");
    }
    let _ = stream.get_ref().shutdown(std::net::Shutdown::Both);
    shared.server.borrow_mut().disconnect(id);
    shared.outboxes.borrow_mut().remove(&id);
    shared.stats.open.fetch_sub(1, Ordering::Relaxed);
}

async fn read_half(id: ClientId, stream: &Async<TcpStream>, shared: &Shared) -> End {
    let config = shared.config;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = std::vec![0u8; 64 << 10];
    // Until VALIDATE arrives, and while a request is half-sent, the clock runs.
    let mut since = Some(Instant::now());
    let mut reader = stream;
    loop {
        let read = reader.read(&mut chunk);
        let n = match since {
            None => read.await,
            Some(t) => {
                let until = t + config.request_timeout;
                match select(read, Timer::at(until)).await {
                    Either::Left((r, _)) => r,
                    Either::Right(_) => {
                        return End::Refused(std::format!(
                            "a request stayed incomplete (or VALIDATE unsent) for {:?}",
                            config.request_timeout
                        ));
                    }
                }
            }
        };
        let n = match n {
            Ok(0) | Err(_) => return End::Closed,
            Ok(n) => n,
        };
        pending.extend_from_slice(chunk.get(..n).unwrap_or_default());
        let used = shared.server.borrow_mut().receive(id, &pending);
        shared.dispatch();
        let used = match used {
            Ok(used) => used,
            Err(e) => return End::Refused(e.to_string()),
        };
        pending.drain(..used);
        if pending.len() > config.max_request {
            return End::Refused(std::format!(
                "over {} bytes buffered for one request",
                config.max_request
            ));
        }
        let validated = shared.server.borrow().is_validated(id);
        since = if pending.is_empty() && validated {
            None
        } else if used > 0 || since.is_none() {
            Some(Instant::now())
        } else {
            since
        };
    }
}

async fn write_half(stream: &Async<TcpStream>, outbox: &Outbox) -> End {
    loop {
        let bytes = std::future::poll_fn(|cx| {
            if outbox.overflow.get() {
                return Poll::Ready(None);
            }
            let mut b = outbox.bytes.borrow_mut();
            if b.is_empty() {
                *outbox.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            } else {
                Poll::Ready(Some(std::mem::take(&mut *b)))
            }
        })
        .await;
        let Some(bytes) = bytes else {
            return End::Refused("it does not read its replies".into());
        };
        let mut writer = stream;
        if writer.write_all(&bytes).await.is_err() {
            return End::Closed;
        }
    }
}
