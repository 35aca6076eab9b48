//! The transport conformance suite: every case is written once against the
//! [`Transport`] trait, then instantiated per backend and per executor.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::executor::{ThreadPool, block_on};
use futures::future::{join, join_all};
use futures::task::SpawnExt;
use tp_transport::{BoxConnection, ErrorKind, Transport};

type Make = fn() -> Arc<dyn Transport>;

/// Runs `case` to completion under an executor, with a deadline so a hang fails.
fn run<F: Future<Output = ()> + Send + 'static>(executor: Executor, case: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    let deadline = Duration::from_secs(60);
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
    rx.recv_timeout(deadline)
        .expect("case panicked or did not finish within 60 s (a hang)");
}

/// The transport, or `None` (the case is skipped, and says why) when it cannot work on
/// this machine — only ibv without an RDMA device; tcp and shm must always be viable.
fn viable(make: Make) -> Option<Arc<dyn Transport>> {
    let t = make();
    match t.viability() {
        Ok(()) => Some(t),
        Err(e) => {
            assert_eq!(t.name(), "ibv", "{e}");
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Executor {
    BlockOn,
    ThreadPool,
}

/// A connected (client, server) pair.
async fn pair(t: &Arc<dyn Transport>, addr: &str) -> (BoxConnection, BoxConnection) {
    let listener = t.listen(addr).unwrap();
    let (c, s) = join(t.connect(listener.address()), listener.accept()).await;
    (c.unwrap(), s.unwrap())
}

/// Returns Pending once, so that everything joined before it gets polled first.
async fn yield_now() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            std::task::Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await;
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

pub(super) async fn ping_pong(t: Arc<dyn Transport>, addr: &'static str) {
    let (c, s) = pair(&t, addr).await;
    for size in [1usize, 8, 1024, 65536] {
        let ping = pattern(size, 1);
        let mut got = vec![0u8; size];
        let (w, r) = join(c.write(&[&ping]), s.read_exact(&mut got)).await;
        w.unwrap();
        r.unwrap();
        assert_eq!(got, ping);
        let mut back = vec![0u8; size];
        let (w, r) = join(s.write(&[&got]), c.read_exact(&mut back)).await;
        w.unwrap();
        r.unwrap();
        assert_eq!(back, ping);
    }
}

pub(super) async fn large_write(t: Arc<dyn Transport>, addr: &'static str) {
    let (c, s) = pair(&t, addr).await;
    let big = pattern(64 << 20, 7);
    let mut got = vec![0u8; big.len()];
    let (w, r) = join(
        c.write(&[&big[..1000], &big[1000..]]),
        s.read_exact(&mut got),
    )
    .await;
    w.unwrap();
    r.unwrap();
    assert!(got == big, "64 MiB arrived corrupted");
}

pub(super) async fn many_queued_ops_complete_in_order(t: Arc<dyn Transport>, addr: &'static str) {
    let (c, s) = pair(&t, addr).await;
    let msgs: Vec<Vec<u8>> = (0..100).map(|i| pattern(1 + i * 37, i as u8)).collect();
    let mut bufs: Vec<Vec<u8>> = msgs.iter().map(|m| vec![0u8; m.len()]).collect();
    // Issue every read first, then every write: each completes in issue order.
    let reads: Vec<_> = bufs.iter_mut().map(|b| s.read_exact(b)).collect();
    let slices: Vec<[&[u8]; 1]> = msgs.iter().map(|m| [m.as_slice()]).collect();
    let writes: Vec<_> = slices.iter().map(|b| c.write(b)).collect();
    let (w, r) = join(join_all(writes), join_all(reads)).await;
    assert!(w.iter().chain(&r).all(Result::is_ok));
    assert_eq!(bufs, msgs);
}

pub(super) async fn zero_length(t: Arc<dyn Transport>, addr: &'static str) {
    let (c, s) = pair(&t, addr).await;
    c.write(&[]).await.unwrap();
    c.write(&[&[]]).await.unwrap();
    s.read_exact(&mut []).await.unwrap();
    c.write_frame(&[]).await.unwrap();
    assert_eq!(s.read_frame(16).await.unwrap(), Vec::<u8>::new());
    // The stream is still aligned afterwards.
    c.write(&[b"x"]).await.unwrap();
    let mut one = [0u8; 1];
    s.read_exact(&mut one).await.unwrap();
    assert_eq!(&one, b"x");
}

pub(super) async fn frames_round_trip(t: Arc<dyn Transport>, addr: &'static str) {
    let (c, s) = pair(&t, addr).await;
    for n in [0usize, 1, 100, 1 << 20] {
        let body = pattern(n, 3);
        let (w, r) = join(c.write_frame(&body), s.read_frame(1 << 20)).await;
        w.unwrap();
        assert_eq!(r.unwrap(), body);
    }
}

pub(super) async fn close_fails_pending_ops_exactly_once(
    t: Arc<dyn Transport>,
    addr: &'static str,
) {
    let (c, _s) = pair(&t, addr).await;
    let mut bufs = [[0u8; 16]; 10];
    let reads: Vec<_> = bufs.iter_mut().map(|b| c.read_exact(b)).collect();
    let closer = async {
        yield_now().await;
        c.close();
    };
    let (results, ()) = join(join_all(reads), closer).await;
    assert_eq!(results.len(), 10);
    for r in results {
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed);
    }
    // Later operations fail at once.
    assert_eq!(
        c.write(&[b"late"]).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(
        c.read_exact(&mut [0u8; 1]).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

pub(super) async fn peer_close_is_eof(t: Arc<dyn Transport>, addr: &'static str) {
    let (c, s) = pair(&t, addr).await;
    c.write(&[b"last words"]).await.unwrap();
    c.close();
    drop(c);
    let mut buf = [0u8; 10];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(
        &buf, b"last words",
        "bytes written before the close still arrive"
    );
    assert_eq!(
        s.read_exact(&mut buf).await.unwrap_err().kind(),
        ErrorKind::Eof
    );
}

pub(super) async fn listener_close_fails_pending_accepts(
    t: Arc<dyn Transport>,
    addr: &'static str,
) {
    let listener = t.listen(addr).unwrap();
    let accepts = join_all((0..3).map(|_| listener.accept()));
    let closer = async {
        yield_now().await;
        listener.close();
    };
    let (results, ()) = join(accepts, closer).await;
    for r in results {
        assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed);
    }
}

pub(super) async fn context_close_closes_everything(t: Arc<dyn Transport>, addr: &'static str) {
    let (c, s) = pair(&t, addr).await;
    let listener = t.listen(addr).unwrap();
    let mut buf = [0u8; 4];
    let read = c.read_exact(&mut buf);
    let accept = listener.accept();
    let closer = async {
        yield_now().await;
        t.close();
    };
    let ((r, a), ()) = join(join(read, accept), closer).await;
    assert_eq!(r.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(a.unwrap_err().kind(), ErrorKind::Closed);
    assert_eq!(
        s.write(&[b"x"]).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    assert_eq!(t.listen(addr).unwrap_err().kind(), ErrorKind::Closed);
}

pub(super) async fn connect_to_nothing_fails(t: Arc<dyn Transport>, addr: &'static str) {
    let listener = t.listen(addr).unwrap();
    let dead = listener.address().to_string();
    listener.close();
    drop(listener);
    assert!(t.connect(&dead).await.is_err());
    // Too long for a Unix socket name, and no port for TCP: bad for every backend.
    let bad = "not an address ".repeat(30);
    assert_eq!(
        t.connect(&bad).await.unwrap_err().kind(),
        ErrorKind::BadAddress
    );
}

pub(super) async fn many_concurrent_connections(t: Arc<dyn Transport>, addr: &'static str) {
    let listener = t.listen(addr).unwrap();
    let n = 32;
    let clients = join_all((0..n).map(|_| t.connect(listener.address())));
    let servers = join_all((0..n).map(|_| listener.accept()));
    let (clients, servers) = join(clients, servers).await;
    let clients: Vec<_> = clients.into_iter().map(Result::unwrap).collect();
    let servers: Vec<_> = servers.into_iter().map(Result::unwrap).collect();
    // Each client says its index; each server echoes what it got.
    let echoes = servers.iter().map(|s| async move {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.unwrap();
        s.write(&[&b]).await.unwrap();
    });
    let pings = clients.iter().enumerate().map(|(i, c)| async move {
        let id = (i as u64).to_le_bytes();
        c.write(&[&id]).await.unwrap();
        let mut b = [0u8; 8];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(b, id);
    });
    join(join_all(echoes), join_all(pings)).await;
}

pub(super) async fn oversized_frame_is_cut_off_and_others_go_on(
    t: Arc<dyn Transport>,
    addr: &'static str,
) {
    let (evil, victim) = pair(&t, addr).await;
    let (good_c, good_s) = pair(&t, addr).await;
    // Announce 1 TiB: the reader must refuse before allocating.
    evil.write(&[&(1u64 << 40).to_le_bytes()]).await.unwrap();
    let err = victim.read_frame(1 << 20).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::FrameTooLarge);
    assert_eq!(
        victim.read_frame(1 << 20).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
    // The cut-off shows on the evil side as the end of the stream.
    assert!(evil.read_exact(&mut [0u8; 1]).await.is_err());
    // Another connection is untouched.
    let (w, r) = join(good_c.write_frame(b"fine"), good_s.read_frame(16)).await;
    w.unwrap();
    assert_eq!(r.unwrap(), b"fine");
}

pub(super) async fn abandoned_read_breaks_the_connection(
    t: Arc<dyn Transport>,
    addr: &'static str,
) {
    let (c, s) = pair(&t, addr).await;
    c.write(&[b"abc"]).await.unwrap();
    {
        // A read of 8 bytes gets 3, then its future is dropped: the stream position is lost.
        let mut buf = [0u8; 8];
        let mut read = s.read_exact(&mut buf);
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        for _ in 0..100 {
            if read.as_mut().poll(&mut cx).is_ready() {
                panic!("an 8-byte read completed with 3 bytes sent");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert_eq!(
        s.read_exact(&mut [0u8; 1]).await.unwrap_err().kind(),
        ErrorKind::Broken
    );
}

/// `try_write` and `try_read_exact` either do the whole operation at once, in its place
/// in the stream, or nothing; they never pass an operation still pending.
pub(super) async fn now_or_nothing_ops_keep_the_stream_in_order(
    t: Arc<dyn Transport>,
    addr: &'static str,
) {
    // The transports that have a path for operations that need no waiting.
    let fast = t.name() == "shm";
    let (c, s) = pair(&t, addr).await;
    // And says so: the pipe looks for such a transport's frames itself.
    assert_eq!(c.reads_now(), fast);
    assert_eq!(s.reads_now(), fast);
    let wrote = c.try_write(&[b"ab", b"c"]);
    assert_eq!(wrote, fast);
    if !wrote {
        c.write(&[b"ab", b"c"]).await.unwrap();
    }
    c.write(&[b"de"]).await.unwrap();
    // shm: all five bytes are in the ring once the writes are done.
    let mut three = [0u8; 3];
    let got = s.try_read_exact(&mut three);
    assert_eq!(got, fast);
    if !got {
        s.read_exact(&mut three).await.unwrap();
    }
    assert_eq!(&three, b"abc");
    assert!(!s.try_read_exact(&mut [0u8; 10]), "more than is there");
    // A read left waiting for its third byte: a read now must not pass it.
    let mut def = [0u8; 3];
    let mut pending = s.read_exact(&mut def);
    let poll_once = |f: &mut futures::future::BoxFuture<'_, _>| {
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        f.as_mut().poll(&mut cx)
    };
    assert!(poll_once(&mut pending).is_pending());
    let mut one = [0u8; 1];
    assert!(!s.try_read_exact(&mut one), "a read is pending");
    c.write(&[b"fg"]).await.unwrap();
    pending.await.unwrap();
    assert_eq!(&def, b"def");
    // shm: in the ring; tcp: in its read-ahead if "g" came with "f" (not otherwise).
    let got = s.try_read_exact(&mut one);
    assert!(got || !fast);
    if !got {
        s.read_exact(&mut one).await.unwrap();
    }
    assert_eq!(&one, b"g");
    // A write waiting for space (more than shm's ring holds): a write now must not pass.
    let big = pattern(4 << 20, 5);
    let bufs: [&[u8]; 1] = [&big];
    let mut waiting = c.write(&bufs);
    // shm: always pending. tcp's socket buffers may take it all at once.
    let first = poll_once(&mut waiting);
    assert!(!c.try_write(&[b"x"]), "a write is pending");
    let written = async move {
        match first {
            std::task::Poll::Ready(r) => r,
            std::task::Poll::Pending => waiting.await,
        }
    };
    let mut got_big = vec![0u8; big.len()];
    let (w, r) = join(written, s.read_exact(&mut got_big)).await;
    w.unwrap();
    r.unwrap();
    assert!(got_big == big);
    // Closed: nothing now, and the async path says why.
    c.close();
    assert!(!c.try_write(&[b"x"]));
    assert!(!c.try_read_exact(&mut one));
    assert_eq!(
        c.write(&[b"x"]).await.unwrap_err().kind(),
        ErrorKind::Closed
    );
}

macro_rules! conformance {
    ($backend:ident, $make:expr, $addr:expr) => {
        mod $backend {
            use super::*;

            const MAKE: Make = $make;

            conformance!(@cases $addr;
                ping_pong, large_write, many_queued_ops_complete_in_order, zero_length,
                frames_round_trip, close_fails_pending_ops_exactly_once, peer_close_is_eof,
                listener_close_fails_pending_accepts, context_close_closes_everything,
                connect_to_nothing_fails, many_concurrent_connections,
                oversized_frame_is_cut_off_and_others_go_on, abandoned_read_breaks_the_connection,
                now_or_nothing_ops_keep_the_stream_in_order);
        }
    };
    (@cases $addr:expr; $($case:ident),*) => {
        $(
            mod $case {
                use super::*;

                #[test]
                fn block_on() {
                    if let Some(t) = viable(MAKE) {
                        run(Executor::BlockOn, super::super::$case(t, $addr));
                    }
                }

                #[test]
                fn thread_pool() {
                    if let Some(t) = viable(MAKE) {
                        run(Executor::ThreadPool, super::super::$case(t, $addr));
                    }
                }
            }
        )*
    };
}

conformance!(
    tcp_v4,
    || Arc::new(tp_transport::tcp::TcpTransport::new()),
    "127.0.0.1:0"
);
conformance!(
    tcp_v6,
    || Arc::new(tp_transport::tcp::TcpTransport::new()),
    "[::1]:0"
);
conformance!(
    shm,
    || Arc::new(tp_transport::shm::ShmTransport::default()),
    ""
);
#[cfg(feature = "ibv")]
conformance!(
    ibv,
    || Arc::new(tp_transport::ibv::IbvTransport::default()),
    "127.0.0.1:0"
);
