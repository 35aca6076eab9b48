//! Pipes end to end inside one process: a real listener and real transports and
//! channels, driven by tp-wire's state machine.

use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use futures::future::join;
use tp_agent::{Allocation, Context, Listener, Message, Payload, Pipe, Tensor};

/// Runs `f` on a thread and fails the test if it takes longer than `secs`.
fn within<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("panicked or hung");
}

/// A server and a client context, the server listening, and its first URL.
type Contexts = (Arc<Context>, Arc<Context>, Listener, String);

/// [`Contexts`], the server listening on `urls`.
fn contexts(urls: &[&str]) -> Contexts {
    let server_ctx = Arc::new(Context::new("server"));
    let client_ctx = Arc::new(Context::new("client"));
    let listener = server_ctx.listen(urls).unwrap();
    let url = listener.urls()[0].clone();
    (server_ctx, client_ctx, listener, url)
}

fn message(seed: u8, payloads: &[usize], tensors: &[usize]) -> Message {
    Message {
        metadata: vec![seed; 3],
        payloads: payloads
            .iter()
            .map(|&n| Payload {
                data: (0..n).map(|i| (i as u8).wrapping_add(seed)).collect(),
                metadata: vec![seed],
            })
            .collect(),
        tensors: tensors
            .iter()
            .map(|&n| Tensor {
                data: Box::new(
                    (0..n)
                        .map(|i| (i as u8).wrapping_mul(7) ^ seed)
                        .collect::<Vec<u8>>(),
                ),
                target_device: None,
                metadata: vec![seed, 1],
            })
            .collect(),
    }
}

fn check(seed: u8, alloc: &Allocation, payloads: &[usize], tensors: &[usize]) {
    for (k, &n) in payloads.iter().enumerate() {
        let want: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_add(seed)).collect();
        assert_eq!(alloc.payloads[k], want, "payload {k}");
    }
    for (k, &n) in tensors.iter().enumerate() {
        let want: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(7) ^ seed).collect();
        assert!(alloc.tensors[k].bytes() == &want[..], "tensor {k}");
    }
}

/// Writes `msg` on `from` and reads it on `to`; both must succeed. Returns what arrived.
async fn deliver(from: &Pipe, to: &Pipe, msg: Message) -> Allocation {
    let (w, r) = join(from.write(msg), async {
        let inc = to.read_descriptor().await.unwrap();
        let alloc = Allocation::for_descriptor(&inc.descriptor);
        to.read(inc, alloc).await
    })
    .await;
    w.1.unwrap();
    r.1.unwrap();
    r.0
}

fn round_trip(listen: &'static str) {
    within(60, move || {
        let (_server_ctx, client_ctx, listener, url) = contexts(&[listen]);
        block_on(async {
            let client = client_ctx.connect(&url).unwrap();
            let server = listener.accept().await.unwrap();
            let payloads = [3usize, 0, 70_000];
            let tensors = [1000usize, 0, 3 << 20];
            for seed in 0..3u8 {
                let (w, r) = join(client.write(message(seed, &payloads, &tensors)), async {
                    let inc = server.read_descriptor().await.unwrap();
                    assert_eq!(inc.descriptor.metadata, vec![seed; 3]);
                    let alloc = Allocation::for_descriptor(&inc.descriptor);
                    server.read(inc, alloc).await
                })
                .await;
                w.1.unwrap();
                assert_eq!(
                    w.0.tensors[2].data.bytes().len(),
                    3 << 20,
                    "buffers come back"
                );
                r.1.unwrap();
                check(seed, &r.0, &payloads, &tensors);
            }
            assert_eq!(server.remote_name(), "client");
            assert!(client.transport().is_some());
        });
    });
}

#[test]
fn messages_cross_a_tcp_pipe_intact() {
    round_trip("tcp://127.0.0.1:0");
}

#[test]
fn messages_cross_an_shm_pipe_intact() {
    round_trip("shm://");
}

#[test]
fn the_handshake_upgrades_to_shm_and_picks_xth_inside_one_process() {
    within(60, || {
        let (_server_ctx, client_ctx, listener, tcp_url) =
            contexts(&["tcp://127.0.0.1:0", "shm://"]);
        assert!(tcp_url.starts_with("tcp://"), "{tcp_url}");
        block_on(async {
            let client = client_ctx.connect(&tcp_url).unwrap();
            let server = listener.accept().await.unwrap();
            let got = deliver(&client, &server, message(9, &[10], &[4096])).await;
            check(9, &got, &[10], &[4096]);
            assert_eq!(client.transport().as_deref(), Some("shm"));
            assert_eq!(client.channel_names(), ["xth"]);
            assert_eq!(server.channel_names(), ["xth"]);
        });
    });
}

