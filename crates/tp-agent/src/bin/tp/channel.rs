//! `tp bench channel`: a tensor ping-pong over one channel, like `tp bench transport`.
//!
//! The connecting end sends a tensor of `size` bytes and receives it back, timing each
//! round trip; the listening end receives and echoes the very buffer it received. The
//! channel runs over `connections_needed()` connections of `--transport`, each opened
//! by the connecting end and numbered by its first 8 bytes; one more connection carries
//! the benchmark's own control headers. Both ends are separate processes, except for
//! xth, which only works inside one process (its two ends then run on two threads).
//!
//! Every round trip's echo is compared with what was sent when `--verify` is given;
//! otherwise the first and the last of each size are.
//!
//! From 64 KiB up, xth and cma rows carry the physical limit measured right after, in
//! the same run: hot `memcpy` of the same size (xth) or single-thread `process_vm_readv`
//! from another process (cma), so the ratio stays within one machine state.
//!
//! The CUDA channels (`cuda_xth`, `cuda_ipc`, `cuda_basic` over basic) move buffers in
//! the memory of GPU `--gpu` on both ends; their limit is the driver's own copy of the
//! same size measured right after: device to device (cuda_xth, cuda_ipc) or pinned host
//! to device (cuda_basic). cuda_xth runs its two ends on two threads of one process.
//! A GPU receive completes once its copies are enqueued on the buffer's stream, so a
//! round trip ends only after that stream is synchronized: the bytes are there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tp_channel::{BoxChannel, ChannelContext, Device, Endpoint, SendBuf};
use tp_transport::{BoxConnection, Transport};

use crate::echo::{into_recv, into_send, pattern};
use crate::gpu;
use crate::limits::{PINGPONG, Regime, cma_gbps, header, memcpy_gbps, parse_header, spawn_server};
use crate::stats::{Summary, parse_sizes, size_label};
use crate::{Mode, PingPongArgs};

#[derive(Debug, Args, Clone)]
pub(crate) struct ChannelArgs {
    /// Which channel: basic, xth, cma, mpt, cuda_xth, cuda_ipc, cuda_basic, cuda_gdr.
    #[arg(long, default_value = "basic")]
    channel: String,
    /// The CUDA channels: the GPU (`cuda:N`) both ends' buffers are on.
    #[arg(long, default_value_t = 0)]
    gpu: u32,
    /// The transport under the channel's connections: tcp or shm.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// mpt: lanes per channel.
    #[arg(long, default_value_t = 2)]
    lanes: usize,
    #[command(flatten)]
    run: PingPongArgs,
    /// Compare every echo with what was sent (default: the first and last of a size).
    #[arg(long)]
    verify: bool,
}

fn make_channel(args: &ChannelArgs) -> Result<Arc<dyn ChannelContext>, String> {
    let ctx: Arc<dyn ChannelContext> = match args.channel.as_str() {
        "basic" => Arc::new(tp_channel::basic::BasicContext::new()),
        "xth" => Arc::new(tp_channel::xth::XthContext::new()),
        "cma" => Arc::new(tp_channel::cma::CmaContext::default()),
        "mpt" => Arc::new(tp_channel::mpt::MptContext::new(
            tp_channel::mpt::MptConfig {
                lanes: args.lanes,
                bind_host: "127.0.0.1".to_string(),
                ..tp_channel::mpt::MptConfig::default()
            },
        )),
        #[cfg(feature = "cuda")]
        "cuda_xth" => Arc::new(tp_cuda::xth::CudaXthContext::new()),
        #[cfg(feature = "cuda")]
        "cuda_ipc" => Arc::new(tp_cuda::ipc::CudaIpcContext::default()),
        #[cfg(feature = "cuda")]
        "cuda_gdr" => Arc::new(tp_cuda::gdr::CudaGdrContext::new()),
        #[cfg(feature = "cuda")]
        "cuda_basic" => Arc::new(tp_cuda::basic::CudaBasicContext::new(
            Arc::new(tp_channel::basic::BasicContext::new()),
            tp_cuda::basic::CudaBasicConfig::default(),
        )),
        other => {
            return Err(format!(
                "unknown channel {other:?} (known: basic, xth, cma, mpt{})",
                if cfg!(feature = "cuda") {
                    ", cuda_xth, cuda_ipc, cuda_basic, cuda_gdr"
                } else {
                    "; the CUDA channels need the cargo feature `cuda`"
                }
            ));
        }
    };
    ctx.viability().map_err(|e| e.to_string())?;
    Ok(ctx)
}

