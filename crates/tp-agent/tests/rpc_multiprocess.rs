//! RPC groups across processes: a TCPStore server in this test process, each worker a
//! `tp rpc worker` child running a scenario and reporting on stdout.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use tp_store::{Store, TcpStore, TcpStoreOptions};

/// A worker process; its stdout lines arrive on `lines`. Killed on drop.
struct Worker {
    name: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    /// Waits for a line starting with `prefix`; returns it.
    fn expect(&mut self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "{}: no {prefix:?} line ({e}); saw {:?}",
                    self.name, self.seen
                ),
            }
        }
    }

    /// Waits for the process to exit successfully.
    fn succeeds(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(Instant::now() < deadline, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn server() -> TcpStore {
    TcpStore::new(TcpStoreOptions {
        host: "127.0.0.1".into(),
        port: 0,
        is_server: true,
        timeout: Duration::from_secs(120),
        ..TcpStoreOptions::default()
    })
    .unwrap()
}

/// Starts worker `rank` (of a static group when `world` is given).
fn spawn(port: u16, rank: u32, world: Option<u32>, scenario: &str, extra: &[&str]) -> Worker {
    let name = format!("worker{rank}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tp"));
    cmd.args([
        "rpc",
        "worker",
        "--name",
        &name,
        "--rank",
        &rank.to_string(),
    ])
    .args(["--store-port", &port.to_string(), "--scenario", scenario])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    if let Some(n) = world {
        cmd.args(["--world-size", &n.to_string()]);
    }
    let mut child = cmd.spawn().expect("spawn tp rpc worker");
    let out = child.stdout.take().unwrap();
    let (tx, lines) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Worker {
        name,
        child,
        lines,
        seen: Vec::new(),
    }
}

/// The `ms=` field of a worker's line.
fn millis(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no ms= in {line:?}"))
}

const T: Duration = Duration::from_secs(120);

fn all_to_all(world: Option<u32>, n: u32, extra: &[&str]) {
    let server = server();
    let port = server.port();
    let mut workers: Vec<Worker> = (0..n)
        .map(|r| {
            if world.is_none() {
                // A dynamic group: members arrive one after another.
                std::thread::sleep(Duration::from_millis(100));
            }
            spawn(port, r, world, "all-to-all", extra)
        })
        .collect();
    for w in &mut workers {
        let line = w.expect("ALL_TO_ALL", T);
        assert_eq!(line, format!("ALL_TO_ALL ok calls={n}"));
    }
    for w in &mut workers {
        assert_eq!(w.expect("SHUTDOWN", T), "SHUTDOWN inflight_ok=20/20");
        w.succeeds(T);
    }
    // PyTorch's keys, with the TCPStore client's leading '/'.
    let is_static = if world.is_some() { "true" } else { "false" };
    assert_eq!(
        server.get("rpc_prefix_0/rpcIsStaticGroup").unwrap(),
        is_static.as_bytes()
    );
    if world.is_some() {
        assert!(server.check(&["rpc_prefix_0/shutdown/READY_ID_0"]).unwrap());
    } else {
        // Everyone left, one at a time.
        assert_eq!(
            server.get("rpc_prefix_0/names/_ALL_WORKER_INFOS").unwrap(),
            b""
        );
    }
}

#[test]
fn a_static_group_of_four_calls_all_to_all_and_shuts_down_losing_nothing() {
    all_to_all(Some(4), 4, &[]);
}

#[test]
fn a_dynamic_group_of_four_joins_calls_all_to_all_and_leaves_losing_nothing() {
    all_to_all(None, 4, &["--expect", "4"]);
}

#[test]
fn more_than_twenty_workers_form_a_group_and_call_all_to_all() {
    // PyTorch: groups of ~20 failed ("connect: Resource temporarily unavailable",
    // "too many open files").
    all_to_all(Some(24), 24, &["--threads", "2", "--sizes", "0,1000"]);
}

#[test]
fn four_workers_make_ten_thousand_concurrent_calls_each() {
    let server = server();
    let port = server.port();
    let mut workers: Vec<Worker> = (0..4)
        .map(|r| spawn(port, r, Some(4), "load", &["--calls", "10000"]))
        .collect();
    for w in &mut workers {
        let line = w.expect("LOAD", Duration::from_secs(300));
        assert!(
            line.starts_with("LOAD ok=10000/10000 "),
            "{}: {line}",
            w.name
        );
        w.succeeds(T);
    }
}

#[test]
fn a_worker_killed_mid_call_fails_its_callers_quickly_and_the_rest_go_on() {
    let server = server();
    let port = server.port();
    let mut victim = spawn(port, 3, Some(4), "serve", &[]);
    let mut survivors: Vec<Worker> = (0..3)
        .map(|r| spawn(port, r, Some(4), "survivor", &[]))
        .collect();
    victim.expect("READY", T);
    for w in &mut survivors {
        w.expect("SENT", T);
    }
    // Let the calls reach the victim's handler, then kill it.
    std::thread::sleep(Duration::from_millis(300));
    victim.child.kill().unwrap();
    let _ = victim.child.wait();
    for w in &mut survivors {
        let line = w.expect("FAILED", T);
        let ms = millis(&line);
        // The call's timeout was 30 s: the failure came from the dead pipe, not the timer.
        assert!(ms < 15_000, "{}: {line}", w.name);
        assert!(line.contains("worker3"), "{line}");
    }
    for w in &mut survivors {
        w.expect("SURVIVORS ok", T);
        w.succeeds(T);
    }
}

#[test]
fn a_worker_publishes_the_interface_tp_socket_ifname_names() {
    // Pain point: a guessed self-address peers cannot reach. TP_SOCKET_IFNAME picks the
    // interface (here loopback), and the worker checks that its address reaches it.
    let server = server();
    let port = server.port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args(["rpc", "worker", "--name", "lo-worker", "--rank", "0"])
        .args(["--world-size", "1", "--store-port", &port.to_string()])
        .args(["--scenario", "serve"])
        .env("TP_SOCKET_IFNAME", "lo")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("JOINED lo-worker url=tcp://127.0.0.1:"),
        "{line}"
    );
    let published = server.get("rpc_prefix_0/addrs/lo-worker").unwrap();
    assert!(
        line.trim_end()
            .ends_with(&*String::from_utf8_lossy(&published)),
        "{line}"
    );
}

