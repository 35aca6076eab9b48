//! `tp bench transport`: the original's `benchmark_transport`, on tp's transports.
//!
//! The connecting end writes `size` bytes and reads them back, timing each round trip;
//! the listening end echoes. Sizes are run in order; each gets 5 warm-up round trips,
//! then a calibrated count that takes about `--seconds` (or `--round-trips`).
//!
//! From 64 KiB up, each size also **streams**: the connecting end writes messages of
//! that size back to back (about `--seconds` worth, at least 64 MiB) and the listening
//! end reads each into its buffer, then acknowledges with one byte; raw blocking TCP
//! does the same with the same chunk size in the same run. That is the "raw loopback
//! TCP streaming" the throughput targets compare against, at equal buffer sizes (a
//! 64 MiB buffer does not fit in cache; a 1 MiB one does, so the two are not
//! comparable).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tp_transport::{Connection, Transport};

use crate::limits::{PINGPONG, RawTcp, Regime, STREAM, header, parse_header, spawn_server};
use crate::stats::{Summary, parse_sizes, size_label};
use crate::{Mode, PingPongArgs};

#[derive(Debug, Args)]
pub(crate) struct TransportArgs {
    /// Which transport.
    #[arg(long, default_value = "tcp")]
    transport: String,
    #[command(flatten)]
    run: PingPongArgs,
    /// shm: which peers may connect.
    #[arg(long, value_enum, default_value = "same-uid")]
    shm_peer: ShmPeer,
}

/// Which peers an shm end accepts.
#[derive(Clone, Copy, Debug, Eq, PartialEq, clap::ValueEnum)]
enum ShmPeer {
    /// Only processes of the same user (SO_PEERCRED).
    SameUid,
    /// Anyone who can reach the socket.
    AnyUid,
}

fn make(name: &str, shm_peer: ShmPeer) -> Result<Arc<dyn Transport>, String> {
    match name {
        "tcp" => Ok(Arc::new(tp_transport::tcp::TcpTransport::new())),
        "shm" => {
            use tp_transport::shm::{PeerCheck, ShmConfig, ShmTransport};
            let peer_check = match shm_peer {
                ShmPeer::SameUid => PeerCheck::SameUid,
                ShmPeer::AnyUid => PeerCheck::AnyUid,
            };
            let t = ShmTransport::new(ShmConfig {
                peer_check,
                ..ShmConfig::default()
            });
            t.viability().map_err(|e| e.to_string())?;
            Ok(Arc::new(t))
        }
        "ibv" => make_ibv(),
        other => Err(format!(
            "unknown transport {other:?} (known: tcp, shm, ibv)"
        )),
    }
}

#[cfg(feature = "ibv")]
fn make_ibv() -> Result<Arc<dyn Transport>, String> {
    let t = tp_transport::ibv::IbvTransport::default();
    t.viability().map_err(|e| e.to_string())?;
    Ok(Arc::new(t))
}

#[cfg(not(feature = "ibv"))]
fn make_ibv() -> Result<Arc<dyn Transport>, String> {
    Err("transport ibv needs tp built with the `ibv` cargo feature".to_string())
}

/// Where a listener binds by default: loopback for tcp (and ibv's TCP bootstrap), a
/// fresh name for shm.
fn default_bind(transport: &str) -> &'static str {
    if transport == "shm" {
        ""
    } else {
        "127.0.0.1:0"
    }
}

pub(crate) fn run(args: &TransportArgs) -> Result<(), String> {
    let transport = make(&args.transport, args.shm_peer)?;
    match args.run.mode {
        Mode::Listen => listen(
            &transport,
            args.run
                .address
                .as_deref()
                .unwrap_or(default_bind(&args.transport)),
        ),
        Mode::Connect => {
            let addr = args
                .run
                .address
                .as_deref()
                .ok_or("--mode connect needs --address")?;
            connect(&transport, addr, args)
        }
        Mode::Both => {
            let regime = Regime::measure()?;
            let bind = args
                .run
                .address
                .clone()
                .unwrap_or_else(|| default_bind(&args.transport).into());
            let (mut child, addr) = spawn_server(&[
                "bench",
                "transport",
                "--transport",
                &args.transport,
                "--mode",
                "listen",
                "--address",
                &bind,
            ])?;
            let result =
                connect_and_report(&transport, &addr, args, Some(regime), Some(child.id()));
            let _ = child.wait();
            result
        }
    }
}