/// Metadata of message `i`: now and then larger than a transport writes in one go, so
/// its frame may arrive in pieces.
fn metadata(i: usize) -> Vec<u8> {
    vec![i as u8; if i.is_multiple_of(5) { 100_000 } else { 3 }]
}

/// Reads `n` messages in turn, checking each one's metadata.
async fn read_all(pipe: &Pipe, n: usize) -> Vec<tp_agent::ReadResult> {
    let mut got = Vec::new();
    for i in 0..n {
        let inc = pipe.read_descriptor().await.unwrap();
        assert_eq!(inc.descriptor.metadata, metadata(i), "message {i}");
        let alloc = Allocation::for_descriptor(&inc.descriptor);
        got.push(pipe.read(inc, alloc).await);
    }
    got
}

fn many_in_flight(make: fn() -> Contexts) {
    within(60, move || {
        let (_server_ctx, client_ctx, listener, url) = make();
        block_on(async {
            let client = client_ctx.connect(&url).unwrap();
            let server = listener.accept().await.unwrap();
            let shapes: Vec<(Vec<usize>, Vec<usize>)> = (0..20)
                .map(|i| {
                    (
                        vec![i * 100 + 1, (i % 3) * 40_000],
                        vec![(i % 4) * 50_000, 7],
                    )
                })
                .collect();
            let with_metadata = |i: usize, mut m: Message| {
                m.metadata = metadata(i);
                m
            };
            let writes: Vec<_> = shapes
                .iter()
                .enumerate()
                .map(|(i, (p, t))| client.write(with_metadata(i, message(i as u8, p, t))))
                .collect();
            let back: Vec<_> = shapes
                .iter()
                .enumerate()
                .map(|(i, (p, t))| server.write(with_metadata(i, message(100 + i as u8, p, t))))
                .collect();
            let (((w, b), got), got_back) = join(
                join(
                    join(
                        futures::future::join_all(writes),
                        futures::future::join_all(back),
                    ),
                    read_all(&server, shapes.len()),
                ),
                read_all(&client, shapes.len()),
            )
            .await;
            for (_, r) in w.iter().chain(b.iter()) {
                assert!(r.is_ok(), "{r:?}");
            }
            for (i, (alloc, r)) in got.iter().enumerate() {
                r.as_ref().unwrap();
                check(i as u8, alloc, &shapes[i].0, &shapes[i].1);
            }
            for (i, (alloc, r)) in got_back.iter().enumerate() {
                r.as_ref().unwrap();
                check(100 + i as u8, alloc, &shapes[i].0, &shapes[i].1);
            }
        });
    });
}

#[test]
fn many_messages_in_flight_both_ways_complete_in_order_over_tcp() {
    many_in_flight(|| contexts(&["tcp://127.0.0.1:0"]));
}

#[test]
fn many_messages_in_flight_both_ways_complete_in_order_over_shm() {
    many_in_flight(|| contexts(&["shm://"]));
}

#[test]
fn many_messages_in_flight_both_ways_complete_in_order_through_a_small_shm_ring() {
    // Most frames and payloads do not fit in the ring at once: they stream through it,
    // and a reader often finds a frame's header there but not yet its body.
    many_in_flight(|| {
        let small = |name: &str| {
            let shm = tp_transport::shm::ShmTransport::new(tp_transport::shm::ShmConfig {
                ring_capacity: 4096,
                ..Default::default()
            });
            let ctx = Context::builder(name).transport(200, Arc::new(shm));
            Arc::new(ctx.build().unwrap())
        };
        let (server_ctx, client_ctx) = (small("server"), small("client"));
        let listener = server_ctx.listen(&["shm://"]).unwrap();
        let url = listener.urls()[0].clone();
        (server_ctx, client_ctx, listener, url)
    });
}

#[test]
fn closing_one_end_fails_the_others_pending_reads() {
    within(30, || {
        let (_server_ctx, client_ctx, listener, url) = contexts(&["tcp://127.0.0.1:0"]);
        block_on(async {
            let client = client_ctx.connect(&url).unwrap();
            let server = listener.accept().await.unwrap();
            // Establish first.
            let got = deliver(&client, &server, message(1, &[1], &[])).await;
            check(1, &got, &[1], &[]);
            let pending = server.read_descriptor();
            let pending2 = server.read_descriptor();
            client.close();
            assert!(pending.await.is_err());
            assert!(pending2.await.is_err());
            // A local close fails what comes later at once.
            server.close();
            assert!(server.read_descriptor().await.is_err());
            let (_, r) = server.write(message(2, &[5], &[5])).await;
            assert!(r.is_err());
        });
    });
}

