//! The channel conformance suite: every case is written once against the
//! [`ChannelContext`]/[`Channel`] traits, then instantiated per channel and per executor
//! (tensorpipe.md §6.4, plus large tensors, close with pending operations, completion
//! order and context close).

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::executor::{ThreadPool, block_on};
use futures::future::{join, join_all};
use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::SpawnExt;
use tp_channel::{BoxChannel, ChannelContext, ChannelError, Endpoint};
use tp_transport::Transport;
use tp_transport::shm::ShmTransport;
use tp_transport::tcp::TcpTransport;

/// How a case makes its channels: the context, and the transport its connections use.
#[derive(Clone, Copy)]
pub(super) struct Make {
    ctx: fn() -> Arc<dyn ChannelContext>,
    /// shm connections instead of loopback TCP ones (they read by looking, which is
    /// what lets cma's sender help: see `tp_channel::kit::Fetch::offer_help`).
    shm: bool,
}

impl Make {
    /// Channels over loopback TCP connections.
    pub(super) const fn tcp(ctx: fn() -> Arc<dyn ChannelContext>) -> Self {
        Self { ctx, shm: false }
    }

    /// Channels over shm connections.
    const fn shm(ctx: fn() -> Arc<dyn ChannelContext>) -> Self {
        Self { ctx, shm: true }
    }

    /// A new context.
    pub(super) fn ctx(self) -> Arc<dyn ChannelContext> {
        (self.ctx)()
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Executor {
    BlockOn,
    ThreadPool,
}

/// Runs `case` under an executor, with a deadline so that a hang fails.
pub(super) fn run<F: Future<Output = ()> + Send + 'static>(executor: Executor, case: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    match executor {
        Executor::BlockOn => {
            std::thread::spawn(move || {
                block_on(case);
                let _ = tx.send(());
            });
        }
        Executor::ThreadPool => {
            let pool = ThreadPool::builder().pool_size(2).create().unwrap();
            let handle = pool.spawn_with_handle(case).unwrap();
            std::thread::spawn(move || {
                block_on(handle);
                let _ = tx.send(());
            });
        }
    }
    rx.recv_timeout(Duration::from_secs(120))
        .expect("case panicked or did not finish within 120 s (a hang)");
}

/// Two channels, (client, server), over fresh loopback TCP connections (or shm ones,
/// as `make` says) — as the original's harness: the client opens the connections and
/// numbers them, the server orders them by number.
pub(super) async fn pair(
    make: Make,
) -> (
    Arc<dyn ChannelContext>,
    BoxChannel,
    Arc<dyn ChannelContext>,
    BoxChannel,
) {
    let (cc, sc) = (make.ctx(), make.ctx());
    let n = cc.connections_needed();
    let transport: Box<dyn Transport> = if make.shm {
        Box::new(ShmTransport::default())
    } else {
        Box::new(TcpTransport::new())
    };
    let listener = transport
        .listen(if make.shm { "" } else { "127.0.0.1:0" })
        .unwrap();
    let addr = listener.address().to_string();
    let client = async {
        let mut conns = Vec::new();
        for i in 0..n {
            let c = transport.connect(&addr).await.unwrap();
            c.write(&[&(i as u64).to_le_bytes()]).await.unwrap();
            conns.push(c);
        }
        conns
    };
    let server = async {
        let mut conns: Vec<Option<_>> = (0..n).map(|_| None).collect();
        for _ in 0..n {
            let c = listener.accept().await.unwrap();
            let mut i = [0u8; 8];
            c.read_exact(&mut i).await.unwrap();
            conns[u64::from_le_bytes(i) as usize] = Some(c);
        }
        conns.into_iter().map(Option::unwrap).collect::<Vec<_>>()
    };
    let (cconns, sconns) = join(client, server).await;
    let (c, s) = join(
        cc.create_channel(cconns, Endpoint::Connect),
        sc.create_channel(sconns, Endpoint::Listen),
    )
    .await;
    (cc, c.unwrap(), sc, s.unwrap())
}

pub(super) fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 8) as u8))
        .collect()
}

async fn transfer(from: &BoxChannel, to: &BoxChannel, data: Vec<u8>) {
    let n = data.len();
    let ((sent, rs), (got, rr)) = join(
        from.send(Box::new(data.clone())),
        to.recv(Box::new(vec![0u8; n])),
    )
    .await;
    rs.unwrap();
    rr.unwrap();
    assert_eq!(sent.bytes(), &data[..], "the send buffer comes back intact");
    assert!(got.bytes() == &data[..], "{n} bytes arrived intact");
}

