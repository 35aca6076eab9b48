//! `tp bench limits`: this machine's physical limits, and the raw-socket reference
//! (`tp bench raw-server`) that other benchmarks measure their regime against.
//!
//! Raw TCP runs across two processes, like baseline.md's C programs: this one and a
//! `tp bench raw-server` child, with blocking std sockets and `TCP_NODELAY`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::CommonArgs;
use crate::stats::{Summary, size_label};

/// The block header both echo servers understand: size, count, kind.
pub(crate) const PINGPONG: u64 = 0;
pub(crate) const STREAM: u64 = 1;
pub(crate) const END: u64 = 2;

pub(crate) fn header(size: usize, count: usize, kind: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..8].copy_from_slice(&(size as u64).to_le_bytes());
    h[8..16].copy_from_slice(&(count as u64).to_le_bytes());
    h[16..].copy_from_slice(&kind.to_le_bytes());
    h
}

pub(crate) fn parse_header(h: &[u8; 24]) -> (usize, usize, u64) {
    let word = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap_or_default());
    (word(0) as usize, word(8) as usize, word(16))
}

/// Runs the raw echo server: prints `LISTENING <addr>`, serves one connection.
pub(crate) fn raw_server() -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    println!(
        "LISTENING {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    std::io::stdout().flush().ok();
    let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    loop {
        let mut h = [0u8; 24];
        if s.read_exact(&mut h).is_err() {
            return Ok(());
        }
        let (size, count, kind) = parse_header(&h);
        buf.resize(size, 0);
        match kind {
            PINGPONG => {
                for _ in 0..count {
                    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
                    s.write_all(&buf).map_err(|e| e.to_string())?;
                }
            }
            STREAM => {
                for _ in 0..count {
                    s.read_exact(&mut buf).map_err(|e| e.to_string())?;
                }
                s.write_all(&[1]).map_err(|e| e.to_string())?;
            }
            _ => return Ok(()),
        }
    }
}

/// Spawns `tp <args>` and waits for its `LISTENING <addr>` line.
pub(crate) fn spawn_server(args: &[&str]) -> Result<(Child, String), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("spawning the server: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout from the server")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .ok_or_else(|| format!("server said {line:?}"))?
        .to_string();
    Ok((child, addr))
}

/// A raw TCP client connected to a fresh `tp bench raw-server` child.
pub(crate) struct RawTcp {
    child: Child,
    stream: TcpStream,
}

impl RawTcp {
    pub(crate) fn start() -> Result<Self, String> {
        let (child, addr) = spawn_server(&["bench", "raw-server"])?;
        let stream = TcpStream::connect(&addr).map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        Ok(Self { child, stream })
    }

    /// `count` round trips of `size` bytes; returns each one's duration.
    pub(crate) fn pingpong(&mut self, size: usize, count: usize) -> Result<Vec<Duration>, String> {
        let mut buf = vec![0x5au8; size];
        self.stream
            .write_all(&header(size, count, PINGPONG))
            .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let t = Instant::now();
            self.stream.write_all(&buf).map_err(|e| e.to_string())?;
            self.stream
                .read_exact(&mut buf)
                .map_err(|e| e.to_string())?;
            out.push(t.elapsed());
        }
        Ok(out)
    }

    /// Streams `total` bytes in `chunk`-byte writes; returns GB/s.
    pub(crate) fn stream(&mut self, chunk: usize, total: usize) -> Result<f64, String> {
        let count = (total / chunk).max(1);
        let buf = vec![0xa5u8; chunk];
        self.stream
            .write_all(&header(chunk, count, STREAM))
            .map_err(|e| e.to_string())?;
        let t = Instant::now();
        for _ in 0..count {
            self.stream.write_all(&buf).map_err(|e| e.to_string())?;
        }
        let mut ack = [0u8; 1];
        self.stream
            .read_exact(&mut ack)
            .map_err(|e| e.to_string())?;
        Ok((count * chunk) as f64 / t.elapsed().as_secs_f64() / 1e9)
    }
}

impl Drop for RawTcp {
    fn drop(&mut self) {
        let _ = self.stream.write_all(&header(0, 0, END));
        let _ = self.child.wait();
    }
}