fn listen(transport: &Arc<dyn Transport>, address: &str) -> Result<(), String> {
    let listener = transport.listen(address).map_err(|e| e.to_string())?;
    println!("LISTENING {}", listener.address());
    async_io::block_on(async {
        let conn = listener.accept().await.map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        loop {
            let mut h = [0u8; 24];
            if conn.read_exact(&mut h).await.is_err() {
                return Ok(());
            }
            let (size, count, kind) = parse_header(&h);
            buf.resize(size, 0);
            match kind {
                PINGPONG => {
                    for _ in 0..count {
                        conn.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                        conn.write(&[&buf]).await.map_err(|e| e.to_string())?;
                    }
                }
                STREAM => {
                    for _ in 0..count {
                        conn.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
                    }
                    conn.write(&[&[1]]).await.map_err(|e| e.to_string())?;
                }
                _ => return Ok(()),
            }
        }
    })
}

async fn block(
    conn: &dyn Connection,
    buf: &mut [u8],
    count: usize,
) -> Result<Vec<Duration>, String> {
    conn.write(&[&header(buf.len(), count, PINGPONG)])
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        conn.write(&[buf]).await.map_err(|e| e.to_string())?;
        conn.read_exact(buf).await.map_err(|e| e.to_string())?;
        out.push(t.elapsed());
    }
    Ok(out)
}

/// Streams `count` messages of `buf.len()` bytes; returns GB/s (one way).
async fn stream(conn: &dyn Connection, buf: &[u8], count: usize) -> Result<f64, String> {
    conn.write(&[&header(buf.len(), count, STREAM)])
        .await
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    for _ in 0..count {
        conn.write(&[buf]).await.map_err(|e| e.to_string())?;
    }
    let mut ack = [0u8; 1];
    conn.read_exact(&mut ack).await.map_err(|e| e.to_string())?;
    Ok((count * buf.len()) as f64 / t.elapsed().as_secs_f64() / 1e9)
}

/// Sizes from here up also stream.
const STREAM_FROM: usize = 64 << 10;

fn connect(transport: &Arc<dyn Transport>, addr: &str, args: &TransportArgs) -> Result<(), String> {
    let regime = Regime::measure()?;
    connect_and_report(transport, addr, args, Some(regime), None)
}

