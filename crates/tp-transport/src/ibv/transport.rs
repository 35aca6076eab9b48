//! [`IbvTransport`]: the [`proto`](super::proto) state machines driven by real verbs.

use std::future::poll_fn;
use std::io;
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use async_io::Async;
use futures::future::BoxFuture;
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};

use super::proto::{ProtoError, Receiver, SETUP_LEN, Sender, SetupInfo};
use super::verbs::{Completion, Device, DeviceChoice, QueuePair, Region, RemoteQp};
use crate::listener::{Accepted, Acceptor};
use crate::ordered::{Ordered, Stream};
use crate::registry::{Closable, Registry};
use crate::signal::{Notify, Signal};
use crate::{BoxConnection, BoxListener, Transport, TransportError};

/// The domain descriptor, as the original's: the verbs API gives no fabric identity, so
/// any two ibv contexts may try (and fail at connect if they share no fabric).
pub const DOMAIN_DESCRIPTOR: &[u8] = b"ibv:*";

/// The largest inbox a peer may announce (its size is our outbox allocation).
const MAX_RING: u64 = 1 << 30;
/// Acknowledgements in flight at once.
const ACK_DEPTH: u32 = 16;
/// Receives kept posted: every peer write and every peer ack consumes one.
const RECV_DEPTH: u32 = 256;
/// The most a write copies into the outbox before posting it, so the NIC starts
/// sending while the rest is copied.
const POST_CHUNK: usize = 256 << 10;
/// How long a close waits for written bytes to reach the peer.
const CLOSE_DRAIN: Duration = Duration::from_secs(1);

const WR_WRITE: u64 = 1;
const WR_ACK: u64 = 2;
const WR_RECV: u64 = 3;

/// Settings of an ibv context.
#[derive(Clone, Debug)]
pub struct IbvConfig {
    /// Device name (`mlx5_0`, ...); `None` takes the first. Default: `TP_IBV_DEVICE`.
    pub device: Option<String>,
    /// Port number, from 1. Default: `TP_IBV_PORT`, else 1.
    pub port: u8,
    /// GID table index (RoCE needs one). Default: `TP_IBV_GID_INDEX`, else 0.
    pub gid_index: u8,
    /// Bytes of each inbox ring (a power of two). Default 2 MiB, as the original.
    pub ring_capacity: usize,
    /// RDMA writes in flight per connection before their completions return.
    pub max_inflight_writes: u32,
}

impl Default for IbvConfig {
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            device: env("TP_IBV_DEVICE"),
            port: env("TP_IBV_PORT").and_then(|v| v.parse().ok()).unwrap_or(1),
            gid_index: env("TP_IBV_GID_INDEX")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            ring_capacity: 2 << 20,
            max_inflight_writes: 64,
        }
    }
}

/// An ibv transport context.
pub struct IbvTransport {
    ctx: Arc<Registry>,
    config: IbvConfig,
    device: Result<Arc<Device>, String>,
}

impl std::fmt::Debug for IbvTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IbvTransport")
            .field("config", &self.config)
            .field("device", &self.device)
            .finish()
    }
}

impl Default for IbvTransport {
    fn default() -> Self {
        Self::new(IbvConfig::default())
    }
}

impl IbvTransport {
    /// Creates a context: lists the devices and opens the chosen one, so that
    /// [`Transport::viability`] tells the real reason when it cannot work.
    pub fn new(config: IbvConfig) -> Self {
        let device = open(&config);
        if let Err(reason) = &device {
            tracing::info!(reason, "ibv transport not viable");
        }
        Self {
            ctx: Arc::default(),
            config,
            device,
        }
    }

    fn usable(&self) -> Result<Arc<Device>, TransportError> {
        let dev = self
            .device
            .clone()
            .map_err(|reason| TransportError::NotViable {
                transport: "ibv",
                reason,
            })?;
        if self.ctx.is_closed() {
            return Err(TransportError::Closed);
        }
        Ok(dev)
    }
}

/// Opens the device, port and GID index `config` names (the first device when it names
/// none), or says why none can be used.
pub(super) fn open_device(config: &IbvConfig) -> Result<Device, String> {
    let names = super::verbs::device_names()
        .map_err(|e| format!("no RDMA support (listing devices failed: {e})"))?;
    if names.is_empty() {
        return Err("no RDMA device found".to_string());
    }
    Device::open(&DeviceChoice {
        name: config.device.clone(),
        port: config.port,
        gid_index: config.gid_index,
    })
    .map_err(|e| {
        format!(
            "cannot use an RDMA device (found: {}): {e}",
            names.join(", ")
        )
    })
}

