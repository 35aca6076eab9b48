//! RPC groups from the command line: `tp rpc worker` (one worker of a group, run by
//! the demo, the benchmark and the multi-process tests), the demo's RPC part, and
//! `tp bench rpc`.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use futures::executor::block_on;
use futures::future::join_all;
use tp_agent::rpc::{Agent, AgentOptions, Reply, Request, RpcMessage, RpcTensor};
use tp_store::{PrefixStore, Store, TcpStore, TcpStoreOptions};

use crate::stats::{Summary, parse_sizes, size_label};

#[derive(Debug, Subcommand)]
pub(crate) enum RpcCommand {
    /// One worker of a group, running a scenario (for the demo, the benchmark and the
    /// multi-process tests).
    #[command(hide = true)]
    Worker(WorkerArgs),
}

/// What each scenario does.
#[derive(Clone, Copy, Debug, Eq, PartialEq, ValueEnum)]
pub(crate) enum Scenario {
    /// Calls every member (itself too) with tensors of several sizes, checks every
    /// byte; then makes calls and shuts down with them in flight, checking none is lost.
    AllToAll,
    /// Makes `--calls` small calls at once, round robin over the others; checks each.
    Load,
    /// Serves until killed (prints READY).
    Serve,
    /// Calls the next rank with calls that outlive their timeout; checks the error, that
    /// the late replies are dropped and that the next call works.
    Timeouts,
    /// Calls the last rank (the victim) with a call it will never answer, prints SENT,
    /// and expects the call to fail once the victim is killed; then the survivors call
    /// each other.
    Survivor,
}

/// Which backends a worker uses.
#[derive(Clone, Debug, Args)]
pub(crate) struct Backends {
    /// Transports to use, first preferred (default: every viable one).
    #[arg(long, value_delimiter = ',')]
    transports: Option<Vec<String>>,
    /// Channels to use, first preferred (default: every viable one).
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<String>>,
}

impl Backends {
    /// The same choice as `tp rpc worker` arguments.
    fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (flag, list) in [
            ("--transports", &self.transports),
            ("--channels", &self.channels),
        ] {
            if let Some(l) = list {
                out.extend([flag.to_string(), l.join(",")]);
            }
        }
        out
    }
}

#[derive(Debug, Args)]
pub(crate) struct WorkerArgs {
    /// Worker name.
    #[arg(long)]
    name: String,
    /// Rank.
    #[arg(long)]
    rank: u32,
    /// The group's size (a static group); without it, a dynamic group.
    #[arg(long)]
    world_size: Option<u32>,
    /// Dynamic groups: how many members to wait for before calling.
    #[arg(long)]
    expect: Option<u32>,
    /// The TCPStore's host.
    #[arg(long, default_value = "127.0.0.1")]
    store_host: String,
    /// The TCPStore's port.
    #[arg(long)]
    store_port: u16,
    /// What to do.
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Tensor sizes for `all-to-all`, comma separated (K, M suffixes).
    #[arg(long, default_value = "0,1,1000,64K,1M,4M")]
    sizes: String,
    /// Calls for `load`.
    #[arg(long, default_value_t = 10_000)]
    calls: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 4)]
    threads: usize,
    #[command(flatten)]
    backends: Backends,
}

/// The workers' handler: `sleep:<ms>` sleeps, then answers; `fail` errs; `bump...`
/// adds 1 to every tensor byte; anything else is echoed.
pub(crate) fn handler(req: Request) -> Reply {
    let p = &req.message.payload;
    if let Some(ms) = p.strip_prefix(b"sleep:") {
        let ms = std::str::from_utf8(ms)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        return Reply::from(RpcMessage::new(format!("slept for {}", req.from)));
    }
    if p == b"fail" {
        return Reply::Ready(Err(format!("refused {} on purpose", req.from)));
    }
    let mut m = req.message;
    if m.payload.starts_with(b"bump") {
        // The tool's agents have CPU tensors only (no device maps).
        for b in m.tensors.iter_mut().filter_map(RpcTensor::as_cpu_mut) {
            for b in b.iter_mut() {
                *b = b.wrapping_add(1);
            }
        }
    }
    Reply::from(m)
}

