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
    for (name, why) in [
        ("carrier-pigeon", "unknown transport"),
        ("shm", "not implemented yet"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tp"))
            .args(["bench", "transport", "--transport", name, "--sizes", "8"])
            .output()
            .expect("run tp");
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{name}");
    }
}