fn open(config: &IbvConfig) -> Result<Arc<Device>, String> {
    if !config.ring_capacity.is_power_of_two() || (config.ring_capacity as u64) > MAX_RING {
        return Err(format!(
            "ring capacity {} is not a power of two up to {MAX_RING}",
            config.ring_capacity
        ));
    }
    let dev = open_device(config)?;
    if (config.ring_capacity as u64) > u64::from(dev.max_message) {
        return Err(format!(
            "ring capacity {} exceeds the port's largest message ({})",
            config.ring_capacity, dev.max_message
        ));
    }
    tracing::debug!(device = dev.name, port = dev.port, "ibv transport ready");
    Ok(Arc::new(dev))
}

impl Transport for IbvTransport {
    fn name(&self) -> &'static str {
        "ibv"
    }

    fn viability(&self) -> Result<(), TransportError> {
        self.device
            .as_ref()
            .map(|_| ())
            .map_err(|reason| TransportError::NotViable {
                transport: "ibv",
                reason: reason.clone(),
            })
    }

    fn domain_descriptor(&self) -> &[u8] {
        DOMAIN_DESCRIPTOR
    }

    fn listen(&self, address: &str) -> Result<BoxListener, TransportError> {
        let device = self.usable()?;
        let (listener, local) = crate::tcp::bind(address)?;
        Ok(crate::listener::listener(
            &self.ctx,
            "ibv",
            local.to_string(),
            IbvAcceptor {
                listener,
                device,
                config: self.config.clone(),
            },
        ))
    }

    fn connect(&self, address: &str) -> BoxFuture<'static, Result<BoxConnection, TransportError>> {
        let ready = self.usable();
        let ctx = self.ctx.clone();
        let config = self.config.clone();
        let parsed = crate::tcp::parse_address(address);
        async move {
            let device = ready?;
            let sa = parsed?;
            if sa.port() == 0 {
                return Err(TransportError::bad_address(
                    &sa.to_string(),
                    "cannot connect to port 0",
                ));
            }
            let stream = Async::<TcpStream>::connect(sa)
                .await
                .map_err(|e| TransportError::io("connect", e))?;
            let conn = IbvConnection::handshake(stream, &device, &config).await?;
            ctx.adopt(Arc::downgrade(&conn.inner) as Weak<dyn Closable>);
            Ok(Box::new(conn) as BoxConnection)
        }
        .boxed()
    }

    fn close(&self) {
        self.ctx.close_all();
    }
}

struct IbvAcceptor {
    listener: Async<std::net::TcpListener>,
    device: Arc<Device>,
    config: IbvConfig,
}

impl Acceptor for IbvAcceptor {
    async fn accept(&self) -> Result<Option<Accepted>, TransportError> {
        let (stream, peer) = self
            .listener
            .accept()
            .await
            .map_err(|e| TransportError::io("accept", e))?;
        match IbvConnection::handshake(stream, &self.device, &self.config).await {
            Ok(conn) => {
                let closable = Arc::downgrade(&conn.inner) as Weak<dyn Closable>;
                Ok(Some(Accepted {
                    conn: Box::new(conn),
                    closable,
                }))
            }
            Err(e) => {
                tracing::warn!(error = %e, %peer, "ibv: refused a connection");
                Ok(None)
            }
        }
    }
}

fn refuse(why: impl std::fmt::Display) -> TransportError {
    TransportError::io(
        "ibv handshake",
        io::Error::new(io::ErrorKind::InvalidData, why.to_string()),
    )
}

fn verbs_err(e: io::Error) -> TransportError {
    TransportError::io("ibv", e)
}

fn proto_err(e: ProtoError) -> TransportError {
    TransportError::io(
        "ibv protocol",
        io::Error::new(io::ErrorKind::InvalidData, e.to_string()),
    )
}

/// A 24-bit initial packet sequence number, different per connection.
pub(super) fn initial_psn(qpn: u32) -> u32 {
    use std::hash::BuildHasher;
    let h = std::collections::hash_map::RandomState::new().hash_one((qpn, Instant::now()));
    u32::try_from(h & 0x00ff_ffff).unwrap_or(0)
}