#[test]
fn a_silent_or_garbage_connection_costs_only_itself() {
    within(60, || {
        let (_server_ctx, client_ctx, listener, url) = contexts(&["tcp://127.0.0.1:0"]);
        let addr = url.trim_start_matches("tcp://").to_string();
        // One connection that never speaks, one that sends garbage.
        let _silent = std::net::TcpStream::connect(&addr).unwrap();
        let mut garbage = std::net::TcpStream::connect(&addr).unwrap();
        std::io::Write::write_all(&mut garbage, &[0xff; 64]).unwrap();
        block_on(async {
            let client = client_ctx.connect(&url).unwrap();
            let server = listener.accept().await.unwrap();
            let got = deliver(&client, &server, message(3, &[5], &[5])).await;
            check(3, &got, &[5], &[5]);
        });
    });
}

#[test]
fn closing_a_context_fails_its_pipes_and_the_peers_pending_reads() {
    within(30, || {
        let (server_ctx, client_ctx, listener, url) = contexts(&["tcp://127.0.0.1:0"]);
        block_on(async {
            let client = client_ctx.connect(&url).unwrap();
            let server = listener.accept().await.unwrap();
            let got = deliver(&client, &server, message(1, &[1], &[1])).await;
            check(1, &got, &[1], &[1]);
            let local = client.read_descriptor();
            let remote = server.read_descriptor();
            client_ctx.close();
            assert!(local.await.is_err());
            assert!(remote.await.is_err());
            // Nothing new gets through a closed context.
            assert!(client.write(message(2, &[1], &[])).await.1.is_err());
        });
        // A closed context's listener accepts nothing more: it ends instead of hanging.
        server_ctx.close();
        assert!(block_on(listener.accept()).is_err());
    });
}

#[test]
fn tasks_spawned_on_the_io_thread_drive_pipes_and_a_panic_in_one_spares_the_rest() {
    within(60, || {
        let (server_ctx, client_ctx, listener, url) = contexts(&["tcp://127.0.0.1:0"]);
        let client = client_ctx.connect(&url).unwrap();
        // The server's echo and the client's loop each run on their context's I/O thread.
        let server = server_ctx.spawn(async move {
            let pipe = listener.accept().await.unwrap();
            let thread = std::thread::current().name().map(str::to_owned);
            for _ in 0..20 {
                let inc = pipe.read_descriptor().await.unwrap();
                let alloc = Allocation::for_descriptor(&inc.descriptor);
                let (alloc, r) = pipe.read(inc, alloc).await;
                r.unwrap();
                let back = Message {
                    metadata: vec![],
                    payloads: alloc
                        .payloads
                        .into_iter()
                        .map(|data| Payload {
                            data,
                            metadata: vec![],
                        })
                        .collect(),
                    tensors: vec![],
                };
                pipe.write(back).await.1.unwrap();
            }
            thread
        });
        let sums = block_on(client_ctx.spawn(async move {
            let mut sums = Vec::new();
            for seed in 0..20u8 {
                client.write(message(seed, &[100], &[])).await.1.unwrap();
                let inc = client.read_descriptor().await.unwrap();
                let alloc = Allocation::for_descriptor(&inc.descriptor);
                let (alloc, r) = client.read(inc, alloc).await;
                r.unwrap();
                check(seed, &alloc, &[100], &[]);
                sums.push(alloc.payloads[0].iter().map(|&b| u64::from(b)).sum::<u64>());
            }
            sums
        }))
        .unwrap();
        assert_eq!(sums.len(), 20);
        assert_eq!(
            block_on(server).unwrap().as_deref(),
            Some("tp-server"),
            "the task ran on the context's I/O thread"
        );

        // A panicking task is reported to its awaiter, and the thread goes on serving.
        let boom = block_on(client_ctx.spawn(async { panic!("on purpose") }));
        let why = boom.unwrap_err();
        assert_eq!(why.downcast_ref::<&str>(), Some(&"on purpose"));
        assert_eq!(block_on(client_ctx.spawn(async { 7 })).unwrap(), 7);
    });
}

