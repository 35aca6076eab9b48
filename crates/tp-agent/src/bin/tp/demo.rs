//! `tp demo`: tp's main job on its embedded default, end to end.
//!
//! This process listens (tcp and shm), starts a second `tp` process that connects to
//! the tcp URL, and shows what the handshake chose and why. Then it sends messages —
//! a payload and a tensor of several sizes — that the other process sends back; every
//! byte is checked, and a table shows sizes, round-trip times and throughput.
//!
//! With `--cuda` the tensors live in GPU `cuda:0` on both ends (the handshake then
//! picks a CUDA channel for the cuda:0 ↔ cuda:0 pair: cuda_ipc between two processes
//! of one machine); without a GPU it says why and fails.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use tp_agent::{Context, Message, Payload, Tensor};
use tp_channel::Device;

use crate::echo::{BYE, echo, pattern, reuse};
use crate::gpu;
use crate::stats::{parse_sizes, size_label};

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Tensor sizes, comma separated (K, M, G suffixes).
    #[arg(long, default_value = "1K,64K,1M,16M,64M")]
    sizes: String,
    /// Round trips per size.
    #[arg(long, default_value_t = 5)]
    round_trips: usize,
    /// Keep the tensors on GPU cuda:0 at both ends (needs a GPU).
    #[arg(long)]
    cuda: bool,
    /// Internal: be the echoing peer, connected to this URL.
    #[arg(long, hide = true)]
    peer: Option<String>,
}

pub(crate) fn run(args: &DemoArgs) -> Result<(), String> {
    match &args.peer {
        Some(url) => peer(url),
        None => lead(args),
    }
}

fn lead(args: &DemoArgs) -> Result<(), String> {
    let sizes = parse_sizes(&args.sizes)?;
    let device = if args.cuda {
        #[cfg(feature = "cuda")]
        tp_cuda::available().map_err(|why| format!("tp demo --cuda needs a GPU: {why}"))?;
        Device::cuda(0)
    } else {
        Device::CPU
    };
    let ctx = Arc::new(Context::new("tp-demo-leader"));
    println!("tp demo: two processes, one pipe\n");
    println!("this context offers (best first):");
    for t in ctx.transports() {
        println!("  transport {:<6} priority {:>5}", t.name, t.priority);
    }
    for c in ctx.channels() {
        println!("  channel   {:<6} priority {:>5}", c.name, c.priority);
    }
    for (name, why) in ctx.skipped() {
        println!("  skipped   {name:<6} {why}");
    }
    let listener = ctx
        .listen(&["tcp://127.0.0.1:0", "shm://"])
        .map_err(|e| e.to_string())?;
    let url = listener.urls().first().cloned().ok_or("no listening URL")?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["demo", "--peer", &url])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the second process: {e}"))?;
    println!(
        "\nlistening on {}; started process {} to connect to {url}",
        listener.urls().join(" and "),
        child.id()
    );
    let result = async_io::block_on(async {
        let pipe = listener.accept().await.map_err(|e| e.to_string())?;
        let mut rows = Vec::new();
        for &size in &sizes {
            let mut times = Vec::new();
            for i in 0..args.round_trips {
                let seed = (size as u8).wrapping_add(i as u8);
                let msg = Message {
                    metadata: format!("size {size}").into_bytes(),
                    payloads: vec![Payload {
                        data: pattern(64, seed),
                        metadata: b"a small payload".to_vec(),
                    }],
                    tensors: vec![Tensor {
                        data: gpu::send_buf(device, pattern(size, seed))?,
                        target_device: Some(device),
                        metadata: b"a tensor".to_vec(),
                    }],
                };
                let t = Instant::now();
                let (_, w) = pipe.write(msg).await;
                w.map_err(|e| format!("write: {e}"))?;
                let incoming = pipe.read_descriptor().await.map_err(|e| e.to_string())?;
                let alloc = reuse(None, &incoming.descriptor)?;
                let (alloc, r) = pipe.read(incoming, alloc).await;
                r.map_err(|e| format!("read: {e}"))?;
                // A GPU tensor's read completes once its copies are enqueued.
                for received in &alloc.tensors {
                    gpu::settle(&**received)?;
                }
                times.push(t.elapsed());
                let tensor = match alloc.tensors.first() {
                    Some(t) => Some(gpu::contents(&**t)?),
                    None => None,
                };
                let ok = alloc
                    .payloads
                    .first()
                    .is_some_and(|p| *p == pattern(64, seed))
                    && tensor.is_some_and(|t| t == pattern(size, seed));
                if !ok {
                    return Err(format!("the echo of {} differs", size_label(size)));
                }
            }
            times.sort();
            rows.push((size, times[times.len() / 2]));
        }
        println!(
            "\nhandshake chose transport {} and channel(s) {}",
            pipe.transport().unwrap_or_default(),
            pipe.channel_names().join(", ")
        );
        println!(
            "  why: both ends offered these; the highest priority whose descriptors match wins"
        );
        println!(
            "  (shm: same boot id and network namespace; cma: same machine, namespaces and user;"
        );
        println!("   xth would need one process, so its descriptors differ)");
        if device != Device::CPU {
            println!(
                "  (tensors on {device}: cuda_ipc needs the same machine, another process and GPUs \
                 that reach each other; cuda_xth one process; cuda_basic stages through pinned \
                 host memory anywhere)"
            );
        }
        let (_, bye) = pipe
            .write(Message {
                metadata: BYE.to_vec(),
                ..Message::default()
            })
            .await;
        bye.map_err(|e| e.to_string())?;
        Ok::<_, String>(rows)
    });
    let status = child.wait().map_err(|e| e.to_string())?;
    let rows = result?;
    if !status.success() {
        return Err(format!("the second process failed: {status}"));
    }
    println!(
        "\n{:>8} {:>14} {:>10}   every byte checked",
        "tensor", "round trip", "GB/s"
    );
    for (size, t) in rows {
        println!(
            "{:>8} {:>11.3} ms {:>10.3}   yes",
            size_label(size),
            t.as_secs_f64() * 1e3,
            2.0 * size as f64 / t.as_secs_f64().max(1e-12) / 1e9
        );
    }
    println!("\n(median of the round trips per size; GB/s counts both directions)");
    if args.cuda {
        // The group's handler rewrites every byte on the host; GPU tensors through the
        // agent's device maps are in the CUDA RPC tests (crates/tp-agent/tests/cuda_rpc.rs).
        println!("\n(the RPC group below moves CPU tensors, --cuda or not)");
    }
    crate::rpc::demo_group(&sizes)
}

/// Echoes every message back until the leader says bye.
fn peer(url: &str) -> Result<(), String> {
    let ctx = Arc::new(Context::new("tp-demo-peer"));
    let pipe = ctx.connect(url).map_err(|e| e.to_string())?;
    // On the context's I/O thread: each completion runs the echo's next step there,
    // without waking this thread (see `Context::spawn`).
    futures::executor::block_on(ctx.spawn(async move { echo(&pipe).await }))
        .map_err(|_| "the echo task panicked".to_string())
}