/// One connection's verbs objects and protocol state. Field order is drop order: the
/// queue pair goes before the regions it used.
struct State {
    qp: QueuePair,
    inbox: Region,
    outbox: Region,
    sender: Sender,
    receiver: Receiver,
    peer_inbox: u64,
    peer_rkey: u32,
    acks_inflight: u32,
    failed: Option<String>,
    completions: Vec<Completion>,
}

impl State {
    fn fail(&mut self, e: &TransportError) -> TransportError {
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        TransportError::Broken
    }

    /// Reaps completions, re-arms the channel, posts what is due. Returns whether
    /// anything another waiter might care about changed.
    fn progress(&mut self) -> Result<bool, TransportError> {
        if self.failed.is_some() {
            return Err(TransportError::Broken);
        }
        match self.progress_inner() {
            Ok(changed) => Ok(changed),
            Err(e) => {
                tracing::warn!(error = %e, "ibv: connection failed");
                Err(self.fail(&e))
            }
        }
    }

    fn progress_inner(&mut self) -> Result<bool, TransportError> {
        self.qp.take_events();
        let mut changed = self.reap()?;
        self.qp.arm().map_err(verbs_err)?;
        // A completion that arrived before arming raised no event: reap again.
        changed |= self.reap()?;
        self.post()?;
        Ok(changed)
    }

    fn reap(&mut self) -> Result<bool, TransportError> {
        let mut changed = false;
        loop {
            self.completions.clear();
            self.qp.poll(&mut self.completions, 32).map_err(verbs_err)?;
            if self.completions.is_empty() {
                return Ok(changed);
            }
            changed = true;
            for c in std::mem::take(&mut self.completions) {
                match c {
                    Completion::Sent { wr_id: WR_ACK } => {
                        self.acks_inflight = self.acks_inflight.saturating_sub(1);
                    }
                    Completion::Sent { .. } => {
                        self.sender.on_write_complete().map_err(proto_err)?;
                    }
                    Completion::Landed { imm } => {
                        self.receiver.on_write(imm).map_err(proto_err)?;
                        self.qp.post_recv(WR_RECV).map_err(verbs_err)?;
                    }
                    Completion::Acked { imm } => {
                        self.sender.on_ack(imm).map_err(proto_err)?;
                        self.qp.post_recv(WR_RECV).map_err(verbs_err)?;
                    }
                    Completion::Failed { wr_id, status } => {
                        return Err(TransportError::io(
                            "ibv completion",
                            io::Error::other(format!("work request {wr_id} failed: {status}")),
                        ));
                    }
                }
            }
        }
    }

    /// Posts the writes and the acknowledgement that are due.
    fn post(&mut self) -> Result<(), TransportError> {
        while let Some(w) = self.sender.poll_write() {
            self.qp
                .post_write(
                    &self.outbox,
                    w.offset,
                    w.len,
                    self.peer_inbox,
                    self.peer_rkey,
                    WR_WRITE,
                )
                .map_err(verbs_err)?;
        }
        if self.acks_inflight < ACK_DEPTH
            && let Some(n) = self.receiver.poll_ack()
        {
            self.qp.post_ack(n, WR_ACK).map_err(verbs_err)?;
            self.acks_inflight += 1;
        }
        Ok(())
    }
}

/// The byte stream of one ibv connection.
struct IbvIo {
    /// The bootstrap socket: carries nothing after the handshake, tells when the peer
    /// is gone.
    sock: Async<TcpStream>,
    /// A duplicate of the completion channel's fd, registered with the reactor.
    events: Async<OwnedFd>,
    state: Mutex<State>,
    changed: Notify,
    closed: Signal,
}

impl std::fmt::Debug for IbvIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IbvIo").finish_non_exhaustive()
    }
}

impl IbvIo {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `step` on the state after making progress; tells the other direction if
    /// anything changed. Returns the step's result and the generation to wait from.
    fn with_state<T>(
        &self,
        step: impl FnOnce(&mut State) -> Result<T, TransportError>,
    ) -> Result<(T, u64), TransportError> {
        let mut st = self.lock();
        let changed = st.progress()?;
        let r = step(&mut st);
        let r = r.map_err(|e| st.fail(&e));
        let seen = self.changed.generation();
        drop(st);
        if changed {
            self.changed.notify();
        }
        Ok((r?, seen))
    }