/// Where this run's buffers are.
fn device(args: &ChannelArgs) -> Device {
    gpu::device_for(&args.channel, args.gpu)
}

fn make_transport(name: &str) -> Result<Arc<dyn Transport>, String> {
    let t: Arc<dyn Transport> = match name {
        "tcp" => Arc::new(tp_transport::tcp::TcpTransport::new()),
        "shm" => Arc::new(tp_transport::shm::ShmTransport::default()),
        other => return Err(format!("unknown transport {other:?} (known: tcp, shm)")),
    };
    t.viability().map_err(|e| e.to_string())?;
    Ok(t)
}

fn default_bind(transport: &str) -> &'static str {
    if transport == "shm" {
        ""
    } else {
        "127.0.0.1:0"
    }
}

pub(crate) fn run(args: &ChannelArgs) -> Result<(), String> {
    let ctx = make_channel(args)?;
    let transport = make_transport(&args.transport)?;
    let bind = args
        .run
        .address
        .clone()
        .unwrap_or_else(|| default_bind(&args.transport).to_string());
    match args.run.mode {
        Mode::Listen => {
            let listener = transport.listen(&bind).map_err(|e| e.to_string())?;
            println!("LISTENING {}", listener.address());
            async_io::block_on(serve(ctx.as_ref(), listener.as_ref(), device(args)))
        }
        Mode::Connect => {
            let addr = args
                .run
                .address
                .clone()
                .ok_or("--mode connect needs --address")?;
            let regime = Regime::measure()?;
            let rows = async_io::block_on(client(ctx.as_ref(), transport.as_ref(), &addr, args))?;
            report(args, &regime.ended()?, &rows);
            Ok(())
        }
        Mode::Both if args.channel == "xth" || args.channel == "cuda_xth" => {
            // One process: the serving end on a thread of its own.
            let regime = Regime::measure()?;
            let listener = transport.listen(&bind).map_err(|e| e.to_string())?;
            let addr = listener.address().to_string();
            let server_ctx = ctx.clone();
            let on = device(args);
            let server = std::thread::spawn(move || {
                async_io::block_on(serve(server_ctx.as_ref(), listener.as_ref(), on))
            });
            let rows = async_io::block_on(client(ctx.as_ref(), transport.as_ref(), &addr, args));
            let served = server.join().map_err(|_| "the serving thread panicked")?;
            let rows = rows?;
            served?;
            report(args, &regime.ended()?, &rows);
            Ok(())
        }
        Mode::Both => {
            let regime = Regime::measure()?;
            let lanes = args.lanes.to_string();
            let gpu = args.gpu.to_string();
            let mut child_args = vec![
                "bench",
                "channel",
                "--mode",
                "listen",
                "--channel",
                &args.channel,
                "--transport",
                &args.transport,
                "--lanes",
                &lanes,
                "--gpu",
                &gpu,
            ];
            if let Some(a) = &args.run.address {
                child_args.extend(["--address", a]);
            }
            let (mut child, addr) = spawn_server(&child_args)?;
            let rows = async_io::block_on(client(ctx.as_ref(), transport.as_ref(), &addr, args));
            let status = child.wait().map_err(|e| e.to_string())?;
            let rows = rows?;
            if !status.success() {
                return Err(format!("the serving process failed: {status}"));
            }
            report(args, &regime.ended()?, &rows);
            Ok(())
        }
    }
}

