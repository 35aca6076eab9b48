//! `tp store` end to end: a server process, client commands, and several processes
//! rendezvousing through one server.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// A `tp store serve` child on a free port; killed on drop.
struct Served {
    child: Child,
    port: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve() -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tp"))
        .args(["store", "serve", "--host", "127.0.0.1", "--port", "0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("run tp store serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("SERVING ")
        .expect(&line)
        .to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();
    Served { child, port }
}

fn tp(port: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tp"));
    cmd.arg("store").arg(args[0]);
    cmd.args(["--port", port]);
    if !args.contains(&"--timeout") {
        cmd.args(["--timeout", "10"]);
    }
    cmd.args(&args[1..]);
    let out = cmd.output().expect("run tp store");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn store_subcommands_talk_to_a_served_store() {
    let s = serve();
    assert!(tp(&s.port, &["set", "greeting", "hello"]).0);
    let (ok, out, _) = tp(&s.port, &["get", "greeting"]);
    assert!(ok);
    assert_eq!(out.trim(), "hello");
    assert_eq!(
        tp(&s.port, &["get", "greeting", "--hex"]).1.trim(),
        "68656c6c6f"
    );
    assert_eq!(tp(&s.port, &["add", "n", "5"]).1.trim(), "5");
    assert_eq!(tp(&s.port, &["add", "n", "-7"]).1.trim(), "-2");
    assert!(tp(&s.port, &["wait", "greeting", "n"]).0);
    assert_eq!(tp(&s.port, &["num-keys"]).1.trim(), "2");
    // A wait that cannot finish says so, naming the key.
    let (ok, _, err) = tp(&s.port, &["wait", "missing", "--timeout", "0.3"]);
    assert!(!ok);
    assert!(
        err.contains("missing") && err.contains("timed out"),
        "{err}"
    );
}

#[test]
fn four_processes_rendezvous_through_one_server() {
    let s = serve();
    let ranks: Vec<_> = (0..4)
        .map(|r| {
            Command::new(env!("CARGO_BIN_EXE_tp"))
                .args(["store", "rendezvous", "--port", &s.port, "--timeout", "30"])
                .args(["--rank", &r.to_string(), "--world", "4"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let pids: Vec<String> = ranks.iter().map(|c| c.id().to_string()).collect();
    for (r, c) in ranks.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        let line = String::from_utf8(out.stdout).unwrap();
        // Every rank saw every rank's pid, in rank order.
        assert!(
            line.starts_with(&format!("RANK {r} SAW {} JOINED>=", pids.join(","))),
            "{line}"
        );
    }
    assert_eq!(tp(&s.port, &["add", "joined", "0"]).1.trim(), "4");
}