    /// True once the peer closed its bootstrap socket (it sends nothing after the
    /// handshake).
    fn peer_gone(&self) -> bool {
        let mut probe = [0u8; 1];
        match self.sock.get_ref().peek(&mut probe) {
            Ok(_) => true,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ),
        }
    }

    /// Waits for a completion event, a change made by the other direction, the peer's
    /// departure, or our close.
    async fn wait(&self, seen: u64) -> Result<(), TransportError> {
        let woken = poll_fn(|cx| {
            let event = self.events.poll_readable(cx).is_ready();
            let changed = self.changed.poll_changed(seen, cx).is_ready();
            let gone = self.sock.poll_readable(cx).is_ready();
            if event || changed || gone {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        });
        self.closed.or_closed(woken).await
    }
}

impl Stream for IbvIo {
    async fn read_into(&self, buf: &mut [u8]) -> Result<(), TransportError> {
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or_default();
            let (n, seen) = self.with_state(|st| {
                let (offset, readable) = st.receiver.readable();
                let n = usize::try_from(readable)
                    .unwrap_or(usize::MAX)
                    .min(rest.len());
                if n > 0 {
                    let dst = rest.get_mut(..n).unwrap_or_default();
                    st.inbox.copy_out(usize::try_from(offset).unwrap_or(0), dst);
                    st.receiver.consume(n as u64);
                    st.post()?;
                }
                Ok(n)
            })?;
            done += n;
            if n > 0 {
                continue;
            }
            if self.closed.is_fired() {
                return Err(TransportError::Closed);
            }
            if self.peer_gone() {
                // Everything the peer wrote before leaving landed before its socket
                // closed (see `shutdown`); reap it once more, then it is the end.
                let (readable, _) = self.with_state(|st| Ok(st.receiver.readable().1))?;
                if readable == 0 {
                    return Err(TransportError::Eof);
                }
                continue;
            }
            self.wait(seen).await?;
        }
        Ok(())
    }

    async fn write_from(&self, bufs: &[&[u8]]) -> Result<(), TransportError> {
        for b in bufs {
            let mut off = 0;
            while off < b.len() {
                let rest = b.get(off..).unwrap_or_default();
                let (n, seen) = self.with_state(|st| {
                    let (offset, free) = st.sender.writable();
                    let n = usize::try_from(free)
                        .unwrap_or(usize::MAX)
                        .min(rest.len())
                        .min(POST_CHUNK);
                    if n > 0 {
                        let src = rest.get(..n).unwrap_or_default();
                        st.outbox.copy_in(usize::try_from(offset).unwrap_or(0), src);
                        st.sender.commit(n as u64);
                        st.post()?;
                    }
                    Ok(n)
                })?;
                off += n;
                if n > 0 {
                    continue;
                }
                if self.closed.is_fired() {
                    return Err(TransportError::Closed);
                }
                if self.peer_gone() {
                    return Err(TransportError::Eof);
                }
                self.wait(seen).await?;
            }
        }
        Ok(())
    }

    fn shutdown(&self) {
        self.closed.fire();
        {
            // Let bytes already written reach the peer's inbox before it learns we are
            // gone: their write completions mean they landed. Bounded, like a linger.
            let deadline = Instant::now() + CLOSE_DRAIN;
            let mut st = self.lock();
            while st.failed.is_none() && !st.sender.delivered() && Instant::now() < deadline {
                if st.progress().is_err() {
                    break;
                }
                std::thread::yield_now();
            }
            st.qp.set_error();
        }
        self.changed.notify();
        let _ = self.sock.get_ref().shutdown(std::net::Shutdown::Both);
    }
}

/// An ibv connection.
pub(crate) struct IbvConnection {
    inner: Arc<Ordered<IbvIo>>,
}

impl std::fmt::Debug for IbvConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IbvConnection").finish_non_exhaustive()
    }
}

