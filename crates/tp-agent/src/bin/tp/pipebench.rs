//! `tp bench pipe`: the original's `benchmark_pipe`, on tp's pipes.
//!
//! The connecting end writes a message (`--payloads` × `--payload-size`,
//! `--tensors` × each `--tensor-sizes`, `--metadata-size` bytes of metadata), then
//! reads the echo, timing each round trip; the listening end reads each message into
//! its own buffers and writes them back. The listening end is the pipe's server, so its
//! priorities decide: `--transport` is the only transport it listens on and
//! `--channel` goes first among its channels. Both ends are spawned unless `--mode` is
//! given; every size's first and last echo is checked byte for byte. Tensors name
//! their target device (CPU), as the original's benchmark does, so no descriptor reply
//! has to travel back before the tensors go.
//!
//! Over tcp, each size's run is followed at once by a raw blocking TCP ping-pong of the
//! message's bytes between two other processes (as many round trips, at most 20,000):
//! the physical limit of that shape in the same run, which the table sets beside it
//! ("raw µs", "÷ raw").

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tp_agent::{Allocation, Context, Message, Payload, Pipe, Tensor};
use tp_channel::Device;

use crate::echo::{echo, pattern, reuse};
use crate::limits::{RawTcp, Regime, spawn_server};
use crate::stats::{Summary, parse_sizes, size_label};
use crate::{Mode, PingPongArgs};

#[derive(Clone, Debug, Args)]
pub(crate) struct PipeArgs {
    /// Transport the listening end offers: tcp or shm.
    #[arg(long, default_value = "tcp")]
    transport: String,
    /// Channel the listening end ranks first: basic, xth, cma, mpt.
    #[arg(long, default_value = "basic")]
    channel: String,
    /// Payloads per message.
    #[arg(long, default_value_t = 0)]
    payloads: usize,
    /// Bytes per payload.
    #[arg(long, default_value_t = 0)]
    payload_size: usize,
    /// Tensors per message.
    #[arg(long, default_value_t = 1)]
    tensors: usize,
    /// Metadata bytes per message.
    #[arg(long, default_value_t = 0)]
    metadata_size: usize,
    /// mpt: lanes per channel, both ends (default: the context's, 2). The original's
    /// benchmark read this from `TP_MPT_LANES`.
    #[arg(long)]
    lanes: Option<usize>,
    /// Draw throughput against size into this SVG file.
    #[arg(long)]
    plot: Option<String>,
    #[command(flatten)]
    run: PingPongArgs,
}

fn context(args: &PipeArgs, name: &str) -> Result<Arc<Context>, String> {
    let mut builder = Context::builder(name);
    if let Some(lanes) = args.lanes {
        let mpt = tp_channel::mpt::MptContext::new(tp_channel::mpt::MptConfig {
            lanes,
            ..Default::default()
        });
        builder = builder.channel(1100, Arc::new(mpt));
    }
    builder
        .priority(&args.channel, 1_000_000)
        .build()
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

fn listen_url(transport: &str) -> Result<&'static str, String> {
    match transport {
        "tcp" => Ok("tcp://127.0.0.1:0"),
        "shm" => Ok("shm://"),
        other => Err(format!("unknown transport {other:?} (known: tcp, shm)")),
    }
}

pub(crate) fn run(args: &PipeArgs) -> Result<(), String> {
    let url = listen_url(&args.transport)?;
    match args.run.mode {
        Mode::Listen => {
            let ctx = context(args, "bench-server")?;
            let listener = ctx.listen(&[url]).map_err(|e| e.to_string())?;
            println!("LISTENING {}", listener.urls()[0]);
            std::io::stdout().flush().ok();
            // The echo runs on the context's I/O thread, as the original's callbacks
            // run on its loop thread: a completion runs the next step without a
            // thread wake-up in between.
            let served = ctx.spawn(async move {
                let pipe = listener.accept().await.map_err(|e| e.to_string())?;
                echo(&pipe).await;
                Ok(())
            });
            futures::executor::block_on(served).map_err(|_| "the echo task panicked".to_string())?
        }
        Mode::Connect => {
            let addr = args
                .run
                .address
                .clone()
                .ok_or("--mode connect needs --address (the listener's URL)")?;
            let regime = Regime::measure()?;
            let rows = client(args, &addr)?;
            report(args, &regime.ended()?, &rows)
        }
        Mode::Both => {
            let regime = Regime::measure()?;
            let lanes = args.lanes.map(|n| n.to_string());
            let mut child_args = vec![
                "bench",
                "pipe",
                "--mode",
                "listen",
                "--transport",
                &args.transport,
                "--channel",
                &args.channel,
            ];
            if let Some(n) = &lanes {
                child_args.extend(["--lanes", n]);
            }
            let (mut child, addr) = spawn_server(&child_args)?;
            let rows = client(args, &addr);
            let status = child.wait().map_err(|e| e.to_string())?;
            let rows = rows?;
            if !status.success() {
                return Err(format!("the serving process failed: {status}"));
            }
            report(args, &regime.ended()?, &rows)
        }
    }
}

