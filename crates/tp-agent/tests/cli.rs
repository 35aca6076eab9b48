//! The `tp` tool end to end: a short transport benchmark with both ends spawned.

use std::process::Command;

#[test]
fn bench_transport_tcp_runs_both_ends_and_prints_json() {
    let out = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args([
            "bench",
            "transport",
            "--transport",
            "tcp",
            "--sizes",
            "8,64K",
            "--round-trips",
            "20",
            "--json",
        ])
        .output()
        .expect("run tp");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(
        json.starts_with("{\"bench\":\"transport\",\"transport\":\"tcp\""),
        "{json}"
    );
    assert_eq!(json.matches("\"round_trips\":20").count(), 2, "{json}");
    assert!(json.contains("\"regime\":{\"tcp_8b_p50_us\":"), "{json}");
}

#[test]
fn bench_transport_rejects_unknown_and_unbuilt_transports() {
    // With the `ibv` feature, this machine (no RDMA device) must say why ibv is not
    // viable; without it, that the feature is missing.
    let ibv_why = if cfg!(feature = "ibv") {
        "not viable"
    } else {
        "`ibv` cargo feature"
    };
    for (name, why) in [("carrier-pigeon", "unknown transport"), ("ibv", ibv_why)] {
        if name == "ibv"
            && cfg!(feature = "ibv")
            && std::path::Path::new("/sys/class/infiniband_verbs").exists()
        {
            continue; // an RDMA machine: ibv may well work
        }
        let out = Command::new(env!("CARGO_BIN_EXE_tp"))
            .args(["bench", "transport", "--transport", name, "--sizes", "8"])
            .output()
            .expect("run tp");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{name}");
    }
}

#[test]
fn bench_transport_shm_runs_both_ends() {
    let out = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args([
            "bench",
            "transport",
            "--transport",
            "shm",
            "--sizes",
            "8,4M",
            "--round-trips",
            "20",
            "--json",
        ])
        .output()
        .expect("run tp");
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert_eq!(json.matches("\"round_trips\":20").count(), 2, "{json}");
}

/// A peer process killed while this side has operations pending: they fail with EOF,
/// promptly, for every transport.
#[test]
fn killed_peer_fails_pending_operations() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    use tp_transport::{ErrorKind, Transport};

    let transports: [(&str, Box<dyn Transport>); 2] = [
        ("tcp", Box::new(tp_transport::tcp::TcpTransport::new())),
        ("shm", Box::new(tp_transport::shm::ShmTransport::default())),
    ];
    for (name, transport) in transports {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tp"))
            .args([
                "bench",
                "transport",
                "--transport",
                name,
                "--mode",
                "listen",
            ])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn listener");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line.trim().strip_prefix("LISTENING ").unwrap().to_string();
        let conn = async_io::block_on(transport.connect(&addr)).expect("connect");
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            child.kill().unwrap();
            child.wait().unwrap();
        });
        let start = Instant::now();
        let mut reads = [[0u8; 8]; 3];
        let results = async_io::block_on(futures::future::join_all(
            reads.iter_mut().map(|b| conn.read_exact(b)),
        ));
        killer.join().unwrap();
        for r in results {
            assert_eq!(r.unwrap_err().kind(), ErrorKind::Eof, "{name}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{name}: took {:?}",
            start.elapsed()
        );
    }
}

/// shm admits only peers of the same user unless told otherwise: a peer running as
/// `nobody` is refused by a default listener and admitted by an `AnyUid` one.
#[test]
fn shm_listener_checks_the_peer_uid() {
    use std::time::Duration;

    use tp_transport::Transport;
    use tp_transport::shm::{PeerCheck, ShmConfig, ShmTransport};

    let root = std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    let setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !root || !setpriv {
        eprintln!("skipped: running a peer as another user needs root and setpriv");
        return;
    }
    for (peer_check, admitted) in [(PeerCheck::SameUid, false), (PeerCheck::AnyUid, true)] {
        let t = ShmTransport::new(ShmConfig {
            peer_check,
            ..ShmConfig::default()
        });
        let listener = t.listen("").unwrap();
        let mut child = Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                env!("CARGO_BIN_EXE_tp"),
            ])
            .args([
                "bench",
                "transport",
                "--transport",
                "shm",
                "--mode",
                "connect",
                "--shm-peer",
                "any-uid",
            ])
            .args([
                "--address",
                listener.address(),
                "--sizes",
                "8",
                "--round-trips",
                "1",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawn peer as nobody");
        let accepted = async_io::block_on(futures::future::select(
            listener.accept(),
            async_io::Timer::after(Duration::from_secs(10)),
        ));
        let got_conn = matches!(accepted, futures::future::Either::Left((Ok(_), _)));
        drop(accepted);
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(got_conn, admitted, "peer check {peer_check:?}");
    }
}