impl IbvConnection {
    async fn handshake(
        stream: Async<TcpStream>,
        device: &Arc<Device>,
        config: &IbvConfig,
    ) -> Result<Self, TransportError> {
        let mut stream = stream;
        stream
            .get_ref()
            .set_nodelay(true)
            .map_err(|e| TransportError::io("set TCP_NODELAY", e))?;
        let send_depth = config.max_inflight_writes.saturating_add(ACK_DEPTH);
        let qp = QueuePair::new(device, send_depth, RECV_DEPTH).map_err(verbs_err)?;
        let inbox = Region::new(device, config.ring_capacity, true).map_err(verbs_err)?;
        for _ in 0..RECV_DEPTH {
            qp.post_recv(WR_RECV).map_err(verbs_err)?;
        }
        let psn = initial_psn(qp.qpn());
        let ours = SetupInfo {
            lid: device.lid,
            mtu: u8::try_from(device.active_mtu).unwrap_or(0),
            qpn: qp.qpn(),
            gid: device.gid,
            inbox_addr: inbox.addr(),
            inbox_rkey: inbox.rkey(),
            psn,
            inbox_capacity: config.ring_capacity as u64,
            max_message: device.max_message,
        };
        stream
            .write_all(&ours.encode())
            .await
            .map_err(|e| TransportError::io("send setup", e))?;
        let mut theirs = [0u8; SETUP_LEN];
        stream
            .read_exact(&mut theirs)
            .await
            .map_err(|e| TransportError::io("receive setup", e))?;
        let theirs = SetupInfo::decode(&theirs).map_err(refuse)?;
        if theirs.inbox_capacity > MAX_RING || theirs.inbox_capacity > u64::from(device.max_message)
        {
            return Err(refuse(format!(
                "peer inbox of {} bytes exceeds the limit",
                theirs.inbox_capacity
            )));
        }
        let outbox_len =
            usize::try_from(theirs.inbox_capacity).map_err(|_| refuse("inbox size"))?;
        let outbox = Region::new(device, outbox_len, false).map_err(verbs_err)?;
        qp.connect(psn, &RemoteQp::from(&theirs))
            .map_err(verbs_err)?;
        // Neither side writes before the other's queue pair is ready to receive.
        stream
            .write_all(&[1])
            .await
            .map_err(|e| TransportError::io("send ready", e))?;
        let mut ready = [0u8; 1];
        stream
            .read_exact(&mut ready)
            .await
            .map_err(|e| TransportError::io("receive ready", e))?;
        if ready != [1] {
            return Err(refuse("malformed ready byte"));
        }

        let events = rustix::io::fcntl_dupfd_cloexec(qp.fd(), 0)
            .map_err(|e| TransportError::io("dup completion channel", e.into()))?;
        let events = Async::new(events).map_err(|e| TransportError::io("register channel", e))?;
        let state = State {
            sender: Sender::new(theirs.inbox_capacity, config.max_inflight_writes),
            receiver: Receiver::new(config.ring_capacity as u64, config.ring_capacity as u64 / 4),
            qp,
            inbox,
            outbox,
            peer_inbox: theirs.inbox_addr,
            peer_rkey: theirs.inbox_rkey,
            acks_inflight: 0,
            failed: None,
            completions: Vec::with_capacity(32),
        };
        Ok(Self {
            inner: Arc::new(Ordered::new(IbvIo {
                sock: stream,
                events,
                state: Mutex::new(state),
                changed: Notify::default(),
                closed: Signal::default(),
            })),
        })
    }
}

crate::ordered::ordered_connection!(IbvConnection);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    /// Without RDMA in the kernel (`/sys/class/infiniband_verbs` absent, as on the
    /// development VMs), the context must say so, and refuse to listen or connect.
    #[test]
    fn without_rdma_the_context_is_not_viable_and_says_why() {
        if std::path::Path::new("/sys/class/infiniband_verbs").exists() {
            eprintln!("SKIPPED: this machine has RDMA support; the conformance suite covers it");
            return;
        }
        let t = IbvTransport::default();
        let e = t.viability().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotViable);
        let why = e.to_string();
        assert!(
            why.contains("no RDMA support") || why.contains("no RDMA device"),
            "{why}"
        );
        assert!(!t.is_viable());
        assert_eq!(t.domain_descriptor(), b"ibv:*");
        assert_eq!(
            t.listen("127.0.0.1:0").unwrap_err().kind(),
            ErrorKind::NotViable
        );
        let connect = futures::executor::block_on(t.connect("127.0.0.1:1"));
        assert_eq!(connect.unwrap_err().kind(), ErrorKind::NotViable);
    }

    #[test]
    fn a_bad_ring_size_is_refused_before_touching_a_device() {
        let t = IbvTransport::new(IbvConfig {
            ring_capacity: 3 << 20,
            ..IbvConfig::default()
        });
        assert!(
            t.viability()
                .unwrap_err()
                .to_string()
                .contains("power of two")
        );
    }
}