fn message(args: &PipeArgs, tensor_size: usize, seed: u8) -> Message {
    Message {
        metadata: pattern(args.metadata_size, seed),
        payloads: (0..args.payloads)
            .map(|k| Payload {
                data: pattern(args.payload_size, seed.wrapping_add(k as u8)),
                metadata: Vec::new(),
            })
            .collect(),
        tensors: (0..args.tensors)
            .map(|k| Tensor {
                data: Box::new(pattern(tensor_size, seed.wrapping_add(50 + k as u8))),
                target_device: Some(Device::CPU),
                metadata: Vec::new(),
            })
            .collect(),
    }
}

/// The buffers a run keeps between round trips, as the original's benchmark
/// preallocates its own: the message written (handed back by each write) and the
/// allocation read into. Neither is built nor freed inside a timed round trip —
/// freeing a 64 MiB message there (an `munmap` of 16,384 pages) took milliseconds.
#[derive(Default)]
struct Kept {
    sent: Option<Message>,
    spare: Option<Allocation>,
}

/// One round trip; checks the echo when `check`. A checked round trip writes a
/// message built afresh from `seed` (untimed), so an echo that left stale bytes in the
/// reused buffers is caught; the others write the kept message again.
async fn round_trip(
    pipe: &Pipe,
    args: &PipeArgs,
    size: usize,
    seed: u8,
    check: bool,
    kept: &mut Kept,
) -> Result<Duration, String> {
    let msg = match kept.sent.take() {
        Some(m) if !check => m,
        _ => message(args, size, seed),
    };
    let t = Instant::now();
    let (msg, w) = pipe.write(msg).await;
    w.map_err(|e| format!("write: {e}"))?;
    let incoming = pipe.read_descriptor().await.map_err(|e| e.to_string())?;
    let alloc = reuse(kept.spare.take(), &incoming.descriptor)?;
    let (alloc, r) = pipe.read(incoming, alloc).await;
    r.map_err(|e| format!("read: {e}"))?;
    let took = t.elapsed();
    if check {
        let payloads_ok = alloc
            .payloads
            .iter()
            .zip(&msg.payloads)
            .all(|(a, b)| *a == b.data);
        let tensors_ok = alloc
            .tensors
            .iter()
            .zip(&msg.tensors)
            .all(|(a, b)| a.bytes() == b.data.bytes());
        if !(payloads_ok && tensors_ok) {
            return Err(format!("the echo at {} differs", size_label(size)));
        }
    }
    kept.sent = Some(msg);
    kept.spare = Some(alloc);
    Ok(took)
}

/// A size, tp's round trips, and (over tcp) the raw TCP ping-pong of the same bytes.
type Row = (usize, Summary, Option<Summary>);

fn client(args: &PipeArgs, url: &str) -> Result<Vec<Row>, String> {
    let sizes = parse_sizes(&args.run.sizes)?;
    let ctx = context(args, "bench-client")?;
    let pipe = ctx.connect(url).map_err(|e| e.to_string())?;
    let args = args.clone();
    let raw = match args.transport.as_str() {
        "tcp" => Some(RawTcp::start()?),
        _ => None,
    };
    // On the context's I/O thread, like the echo (see `run`). The raw ping-pongs block
    // that thread between sizes, while the pipe is idle.
    futures::executor::block_on(ctx.spawn(async move {
        let rows = rounds(&pipe, &args, &sizes, raw).await;
        pipe.close();
        rows
    }))
    .map_err(|_| "the benchmark task panicked".to_string())?
}

