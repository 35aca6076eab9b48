//! Pain point: tensors of 2 GiB and more. PyTorch failed them ("short read: got
//! 2147479552 bytes": Linux caps one read or write at 0x7ffff000 bytes; CMA > 2 GB
//! failed too). Here a call carries a tensor of 2 GiB + 4 KiB over tcp + basic and over
//! shm + cma, and the callee checks every block.
//!
//! Its own test binary, so it never runs beside other tests' memory use; skipped (and
//! saying so) on a machine with less than 6 GiB available.

use std::sync::Arc;
use std::time::Duration;

use futures::executor::block_on;
use tp_agent::rpc::{Agent, AgentOptions, Reply, Request, RpcMessage, RpcTensor};
use tp_store::{MemoryStore, Store};

const BLOCK: usize = 1 << 20;
const LEN: usize = (2 << 30) + 4096;

/// Block `i` of the test tensor: a fixed pattern with the block's index in front, so a
/// misplaced block is caught too.
fn block(base: &[u8], i: usize, len: usize) -> Vec<u8> {
    let mut b = base[..len].to_vec();
    let tag = (i as u64).to_le_bytes();
    let n = tag.len().min(len);
    b[..n].copy_from_slice(&tag[..n]);
    b
}

fn base() -> Vec<u8> {
    (0..BLOCK)
        .map(|i| (i as u8).wrapping_mul(13) ^ 0x5a)
        .collect()
}

fn tensor() -> Vec<u8> {
    let base = base();
    let mut v = Vec::with_capacity(LEN);
    let mut i = 0;
    while v.len() < LEN {
        let n = BLOCK.min(LEN - v.len());
        v.extend_from_slice(&block(&base, i, n));
        i += 1;
    }
    v
}

/// Checks every block; answers "ok <len>" or which block differs.
fn check(req: Request) -> Reply {
    let base = base();
    let Some(data) = req.message.tensors[0].as_cpu() else {
        return Reply::Ready(Err("not a CPU tensor".into()));
    };
    for (i, got) in data.chunks(BLOCK).enumerate() {
        if got != &block(&base, i, got.len())[..] {
            return Reply::Ready(Err(format!("block {i} differs")));
        }
    }
    Reply::from(RpcMessage::new(format!("ok {}", data.len())))
}

fn available_bytes() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn pair(transport: &str, channel: &str) -> (Agent, Agent) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    store.set_timeout(Duration::from_secs(60));
    let opts = |name: &str, rank| AgentOptions {
        world_size: Some(2),
        num_worker_threads: 2,
        rpc_timeout: Duration::from_secs(600),
        transports: Some(vec![transport.into()]),
        channels: Some(vec![channel.into()]),
        ..AgentOptions::new(name, rank)
    };
    let s = store.clone();
    let o = opts("callee", 1);
    let callee = std::thread::spawn(move || Agent::start(o, s, check).unwrap());
    let caller = Agent::start(opts("caller", 0), store, check).unwrap();
    (caller, callee.join().unwrap())
}

#[test]
fn a_tensor_over_two_gib_crosses_tcp_basic_and_shm_cma() {
    let have = available_bytes();
    if have < 6 << 30 {
        eprintln!(
            "SKIPPED: needs 6 GiB of available memory for a 2 GiB tensor on both ends; this machine has {} MiB",
            have >> 20
        );
        return;
    }
    for (transport, channel) in [("tcp", "basic"), ("shm", "cma")] {
        let (caller, callee) = pair(transport, channel);
        let m = RpcMessage::new("big").with_tensor(RpcTensor::cpu(tensor()));
        let reply = block_on(caller.send("callee", m, None))
            .unwrap_or_else(|e| panic!("{transport}+{channel}: {e}"));
        assert_eq!(
            reply.payload,
            format!("ok {LEN}").into_bytes(),
            "{transport}+{channel}"
        );
        std::thread::scope(|s| {
            s.spawn(|| caller.shutdown().unwrap());
            s.spawn(|| callee.shutdown().unwrap());
        });
    }
}
