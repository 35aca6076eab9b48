//! mpt: tensors striped across N TCP lanes.
//!
//! Setup, over the one connection the pipe gives the channel: the listening end binds a
//! TCP listener for the lanes and sends `ServerHello{token, address, lanes}`; the
//! connecting end opens the lanes and starts each with `ClientHello{token, lane}`. The
//! listening end accepts until every lane arrived with the right token (a stray
//! connection is dropped, not fatal) or the setup timeout passes.
//!
//! Transfer: tensor bytes `[len·i/N, len·(i+1)/N)` go on lane i, raw (both ends know
//! the length); a tensor is done when all its slices are. Each lane's writes and reads
//! are queued in tensor order, so order across tensors holds while the next tensor's
//! slices already queue behind the current ones. A tensor larger than
//! [`MptConfig::threads_above`] is moved by the context's lane threads — lane i of
//! every channel by thread i mod T (T = the lane count, or the CPU count if lower),
//! started with the first channel — so its slices are copied on as many cores at once;
//! a smaller one by the task that waits for it, which saves two thread wake-ups. A
//! future dropped mid-transfer leaves its tensor to the lane threads: the lanes stay in
//! step with the peer, and the buffer is freed when the last slice is over.
//!
//! A lane to this host gets the bounded send buffer of a tcp connection
//! ([`tp_transport::tcp::LOCAL_SEND_BUFFER`]), and its lane thread's read mark
//! (`SO_RCVLOWAT`) stays below that bound: 2 and 4 lanes moved 16 and 64 MiB faster so
//! than with autotuned buffers, and faster than with the bound shared out among the
//! lanes (BENCHMARKS.md).
//!
//! Descriptor `mpt:<N>:tcp:*`: two contexts must agree on the lane count.

#[allow(unsafe_code)]
mod lanes;

use std::net::{TcpListener, TcpStream};
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_io::Async;
use futures::future::{BoxFuture, Either, join_all, select};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::{AsyncReadExt, AsyncWriteExt, FutureExt};
use tp_transport::{BoxConnection, TransportError};

use lanes::{Held, Lane, Loops, Transfer};

use crate::children::{Children, Close};
use crate::ops::Ops;
use crate::{
    BoxChannel, Channel, ChannelContext, ChannelError, Device, Endpoint, RecvBuf, RecvDone,
    SendBuf, SendDone,
};
use tp_transport::order::{Order, Turn};

const SERVER_HELLO: u8 = 1;
const CLIENT_HELLO: u8 = 2;
/// Most lanes a peer may ask for.
pub const MAX_LANES: usize = 64;

/// Settings of an mpt context.
#[derive(Clone, Debug)]
pub struct MptConfig {
    /// Lanes per channel (1..=64). Default 2; PyTorch's agent uses 16. The context
    /// drives them with one thread per lane, or per CPU if there are fewer CPUs.
    pub lanes: usize,
    /// Where the listening end binds its lane listener (`host`, port 0 is picked).
    /// Default: the transport's guessed address (`TP_SOCKET_IFNAME`, the hostname's
    /// address, else loopback).
    pub bind_host: String,
    /// How long setting up the lanes may take.
    pub setup_timeout: Duration,
    /// Tensors larger than this are moved by the context's lane threads, one per lane,
    /// in parallel; smaller ones by the task that waits for them, without a hop to
    /// another thread. Default 1 MiB (on 2 vCPUs, 1 MiB round trips were faster on the
    /// waiting task, 2 MiB ones much faster on the lane threads; BENCHMARKS.md).
    pub threads_above: usize,
}

impl Default for MptConfig {
    fn default() -> Self {
        Self {
            lanes: 2,
            bind_host: tp_transport::tcp::guess_address().0.to_string(),
            setup_timeout: Duration::from_secs(30),
            threads_above: 1 << 20,
        }
    }
}

/// The mpt channel context.
#[derive(Debug)]
pub struct MptContext {
    config: MptConfig,
    descriptor: Vec<u8>,
    /// The lane threads, started with the first channel.
    loops: Mutex<Option<Arc<Loops>>>,
    children: Arc<Children>,
}