/// Runs `tp bench channel` between two processes (xth: two threads) with every echo
/// compared byte for byte; returns its JSON.
fn bench_channel(extra: &[&str]) -> String {
    let mut args = vec![
        "bench",
        "channel",
        "--sizes",
        "1,4K,1M,17M",
        "--round-trips",
        "3",
        "--verify",
        "--json",
    ];
    args.extend_from_slice(extra);
    let out = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args(&args)
        .output()
        .expect("run tp");
    assert!(
        out.status.success(),
        "{extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.starts_with("{\"bench\":\"channel\""), "{json}");
    assert_eq!(json.matches("\"round_trips\":3").count(), 4, "{json}");
    json
}

#[test]
fn cma_moves_verified_tensors_between_two_processes_over_shm() {
    use tp_channel::ChannelContext;
    if let Err(e) = tp_channel::cma::CmaContext::default().viability() {
        eprintln!("SKIPPED: {e}");
        return;
    }
    let json = bench_channel(&["--channel", "cma", "--transport", "shm"]);
    // The same run measured raw process_vm_readv for the sizes from 64 KiB up.
    assert_eq!(json.matches("\"limit_gbps\":null").count(), 2, "{json}");
}

#[test]
fn mpt_moves_verified_tensors_between_two_processes_over_three_lanes() {
    let json = bench_channel(&["--channel", "mpt", "--lanes", "3"]);
    assert!(json.contains("\"lanes\":3"), "{json}");
}

#[test]
fn basic_and_xth_move_verified_tensors() {
    bench_channel(&["--channel", "basic", "--transport", "shm"]);
    bench_channel(&["--channel", "xth"]);
}

#[test]
fn bench_channel_rejects_unknown_channels() {
    let out = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args(["bench", "channel", "--channel", "carrier-pigeon"])
        .output()
        .expect("run tp");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown channel"));
}

/// The README's first command: two processes, one pipe, every byte checked.
#[test]
fn demo_moves_verified_tensors_between_two_processes() {
    let out = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args(["demo", "--sizes", "1K,3M", "--round-trips", "2"])
        .output()
        .expect("run tp");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Same machine, same user: shm is always viable here; cma when the probe allows.
    assert!(
        stdout.contains("handshake chose transport shm and channel(s) "),
        "{stdout}"
    );
    // Two sizes over the pipe, then two sizes to each of the RPC group's four workers.
    let (pipe_part, rpc_part) = stdout
        .split_once("an RPC group of 4 workers")
        .unwrap_or_else(|| panic!("no RPC part: {stdout}"));
    assert_eq!(pipe_part.matches("   yes").count(), 2, "{stdout}");
    assert_eq!(rpc_part.matches("   yes").count(), 8, "{stdout}");
    for w in ["worker0", "worker1", "worker2", "worker3"] {
        assert!(rpc_part.contains(&format!("{w:>8}    1 KiB")), "{stdout}");
    }
}

