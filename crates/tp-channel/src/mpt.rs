//! mpt: tensors striped across N TCP lanes.
//!
//! Setup, over the one connection the pipe gives the channel: the listening end binds a
//! TCP listener for the lanes and sends `ServerHello{token, address, lanes}`; the
//! connecting end opens the lanes and starts each with `ClientHello{token, lane}`. The
//! listening end accepts until every lane arrived with the right token (a stray
//! connection is dropped, not fatal) or the setup timeout passes.
//!
//! Transfer: tensor bytes `[len·i/N, len·(i+1)/N)` go on lane i, raw (both ends know the
//! length); a tensor is done when all its slices are. Each lane's writes and reads are
//! queued in tensor order, so order across tensors holds while the next tensor's
//! slices already queue behind the current ones.
//!
//! Descriptor `mpt:<N>:tcp:*`: two contexts must agree on the lane count.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use std::pin::pin;

use futures::future::{BoxFuture, Either, join_all, select};
use futures::stream::{FuturesUnordered, StreamExt};
use tp_transport::tcp::TcpTransport;
use tp_transport::{BoxConnection, Transport};

use crate::children::{Children, Close};
use crate::ops::Ops;
use crate::{
    BoxChannel, Channel, ChannelContext, ChannelError, Device, Endpoint, RecvBuf, RecvDone,
    SendBuf, SendDone,
};

const SERVER_HELLO: u8 = 1;
const CLIENT_HELLO: u8 = 2;
/// Most lanes a peer may ask for.
pub const MAX_LANES: usize = 64;

/// Settings of an mpt context.
#[derive(Clone, Debug)]
pub struct MptConfig {
    /// Lanes per channel (1..=64). Default 2; PyTorch's agent uses 16.
    pub lanes: usize,
    /// Where the listening end binds its lane listener (`host`, port 0 is picked).
    /// Default: the transport's guessed address (`TP_SOCKET_IFNAME`, the hostname's
    /// address, else loopback).
    pub bind_host: String,
    /// How long setting up the lanes may take.
    pub setup_timeout: Duration,
}

impl Default for MptConfig {
    fn default() -> Self {
        Self {
            lanes: 2,
            bind_host: tp_transport::tcp::guess_address().0.to_string(),
            setup_timeout: Duration::from_secs(30),
        }
    }
}

/// The mpt channel context.
#[derive(Debug)]
pub struct MptContext {
    config: MptConfig,
    descriptor: Vec<u8>,
    tcp: TcpTransport,
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
            tcp: TcpTransport::new(),
            children: Arc::default(),
        }
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
        let ready = self.viability();
        let children = self.children.clone();
        let config = self.config.clone();
        let tcp = self.tcp.clone();
        async move {
            ready?;
            if children.is_closed() {
                return Err(ChannelError::Closed);
            }
            let [control]: [BoxConnection; 1] = conns.try_into().map_err(|c: Vec<_>| {
                ChannelError::protocol(format!("mpt needs 1 connection, got {}", c.len()))
            })?;
            let setup = async {
                match endpoint {
                    Endpoint::Listen => listen_lanes(&tcp, &control, &config).await,
                    Endpoint::Connect => connect_lanes(&tcp, &control, config.lanes).await,
                }
            };
            let timeout = async {
                async_io::Timer::after(config.setup_timeout).await;
                Err(ChannelError::protocol(format!(
                    "mpt lanes not set up within {:?}",
                    config.setup_timeout
                )))
            };
            let lanes = select(setup.boxed(), timeout.boxed())
                .await
                .factor_first()
                .0?;
            let inner = Arc::new(Inner {
                control,
                lanes,
                ops: Ops::default(),
            });
            children.adopt(Arc::downgrade(&inner) as std::sync::Weak<dyn Close>);
            Ok(Box::new(MptChannel { inner }) as BoxChannel)
        }
        .boxed()
    }

    fn close(&self) {
        self.children.close_all();
        self.tcp.close();
    }
}

fn random_token() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::time::Instant::now())
}