impl Default for MptContext {
    fn default() -> Self {
        Self::new(MptConfig::default())
    }
}

impl MptContext {
    /// Creates a context.
    pub fn new(config: MptConfig) -> Self {
        let descriptor = format!("mpt:{}:tcp:*", config.lanes).into_bytes();
        Self {
            config,
            descriptor,
            loops: Mutex::default(),
            children: Arc::default(),
        }
    }
}

impl MptContext {
    /// The lane threads, started on first use.
    fn loops(&self) -> Result<Arc<Loops>, ChannelError> {
        let mut loops = self.loops.lock().unwrap_or_else(PoisonError::into_inner);
        if self.children.is_closed() {
            return Err(ChannelError::Closed);
        }
        if let Some(l) = &*loops {
            return Ok(l.clone());
        }
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let l = Arc::new(Loops::start(self.config.lanes.min(cpus)).map_err(|e| {
            ChannelError::Transport(TransportError::Io {
                op: "start the mpt lane threads",
                source: e,
            })
        })?);
        *loops = Some(l.clone());
        Ok(l)
    }
}

impl Drop for MptContext {
    fn drop(&mut self) {
        ChannelContext::close(self);
    }
}

impl ChannelContext for MptContext {
    fn name(&self) -> &'static str {
        "mpt"
    }

    fn viability(&self) -> Result<(), ChannelError> {
        if (1..=MAX_LANES).contains(&self.config.lanes) {
            Ok(())
        } else {
            Err(ChannelError::not_viable(
                "mpt",
                format!("{} lanes (1..={MAX_LANES} allowed)", self.config.lanes),
            ))
        }
    }

    fn device_descriptors(&self) -> Vec<(Device, Vec<u8>)> {
        if self.is_viable() {
            vec![(Device::CPU, self.descriptor.clone())]
        } else {
            Vec::new()
        }
    }

    fn connections_needed(&self) -> usize {
        1
    }

    fn create_channel(
        &self,
        conns: Vec<BoxConnection>,
        endpoint: Endpoint,
    ) -> BoxFuture<'static, Result<BoxChannel, ChannelError>> {
        let ready = self.viability().and_then(|()| self.loops());
        let children = self.children.clone();
        let config = self.config.clone();
        async move {
            let loops = ready?;
            let [control]: [BoxConnection; 1] = conns.try_into().map_err(|c: Vec<_>| {
                ChannelError::protocol(format!("mpt needs 1 connection, got {}", c.len()))
            })?;
            let setup = async {
                match endpoint {
                    Endpoint::Listen => listen_lanes(&control, &config).await,
                    Endpoint::Connect => connect_lanes(&control, config.lanes).await,
                }
            };
            let timeout = async {
                async_io::Timer::after(config.setup_timeout).await;
                Err(ChannelError::protocol(format!(
                    "mpt lanes not set up within {:?}",
                    config.setup_timeout
                )))
            };
            let streams = select(setup.boxed(), timeout.boxed())
                .await
                .factor_first()
                .0?;
            let lanes = streams
                .into_iter()
                .enumerate()
                .map(|(i, s)| loops.lane(i, s))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    ChannelError::Transport(TransportError::Io {
                        op: "set up an mpt lane",
                        source: e,
                    })
                })?;
            let inner = Arc::new(Inner {
                control,
                caller_up_to: config.threads_above,
                lanes,
                ops: Ops::default(),
                sends_done: Order::default(),
                recvs_done: Order::default(),
            });
            children.adopt(Arc::downgrade(&inner) as std::sync::Weak<dyn Close>);
            Ok(Box::new(MptChannel { inner }) as BoxChannel)
        }
        .boxed()
    }

    fn close(&self) {
        self.children.close_all();
        let loops = self
            .loops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(l) = loops {
            l.close();
        }
    }
}

fn random_token() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now())
}