/// The regime indicator every benchmark prints: raw TCP 8 B ping-pong p50 across two
/// processes, as baseline.md's sentinel (see [`sentinel_p50_us`]) — measured before the rows
/// and, for benchmarks that print it after them, again after.
///
/// The readings can differ from each other and from the rows' own raw columns (see
/// [`sentinel_p50_us`] for why); when the two disagree the label says "mixed", and the
/// rows are to be classed by their own raw column where they have one.
#[derive(Clone, Copy)]
pub(crate) struct Regime {
    pub(crate) tcp_8b_p50_us: f64,
    end_us: Option<f64>,
}

/// The sentinel's reading: a fresh pair (a server process), 100 round trips of warm-up,
/// 1,500 measured.
///
/// Where the scheduler puts the pair decides the reading as much as the VM does: on an
/// idle VM a wake-up that lands on the other, idle CPU takes ~54 µs, but a freshly
/// spawned server often stays on its parent's CPU, and one ping-pong on one CPU reads
/// 13–16 µs (as `taskset -c 0` shows). Session 21 saw readings of 13 µs before or
/// after the rows of runs whose own raw columns read 54–70 µs. Pinning the two ends
/// apart fixes the idle reading but reads ~40 µs under a busy VM too (the woken end
/// must preempt the load), so it cannot tell the regimes apart either; taking the
/// slowest of three fresh pairs did not help (they all stay together). Hence two
/// readings, a "mixed" label when they disagree, and rows classed by their own raw
/// columns where a benchmark has them.
fn sentinel_p50_us() -> Result<f64, String> {
    let mut raw = RawTcp::start()?;
    raw.pingpong(8, 100)?;
    let mut s = raw.pingpong(8, 1500)?;
    Ok(Summary::of(&mut s).p50_us)
}

/// baseline.md: ≈12 µs when the VM is busy, ≈54 µs when idle.
fn label_of(us: f64) -> &'static str {
    if us < 30.0 { "busy VM" } else { "idle VM" }
}

impl Regime {
    /// The reading before the rows.
    pub(crate) fn measure() -> Result<Self, String> {
        Ok(Self {
            tcp_8b_p50_us: sentinel_p50_us()?,
            end_us: None,
        })
    }

    /// Adds the reading after the rows.
    pub(crate) fn ended(mut self) -> Result<Self, String> {
        self.end_us = Some(sentinel_p50_us()?);
        Ok(self)
    }

    pub(crate) fn label(&self) -> &'static str {
        let start = label_of(self.tcp_8b_p50_us);
        match self.end_us.map(label_of) {
            Some(end) if end != start => "mixed",
            _ => start,
        }
    }

    pub(crate) fn json(&self) -> String {
        let end = self.end_us.map_or(String::new(), |us| {
            format!(",\"tcp_8b_p50_us_after\":{us:.2}")
        });
        format!(
            "{{\"tcp_8b_p50_us\":{:.2}{end},\"label\":\"{}\"}}",
            self.tcp_8b_p50_us,
            self.label()
        )
    }

    pub(crate) fn line(&self) -> String {
        let readings = match self.end_us {
            Some(end) => format!(
                "{:.1} µs before the rows, {end:.1} µs after",
                self.tcp_8b_p50_us
            ),
            None => format!("{:.1} µs", self.tcp_8b_p50_us),
        };
        let label = match self.label() {
            "mixed" => "mixed: the two readings disagree; class rows by their own raw column",
            label => label,
        };
        format!(
            "regime: raw TCP 8 B ping-pong p50 {readings} -> {label} (baseline.md: ~12 µs busy, ~54 µs idle)"
        )
    }
}

