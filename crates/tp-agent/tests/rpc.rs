//! The RPC agent in one process: several agents, each with its own context, over a
//! memory or TCP store. (Across processes: `rpc_multiprocess.rs`.)

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use futures::executor::block_on;
use futures::future::join_all;
use tp_agent::rpc::{
    Agent, AgentError, AgentOptions, CallError, Reply, Request, RpcMessage, RpcTensor,
};
use tp_channel::Device;
use tp_store::{MemoryStore, PrefixStore, Store};

/// Runs `f` on a thread and fails the test if it takes longer than `secs`.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs))
        .expect("panicked or hung")
}

fn store(timeout: Duration) -> Arc<dyn Store> {
    let s: Arc<dyn Store> = Arc::new(MemoryStore::new());
    s.set_timeout(timeout);
    Arc::new(PrefixStore::new("rpc_prefix_0", s))
}

fn opts(name: &str, rank: u32, world: Option<u32>) -> AgentOptions {
    AgentOptions {
        world_size: world,
        num_worker_threads: 4,
        rpc_timeout: Duration::from_secs(30),
        ..AgentOptions::new(name, rank)
    }
}

/// The test handler: `echo` sends the message back with every tensor byte + 1;
/// `sleep:<ms>` sleeps then answers; `fail` errs; `panic` panics.
fn handler(req: Request) -> Reply {
    let text = String::from_utf8_lossy(&req.message.payload).into_owned();
    if let Some(ms) = text.strip_prefix("sleep:") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
        return Reply::from(RpcMessage::new(format!("slept for {}", req.from)));
    }
    match text.as_str() {
        "fail" => Reply::Ready(Err(format!("refused {} on purpose", req.from))),
        "panic" => panic!("handler panics on purpose"),
        _ => {
            let mut m = req.message;
            for t in m.tensors.iter_mut().filter_map(RpcTensor::as_cpu_mut) {
                for b in t.iter_mut() {
                    *b = b.wrapping_add(1);
                }
            }
            Reply::from(m)
        }
    }
}