fn io_error(op: &'static str) -> impl Fn(std::io::Error) -> ChannelError {
    move |e| ChannelError::Transport(TransportError::Io { op, source: e })
}

async fn listen_lanes(
    control: &BoxConnection,
    config: &MptConfig,
) -> Result<Vec<TcpStream>, ChannelError> {
    let at = tp_transport::tcp::parse_address(&format!("{}:0", bracket(&config.bind_host)))?;
    let listener = Async::<TcpListener>::bind(at).map_err(io_error("bind"))?;
    let token = random_token();
    let address = listener
        .get_ref()
        .local_addr()
        .map_err(io_error("getsockname"))?
        .to_string();
    let mut hello = vec![SERVER_HELLO];
    hello.extend_from_slice(&token.to_le_bytes());
    hello.extend_from_slice(&(config.lanes as u32).to_le_bytes());
    hello.extend_from_slice(address.as_bytes());
    control.write_frame(&hello).await?;
    let mut lanes: Vec<Option<TcpStream>> = (0..config.lanes).map(|_| None).collect();
    // Hellos are read concurrently, each within HELLO_TIMEOUT, so a stray connection
    // that never speaks (a port scan) costs only itself.
    let mut hellos = FuturesUnordered::new();
    let mut accept = listener.accept().boxed();
    while lanes.iter().any(Option::is_none) {
        let next_hello = async {
            if hellos.is_empty() {
                std::future::pending().await
            } else {
                hellos.next().await
            }
        };
        match select(&mut accept, pin!(next_hello)).await {
            Either::Left((conn, _)) => {
                accept = listener.accept().boxed();
                hellos.push(read_hello(conn.map_err(io_error("accept"))?.0));
            }
            Either::Right((Some((conn, Some(h))), _)) => {
                let ok_token = h[0] == CLIENT_HELLO && h[1..9] == token.to_le_bytes();
                let lane = u32::from_le_bytes([h[9], h[10], h[11], h[12]]) as usize;
                match lanes.get_mut(lane) {
                    Some(slot @ None) if ok_token => {
                        *slot = Some(conn.into_inner().map_err(io_error("accept"))?);
                    }
                    _ => tracing::warn!(lane, "mpt: dropped a stray lane connection"),
                }
            }
            Either::Right(_) => tracing::warn!("mpt: dropped a lane connection without a hello"),
        }
    }
    Ok(lanes.into_iter().flatten().collect())
}

/// How long a lane connection may take to send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads a lane's 13-byte hello; `None` if it fails or takes too long.
async fn read_hello(mut conn: Async<TcpStream>) -> (Async<TcpStream>, Option<[u8; 13]>) {
    let mut h = [0u8; 13];
    let ok = {
        let read = conn.read_exact(&mut h);
        let timer = async_io::Timer::after(HELLO_TIMEOUT);
        matches!(select(read, timer).await, Either::Left((Ok(()), _)))
    };
    (conn, ok.then_some(h))
}

async fn connect_lanes(
    control: &BoxConnection,
    lanes: usize,
) -> Result<Vec<TcpStream>, ChannelError> {
    let hello = control.read_frame(1024).await?;
    if hello.len() < 13 || hello[0] != SERVER_HELLO {
        return Err(ChannelError::protocol("malformed mpt server hello"));
    }
    let token = &hello[1..9];
    let n = u32::from_le_bytes([hello[9], hello[10], hello[11], hello[12]]) as usize;
    if n != lanes {
        return Err(ChannelError::protocol(format!(
            "the peer wants {n} lanes, this end {lanes}"
        )));
    }
    let address = std::str::from_utf8(&hello[13..])
        .map_err(|_| ChannelError::protocol("lane address is not UTF-8"))?;
    let at = tp_transport::tcp::parse_address(address)?;
    let conns = join_all((0..lanes).map(|i| async move {
        let mut conn = Async::<TcpStream>::connect(at)
            .await
            .map_err(io_error("connect"))?;
        let mut h = vec![CLIENT_HELLO];
        h.extend_from_slice(token);
        h.extend_from_slice(&(i as u32).to_le_bytes());
        conn.write_all(&h).await.map_err(io_error("write"))?;
        conn.into_inner().map_err(io_error("connect"))
    }))
    .await;
    conns.into_iter().collect()
}