pub(super) async fn device_descriptors(make: Make) {
    let (a, b) = (make.ctx(), make.ctx());
    let (da, db) = (a.device_descriptors(), b.device_descriptors());
    assert!(!da.is_empty());
    assert_eq!(da, db);
    for (_, d) in &da {
        assert!(!d.is_empty());
        assert!(a.can_communicate_with_remote(d, d));
    }
}

pub(super) async fn client_to_server(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    transfer(&c, &s, (0..=255u8).collect()).await;
}

pub(super) async fn server_to_client(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    transfer(&s, &c, (0..=255u8).collect()).await;
}

pub(super) async fn one_byte(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    transfer(&c, &s, vec![0x42]).await;
}

pub(super) async fn large_256_mib(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    transfer(&c, &s, pattern(256 << 20, 7)).await;
}

pub(super) async fn many_tensors_in_flight(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    let data: Vec<Vec<u8>> = (0..100).map(|i| pattern(256 << 10, i as u8)).collect();
    let sends: Vec<_> = data.iter().map(|d| c.send(Box::new(d.clone()))).collect();
    let recvs: Vec<_> = data
        .iter()
        .map(|d| s.recv(Box::new(vec![0u8; d.len()])))
        .collect();
    let (sent, got) = join(join_all(sends), join_all(recvs)).await;
    for (i, ((_, rs), (buf, rr))) in sent.into_iter().zip(got).enumerate() {
        rs.unwrap();
        rr.unwrap();
        assert!(buf.bytes() == &data[i][..], "tensor {i}");
    }
}

pub(super) async fn both_ways_at_once(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    let a = pattern(1 << 20, 1);
    let b = pattern(1 << 20, 2);
    join(transfer(&c, &s, a), transfer(&s, &c, b)).await;
}

pub(super) async fn empty_and_nonempty_tensors(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    let lens = [1usize, 0, 1, 0, 0, 3];
    let sends: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| c.send(Box::new(vec![i as u8 + 1; n])))
        .collect();
    let recvs: Vec<_> = lens
        .iter()
        .map(|&n| s.recv(Box::new(vec![0u8; n])))
        .collect();
    let (sent, got) = join(join_all(sends), join_all(recvs)).await;
    for (i, ((_, rs), (buf, rr))) in sent.into_iter().zip(got).enumerate() {
        rs.unwrap();
        rr.unwrap();
        assert_eq!(buf.bytes(), &vec![i as u8 + 1; lens[i]][..], "tensor {i}");
    }
}

pub(super) async fn completions_come_in_issue_order(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut recvs = FuturesUnordered::new();
    for i in 0..8usize {
        let order = order.clone();
        // Big first, small last: a channel that let a later, smaller tensor finish first
        // would show it here.
        let len = (8 - i) << 16;
        let f = s.recv(Box::new(vec![0u8; len]));
        recvs.push(async move {
            let (_, r) = f.await;
            r.unwrap();
            order.lock().unwrap().push(i);
        });
    }
    let sends = join_all((0..8usize).map(|i| c.send(Box::new(pattern((8 - i) << 16, i as u8)))));
    let drain = async { while recvs.next().await.is_some() {} };
    let (sent, ()) = join(sends, drain).await;
    for (_, r) in sent {
        r.unwrap();
    }
    assert_eq!(*order.lock().unwrap(), (0..8).collect::<Vec<_>>());
}

pub(super) async fn close_fails_pending_ops_exactly_once(make: Make) {
    let (_cc, c, _sc, s) = pair(make).await;
    let pending: Vec<_> = (0..3).map(|_| s.recv(Box::new(vec![0u8; 4096]))).collect();
    let zero = s.recv(Box::new(Vec::new()));
    s.close();
    for (buf, r) in join_all(pending).await {
        assert_eq!(buf.bytes().len(), 4096, "the buffer comes back");
        assert!(matches!(r, Err(ChannelError::Closed)), "{r:?}");
    }
    assert!(matches!(zero.await.1, Err(ChannelError::Closed)));
    // Later operations fail at once, and the peer's sends end instead of hanging.
    assert!(matches!(
        s.recv(Box::new(vec![0u8; 1])).await.1,
        Err(ChannelError::Closed)
    ));
    let sends = join_all((0..3).map(|_| c.send(Box::new(vec![1u8; 4096]))));
    let results = futures::future::select(
        Box::pin(sends),
        Box::pin(async_io::Timer::after(Duration::from_secs(5))),
    )
    .await;
    if let futures::future::Either::Left((results, _)) = results {
        // Each completed exactly once (join_all resolved); basic's may have been
        // buffered by the kernel before the close, so success is possible there.
        assert_eq!(results.len(), 3);
    } else {
        // Sends still pending after the peer closed: closing our end must end them.
        c.close();
    }
}