#[test]
fn timeouts_fire_and_late_replies_are_dropped_across_processes() {
    let server = server();
    let port = server.port();
    let mut workers: Vec<Worker> = (0..4)
        .map(|r| spawn(port, r, Some(4), "timeouts", &[]))
        .collect();
    for w in &mut workers {
        let line = w.expect("TIMEOUT", T);
        let ms = millis(&line);
        assert!((150..550).contains(&ms), "{}: {line}", w.name);
        assert!(line.contains("set timeout (150 ms)"), "{line}");
        assert_eq!(w.expect("LATE", T), "LATE dropped=1 next_call=ok");
        w.succeeds(T);
    }
}

#[test]
fn bad_options_are_refused_with_what_is_wrong() {
    let server = server();
    let port = server.port().to_string();
    for (extra, want) in [
        (
            &["--threads", "0"][..],
            "num_worker_threads must be positive",
        ),
        (&["--transports", "uv"][..], "unknown transport \"uv\""),
        (
            &["--channels", "basic,basic"][..],
            "channel \"basic\" is listed twice",
        ),
        (
            &["--world-size", "2", "--rank", "5"][..],
            "rank 5 is out of range for world_size 2",
        ),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tp"));
        cmd.args(["rpc", "worker", "--name", "bad", "--store-port", &port])
            .args(["--scenario", "serve"]);
        if !extra.contains(&"--rank") {
            cmd.args(["--rank", "0"]);
        }
        let out = cmd.args(extra).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(err.contains(want), "{extra:?}: {err}");
    }
}