/// `::1` → `[::1]` for `host:port`.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

struct Inner {
    control: BoxConnection,
    /// [`MptConfig::threads_above`].
    caller_up_to: usize,
    lanes: Vec<Lane>,
    ops: Ops,
    /// Sends, then receives, complete in this order. Each lane finishes its slices in
    /// tensor order, but a tensor's last slice and the next tensor's last slice may
    /// finish on two lanes' threads at once, so their futures could see the later one
    /// done first.
    sends_done: Order,
    recvs_done: Order,
}

impl Close for Inner {
    fn close(&self) {
        if self.ops.mark_closed() {
            self.control.close();
            for l in &self.lanes {
                l.close();
            }
        }
    }
}

struct MptChannel {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MptChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MptChannel")
            .field("lanes", &self.inner.lanes.len())
            .field("closed", &self.inner.ops.is_closed())
            .finish()
    }
}

/// One tensor through the lanes: waits for its turn, queues its slices behind the
/// earlier tensors' (then lets the next tensor queue), waits for them, and completes
/// after the tensors issued before it (`done`).
async fn transfer(
    inner: &Inner,
    (turn, done): (Turn, Turn),
    held: Held,
    (device, len): (Device, usize),
) -> (Held, Result<(), ChannelError>) {
    let (held, r) = match inner.ops.start_host("mpt", inner, &turn, device, len).await {
        Ok(true) => {
            let transfer = Transfer::start(held, &inner.lanes, inner.caller_up_to);
            drop(turn);
            let (held, r) = transfer.finish(&inner.lanes).await;
            (held, r.map_err(ChannelError::from))
        }
        r => (held, r.map(drop)),
    };
    done.ready().await;
    (held, r)
}

impl Channel for MptChannel {
    fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone> {
        let turns = (self.inner.ops.send_turn(), self.inner.sends_done.turn());
        let inner = self.inner.clone();
        async move {
            let shape = (buf.device(), buf.byte_len());
            match transfer(&inner, turns, Held::Send(buf), shape).await {
                (Held::Send(buf), r) => (buf, r),
                (Held::Recv(_), _) => unreachable!("a send's transfer holds a send buffer"),
            }
        }
        .boxed()
    }