pub(super) async fn context_close_closes_its_channels(make: Make) {
    let (cc, c, _sc, _s) = pair(make).await;
    let pending = c.recv(Box::new(vec![0u8; 16]));
    cc.close();
    assert!(matches!(pending.await.1, Err(ChannelError::Closed)));
    assert!(matches!(
        c.send(Box::new(vec![1u8; 1])).await.1,
        Err(ChannelError::Closed)
    ));
}

pub(super) async fn a_vanished_peer_fails_pending_ops(make: Make) {
    let (_cc, c, sc, s) = pair(make).await;
    // Prove the pair works, then let one end vanish with the other mid-operation.
    transfer(&c, &s, vec![9u8; 4096]).await;
    let recv = c.recv(Box::new(vec![0u8; 1 << 20]));
    let send = c.send(Box::new(vec![1u8; 8 << 20]));
    drop(s);
    sc.close();
    drop(sc);
    let both = join(recv, send);
    let deadline = async_io::Timer::after(Duration::from_secs(10));
    match futures::future::select(Box::pin(both), Box::pin(deadline)).await {
        futures::future::Either::Left((((_, rr), (_, rs)), _)) => {
            assert!(rr.is_err(), "a receive from a vanished peer cannot succeed");
            assert!(rs.is_err(), "nobody took the 8 MiB: {rs:?}");
        }
        futures::future::Either::Right(_) => {
            panic!("pending operations hung after the peer vanished")
        }
    }
}

/// Whether the channel works on this machine; if not, the case is skipped and says why.
/// Only cma may be unusable (a seccomp filter, Yama, a foreign user namespace); the
/// others must always work.
fn viable(make: Make) -> bool {
    let ctx = make.ctx();
    match ctx.viability() {
        Ok(()) => true,
        Err(e) => {
            assert_eq!(ctx.name(), "cma", "{e}");
            eprintln!("SKIPPED: {e}");
            false
        }
    }
}

macro_rules! channel_conformance {
    ($backend:ident, $make:expr) => {
        channel_conformance!($backend, $make, tcp);
    };
    ($backend:ident, $make:expr, $over:ident) => {
        mod $backend {
            use super::*;

            const MAKE: Make = Make::$over($make);

            channel_conformance!(@cases
                device_descriptors, client_to_server, server_to_client, one_byte,
                large_256_mib, many_tensors_in_flight, both_ways_at_once,
                empty_and_nonempty_tensors, completions_come_in_issue_order,
                close_fails_pending_ops_exactly_once, context_close_closes_its_channels,
                a_vanished_peer_fails_pending_ops);
        }
    };
    (@cases $($case:ident),*) => {
        $(
            mod $case {
                use super::*;

                #[test]
                fn block_on() {
                    if viable(MAKE) {
                        run(Executor::BlockOn, super::super::$case(MAKE));
                    }
                }

                #[test]
                fn thread_pool() {
                    if viable(MAKE) {
                        run(Executor::ThreadPool, super::super::$case(MAKE));
                    }
                }
            }
        )*
    };
}

channel_conformance!(basic, || Arc::new(tp_channel::basic::BasicContext::new()));
channel_conformance!(xth, || Arc::new(tp_channel::xth::XthContext::new()));
// Over shm, where xth's sender helps with tensors from 256 KiB (the suite's 1 MiB and
// 256 MiB ones).
channel_conformance!(
    xth_helped,
    || Arc::new(tp_channel::xth::XthContext::new()),
    shm
);
channel_conformance!(cma, || Arc::new(tp_channel::cma::CmaContext::default()));
// Over shm, where the sender helps: on every tensor from 8 KiB, the receiver's share
// split across threads from 64 KiB — the many-tensors, both-ways and order cases run
// through both.
channel_conformance!(
    cma_helped,
    || Arc::new(tp_channel::cma::CmaContext::new(
        tp_channel::cma::CmaConfig {
            help_from: 8 << 10,
            parallel_from: 64 << 10,
            threads: 3,
            ..Default::default()
        }
    )),
    shm
);
channel_conformance!(mpt, || Arc::new(tp_channel::mpt::MptContext::new(
    tp_channel::mpt::MptConfig {
        lanes: 3,
        bind_host: "127.0.0.1".into(),
        ..Default::default()
    }
)));
// Every tensor, however small, moved by the lane threads (the default leaves tensors
// of up to 1 MiB to the waiting task, so the suite's small cases go that way above).
channel_conformance!(mpt_lane_threads, || Arc::new(
    tp_channel::mpt::MptContext::new(tp_channel::mpt::MptConfig {
        lanes: 3,
        bind_host: "127.0.0.1".into(),
        threads_above: 0,
        ..Default::default()
    })
));