fn store(host: &str, port: u16, timeout: Duration) -> Result<Arc<dyn Store>, String> {
    let s: Arc<dyn Store> = Arc::new(
        TcpStore::new(TcpStoreOptions {
            host: host.to_string(),
            port,
            timeout,
            ..TcpStoreOptions::default()
        })
        .map_err(|e| e.to_string())?,
    );
    Ok(Arc::new(PrefixStore::new("rpc_prefix_0", s)))
}

pub(crate) fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// A copy of one of the tool's messages (CPU tensors only, so always possible).
fn copy(m: &RpcMessage) -> RpcMessage {
    m.try_clone().unwrap_or_default()
}

/// A message with a tensor of each size, for `bump`.
fn sized(seed: u8, sizes: &[usize]) -> RpcMessage {
    sizes
        .iter()
        .fold(RpcMessage::new(format!("bump {seed}")), |m, &n| {
            m.with_tensor(RpcTensor::cpu(pattern(n, seed)))
        })
}

fn check_bumped(reply: &RpcMessage, sent: &RpcMessage) -> Result<(), String> {
    let ok =
        reply.payload == sent.payload
            && reply.tensors.len() == sent.tensors.len()
            && reply.tensors.iter().zip(&sent.tensors).all(|(g, w)| {
                match (g.as_cpu(), w.as_cpu()) {
                    (Some(g), Some(w)) => {
                        g.len() == w.len() && g.iter().zip(w).all(|(a, b)| *a == b.wrapping_add(1))
                    }
                    _ => false,
                }
            });
    if ok {
        Ok(())
    } else {
        Err("a reply's bytes differ".into())
    }
}