/// `--lanes` reaches both ends: the run fails unless the handshake chose mpt, which it
/// can only do when the two ends' lane counts agree. Tensors of 4 KiB and 3 MiB take
/// both of mpt's paths (the waiting task's, the lane threads').
#[test]
fn bench_pipe_sets_mpt_lanes_on_both_ends() {
    let run = |channel: &str| {
        Command::new(env!("CARGO_BIN_EXE_tp"))
            .args(["bench", "pipe", "--transport", "tcp", "--channel", channel])
            .args(["--lanes", "3", "--sizes", "4K,3M", "--round-trips", "5"])
            .arg("--json")
            .output()
            .expect("run tp")
    };
    let out = run("mpt");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(json.contains("\"channel\":\"mpt\",\"lanes\":3"), "{json}");
    // Over tcp each size has its raw TCP ping-pong of the same bytes beside it.
    let raws: Vec<f64> = json
        .split("\"raw_tcp_p50_us\":")
        .skip(1)
        .map(|rest| rest.split(',').next().unwrap().parse().expect("a number"))
        .collect();
    assert_eq!(raws.len(), 2, "{json}");
    assert!(raws.iter().all(|&us| us > 0.0), "{json}");
    // basic goes first there: the lanes say nothing, and the run says so.
    let out = run("basic");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not mpt"), "{err}");
}

#[test]
fn bench_pipe_runs_both_ends_and_draws_its_plot() {
    use tp_channel::ChannelContext;
    // cma goes first when it works; basic carries the tensors otherwise.
    let channel = if tp_channel::cma::CmaContext::default().is_viable() {
        "cma"
    } else {
        "basic"
    };
    let plot = std::env::temp_dir().join(format!("tp-bench-pipe-{}.svg", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args([
            "bench",
            "pipe",
            "--transport",
            "shm",
            "--channel",
            channel,
            "--payloads",
            "2",
            "--payload-size",
            "100",
            "--tensors",
            "2",
            "--metadata-size",
            "16",
            "--sizes",
            "1K,2M",
            "--round-trips",
            "10",
            "--json",
            "--plot",
        ])
        .arg(&plot)
        .output()
        .expect("run tp");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json = String::from_utf8(out.stdout).unwrap();
    assert!(
        json.starts_with("{\"bench\":\"pipe\",\"transport\":\"shm\""),
        "{json}"
    );
    assert_eq!(json.matches("\"round_trips\":10").count(), 2, "{json}");
    // No raw TCP reference over shm.
    assert_eq!(json.matches("\"raw_tcp_p50_us\":null").count(), 2, "{json}");
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("2 MiB"), "{svg}");
    let _ = std::fs::remove_file(&plot);
}

/// cuda_ipc between two processes, cuda_basic over shm between two processes, and
/// cuda_xth: GPU buffers both ends, every echo compared, the driver's copy as the limit.
#[cfg(feature = "cuda")]
#[test]
fn cuda_channels_move_verified_gpu_tensors_between_two_processes() {
    let what = "cli::cuda_channels_move_verified_gpu_tensors_between_two_processes";
    if tp_cuda::gpus_or_skip(what).is_none() {
        return;
    }
    for channel in [
        &["--channel", "cuda_ipc"][..],
        &["--channel", "cuda_basic", "--transport", "shm"],
        &["--channel", "cuda_xth"],
    ] {
        let json = bench_channel(channel);
        // The same run measured the driver's copy for the sizes from 64 KiB up.
        assert_eq!(json.matches("\"limit_gbps\":null").count(), 2, "{json}");
    }
}

/// `tp demo --cuda`: with a GPU, two processes move GPU tensors over a CUDA channel;
/// without one, it fails saying why (and nothing panics).
#[cfg(feature = "cuda")]
#[test]
fn cuda_demo_moves_gpu_tensors_or_says_why_not() {
    let out = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args(["demo", "--cuda", "--sizes", "1K,9M", "--round-trips", "2"])
        .output()
        .expect("run tp");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    if tp_cuda::gpus_or_skip("cli::cuda_demo_moves_gpu_tensors (its GPU half)").is_some() {
        assert!(out.status.success(), "{stdout}\n{stderr}");
        assert!(stdout.contains("cuda_ipc"), "{stdout}");
        let (pipe_part, _) = stdout.split_once("an RPC group").unwrap_or_default();
        assert_eq!(pipe_part.matches("   yes").count(), 2, "{stdout}");
    } else {
        assert!(!out.status.success());
        assert!(stderr.contains("tp demo --cuda needs a GPU"), "{stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}