async fn rounds(
    pipe: &Pipe,
    args: &PipeArgs,
    sizes: &[usize],
    mut raw: Option<RawTcp>,
) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let mut kept = Kept::default();
    for &size in sizes {
        // Warm up for at least 5 round trips and 50 ms (the first ones set buffers and
        // caches up, so they say little about the rest), then size the run from it.
        let warm_started = Instant::now();
        let mut warm = 0u32;
        while warm < 5 || warm_started.elapsed() < Duration::from_millis(50) {
            round_trip(pipe, args, size, warm as u8, warm == 0, &mut kept).await?;
            warm += 1;
        }
        // Both ends must have agreed on the lane count, or the handshake fell back to
        // another channel and the run would measure that one.
        if args.lanes.is_some() && !pipe.channel_names().iter().any(|c| c == "mpt") {
            return Err(format!(
                "--lanes was given but the handshake chose {:?}, not mpt",
                pipe.channel_names()
            ));
        }
        let est = warm_started.elapsed().as_secs_f64() / f64::from(warm);
        let count = args
            .run
            .round_trips
            .unwrap_or(((args.run.seconds / est.max(1e-9)) as usize).clamp(10, 1_000_000));
        let mut samples = Vec::with_capacity(count);
        let started = Instant::now();
        let mut shown = Instant::now();
        for i in 0..count {
            let seed = i as u8;
            samples.push(round_trip(pipe, args, size, seed, i + 1 == count, &mut kept).await?);
            if !args.run.common.json && shown.elapsed() > Duration::from_millis(500) {
                shown = Instant::now();
                eprint!(
                    "\r{:>8}: {:>6}/{count} round trips, {:.0} s",
                    size_label(size),
                    i + 1,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        if !args.run.common.json && started.elapsed() > Duration::from_millis(500) {
            eprint!("\r{:60}\r", "");
        }
        let raw = match raw.as_mut() {
            Some(raw) => {
                let mut r = raw.pingpong(message_bytes(args, size).max(1), count.min(20_000))?;
                Some(Summary::of(&mut r))
            }
            None => None,
        };
        rows.push((size, Summary::of(&mut samples), raw));
    }
    Ok::<_, String>(rows)
}

/// Bytes moved one way per message (payloads, tensors and metadata; not the framing).
fn message_bytes(args: &PipeArgs, tensor_size: usize) -> usize {
    args.payloads * args.payload_size + args.tensors * tensor_size + args.metadata_size
}

fn report(args: &PipeArgs, regime: &Regime, rows: &[Row]) -> Result<(), String> {
    let bytes = |size: usize| message_bytes(args, size);
    let raw_p50 = |raw: &Option<Summary>| raw.as_ref().map(|r| r.p50_us);
    if args.run.common.json {
        let items: Vec<String> = rows
            .iter()
            .map(|(size, s, raw)| {
                let num = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.3}"));
                format!(
                    "{{\"tensor_size\":{size},\"round_trips\":{},\"avg_us\":{:.3},\"p50_us\":{:.3},\"p75_us\":{:.3},\"p90_us\":{:.3},\"p99_us\":{:.3},\"throughput_gbps\":{:.3},\"raw_tcp_p50_us\":{},\"p50_vs_raw_tcp\":{}}}",
                    s.count,
                    s.avg_us,
                    s.p50_us,
                    s.p75_us,
                    s.p90_us,
                    s.p99_us,
                    s.throughput_gbps(bytes(*size)),
                    num(raw_p50(raw)),
                    num(raw_p50(raw).map(|r| s.p50_us / r.max(1e-9)))
                )
            })
            .collect();
        println!(
            "{{\"bench\":\"pipe\",\"transport\":\"{}\",\"channel\":\"{}\",\"lanes\":{},\"payloads\":{},\"payload_size\":{},\"tensors\":{},\"metadata_size\":{},\"regime\":{},\"results\":[{}]}}",
            args.transport,
            args.channel,
            args.lanes.map_or("null".to_string(), |n| n.to_string()),
            args.payloads,
            args.payload_size,
            args.tensors,
            args.metadata_size,
            regime.json(),
            items.join(",")
        );
    } else {
        println!(
            "tp bench pipe --transport {} --channel {}{} ({} x {} B payloads, {} tensor(s), {} B metadata)",
            args.transport,
            args.channel,
            args.lanes
                .map_or(String::new(), |n| format!(" --lanes {n}")),
            args.payloads,
            args.payload_size,
            args.tensors,
            args.metadata_size
        );
        println!("{}", regime.line());
        println!(
            "\n{:>8} {:>11} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>10} {:>8}",
            "tensor",
            "round trips",
            "avg µs",
            "p50 µs",
            "p75 µs",
            "p90 µs",
            "p99 µs",
            "GB/s",
            "raw µs",
            "÷ raw"
        );
        for (size, s, raw) in rows {
            let (raw_us, ratio) = raw_p50(raw).map_or(("-".to_string(), "-".to_string()), |r| {
                (format!("{r:.2}"), format!("{:.2}x", s.p50_us / r.max(1e-9)))
            });
            println!(
                "{:>8} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.3} {:>10} {:>8}",
                size_label(*size),
                s.count,
                s.avg_us,
                s.p50_us,
                s.p75_us,
                s.p90_us,
                s.p99_us,
                s.throughput_gbps(bytes(*size)),
                raw_us,
                ratio
            );
        }
        println!("\nthroughput = 2 x message bytes / p50 round trip (baseline.md's definition)");
        if args.transport == "tcp" {
            println!(
                "raw = p50 of a blocking TCP ping-pong of the message's bytes between two processes, right after that size's run; ÷ raw = p50 / raw"
            );
        }
    }
    if let Some(path) = &args.plot {
        let points: Vec<(usize, f64)> = rows
            .iter()
            .map(|(size, s, _)| (*size, s.throughput_gbps(bytes(*size))))
            .collect();
        let title = format!(
            "tp bench pipe: {} + {} (throughput vs tensor size)",
            args.transport, args.channel
        );
        std::fs::write(path, svg(&title, &points)).map_err(|e| format!("{path}: {e}"))?;
        if !args.run.common.json {
            println!("plot written to {path}");
        }
    }
    Ok(())
}

/// A small line chart: log2 size on x, GB/s on y.
fn svg(title: &str, points: &[(usize, f64)]) -> String {
    let (w, h, m) = (640.0, 400.0, 60.0);
    let xs: Vec<f64> = points
        .iter()
        .map(|(s, _)| (*s.max(&1) as f64).log2())
        .collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let ymax = points.iter().map(|(_, y)| *y).fold(0.0, f64::max).max(1e-9) * 1.1;
    let sx = |x: f64| m + (x - xmin) / (xmax - xmin).max(1e-9) * (w - 2.0 * m);
    let sy = |y: f64| h - m - y / ymax * (h - 2.0 * m);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"14\">{}</text>\n",
        w / 2.0,
        title.replace('&', "&amp;").replace('<', "&lt;")
    );
    out.push_str(&format!(
        "<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n",
        h - m,
        w - m,
        h - m,
        h - m
    ));
    for k in 0..=4 {
        let y = ymax * f64::from(k) / 4.0;
        out.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.2}</text>\n",
            m - 6.0,
            sy(y) + 4.0
        ));
    }
    out.push_str(&format!(
        "<text x=\"16\" y=\"{}\" transform=\"rotate(-90 16 {})\" text-anchor=\"middle\">GB/s</text>\n",
        h / 2.0,
        h / 2.0
    ));
    let mut path = String::new();
    for (i, ((size, y), x)) in points.iter().zip(&xs).enumerate() {
        let (px, py) = (sx(*x), sy(*y));
        path.push_str(&format!(
            "{}{px:.1},{py:.1} ",
            if i == 0 { "M" } else { "L" }
        ));
        out.push_str(&format!(
            "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"steelblue\"/>\n<text x=\"{px:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            h - m + 18.0,
            size_label(*size)
        ));
    }
    out.push_str(&format!(
        "<path d=\"{}\" fill=\"none\" stroke=\"steelblue\" stroke-width=\"2\"/>\n</svg>\n",
        path.trim_end()
    ));
    out
}