/// Waits until a dynamic group has `n` members.
fn await_members(agent: &Agent, n: u32) -> Result<(), String> {
    let t0 = Instant::now();
    while agent.workers().len() < n as usize {
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(format!("only {:?} joined", agent.workers()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Every worker reached `name` (a store barrier for the scenario's phases).
fn barrier(store: &dyn Store, name: &str, n: u32) -> Result<(), String> {
    let e = |e: tp_store::StoreError| e.to_string();
    if store.add(&format!("test/{name}"), 1).map_err(e)? == i64::from(n) {
        store.set(&format!("test/{name}/go"), b"1").map_err(e)?;
    }
    store.wait(&[&format!("test/{name}/go")], None).map_err(e)
}

pub(crate) fn worker(args: &WorkerArgs) -> Result<(), String> {
    let store = store(&args.store_host, args.store_port, Duration::from_secs(60))?;
    let opts = AgentOptions {
        world_size: args.world_size,
        num_worker_threads: args.threads,
        rpc_timeout: Duration::from_secs(60),
        transports: args.backends.transports.clone(),
        channels: args.backends.channels.clone(),
        ..AgentOptions::new(args.name.clone(), args.rank)
    };
    let agent = Agent::start(opts, store.clone(), handler).map_err(|e| e.to_string())?;
    let n = args.world_size.or(args.expect).unwrap_or(1);
    await_members(&agent, n)?;
    let names: Vec<String> = agent.workers().into_values().collect();
    let others: Vec<&String> = names.iter().filter(|w| **w != args.name).collect();
    println!("JOINED {} url={}", args.name, agent.url());
    match args.scenario {
        Scenario::AllToAll => {
            let sizes = parse_sizes(&args.sizes)?;
            let calls: Vec<_> = names
                .iter()
                .enumerate()
                .map(|(i, to)| {
                    let m = sized(i as u8 ^ args.rank as u8, &sizes);
                    (copy(&m), agent.send(to, m, None))
                })
                .collect();
            for (sent, call) in calls {
                check_bumped(&block_on(call).map_err(|e| e.to_string())?, &sent)?;
            }
            println!("ALL_TO_ALL ok calls={}", names.len());
            // Shut down with calls in flight: every one must complete.
            let inflight: Vec<_> = (0..20)
                .map(|i| agent.send(others[i % others.len()], RpcMessage::new("sleep:200"), None))
                .collect();
            barrier(&*store, "issued", n)?;
            agent.shutdown().map_err(|e| e.to_string())?;
            let ok = block_on(join_all(inflight))
                .into_iter()
                .filter(Result::is_ok)
                .count();
            println!("SHUTDOWN inflight_ok={ok}/20");
        }
        Scenario::Load => {
            let t0 = Instant::now();
            let calls: Vec<_> = (0..args.calls)
                .map(|i| {
                    let m = RpcMessage::new(format!("{} #{i}", args.name));
                    (
                        m.payload.clone(),
                        agent.send(others[i % others.len()], m, None),
                    )
                })
                .collect();
            let (sent, calls): (Vec<_>, Vec<_>) = calls.into_iter().unzip();
            let replies = block_on(join_all(calls));
            let secs = t0.elapsed().as_secs_f64();
            let good = replies
                .iter()
                .zip(&sent)
                .filter(|(r, s)| r.as_ref().is_ok_and(|m| m.payload == **s))
                .count();
            println!("LOAD ok={good}/{} secs={secs:.2}", args.calls);
            barrier(&*store, "loaded", n)?;
            agent.shutdown().map_err(|e| e.to_string())?;
        }
        Scenario::Timeouts => {
            let to = &names[(args.rank as usize + 1) % names.len()];
            let t0 = Instant::now();
            let slow = agent.send(
                to,
                RpcMessage::new("sleep:600"),
                Some(Duration::from_millis(150)),
            );
            let id = slow.id().unwrap_or_default();
            let e = block_on(slow).err().ok_or("a call outlived its timeout")?;
            println!("TIMEOUT ms={} error={e}", t0.elapsed().as_millis());
            if !e.to_string().contains(&format!("RPC call {id} to {to:?}")) {
                return Err(format!("the error does not name the call: {e}"));
            }
            let t0 = Instant::now();
            while agent.metrics()["agent.late_replies_dropped"] < 1 {
                if t0.elapsed() > Duration::from_secs(30) {
                    return Err("the late reply never arrived".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let m = sized(3, &[4096]);
            check_bumped(
                &block_on(agent.send(to, copy(&m), None)).map_err(|e| e.to_string())?,
                &m,
            )?;
            println!("LATE dropped=1 next_call=ok");
            barrier(&*store, "timeouts", n)?;
            agent.shutdown().map_err(|e| e.to_string())?;
        }
        Scenario::Serve => {
            println!("READY");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        Scenario::Survivor => {
            let victim = names.last().cloned().ok_or("empty group")?;
            let t0 = Instant::now();
            let call = agent.send(
                &victim,
                RpcMessage::new("sleep:600000"),
                Some(Duration::from_secs(30)),
            );
            println!("SENT");
            let e = block_on(call).err().ok_or("the victim answered")?;
            println!("FAILED ms={} error={e}", t0.elapsed().as_millis());
            let survivors: Vec<&String> = names.iter().filter(|w| **w != victim).collect();
            for (i, to) in survivors.iter().enumerate() {
                let m = sized(i as u8, &[1000, 1 << 20]);
                check_bumped(
                    &block_on(agent.send(to, copy(&m), None)).map_err(|e| e.to_string())?,
                    &m,
                )?;
            }
            println!("SURVIVORS ok");
            barrier(&*store, "survived", n - 1)?;
            agent.shutdown_now();
        }
    }
    Ok(())
}

/// Starts `tp rpc worker` processes for ranks `ranks` of a static group of `world`.
pub(crate) fn spawn_workers(
    port: u16,
    world: u32,
    ranks: std::ops::Range<u32>,
    scenario: &str,
    extra: &[&str],
) -> Result<Vec<Child>, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    ranks
        .map(|r| {
            Command::new(&exe)
                .args(["rpc", "worker", "--name", &format!("worker{r}")])
                .args(["--rank", &r.to_string(), "--world-size", &world.to_string()])
                .args(["--store-port", &port.to_string(), "--scenario", scenario])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting a worker: {e}"))
        })
        .collect()
}

/// Runs `lead(port)` as worker 0 of a static group of `world` over a TCPStore served
/// here on `port`; workers 1.. are `tp rpc worker --scenario serve` processes (with
/// `extra` arguments), killed once `lead` returns.
fn with_serving_group<T>(
    world: u32,
    extra: &[&str],
    lead: impl FnOnce(u16) -> Result<T, String>,
) -> Result<T, String> {
    let server = store_server()?;
    let port = server.port();
    let mut children = spawn_workers(port, world, 1..world, "serve", extra)?;
    let result = lead(port);
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

fn store_server() -> Result<TcpStore, String> {
    TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port: 0,
        is_server: true,
        timeout: Duration::from_secs(60),
        ..TcpStoreOptions::default()
    })
    .map_err(|e| e.to_string())
}

/// The demo's RPC part: a TCPStore here, three worker processes, and this process as
/// worker 0 calling each of them (and itself) with tensors.
pub(crate) fn demo_group(sizes: &[usize]) -> Result<(), String> {
    const WORLD: u32 = 4;
    with_serving_group(WORLD, &[], |port| {
        println!(
            "\nan RPC group of {WORLD} workers: a TCPStore on 127.0.0.1:{port}, 3 more processes"
        );
        let store = store("127.0.0.1", port, Duration::from_secs(60))?;
        let agent = Agent::start(
            AgentOptions {
                world_size: Some(WORLD),
                ..AgentOptions::new("worker0", 0)
            },
            store,
            handler,
        )
        .map_err(|e| e.to_string())?;
        println!(
            "worker0 published {} (the lowest-priority transport's URL)",
            agent.url()
        );
        println!(
            "\n{:>8} {:>8} {:>12} {:>10}   handler ran remotely, every byte checked",
            "to", "tensor", "call", "GB/s"
        );
        for (rank, name) in agent.workers() {
            let t = Instant::now();
            block_on(agent.send(&name, RpcMessage::new("hello"), None))
                .map_err(|e| e.to_string())?;
            println!(
                "{name:>8} {:>8} {:>9.3} ms {:>10}   (the first call opens the pipe: handshake, shm upgrade)",
                "-",
                t.elapsed().as_secs_f64() * 1e3,
                "-"
            );
            for &size in sizes {
                let m = sized(rank as u8, &[size]);
                let t = Instant::now();
                let reply =
                    block_on(agent.send(&name, copy(&m), None)).map_err(|e| e.to_string())?;
                let took = t.elapsed();
                check_bumped(&reply, &m)?;
                println!(
                    "{:>8} {:>8} {:>9.3} ms {:>10.3}   yes",
                    name,
                    size_label(size),
                    took.as_secs_f64() * 1e3,
                    2.0 * size as f64 / took.as_secs_f64().max(1e-12) / 1e9
                );
            }
        }
        let m = agent.metrics();
        println!(
            "\nmetrics: {} worker threads, {} calls active; to worker1: {:?}",
            m["agent.thread_pool_size"],
            m["agent.client_active_calls"],
            agent.network_data().get("worker1")
        );
        agent.shutdown_now();
        Ok(())
    })
}

#[derive(Debug, Args)]
pub(crate) struct RpcBenchArgs {
    /// Tensor sizes per call (0 = a payload-only call of 8 bytes), comma separated.
    #[arg(long, default_value = "0,1K,64K,1M,16M")]
    sizes: String,
    /// Calls sent together (then all awaited) for the calls-per-second figure.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 1.5)]
    seconds: f64,
    #[command(flatten)]
    backends: Backends,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    json: bool,
}

/// `tp bench rpc`: a caller here and a callee process; one call at a time for latency,
/// then `--in-flight` at a time for calls per second.
pub(crate) fn bench(args: &RpcBenchArgs) -> Result<(), String> {
    let sizes = parse_sizes(&args.sizes)?;
    let regime = crate::limits::Regime::measure()?;
    let extra = args.backends.args();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    with_serving_group(2, &extra, |port| {
        let store = store("127.0.0.1", port, Duration::from_secs(60))?;
        let agent = Agent::start(
            AgentOptions {
                world_size: Some(2),
                transports: args.backends.transports.clone(),
                channels: args.backends.channels.clone(),
                ..AgentOptions::new("worker0", 0)
            },
            store,
            handler,
        )
        .map_err(|e| e.to_string())?;
        if !args.json {
            println!("tp bench rpc: worker0 (here) calls worker1 (a second process)");
            println!("{}", regime.line());
            println!(
                "{:>8} {:>9} {:>9} {:>9} {:>7} {:>9} {:>12} {:>9}",
                "tensor", "p50 µs", "p90 µs", "p99 µs", "÷ raw", "calls", "calls/s", "GB/s"
            );
        }
        for &size in &sizes {
            let msg = if size == 0 {
                RpcMessage::new(vec![7u8; 8])
            } else {
                RpcMessage::new(vec![7u8; 8]).with_tensor(RpcTensor::cpu(vec![5u8; size]))
            };
            let budget = Duration::from_secs_f64(args.seconds);
            // Warm-up: opens the pipe, takes the first allocations.
            for _ in 0..10 {
                block_on(agent.send("worker1", copy(&msg), None)).map_err(|e| e.to_string())?;
            }
            let mut lat = Vec::new();
            let t0 = Instant::now();
            while t0.elapsed() < budget || lat.len() < 20 {
                let m = copy(&msg); // not timed: a caller sends a message it has
                let t = Instant::now();
                block_on(agent.send("worker1", m, None)).map_err(|e| e.to_string())?;
                lat.push(t.elapsed());
            }
            let s = Summary::of(&mut lat);
            // Throughput: `in_flight` calls outstanding at all times.
            let t0 = Instant::now();
            let mut done = 0usize;
            let mut busy = Duration::ZERO;
            while t0.elapsed() < budget {
                let msgs: Vec<RpcMessage> = (0..args.in_flight).map(|_| copy(&msg)).collect();
                let t = Instant::now();
                let batch: Vec<_> = msgs
                    .into_iter()
                    .map(|m| agent.send("worker1", m, None))
                    .collect();
                for r in block_on(join_all(batch)) {
                    r.map_err(|e| e.to_string())?;
                    done += 1;
                }
                busy += t.elapsed();
            }
            let rate = done as f64 / busy.as_secs_f64();
            let gbps = 2.0 * size as f64 * rate / 1e9;
            if args.json {
                println!(
                    "{{\"bench\":\"rpc\",\"regime\":{},\"tensor_bytes\":{size},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"calls\":{},\"calls_per_s\":{rate:.0},\"batch\":{},\"gbps\":{gbps:.3}}}",
                    regime.json(),
                    s.p50_us,
                    s.p90_us,
                    s.p99_us,
                    s.count,
                    args.in_flight
                );
            } else {
                println!(
                    "{:>8} {:>9.1} {:>9.1} {:>9.1} {:>6.2}x {:>9} {:>12.0} {:>9.3}",
                    size_label(size),
                    s.p50_us,
                    s.p90_us,
                    s.p99_us,
                    s.p50_us / regime.tcp_8b_p50_us,
                    s.count,
                    rate,
                    gbps
                );
            }
        }
        let after = regime.ended()?;
        if args.json {
            println!("{{\"bench\":\"rpc\",\"regime\":{}}}", after.json());
        } else {
            println!(
                "(latency: one call at a time; ÷ raw: p50 / raw TCP 8 B ping-pong p50 of the regime line;\n calls/s and GB/s: batches of {} calls in flight, both directions' bytes)",
                args.in_flight
            );
            println!("{}", after.line());
        }
        agent.shutdown_now();
        Ok(())
    })
}