/// Opens the channel's connections plus the control connection, numbered.
async fn open(
    ctx: &dyn ChannelContext,
    transport: &dyn Transport,
    addr: &str,
) -> Result<(BoxChannel, BoxConnection), String> {
    let n = ctx.connections_needed();
    let mut conns = Vec::new();
    for i in 0..=n {
        let c = transport.connect(addr).await.map_err(|e| e.to_string())?;
        c.write(&[&(i as u64).to_le_bytes()])
            .await
            .map_err(|e| e.to_string())?;
        conns.push(c);
    }
    let control = conns.pop().ok_or("no control connection")?;
    let channel = ctx
        .create_channel(conns, Endpoint::Connect)
        .await
        .map_err(|e| e.to_string())?;
    Ok((channel, control))
}

/// Accepts the connections, then echoes tensors until the client says stop.
async fn serve(
    ctx: &dyn ChannelContext,
    listener: &dyn tp_transport::Listener,
    device: Device,
) -> Result<(), String> {
    let n = ctx.connections_needed();
    let mut slots: Vec<Option<BoxConnection>> = (0..=n).map(|_| None).collect();
    for _ in 0..=n {
        let c = listener.accept().await.map_err(|e| e.to_string())?;
        let mut i = [0u8; 8];
        c.read_exact(&mut i).await.map_err(|e| e.to_string())?;
        let slot = slots
            .get_mut(u64::from_le_bytes(i) as usize)
            .ok_or("bad connection number")?;
        *slot = Some(c);
    }
    let mut conns: Vec<BoxConnection> = slots.into_iter().flatten().collect();
    let control = conns.pop().ok_or("no control connection")?;
    let channel = ctx
        .create_channel(conns, Endpoint::Listen)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        let mut h = [0u8; 24];
        if control.read_exact(&mut h).await.is_err() {
            return Ok(());
        }
        let (size, count, kind) = parse_header(&h);
        if kind != PINGPONG {
            return Ok(());
        }
        let mut buf = gpu::recv_buf(device, size)?;
        for _ in 0..count {
            let (got, r) = channel.recv(buf).await;
            r.map_err(|e| format!("server recv: {e}"))?;
            let echo: Box<dyn SendBuf> = into_send(got);
            let (sent, r) = channel.send(echo).await;
            r.map_err(|e| format!("server send: {e}"))?;
            buf = into_recv(sent);
        }
    }
}

/// `count` round trips of one size; returns their durations.
async fn round_trips(
    channel: &BoxChannel,
    control: &BoxConnection,
    (size, device): (usize, Device),
    count: usize,
    verify_all: bool,
) -> Result<Vec<Duration>, String> {
    control
        .write(&[&header(size, count, PINGPONG)])
        .await
        .map_err(|e| e.to_string())?;
    let expect = pattern(size, size as u8);
    let mut tx = gpu::send_buf(device, expect.clone())?;
    let mut rx = gpu::recv_buf(device, size)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        let (sent, r) = channel.send(tx).await;
        r.map_err(|e| format!("send: {e}"))?;
        let (got, r) = channel.recv(rx).await;
        r.map_err(|e| format!("recv: {e}"))?;
        // A GPU receive completes once its copies are enqueued: the round trip ends
        // when the bytes are there.
        gpu::settle(&*got)?;
        out.push(t.elapsed());
        if (verify_all || i == 0 || i + 1 == count) && gpu::contents(&*got)? != expect {
            return Err(format!(
                "round trip {i} of {}: the echo differs from what was sent",
                size_label(size)
            ));
        }
        tx = sent;
        rx = got;
    }
    Ok(out)
}