/// A static group of `n` agents named `w0..`, started at once.
fn static_group(n: u32, store: &Arc<dyn Store>, tweak: fn(&mut AgentOptions)) -> Vec<Agent> {
    let threads: Vec<_> = (0..n)
        .map(|r| {
            let store = store.clone();
            std::thread::spawn(move || {
                let mut o = opts(&format!("w{r}"), r, Some(n));
                tweak(&mut o);
                Agent::start(o, store, handler).unwrap()
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// Shuts every agent down gracefully, together (the barrier needs all of them).
fn shutdown_all(agents: &[Agent]) {
    std::thread::scope(|sc| {
        for a in agents {
            sc.spawn(move || a.shutdown().unwrap());
        }
    });
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn check_echo(reply: &RpcMessage, sent: &RpcMessage) {
    assert_eq!(reply.payload, sent.payload);
    assert_eq!(reply.tensors.len(), sent.tensors.len());
    for (got, want) in reply.tensors.iter().zip(&sent.tensors) {
        let (got, want) = (got.as_cpu().unwrap(), want.as_cpu().unwrap());
        assert_eq!(got.len(), want.len());
        assert!(
            got.iter().zip(want).all(|(g, w)| *g == w.wrapping_add(1)),
            "tensor bytes differ"
        );
    }
}

fn sizes_message(seed: u8) -> RpcMessage {
    [0usize, 1, 1000, 1 << 20, 3 << 20]
        .iter()
        .fold(RpcMessage::new(vec![seed; 5]), |m, &n| {
            m.with_tensor(RpcTensor::cpu(pattern(n, seed)))
        })
}

#[test]
fn a_static_group_calls_all_to_all_with_tensors_and_counts_it() {
    within(120, || {
        let s = store(Duration::from_secs(30));
        let agents = static_group(3, &s, |_| {});
        for a in agents.iter() {
            let calls: Vec<_> = (0..3)
                .map(|to| {
                    let m = sizes_message(to as u8);
                    (m.try_clone().unwrap(), a.send(&format!("w{to}"), m, None))
                })
                .collect();
            for (sent, call) in calls {
                check_echo(&block_on(call).unwrap(), &sent);
            }
        }
        let m = agents[0].metrics();
        assert_eq!(m["agent.thread_pool_size"], 4);
        assert_eq!(m["agent.client_active_calls"], 0);
        assert!(m["agent.num_idle_threads"] <= 4);
        let net = agents[0].network_data();
        let sent = sizes_message(1).len();
        assert_eq!(net["w1"].num_calls, 1);
        assert_eq!(net["w1"].total_sent_bytes, sent);
        assert_eq!(net["w1"].total_recv_bytes, sent);
        assert_eq!(net["w1"].total_errors, 0);
        assert_eq!(agents[0].workers().len(), 3);
        shutdown_all(&agents);
        // Shut down: calls are refused with PyTorch's meaning.
        let e = block_on(agents[0].send("w1", RpcMessage::new("x"), None)).unwrap_err();
        assert!(e.to_string().contains("no longer running"), "{e}");
    });
}

#[test]
fn handler_errors_and_panics_come_back_as_errors_and_the_agent_goes_on() {
    within(60, || {
        let s = store(Duration::from_secs(30));
        let g = static_group(2, &s, |_| {});
        let e = block_on(g[0].send("w1", RpcMessage::new("fail"), None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the handler on \"w1\" failed: refused w0 on purpose"
        );
        let e = block_on(g[0].send("w1", RpcMessage::new("panic"), None)).unwrap_err();
        assert!(
            matches!(&e, CallError::Remote { message, .. } if message.contains("panicked: handler panics on purpose")),
            "{e}"
        );
        let m = RpcMessage::new("still here");
        check_echo(
            &block_on(g[0].send("w1", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        assert_eq!(g[0].network_data()["w1"].total_errors, 2);
        let e = block_on(g[0].send("nobody", m, None)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "name:w0,rank:0 could not find destination name nobody"
        );
        shutdown_all(&g);
    });
}

#[test]
fn timeouts_fire_name_the_call_and_late_replies_are_dropped() {
    within(60, || {
        let s = store(Duration::from_secs(30));
        let g = static_group(2, &s, |o| o.rpc_timeout = Duration::from_millis(150));
        let t0 = Instant::now();
        // The agent's default (150 ms) applies when none is given.
        let slow = g[0].send("w1", RpcMessage::new("sleep:600"), None);
        let id = slow.id().unwrap();
        let e = block_on(slow).unwrap_err();
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(150), "{took:?}");
        assert!(took < Duration::from_millis(550), "fired late: {took:?}");
        assert_eq!(
            e.to_string(),
            format!(
                "RPC call {id} to \"w1\" ran for more than the set timeout (150 ms) and was marked failed (the callee is not told and may still run it)"
            )
        );
        // A per-call timeout overrides it; zero means never.
        let e = block_on(g[0].send(
            "w1",
            RpcMessage::new("sleep:300"),
            Some(Duration::from_millis(50)),
        ))
        .unwrap_err();
        assert!(e.to_string().contains("(50 ms)"), "{e}");
        let r = block_on(g[0].send("w1", RpcMessage::new("sleep:400"), Some(Duration::ZERO)));
        assert_eq!(r.unwrap().payload, b"slept for w0");
        // The two late replies arrived and were dropped; the pipe is fine.
        let deadline = Instant::now() + Duration::from_secs(10);
        while g[0].metrics()["agent.late_replies_dropped"] < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let m = g[0].metrics();
        assert_eq!(m["agent.late_replies_dropped"], 2);
        assert_eq!(m["agent.calls_timed_out"], 2);
        assert_eq!(m["agent.client_active_calls"], 0);
        let ok = RpcMessage::new("after");
        check_echo(
            &block_on(g[0].send("w1", ok.try_clone().unwrap(), None)).unwrap(),
            &ok,
        );
        shutdown_all(&g);
    });
}

#[test]
fn graceful_shutdown_with_calls_in_flight_loses_none() {
    within(120, || {
        let s = store(Duration::from_secs(60));
        let g = static_group(3, &s, |_| {});
        let threads: Vec<_> = g
            .into_iter()
            .enumerate()
            .map(|(me, a)| {
                std::thread::spawn(move || {
                    let calls: Vec<_> = (0..60)
                        .map(|i| {
                            let to = format!("w{}", (me + 1 + i % 2) % 3);
                            a.send(&to, RpcMessage::new("sleep:20"), None)
                        })
                        .collect();
                    // Shut down at once, with all of them in flight.
                    a.shutdown().unwrap();
                    let results = block_on(join_all(calls));
                    assert_eq!(a.metrics()["agent.client_active_calls"], 0);
                    results.into_iter().filter(Result::is_ok).count()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 60, "every call in flight completed");
        }
    });
}

#[test]
fn a_failed_pipe_fails_its_calls_and_the_next_call_opens_a_new_one() {
    within(120, || {
        let s = store(Duration::from_secs(30));
        let mut g = static_group(2, &s, |_| {});
        let m = RpcMessage::new("hi");
        check_echo(
            &block_on(g[0].send("w1", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        // w1 dies with a call in flight; the call fails well before its timeout.
        let slow = g[0].send("w1", RpcMessage::new("sleep:5000"), None);
        std::thread::sleep(Duration::from_millis(100));
        let t0 = Instant::now();
        g.pop().unwrap().shutdown_now();
        let e = block_on(slow).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert!(
            matches!(e, CallError::Pipe { .. } | CallError::Remote { .. }),
            "{e}"
        );
        // While it is down, calls fail (the pipe cannot open), without hanging.
        let e = block_on(g[0].send("w1", m.try_clone().unwrap(), None)).unwrap_err();
        assert!(matches!(e, CallError::Pipe { .. }), "{e}");
        // It comes back (new address, same name and rank): the next call reaches it.
        let back = Agent::start(opts("w1", 1, Some(2)), s.clone(), handler).unwrap();
        check_echo(
            &block_on(g[0].send("w1", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        back.shutdown_now();
        g[0].shutdown_now();
    });
}

#[test]
fn bad_options_and_bad_groups_are_refused_and_leave_nothing_running() {
    within(60, || {
        let s = store(Duration::from_millis(300));
        let e = Agent::start(
            AgentOptions {
                transports: Some(vec!["uv".into()]),
                ..opts("a", 0, Some(1))
            },
            s.clone(),
            handler,
        )
        .unwrap_err();
        assert!(matches!(e, AgentError::Options(_)), "{e}");
        assert!(e.to_string().contains("unknown transport \"uv\""), "{e}");
        let e = Agent::start(opts("a", 0, Some(0)), s.clone(), handler).unwrap_err();
        assert!(
            e.to_string().contains("world_size must be at least 1"),
            "{e}"
        );
        // A static worker whose peers never come: the rendezvous times out, naming them.
        let t0 = Instant::now();
        let e = Agent::start(opts("a", 0, Some(2)), s.clone(), handler).unwrap_err();
        assert!(e.to_string().contains("names/1"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        // The same name again at another rank.
        let e = Agent::start(opts("a", 1, Some(2)), s, handler).unwrap_err();
        assert!(e.to_string().contains("\"a\" is not unique"), "{e}");
    });
}

#[test]
fn options_naming_a_device_this_machine_lacks_are_refused_before_anything_starts() {
    // (A GPU tensor sent without a device map: `cuda_rpc.rs`, which needs a GPU.)
    within(60, || {
        let e = Agent::start(
            AgentOptions {
                devices: vec![Device::cuda(999)],
                ..opts("z", 9, None)
            },
            store(Duration::from_secs(1)),
            handler,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("device cuda:999 does not exist here"),
            "{e}"
        );
    });
}

#[test]
fn async_handlers_make_nested_calls_without_holding_a_thread() {
    within(60, || {
        let s = store(Duration::from_secs(30));
        // w1's handler forwards to w2 and waits for it, asynchronously; with one worker
        // thread, that only works if waiting frees the thread.
        static W1: OnceLock<Arc<Agent>> = OnceLock::new();
        let (s1, s2) = (s.clone(), s.clone());
        let t1 = std::thread::spawn(move || {
            let forward = |req: Request| {
                let agent = W1.get().unwrap().clone();
                Reply::Later(Box::pin(async move {
                    let r = agent.send("w2", req.message, None).await;
                    r.map_err(|e| e.to_string())
                }))
            };
            let a = Agent::start(
                AgentOptions {
                    num_worker_threads: 1,
                    ..opts("w1", 1, Some(3))
                },
                s1,
                forward,
            )
            .unwrap();
            let _ = W1.set(Arc::new(a));
        });
        let t2 =
            std::thread::spawn(move || Agent::start(opts("w2", 2, Some(3)), s2, handler).unwrap());
        let w0 = Agent::start(opts("w0", 0, Some(3)), s, handler).unwrap();
        t1.join().unwrap();
        let w2 = t2.join().unwrap();
        let sent: Vec<RpcMessage> = (0..20u8).map(sizes_message).collect();
        let calls: Vec<_> = sent
            .iter()
            .map(|m| w0.send("w1", m.try_clone().unwrap(), None))
            .collect();
        for (m, r) in sent.iter().zip(block_on(join_all(calls))) {
            check_echo(&r.unwrap(), m);
        }
        let w1 = W1.get().unwrap();
        assert_eq!(w1.metrics()["agent.server_active_async_calls"], 0);
        std::thread::scope(|sc| {
            sc.spawn(|| w0.shutdown().unwrap());
            sc.spawn(|| w1.shutdown().unwrap());
            sc.spawn(|| w2.shutdown().unwrap());
        });
    });
}

#[test]
fn dynamic_workers_join_and_leave_while_others_run() {
    within(120, || {
        let s = store(Duration::from_secs(30));
        let d0 = Agent::start(opts("d0", 0, None), s.clone(), handler).unwrap();
        let d1 = Agent::start(opts("d1", 1, None), s.clone(), handler).unwrap();
        let m = RpcMessage::new("hi").with_tensor(RpcTensor::cpu(pattern(4096, 7)));
        check_echo(
            &block_on(d0.send("d1", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        // A newcomer: d0 finds it through the store on first call.
        let d2 = Agent::start(opts("d2", 2, None), s.clone(), handler).unwrap();
        assert_eq!(d0.workers().len(), 3);
        check_echo(
            &block_on(d0.send("d2", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        check_echo(
            &block_on(d2.send("d0", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        // d1 leaves while d0 has calls to it in flight: they complete first.
        let inflight: Vec<_> = (0..10)
            .map(|_| d0.send("d1", RpcMessage::new("sleep:50"), None))
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        d1.shutdown().unwrap();
        for r in block_on(join_all(inflight)) {
            assert_eq!(r.unwrap().payload, b"slept for d0");
        }
        let e = block_on(d0.send("d1", m.try_clone().unwrap(), None)).unwrap_err();
        assert!(
            matches!(e, CallError::PeerLeft { .. }),
            "after a leave: {e}"
        );
        assert_eq!(d0.workers().len(), 2);
        // Its rank is free again; a worker of the same name may come back.
        let d1b = Agent::start(opts("d1", 1, None), s.clone(), handler).unwrap();
        check_echo(
            &block_on(d0.send("d1", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        for a in [d1b, d2, d0] {
            a.shutdown().unwrap();
        }
        assert!(
            block_on(async { s.get("names/_ALL_WORKER_INFOS") })
                .unwrap()
                .is_empty()
        );
    });
}

#[test]
fn shutting_down_a_group_that_never_called_is_quick() {
    // PyTorch #59795: a shutdown with cold pipes timed out.
    within(60, || {
        let s = store(Duration::from_secs(30));
        let g = static_group(4, &s, |_| {});
        let t0 = Instant::now();
        shutdown_all(&g);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    });
}

#[test]
fn a_graceful_shutdown_with_a_dead_peer_ends_with_an_error_not_a_hang() {
    within(60, || {
        let s = store(Duration::from_secs(1));
        let mut g = static_group(2, &s, |_| {});
        g.pop().unwrap().shutdown_now(); // w1 never reaches the barrier
        let t0 = Instant::now();
        let e = g[0].shutdown().unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(e.to_string().contains("READY_ID_0"), "{e}");
        // Closed all the same.
        let e = block_on(g[0].send("w1", RpcMessage::new("x"), None)).unwrap_err();
        assert!(matches!(e, CallError::NotRunning { .. }), "{e}");
    });
}

#[test]
fn a_peer_that_published_an_unreachable_address_fails_fast_with_advice() {
    // Pain point: a worker that guessed an address its peers cannot reach. Its callers
    // fail at once, told where they tried and what to set — no hang.
    within(60, || {
        let s = store(Duration::from_secs(30));
        let d0 = Agent::start(opts("d0", 0, None), s.clone(), handler).unwrap();
        // "ghost" joined from a machine whose guessed address is wrong.
        let all = s.get("names/_ALL_WORKER_INFOS").unwrap();
        let mut listed = all.clone();
        listed.extend_from_slice(b"ghost-1,");
        s.compare_set("names/_ALL_WORKER_INFOS", &all, &listed)
            .unwrap();
        s.set("addrs/ghost", b"tcp://127.0.0.1:1").unwrap();
        let t0 = Instant::now();
        let e = block_on(d0.send("ghost", RpcMessage::new("x"), None)).unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        let text = e.to_string();
        assert!(text.contains("tcp://127.0.0.1:1"), "{text}");
        assert!(text.contains("set TP_SOCKET_IFNAME"), "{text}");
        d0.shutdown_now();
    });
}

#[test]
fn transports_and_channels_in_the_options_are_the_only_ones_used() {
    within(60, || {
        let s = store(Duration::from_secs(30));
        let g = static_group(2, &s, |o| {
            o.transports = Some(vec!["tcp".into()]);
            o.channels = Some(vec!["basic".into()]);
        });
        for a in &g {
            let ctx = a.context();
            assert_eq!(ctx.transports().len(), 1);
            assert_eq!(ctx.transports()[0].name, "tcp");
            assert_eq!(ctx.channels().len(), 1);
            assert_eq!(ctx.channels()[0].name, "basic");
            assert!(a.url().starts_with("tcp://"), "{}", a.url());
        }
        let m = sizes_message(3);
        check_echo(
            &block_on(g[0].send("w1", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        // Order sets priority: the first listed wins.
        let g2 = static_group(1, &store(Duration::from_secs(5)), |o| {
            o.channels = Some(vec!["basic".into(), "cma".into()]);
        });
        let names: Vec<&str> = g2[0]
            .context()
            .channels()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(names[0], "basic");
        shutdown_all(&g);
        shutdown_all(&g2);
    });
}

#[test]
fn malformed_or_oversized_messages_close_that_pipe_only() {
    use tp_agent::{Context, Message, Payload, Tensor};
    within(60, || {
        let s = store(Duration::from_secs(30));
        let g = static_group(2, &s, |o| o.max_message_bytes = 1 << 20);
        let url = g[1].url().to_string();
        let rogue = Arc::new(Context::new("rogue"));
        let bad_messages = [
            // Not an RPC header.
            Message {
                metadata: b"hello".to_vec(),
                ..Message::default()
            },
            // A request with no payload.
            Message {
                metadata: tp_wire::rpc::RpcHeader {
                    kind: tp_wire::rpc::RpcKind::Request,
                    id: 1,
                }
                .encode()
                .to_vec(),
                ..Message::default()
            },
            // Over the callee's 1 MiB limit: refused before it is allocated.
            Message {
                metadata: tp_wire::rpc::RpcHeader {
                    kind: tp_wire::rpc::RpcKind::Request,
                    id: 2,
                }
                .encode()
                .to_vec(),
                payloads: vec![Payload::default()],
                tensors: vec![Tensor {
                    data: Box::new(vec![0u8; 2 << 20]),
                    target_device: Some(Device::CPU),
                    metadata: tp_wire::rpc::encode_source_device(Device::CPU).to_vec(),
                }],
            },
        ];
        for bad in bad_messages {
            let pipe = rogue.connect(&url).unwrap();
            let _ = block_on(pipe.write(bad));
            // The agent closes this pipe: the next read fails instead of hanging.
            assert!(block_on(pipe.read_descriptor()).is_err());
        }
        // The agent serves everyone else as before (within its limit).
        let m = RpcMessage::new("fine").with_tensor(RpcTensor::cpu(pattern(1000, 9)));
        check_echo(
            &block_on(g[0].send("w1", m.try_clone().unwrap(), None)).unwrap(),
            &m,
        );
        shutdown_all(&g);
    });
}