/// Hot-buffer memcpy bandwidth, best of 5 repetitions of ~4 GB. The buffers are
/// page-aligned with the destination offset by half a page: heap buffers that share a
/// page offset make `rep movsb` crawl on this CPU (4K aliasing), which measures the
/// allocator, not the machine.
pub(crate) fn memcpy_gbps(size: usize) -> f64 {
    let mut src_buf = vec![0x11u8; size + 8192];
    let mut dst_buf = vec![0u8; size + 8192];
    let src_at = src_buf.as_ptr().align_offset(4096);
    let dst_at = dst_buf.as_ptr().align_offset(4096) + 2048;
    let src = &mut src_buf[src_at..src_at + size];
    src.fill(0x11);
    let src = &*src;
    let dst = &mut dst_buf[dst_at..dst_at + size];
    let reps = (4_000_000_000 / size).clamp(4, 100_000);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..reps {
            dst.copy_from_slice(std::hint::black_box(src));
            std::hint::black_box(&mut *dst);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    (size * reps) as f64 / best / 1e9
}

pub(crate) fn run(args: &CommonArgs) -> Result<(), String> {
    let regime = Regime::measure()?;
    let mut rows: Vec<(String, f64, &str)> = Vec::new();
    for size in [64 << 10, 1 << 20, 16 << 20, 64 << 20] {
        rows.push((
            format!("memcpy {} (hot buffers)", size_label(size)),
            memcpy_gbps(size),
            "GB/s",
        ));
    }
    let mut raw = RawTcp::start()?;
    for size in [8usize, 1024, 65536] {
        raw.pingpong(size, 100)?;
        let mut s = raw.pingpong(size, if size > 1024 { 5_000 } else { 20_000 })?;
        rows.push((
            format!("tcp loopback (NODELAY) {} RTT p50", size_label(size)),
            Summary::of(&mut s).p50_us,
            "µs",
        ));
    }
    {
        let mut s = eventfd_pingpong(20_000)?;
        rows.push((
            "eventfd ping-pong, 2 processes, RTT p50".to_string(),
            Summary::of(&mut s).p50_us,
            "µs",
        ));
    }
    for chunk in [64 << 10, 1 << 20] {
        raw.stream(chunk, 256 << 20)?;
        let gbps = raw.stream(chunk, 2 << 30)?;
        rows.push((
            format!("tcp loopback stream, {} chunks", size_label(chunk)),
            gbps,
            "GB/s",
        ));
    }
    drop(raw);
    for size in [1 << 20, 16 << 20, 64 << 20] {
        rows.push((
            format!("process_vm_readv, 1 thread, {}", size_label(size)),
            cma_gbps(size)?,
            "GB/s",
        ));
    }
    let regime = regime.ended()?;
    let gpu = gpu_rows(&mut rows);
    if args.json {
        let items: Vec<String> = rows
            .iter()
            .map(|(k, v, u)| format!("{{\"quantity\":\"{k}\",\"value\":{v:.3},\"unit\":\"{u}\"}}"))
            .collect();
        println!(
            "{{\"bench\":\"limits\",\"regime\":{},\"gpu\":\"{}\",\"results\":[{}]}}",
            regime.json(),
            gpu.replace('"', "'"),
            items.join(",")
        );
    } else {
        println!("tp bench limits\n{}\ngpu: {gpu}\n", regime.line());
        for (k, v, u) in rows {
            println!("{k:<44} {v:>10.2} {u}");
        }
    }
    Ok(())
}

/// The CUDA driver's copy bandwidths on `cuda:0` (the CUDA channels' ceilings), added
/// to `rows`; returns the GPU's description, or why there is none.
#[cfg(feature = "cuda")]
fn gpu_rows(rows: &mut Vec<(String, f64, &str)>) -> String {
    use tp_cuda::limits::{Copy, copy_gbps, describe};
    if let Err(why) = tp_cuda::available() {
        return format!("none (CUDA rows skipped: {why})");
    }
    for (copy, what) in [
        (Copy::DeviceToDevice, "device to device"),
        (Copy::HostToDevice, "pinned host to device"),
        (Copy::DeviceToHost, "device to pinned host"),
    ] {
        for size in [1 << 20, 16 << 20, 64 << 20] {
            match copy_gbps(0, copy, size, 20) {
                Ok(g) => rows.push((
                    format!("cuda:0 copy {what}, {}", size_label(size)),
                    g,
                    "GB/s",
                )),
                Err(e) => return format!("cuda:0: the copy failed: {e}"),
            }
        }
    }
    describe(0).unwrap_or_else(|e| e)
}

/// Without the cargo feature `cuda`: no CUDA rows.
#[cfg(not(feature = "cuda"))]
fn gpu_rows(_: &mut Vec<(String, f64, &str)>) -> String {
    "none (this build has no CUDA support)".to_string()
}

/// Ping-pongs an eventfd pair with a child process; returns each round trip.
///
/// The child takes the parent's eventfds with `pidfd_getfd` (same user, no Yama here),
/// then echoes: it blocks reading "ping", writes "pong", until it reads the stop value.
fn eventfd_pingpong(count: usize) -> Result<Vec<Duration>, String> {
    use std::os::fd::AsRawFd;

    use rustix::event::{EventfdFlags, eventfd};
    let ping = eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| e.to_string())?;
    let pong = eventfd(0, EventfdFlags::CLOEXEC).map_err(|e| e.to_string())?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args([
            "bench",
            "eventfd-peer",
            "--pid",
            &std::process::id().to_string(),
            "--fds",
        ])
        .args([ping.as_raw_fd().to_string(), pong.as_raw_fd().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().ok_or("no stdout")?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if line.trim() != "READY" {
        let _ = child.kill();
        return Err(format!("eventfd peer: {line:?}"));
    }
    let mut buf = [0u8; 8];
    let mut out = Vec::with_capacity(count);
    for i in 0..count + 100 {
        let t = Instant::now();
        rustix::io::write(&ping, &1u64.to_ne_bytes()).map_err(|e| e.to_string())?;
        rustix::io::read(&pong, &mut buf).map_err(|e| e.to_string())?;
        if i >= 100 {
            out.push(t.elapsed());
        }
    }
    rustix::io::write(&ping, &STOP.to_ne_bytes()).map_err(|e| e.to_string())?;
    let _ = child.wait();
    Ok(out)
}

const STOP: u64 = 1 << 40;

/// The child side of [`eventfd_pingpong`].
pub(crate) fn eventfd_peer(pid: i32, fds: &[i32]) -> Result<(), String> {
    use rustix::process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open};
    let pid = Pid::from_raw(pid).ok_or("bad pid")?;
    let pidfd = pidfd_open(pid, PidfdFlags::empty()).map_err(|e| format!("pidfd_open: {e}"))?;
    let take = |fd: Option<&i32>| -> Result<std::os::fd::OwnedFd, String> {
        let fd = *fd.ok_or("missing fd")?;
        pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| format!("pidfd_getfd: {e}"))
    };
    let ping = take(fds.first())?;
    let pong = take(fds.get(1))?;
    println!("READY");
    std::io::stdout().flush().ok();
    let mut buf = [0u8; 8];
    loop {
        rustix::io::read(&ping, &mut buf).map_err(|e| e.to_string())?;
        if u64::from_ne_bytes(buf) >= STOP {
            return Ok(());
        }
        rustix::io::write(&pong, &1u64.to_ne_bytes()).map_err(|e| e.to_string())?;
    }
}