async fn client(
    ctx: &dyn ChannelContext,
    transport: &dyn Transport,
    addr: &str,
    args: &ChannelArgs,
) -> Result<Vec<Row>, String> {
    let sizes = parse_sizes(&args.run.sizes)?;
    let (channel, control) = open(ctx, transport, addr).await?;
    let mut rows = Vec::new();
    for &size in &sizes {
        let on = (size, device(args));
        let warm = round_trips(&channel, &control, on, 5, true).await?;
        let est = warm.iter().sum::<Duration>().as_secs_f64() / 5.0;
        let count = args
            .run
            .round_trips
            .unwrap_or(((args.run.seconds / est.max(1e-9)) as usize).clamp(20, 300_000));
        let mut samples = round_trips(&channel, &control, on, count, args.verify).await?;
        let limit = match args.channel.as_str() {
            "xth" if size >= 64 << 10 => Some(memcpy_gbps(size)),
            "cma" if size >= 64 << 10 => Some(cma_gbps(size)?),
            #[cfg(feature = "cuda")]
            "cuda_xth" | "cuda_ipc" | "cuda_basic" if size >= 64 << 10 => {
                use tp_cuda::limits::{Copy, copy_gbps};
                let copy = if args.channel == "cuda_basic" {
                    Copy::HostToDevice
                } else {
                    Copy::DeviceToDevice
                };
                Some(copy_gbps(args.gpu, copy, size, 10).map_err(|e| e.to_string())?)
            }
            _ => None,
        };
        rows.push((size, Summary::of(&mut samples), limit));
    }
    // Tell the server to stop, and close.
    let _ = control.write(&[&header(0, 0, u64::MAX)]).await;
    channel.close();
    control.close();
    Ok(rows)
}

/// Size, round trips, and the same run's physical limit (GB/s) where there is one.
type Row = (usize, Summary, Option<f64>);

fn report(args: &ChannelArgs, regime: &Regime, rows: &[Row]) {
    let what = if args.channel == "mpt" {
        format!("mpt ({} lanes)", args.lanes)
    } else {
        args.channel.clone()
    };
    if args.run.common.json {
        let items: Vec<String> = rows
            .iter()
            .map(|(size, s, limit)| {
                format!(
                    "{{\"size\":{size},\"round_trips\":{},\"avg_us\":{:.3},\"p50_us\":{:.3},\"p90_us\":{:.3},\"p99_us\":{:.3},\"throughput_gbps\":{:.3},\"limit_gbps\":{}}}",
                    s.count,
                    s.avg_us,
                    s.p50_us,
                    s.p90_us,
                    s.p99_us,
                    s.throughput_gbps(*size),
                    limit.map_or("null".to_string(), |l| format!("{l:.3}"))
                )
            })
            .collect();
        println!(
            "{{\"bench\":\"channel\",\"channel\":\"{}\",\"lanes\":{},\"transport\":\"{}\",\"regime\":{},\"results\":[{}]}}",
            args.channel,
            args.lanes,
            args.transport,
            regime.json(),
            items.join(",")
        );
    } else {
        println!(
            "tp bench channel --channel {what} --transport {}",
            args.transport
        );
        println!("{}", regime.line());
        #[cfg(feature = "cuda")]
        if args.channel.starts_with("cuda_") {
            println!(
                "{}",
                tp_cuda::limits::describe(args.gpu).unwrap_or_else(|e| e)
            );
        }
        println!(
            "\n{:>8} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>7}",
            "size", "round trips", "avg µs", "p50 µs", "p90 µs", "p99 µs", "GB/s", "limit", "ratio"
        );
        for (size, s, limit) in rows {
            let (l, r) = limit.map_or(("-".to_string(), "-".to_string()), |l| {
                (
                    format!("{l:.3}"),
                    format!("{:.2}", s.throughput_gbps(*size) / l.max(1e-9)),
                )
            });
            println!(
                "{:>8} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.3} {:>10} {:>7}",
                size_label(*size),
                s.count,
                s.avg_us,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.throughput_gbps(*size),
                l,
                r
            );
        }
        println!(
            "\nthroughput = 2 x size / p50 round trip (baseline.md's definition); every echo verified: {}",
            if args.verify {
                "yes"
            } else {
                "first and last of each size"
            }
        );
        println!(
            "limit = same run: hot memcpy of the size (xth), 1-thread process_vm_readv from another process (cma),"
        );
        println!(
            "        the driver's copy of the size on the GPU: device to device (cuda_xth, cuda_ipc), pinned host to device (cuda_basic)"
        );
    }
}