    fn recv(&self, buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone> {
        let turns = (self.inner.ops.recv_turn(), self.inner.recvs_done.turn());
        let inner = self.inner.clone();
        async move {
            let shape = (buf.device(), buf.byte_len());
            match transfer(&inner, turns, Held::Recv(buf), shape).await {
                (Held::Recv(buf), r) => (buf, r),
                (Held::Send(_), _) => unreachable!("a receive's transfer holds a receive buffer"),
            }
        }
        .boxed()
    }

    fn close(&self) {
        Close::close(&*self.inner);
    }
}

impl Drop for MptChannel {
    fn drop(&mut self) {
        Close::close(&*self.inner);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tp_transport::Transport;
    use tp_transport::tcp::TcpTransport;

    /// The listening end, driven by a hand-written client: a connection that never
    /// speaks and one with a wrong token do not stop the real lanes, and a tensor then
    /// arrives striped across them.
    #[test]
    fn stray_lane_connections_cost_only_themselves() {
        async_io::block_on(async {
            let tcp = TcpTransport::new();
            let l = tcp.listen("127.0.0.1:0").unwrap();
            let (c, s) = futures::future::join(tcp.connect(l.address()), l.accept()).await;
            let (control_client, control_server) = (c.unwrap(), s.unwrap());
            let ctx = MptContext::new(MptConfig {
                lanes: 2,
                bind_host: "127.0.0.1".into(),
                ..MptConfig::default()
            });
            let server = ctx.create_channel(vec![control_server], Endpoint::Listen);
            let client = async {
                let hello = control_client.read_frame(1024).await.unwrap();
                let token: [u8; 8] = hello[1..9].try_into().unwrap();
                let addr = std::str::from_utf8(&hello[13..]).unwrap().to_string();
                let silent = tcp.connect(&addr).await.unwrap();
                let liar = tcp.connect(&addr).await.unwrap();
                let mut bad = vec![CLIENT_HELLO];
                bad.extend_from_slice(&(!u64::from_le_bytes(token)).to_le_bytes());
                bad.extend_from_slice(&0u32.to_le_bytes());
                liar.write(&[&bad]).await.unwrap();
                let mut lanes = Vec::new();
                for i in 0..2u32 {
                    let lane = tcp.connect(&addr).await.unwrap();
                    let mut h = vec![CLIENT_HELLO];
                    h.extend_from_slice(&token);
                    h.extend_from_slice(&i.to_le_bytes());
                    lane.write(&[&h]).await.unwrap();
                    lanes.push(lane);
                }
                (silent, liar, lanes)
            };
            let (server, (_silent, _liar, lanes)) = futures::future::join(server, client).await;
            let server = server.unwrap();
            let data: Vec<u8> = (0..=200u8).collect();
            let (sent, r) = server.send(Box::new(data.clone())).await;
            r.unwrap();
            assert_eq!(sent.bytes(), &data[..]);
            let mut first = vec![0u8; 100];
            let mut second = vec![0u8; 101];
            lanes[0].read_exact(&mut first).await.unwrap();
            lanes[1].read_exact(&mut second).await.unwrap();
            assert_eq!(first, data[..100]);
            assert_eq!(second, data[100..]);
        });
    }

    /// Two mpt channels joined over loopback.
    fn pair(config: MptConfig) -> (BoxChannel, BoxChannel, MptContext, MptContext) {
        async_io::block_on(async {
            let tcp = TcpTransport::new();
            let l = tcp.listen("127.0.0.1:0").unwrap();
            let (c, s) = futures::future::join(tcp.connect(l.address()), l.accept()).await;
            let (server_ctx, client_ctx) =
                (MptContext::new(config.clone()), MptContext::new(config));
            let (server, client) = futures::future::join(
                server_ctx.create_channel(vec![s.unwrap()], Endpoint::Listen),
                client_ctx.create_channel(vec![c.unwrap()], Endpoint::Connect),
            )
            .await;
            (client.unwrap(), server.unwrap(), client_ctx, server_ctx)
        })
    }

    fn all_by_the_task() -> MptConfig {
        MptConfig {
            lanes: 2,
            bind_host: "127.0.0.1".into(),
            threads_above: usize::MAX,
            ..MptConfig::default()
        }
    }

    /// Fails the test instead of hanging it.
    async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
        let timeout = async {
            async_io::Timer::after(Duration::from_secs(20)).await;
            panic!("{what}: not done within 20 s");
        };
        match select(pin!(f), pin!(timeout)).await {
            Either::Left((v, _)) => v,
            Either::Right((never, _)) => never,
        }
    }

    /// A receive the task moves, dropped before any byte came: its slices go to the
    /// lane threads, which take the first tensor into its buffer, and the next receive
    /// gets the second tensor whole.
    #[test]
    fn a_dropped_receive_leaves_its_tensor_to_the_lane_threads() {
        let (client, server, _c, _s) = pair(all_by_the_task());
        let mut dropped = server.recv(Box::new(vec![0u8; 1 << 20]));
        assert!((&mut dropped).now_or_never().is_none());
        drop(dropped);
        let first = vec![1u8; 1 << 20];
        let second: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        async_io::block_on(within("the second tensor", async {
            let sends = futures::future::join(
                client.send(Box::new(first)),
                client.send(Box::new(second.clone())),
            );
            let recv = server.recv(Box::new(vec![0u8; 1 << 20]));
            let ((a, b), (got, r)) = futures::future::join(sends, recv).await;
            a.1.unwrap();
            b.1.unwrap();
            r.unwrap();
            assert!(
                got.bytes() == &second[..],
                "the second tensor arrived changed"
            );
        }));
    }