#[test]
fn join_closes_the_context_and_returns_once_its_pipes_are_done() {
    within(60, || {
        let (server_ctx, client_ctx, listener, url) = contexts(&["tcp://127.0.0.1:0", "shm://"]);
        let client = client_ctx.connect(&url).unwrap();
        let server = block_on(listener.accept()).unwrap();
        block_on(deliver(&client, &server, message(1, &[10], &[100])));
        // Operations pending on both sides, and the pipes still held by the test.
        let pending_read = client.read_descriptor();
        let pending_accept = listener.accept();
        block_on(client_ctx.join());
        assert!(
            block_on(pending_read).is_err(),
            "join failed the pending read"
        );
        // The peer sees the pipe fail too; then the server's context joins.
        assert!(block_on(server.read_descriptor()).is_err());
        block_on(server_ctx.join());
        assert!(
            block_on(pending_accept).is_err(),
            "join failed the pending accept"
        );
        // Idempotent, and nothing works afterwards.
        block_on(client_ctx.join());
        assert!(block_on(client.write(message(2, &[1], &[]))).1.is_err());
        drop((client, server, listener));
    });
}

#[test]
fn closing_a_listener_fails_a_pending_accept() {
    within(60, || {
        let ctx = Arc::new(Context::new("server"));
        let listener = ctx.listen(&["tcp://127.0.0.1:0"]).unwrap();
        let pending = listener.accept();
        listener.close();
        assert!(block_on(pending).is_err());
        assert!(block_on(listener.accept()).is_err(), "and later ones");
        block_on(ctx.join());
    });
}

/// tensorpipe.md §6.1's pipe shapes: payloads only, tensors only, every tensor with a
/// target device (no reply round trip), some with one (the reader's DescriptorReply),
/// and a full message followed by an empty one. The reader checks the descriptor —
/// metadata, lengths, devices, per-item metadata — then the bytes.
#[test]
fn the_original_pipe_shapes_arrive_with_exact_descriptors() {
    use tp_channel::Device;
    within(60, || {
        let server_ctx = Arc::new(Context::new("server"));
        let client_ctx = Arc::new(Context::new("client"));
        // As the original's test: listen on shm and tcp, connect over tcp (the
        // handshake must switch to shm).
        let listener = server_ctx.listen(&["shm://", "tcp://127.0.0.1:0"]).unwrap();
        let url = listener
            .urls()
            .iter()
            .find(|u| u.starts_with("tcp://"))
            .unwrap()
            .clone();
        let client = client_ctx.connect(&url).unwrap();
        let server = block_on(listener.accept()).unwrap();
        // (name, payload lengths, tensor lengths, which tensors name a target)
        type Case = (
            &'static str,
            &'static [usize],
            &'static [usize],
            &'static [bool],
        );
        let cases: [Case; 6] = [
            ("payloads only", &[5, 0, 300], &[], &[]),
            ("tensors only", &[], &[7, 0, 70_000], &[false, false, false]),
            ("all targets", &[3], &[10, 20, 30], &[true, true, true]),
            ("some targets", &[3], &[10, 20, 30], &[true, false, true]),
            (
                "full",
                &[1, 2, 3, 4],
                &[5, 6, 7, 8],
                &[false, true, false, true],
            ),
            ("empty", &[], &[], &[]),
        ];
        block_on(async {
            for (seed, (name, payloads, tensors, targets)) in cases.into_iter().enumerate() {
                let seed = seed as u8;
                let mut msg = message(seed, payloads, tensors);
                for (t, &has) in msg.tensors.iter_mut().zip(targets) {
                    t.target_device = has.then_some(Device::CPU);
                }
                let (w, r) = join(client.write(msg), async {
                    let inc = server.read_descriptor().await.unwrap();
                    let d = &inc.descriptor;
                    assert_eq!(d.metadata, vec![seed; 3], "{name}");
                    assert_eq!(d.payloads.len(), payloads.len(), "{name}");
                    for (p, &n) in d.payloads.iter().zip(payloads.iter()) {
                        assert_eq!(
                            (p.length, &p.metadata[..]),
                            (n as u64, &[seed][..]),
                            "{name}"
                        );
                    }
                    assert_eq!(d.tensors.len(), tensors.len(), "{name}");
                    for ((t, &n), &has) in d.tensors.iter().zip(tensors.iter()).zip(targets) {
                        assert_eq!(t.length, n as u64, "{name}");
                        assert_eq!(t.source_device, Device::CPU, "{name}");
                        assert_eq!(t.target_device, has.then_some(Device::CPU), "{name}");
                        assert_eq!(t.metadata, vec![seed, 1], "{name}");
                    }
                    let alloc = Allocation::for_descriptor(d);
                    server.read(inc, alloc).await
                })
                .await;
                w.1.unwrap();
                r.1.unwrap();
                check(seed, &r.0, payloads, tensors);
            }
        });
        assert_eq!(client.transport().as_deref(), Some("shm"));
    });
}