fn connect_and_report(
    transport: &Arc<dyn Transport>,
    addr: &str,
    args: &TransportArgs,
    regime: Option<Regime>,
    server_pid: Option<u32>,
) -> Result<(), String> {
    let sizes = parse_sizes(&args.run.sizes)?;
    let mut raw = RawTcp::start()?;
    let rows = async_io::block_on(async {
        let conn = transport.connect(addr).await.map_err(|e| e.to_string())?;
        let mut rows = Vec::new();
        for &size in &sizes {
            let mut buf = vec![0x3cu8; size];
            let warm = block(conn.as_ref(), &mut buf, 5).await?;
            let est = warm.iter().sum::<Duration>().as_secs_f64() / 5.0;
            let count = args
                .run
                .round_trips
                .unwrap_or(((args.run.seconds / est.max(1e-9)) as usize).clamp(20, 300_000));
            let mut samples = block(conn.as_ref(), &mut buf, count).await?;
            // The reference: raw blocking TCP, same size and count, same run.
            let mut raw_samples = raw.pingpong(size, count.min(20_000))?;
            let streams = if size >= STREAM_FROM {
                // About --seconds of one-way traffic at the ping-pong's rate, >= 64 MiB.
                let rate = 2.0 * size as f64 / est.max(1e-9);
                let total = ((rate * args.run.seconds) as usize).clamp(64 << 20, 4 << 30);
                let n = (total / size).max(4);
                let tp = stream(conn.as_ref(), &buf, n).await?;
                let raw = raw.stream(size, n * size)?;
                Some((tp, raw))
            } else {
                None
            };
            rows.push((
                size,
                Summary::of(&mut samples),
                Summary::of(&mut raw_samples),
                streams,
            ));
        }
        // Idle pair: both ends hold a pending read for IDLE and should sleep, not spin.
        let before = (
            cpu_ticks("self"),
            server_pid.map(|p| cpu_ticks(&p.to_string())),
        );
        let mut one = [0u8; 1];
        let read = conn.read_exact(&mut one);
        let _ = futures::future::select(read, async_io::Timer::after(IDLE)).await;
        let after = (
            cpu_ticks("self"),
            server_pid.map(|p| cpu_ticks(&p.to_string())),
        );
        let idle = IdleCpu::new(before, after);
        // The abandoned read broke the connection; the server sees it end and exits.
        drop(conn);
        Ok::<_, String>((rows, idle))
    })?;
    let (rows, idle) = rows;
    let regime = regime.map(Regime::ended).transpose()?;
    if args.run.common.json {
        let items: Vec<String> = rows
            .iter()
            .map(|(size, s, raw, streams)| {
                let (st, raw_st) = streams.map_or(("null".to_string(), "null".to_string()), |(a, b)| {
                    (format!("{a:.3}"), format!("{b:.3}"))
                });
                format!(
                    "{{\"size\":{size},\"round_trips\":{},\"avg_us\":{:.3},\"p50_us\":{:.3},\"p90_us\":{:.3},\"p99_us\":{:.3},\"throughput_gbps\":{:.3},\"raw_tcp_p50_us\":{:.3},\"raw_tcp_throughput_gbps\":{:.3},\"stream_gbps\":{st},\"raw_tcp_stream_gbps\":{raw_st}}}",
                    s.count,
                    s.avg_us,
                    s.p50_us,
                    s.p90_us,
                    s.p99_us,
                    s.throughput_gbps(*size),
                    raw.p50_us,
                    raw.throughput_gbps(*size)
                )
            })
            .collect();
        let regime = regime.as_ref().map_or("null".to_string(), Regime::json);
        println!(
            "{{\"bench\":\"transport\",\"transport\":\"{}\",\"regime\":{regime},\"idle_cpu_percent\":{{\"client\":{:.2},\"server\":{}}},\"results\":[{}]}}",
            args.transport,
            idle.client,
            idle.server
                .map_or("null".to_string(), |v| format!("{v:.2}")),
            items.join(",")
        );
    } else {
        println!("tp bench transport --transport {}", args.transport);
        if let Some(r) = regime {
            println!("{}", r.line());
        }
        println!(
            "\n{:>8} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>12} {:>9} {:>10} {:>10} {:>8}",
            "size",
            "round trips",
            "avg µs",
            "p50 µs",
            "p90 µs",
            "p99 µs",
            "GB/s",
            "raw p50 µs",
            "p50/raw",
            "stream",
            "raw stream",
            "ratio"
        );
        for (size, s, raw, streams) in rows {
            let (st, raw_st, ratio) = streams.map_or(
                ("-".to_string(), "-".to_string(), "-".to_string()),
                |(a, b)| {
                    (
                        format!("{a:.3}"),
                        format!("{b:.3}"),
                        format!("{:.2}", a / b.max(1e-9)),
                    )
                },
            );
            println!(
                "{:>8} {:>11} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>9.3} {:>12.2} {:>9.2} {:>10} {:>10} {:>8}",
                size_label(size),
                s.count,
                s.avg_us,
                s.p50_us,
                s.p90_us,
                s.p99_us,
                s.throughput_gbps(size),
                raw.p50_us,
                s.p50_us / raw.p50_us.max(1e-9),
                st,
                raw_st,
                ratio
            );
        }
        println!(
            "\nidle pair, {} s with a read pending on each end: client {:.2}% of a core, server {}",
            IDLE.as_secs(),
            idle.client,
            idle.server
                .map_or("not measured (--mode connect)".to_string(), |v| format!(
                    "{v:.2}% of a core"
                ))
        );
        println!(
            "throughput = 2 x size / p50 round trip (baseline.md's definition); raw = blocking TCP ping-pong between two processes, same run"
        );
        println!(
            "stream = one-way GB/s writing messages of this size back to back; raw stream = blocking TCP, same chunk size, same run"
        );
    }
    Ok(())
}

const IDLE: Duration = Duration::from_secs(3);

/// CPU time (user + system, clock ticks) of `/proc/<pid>`, or 0 if unreadable.
fn cpu_ticks(pid: &str) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the parenthesised command name come state (field 3) ... utime (14), stime (15).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

/// CPU use of both ends over the idle window, in percent of one core.
struct IdleCpu {
    client: f64,
    server: Option<f64>,
}

impl IdleCpu {
    fn new(before: (u64, Option<u64>), after: (u64, Option<u64>)) -> Self {
        // Linux reports these in USER_HZ = 100 ticks per second.
        let pct = |ticks: u64| ticks as f64 / 100.0 / IDLE.as_secs_f64() * 100.0;
        Self {
            client: pct(after.0.saturating_sub(before.0)),
            server: before.1.zip(after.1).map(|(b, a)| pct(a.saturating_sub(b))),
        }
    }
}