    /// A send the task moves, dropped after its first step (64 MiB do not fit in the
    /// sockets): the lane threads send the rest, and the peer gets both tensors whole.
    #[test]
    fn a_dropped_send_still_sends_in_order() {
        let (client, server, _c, _s) = pair(all_by_the_task());
        let first: Vec<u8> = (0..64 << 20).map(|i| (i % 253) as u8).collect();
        let mut dropped = client.send(Box::new(first.clone()));
        assert!((&mut dropped).now_or_never().is_none());
        drop(dropped);
        let second = vec![7u8; 1000];
        async_io::block_on(within("both tensors", async {
            let (sent, (a, ra), (b, rb)) = futures::future::join3(
                client.send(Box::new(second.clone())),
                server.recv(Box::new(vec![0u8; 64 << 20])),
                server.recv(Box::new(vec![0u8; 1000])),
            )
            .await;
            sent.1.unwrap();
            ra.unwrap();
            rb.unwrap();
            assert!(a.bytes() == &first[..], "the first tensor arrived changed");
            assert_eq!(b.bytes(), &second[..]);
        }));
    }

    /// A lane thread's receive raises the socket's `SO_RCVLOWAT`; the small receive
    /// after it, which the task moves, must still wake at its first byte (the low-water
    /// mark back at 1), even though its bytes come after it started waiting.
    #[test]
    fn a_small_receive_after_a_large_one_wakes() {
        let (client, server, _c, _s) = pair(MptConfig {
            threads_above: 1 << 20,
            ..all_by_the_task()
        });
        let large: Vec<u8> = (0..8 << 20).map(|i| (i % 241) as u8).collect();
        async_io::block_on(within("the small receive", async {
            let ((_, s), (got, r)) = futures::future::join(
                client.send(Box::new(large.clone())),
                server.recv(Box::new(vec![0u8; 8 << 20])),
            )
            .await;
            s.unwrap();
            r.unwrap();
            assert!(got.bytes() == &large[..]);
            let mut small = server.recv(Box::new(vec![0u8; 1000]));
            assert!((&mut small).now_or_never().is_none());
            async_io::Timer::after(Duration::from_millis(20)).await;
            let ((_, s), (got, r)) =
                futures::future::join(client.send(Box::new(vec![9u8; 1000])), small).await;
            s.unwrap();
            r.unwrap();
            assert_eq!(got.bytes(), &[9u8; 1000][..]);
        }));
    }

    /// Closing the context fails what its lane threads still hold, and the threads end.
    #[test]
    fn closing_the_context_fails_transfers_on_the_lane_threads() {
        let (client, _server, client_ctx, _s) = pair(MptConfig {
            threads_above: 0,
            ..all_by_the_task()
        });
        // The server neither sends nor reads: the receive waits on the client's lane
        // threads, and so does the send (256 MiB, more than the sockets hold).
        let recv = client.recv(Box::new(vec![0u8; 4096]));
        let send = client.send(Box::new(vec![3u8; 256 << 20]));
        let (r, s) = async_io::block_on(within("the close", async {
            let close = async {
                async_io::Timer::after(Duration::from_millis(100)).await;
                client_ctx.close();
            };
            let (r, s, ()) = futures::future::join3(recv, send, close).await;
            (r, s)
        }));
        assert!(s.1.is_err(), "a send on a closed context succeeded");
        assert!(r.1.is_err(), "a receive on a closed context succeeded");
    }

    #[test]
    fn slices_cover_the_tensor_exactly() {
        for len in [0usize, 1, 2, 3, 7, 1000, 1 << 20] {
            for n in 1..=5 {
                let mut next = 0;
                for i in 0..n {
                    let (a, b) = lanes::bounds(len, i, n);
                    assert_eq!(a, next);
                    assert!(b >= a);
                    next = b;
                }
                assert_eq!(next, len);
            }
        }
    }
}
