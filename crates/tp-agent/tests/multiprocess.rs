//! Pipes between two processes: this test process leads, a `tp demo --peer` child
//! echoes every message back. Messages with many payloads and tensors cross shm + cma
//! and tcp + mpt with every byte checked; a peer killed mid-message turns every pending
//! operation here into an error within a bounded time.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::join;
use tp_agent::{Allocation, Context, Listener, Message, Payload, Pipe, Tensor};
use tp_channel::ChannelContext;

fn within<F: FnOnce() + Send + 'static>(secs: u64, f: F) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("panicked or hung");
}

struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_peer(url: &str) -> Peer {
    Peer(
        Command::new(env!("CARGO_BIN_EXE_tp"))
            .args(["demo", "--peer", url])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn the peer"),
    )
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ ((i >> 10) as u8))
        .collect()
}

fn message(seed: u8, payloads: &[usize], tensors: &[usize]) -> Message {
    Message {
        metadata: vec![seed; 4],
        payloads: payloads
            .iter()
            .enumerate()
            .map(|(k, &n)| Payload {
                data: pattern(n, seed.wrapping_add(k as u8)),
                metadata: vec![k as u8],
            })
            .collect(),
        tensors: tensors
            .iter()
            .enumerate()
            .map(|(k, &n)| Tensor {
                data: Box::new(pattern(n, seed.wrapping_add(100 + k as u8))),
                target_device: None,
                metadata: vec![k as u8, 1],
            })
            .collect(),
    }
}

/// Sends `count` messages of the given shapes and checks every echoed byte.
async fn echo_many(pipe: &Pipe, payloads: &[usize], tensors: &[usize], count: u8) {
    for seed in 0..count {
        let (_, w) = pipe.write(message(seed, payloads, tensors)).await;
        w.unwrap();
        let incoming = pipe.read_descriptor().await.unwrap();
        assert_eq!(incoming.descriptor.metadata, vec![seed; 4]);
        assert_eq!(incoming.descriptor.tensors.len(), tensors.len());
        let alloc = Allocation::for_descriptor(&incoming.descriptor);
        let (alloc, r) = pipe.read(incoming, alloc).await;
        r.unwrap();
        for (k, &n) in payloads.iter().enumerate() {
            assert_eq!(
                alloc.payloads[k],
                pattern(n, seed.wrapping_add(k as u8)),
                "payload {k}"
            );
        }
        for (k, &n) in tensors.iter().enumerate() {
            assert!(
                alloc.tensors[k].bytes() == &pattern(n, seed.wrapping_add(100 + k as u8))[..],
                "tensor {k} of message {seed}"
            );
        }
    }
}

fn lead(ctx: Context, urls: &[&str]) -> (Arc<Context>, Listener, Peer) {
    let ctx = Arc::new(ctx);
    let listener = ctx.listen(urls).unwrap();
    let peer = spawn_peer(&listener.urls()[0]);
    (ctx, listener, peer)
}

#[test]
fn shm_and_cma_carry_many_payloads_and_tensors_between_processes() {
    within(120, || {
        let (_ctx, listener, _peer) =
            lead(Context::new("leader"), &["tcp://127.0.0.1:0", "shm://"]);
        async_io::block_on(async {
            let pipe = listener.accept().await.unwrap();
            echo_many(
                &pipe,
                &[0, 1, 1000, 70_000, 3],
                &[1, 0, 4096, 5 << 20, 17],
                4,
            )
            .await;
            assert_eq!(pipe.transport().as_deref(), Some("shm"));
            if tp_channel::cma::CmaContext::default().is_viable() {
                assert_eq!(pipe.channel_names(), ["cma"]);
            }
        });
    });
}

#[test]
fn tcp_and_mpt_carry_many_payloads_and_tensors_between_processes() {
    within(120, || {
        // The listening side's priorities decide: mpt first, and only tcp to listen on.
        let ctx = Context::builder("leader")
            .priority("mpt", 5000)
            .build()
            .unwrap();
        let (_ctx, listener, _peer) = lead(ctx, &["tcp://127.0.0.1:0"]);
        async_io::block_on(async {
            let pipe = listener.accept().await.unwrap();
            echo_many(&pipe, &[7, 0, 200_000], &[3 << 20, 1, 0, 65_536], 3).await;
            assert_eq!(pipe.transport().as_deref(), Some("tcp"));
            assert_eq!(pipe.channel_names(), ["mpt"]);
        });
    });
}

#[test]
fn a_peer_killed_mid_message_fails_every_pending_operation_in_bounded_time() {
    for urls in [
        &["tcp://127.0.0.1:0", "shm://"][..],
        &["tcp://127.0.0.1:0"][..],
    ] {
        let urls: Vec<String> = urls.iter().map(|s| s.to_string()).collect();
        within(60, move || {
            let refs: Vec<&str> = urls.iter().map(String::as_str).collect();
            let (_ctx, listener, mut peer) = lead(Context::new("leader"), &refs);
            async_io::block_on(async {
                let pipe = listener.accept().await.unwrap();
                echo_many(&pipe, &[10], &[10], 1).await;
                // A 1 GiB message and reads in flight, then the peer dies (1 GiB takes
                // far longer than 30 ms to cross, whatever the channel).
                let write = pipe.write(Message {
                    metadata: vec![1],
                    payloads: vec![Payload {
                        data: vec![3u8; 1 << 20],
                        metadata: Vec::new(),
                    }],
                    tensors: vec![Tensor {
                        data: Box::new(vec![7u8; 1 << 30]),
                        target_device: None,
                        metadata: Vec::new(),
                    }],
                });
                let read = pipe.read_descriptor();
                let read2 = pipe.read_descriptor();
                let killer = async {
                    async_io::Timer::after(Duration::from_millis(30)).await;
                    peer.0.kill().unwrap();
                    Instant::now()
                };
                let ((killed_at, (_, w)), (r, r2)) =
                    join(join(killer, write), join(read, read2)).await;
                assert!(w.is_err(), "a write to a dead peer cannot succeed");
                assert!(r.is_err() && r2.is_err());
                assert!(
                    killed_at.elapsed() < Duration::from_secs(10),
                    "took {:?}",
                    killed_at.elapsed()
                );
                // And the pipe stays failed.
                assert!(pipe.read_descriptor().await.is_err());
            });
        });
    }
}