/// Holds `size` bytes and prints `BUFFER <pid> <address>`; exits when stdin closes.
pub(crate) fn cma_peer(size: usize) -> Result<(), String> {
    let buf = vec![0x5au8; size];
    println!("BUFFER {} {}", std::process::id(), buf.as_ptr() as u64);
    std::io::stdout().flush().ok();
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(buf);
    Ok(())
}

/// Raw single-thread `process_vm_readv` bandwidth from a child process's buffer of
/// `size` bytes into a hot local one: best of 5 repetitions of ~2 GB.
pub(crate) fn cma_gbps(size: usize) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["bench", "cma-peer", "--size", &size.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawning the cma peer: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout from the cma peer")?;
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let mut words = line.split_whitespace();
    let (Some("BUFFER"), Some(pid), Some(addr)) = (words.next(), words.next(), words.next()) else {
        return Err(format!("cma peer said {line:?}"));
    };
    let pid: u32 = pid.parse().map_err(|_| "bad pid")?;
    let addr: u64 = addr.parse().map_err(|_| "bad address")?;
    let mut dst = vec![0u8; size];
    let reps = (2_000_000_000 / size).clamp(4, 10_000);
    let mut best = f64::MAX;
    let result = (|| {
        tp_channel::cma::pull_from(pid, addr, &mut dst).map_err(|e| e.to_string())?;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                tp_channel::cma::pull_from(pid, addr, &mut dst).map_err(|e| e.to_string())?;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok::<_, String>((size * reps) as f64 / best / 1e9)
    })();
    drop(child.stdin.take());
    let _ = child.wait();
    result
}