async fn listen_lanes(
    tcp: &TcpTransport,
    control: &BoxConnection,
    config: &MptConfig,
) -> Result<Vec<BoxConnection>, ChannelError> {
    let listener = tcp.listen(&format!("{}:0", bracket(&config.bind_host)))?;
    let token = random_token();
    let address = listener.address().as_bytes();
    let mut hello = vec![SERVER_HELLO];
    hello.extend_from_slice(&token.to_le_bytes());
    hello.extend_from_slice(&(config.lanes as u32).to_le_bytes());
    hello.extend_from_slice(address);
    control.write_frame(&hello).await?;
    let mut lanes: Vec<Option<BoxConnection>> = (0..config.lanes).map(|_| None).collect();
    // Hellos are read concurrently, each within HELLO_TIMEOUT, so a stray connection
    // that never speaks (a port scan) costs only itself.
    let mut hellos = FuturesUnordered::new();
    let mut accept = listener.accept();
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
                accept = listener.accept();
                hellos.push(read_hello(conn?));
            }
            Either::Right((Some((conn, Some(h))), _)) => {
                let ok_token = h[0] == CLIENT_HELLO && h[1..9] == token.to_le_bytes();
                let lane = u32::from_le_bytes([h[9], h[10], h[11], h[12]]) as usize;
                match lanes.get_mut(lane) {
                    Some(slot @ None) if ok_token => *slot = Some(conn),
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
async fn read_hello(conn: BoxConnection) -> (BoxConnection, Option<[u8; 13]>) {
    let mut h = [0u8; 13];
    let ok = {
        let read = conn.read_exact(&mut h);
        let timer = async_io::Timer::after(HELLO_TIMEOUT);
        matches!(select(read, timer).await, Either::Left((Ok(()), _)))
    };
    (conn, ok.then_some(h))
}

async fn connect_lanes(
    tcp: &TcpTransport,
    control: &BoxConnection,
    lanes: usize,
) -> Result<Vec<BoxConnection>, ChannelError> {
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
    let conns = join_all((0..lanes).map(|i| {
        let connect = tcp.connect(address);
        async move {
            let conn = connect.await?;
            let mut h = vec![CLIENT_HELLO];
            h.extend_from_slice(token);
            h.extend_from_slice(&(i as u32).to_le_bytes());
            conn.write(&[&h]).await?;
            Ok::<_, ChannelError>(conn)
        }
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
    lanes: Vec<BoxConnection>,
    ops: Ops,
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

impl Inner {
    /// Slice `i` of `n` of a `len`-byte tensor.
    fn bounds(len: usize, i: usize, n: usize) -> (usize, usize) {
        let at = |k: usize| (len as u128 * k as u128 / n as u128) as usize;
        (at(i), at(i + 1))
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

fn first_error(results: Vec<Result<(), tp_transport::TransportError>>) -> Result<(), ChannelError> {
    results
        .into_iter()
        .find_map(Result::err)
        .map_or(Ok(()), |e| Err(e.into()))
}

impl Channel for MptChannel {
    fn send(&self, buf: Box<dyn SendBuf>) -> BoxFuture<'static, SendDone> {
        let turn = self.inner.ops.send_turn();
        let inner = self.inner.clone();
        async move {
            match inner
                .ops
                .start_host("mpt", &*inner, &turn, buf.device(), buf.byte_len())
                .await
            {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let bytes = buf.bytes();
            let n = inner.lanes.len();
            let slices: Vec<[&[u8]; 1]> = (0..n)
                .map(|i| {
                    let (a, b) = Inner::bounds(bytes.len(), i, n);
                    [bytes.get(a..b).unwrap_or_default()]
                })
                .collect();
            // Every lane's write is queued now, in tensor order; the next tensor may
            // queue behind it as soon as the turn is released.
            let writes: Vec<_> = inner
                .lanes
                .iter()
                .zip(&slices)
                .filter(|(_, s)| !s[0].is_empty())
                .map(|(lane, s)| lane.write(s))
                .collect();
            drop(turn);
            let r = first_error(join_all(writes).await);
            drop(slices);
            (buf, r)
        }
        .boxed()
    }

    fn recv(&self, mut buf: Box<dyn RecvBuf>) -> BoxFuture<'static, RecvDone> {
        let turn = self.inner.ops.recv_turn();
        let inner = self.inner.clone();
        async move {
            match inner
                .ops
                .start_host("mpt", &*inner, &turn, buf.device(), buf.byte_len())
                .await
            {
                Ok(true) => {}
                r => return (buf, r.map(drop)),
            }
            let n = inner.lanes.len();
            let r = {
                let mut rest = buf.bytes_mut();
                let len = rest.len();
                let mut reads = Vec::with_capacity(n);
                for (i, lane) in inner.lanes.iter().enumerate() {
                    let (a, b) = Inner::bounds(len, i, n);
                    let (part, tail) = std::mem::take(&mut rest).split_at_mut(b - a);
                    rest = tail;
                    if !part.is_empty() {
                        reads.push(lane.read_exact(part));
                    }
                }
                drop(turn);
                first_error(join_all(reads).await)
            };
            (buf, r)
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

    #[test]
    fn slices_cover_the_tensor_exactly() {
        for len in [0usize, 1, 2, 3, 7, 1000, 1 << 20] {
            for n in 1..=5 {
                let mut next = 0;
                for i in 0..n {
                    let (a, b) = Inner::bounds(len, i, n);
                    assert_eq!(a, next);
                    assert!(b >= a);
                    next = b;
                }
                assert_eq!(next, len);
            }
        }
    }
}