/// A future polled from inside its own waker, as some executors do: the pipe must wake
/// it after it lets go of its lock, or that poll would deadlock.
#[test]
fn a_waker_that_polls_at_once_does_not_deadlock() {
    use std::future::Future;
    use std::sync::Mutex;
    use std::task::{Context as TaskContext, Poll, Wake, Waker};

    type Read = std::pin::Pin<Box<dyn Future<Output = Vec<u8>> + Send>>;
    struct PollOnWake {
        fut: Mutex<Option<Read>>,
        done: Mutex<Option<std::sync::mpsc::Sender<Vec<u8>>>>,
    }
    impl PollOnWake {
        fn poll_now(self: &Arc<Self>) {
            let waker = Waker::from(self.clone());
            let mut slot = self.fut.lock().unwrap();
            if let Some(f) = slot.as_mut()
                && let Poll::Ready(v) = f.as_mut().poll(&mut TaskContext::from_waker(&waker))
            {
                *slot = None;
                if let Some(tx) = self.done.lock().unwrap().take() {
                    let _ = tx.send(v);
                }
            }
        }
    }
    impl Wake for PollOnWake {
        fn wake(self: Arc<Self>) {
            self.poll_now();
        }
    }

    within(60, || {
        let (_server_ctx, client_ctx, listener, url) = contexts(&["shm://"]);
        let client = client_ctx.connect(&url).unwrap();
        let server = Arc::new(block_on(listener.accept()).unwrap());
        for seed in 0..20u8 {
            let (tx, rx) = std::sync::mpsc::channel();
            let reader = server.clone();
            let task = Arc::new(PollOnWake {
                fut: Mutex::new(Some(Box::pin(async move {
                    let inc = reader.read_descriptor().await.unwrap();
                    let alloc = Allocation::for_descriptor(&inc.descriptor);
                    let (alloc, r) = reader.read(inc, alloc).await;
                    r.unwrap();
                    alloc.payloads.concat()
                }))),
                done: Mutex::new(Some(tx)),
            });
            task.poll_now();
            let (_, w) = block_on(client.write(message(seed, &[5], &[])));
            w.unwrap();
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("woken and done");
            assert_eq!(
                got,
                (0..5u8).map(|i| i.wrapping_add(seed)).collect::<Vec<_>>()
            );
        }
    });
}

/// An operation's future may be dropped before it completes: the operation still runs
/// in order, and later operations complete as usual.
#[test]
fn a_dropped_future_leaves_later_operations_intact() {
    within(60, || {
        let (_server_ctx, client_ctx, listener, url) = contexts(&["tcp://127.0.0.1:0"]);
        block_on(async {
            let client = client_ctx.connect(&url).unwrap();
            let server = listener.accept().await.unwrap();
            // Dropped at once: the first message still goes out, ahead of the second.
            // (A tensor's send may complete only once the peer takes it: read alongside.)
            drop(client.write(message(1, &[4], &[100])));
            let reads = async {
                for seed in 1..=2u8 {
                    let inc = server.read_descriptor().await.unwrap();
                    assert_eq!(inc.descriptor.metadata, vec![seed; 3]);
                    let alloc = Allocation::for_descriptor(&inc.descriptor);
                    let (alloc, r) = server.read(inc, alloc).await;
                    r.unwrap();
                    check(seed, &alloc, &[4], &[100]);
                }
            };
            let ((_, w), ()) = join(client.write(message(2, &[4], &[100])), reads).await;
            w.unwrap();
            // A read dropped while its payload may still be under way: the next
            // message still arrives whole.
            let (_, w) = client.write(message(3, &[70_000], &[])).await;
            w.unwrap();
            let inc = server.read_descriptor().await.unwrap();
            let alloc = Allocation::for_descriptor(&inc.descriptor);
            drop(server.read(inc, alloc));
            let got = deliver(&client, &server, message(5, &[3], &[7])).await;
            check(5, &got, &[3], &[7]);
        });
    });
}
