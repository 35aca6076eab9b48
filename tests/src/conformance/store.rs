//! The store conformance suite: every case is written once against the [`Store`]
//! trait, then instantiated for every store (memory, file, tcp, prefix — alone and
//! nested over tcp). Each case gets two handles on one store, so that what one writes
//! the other must see (and must be woken by).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tp_store::{FileStore, MemoryStore, PrefixStore, Store, StoreError, TcpStore, TcpStoreOptions};

/// Two handles on one store, and whatever keeps it alive.
struct Fixture {
    a: Arc<dyn Store>,
    b: Arc<dyn Store>,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
    cleanup: Option<std::path::PathBuf>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(p) = &self.cleanup {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn memory() -> Fixture {
    let s: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Fixture {
        a: s.clone(),
        b: s,
        _keep: Vec::new(),
        cleanup: None,
    }
}

fn file() -> Fixture {
    static N: AtomicU64 = AtomicU64::new(0);
    let path = std::env::temp_dir().join(format!(
        "tp-store-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    Fixture {
        a: Arc::new(FileStore::new(&path, None).unwrap()),
        b: Arc::new(FileStore::new(&path, None).unwrap()),
        _keep: Vec::new(),
        cleanup: Some(path),
    }
}

fn tcp_pair() -> (Arc<TcpStore>, Arc<TcpStore>) {
    let server = TcpStore::new(TcpStoreOptions {
        port: 0,
        is_server: true,
        ..TcpStoreOptions::default()
    })
    .unwrap();
    let client = TcpStore::new(TcpStoreOptions {
        port: server.port(),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    (Arc::new(server), Arc::new(client))
}

fn tcp() -> Fixture {
    let (a, b) = tcp_pair();
    Fixture {
        a,
        b,
        _keep: Vec::new(),
        cleanup: None,
    }
}

fn prefix() -> Fixture {
    let m: Arc<dyn Store> = Arc::new(MemoryStore::new());
    Fixture {
        a: Arc::new(PrefixStore::new("p", m.clone())),
        b: Arc::new(PrefixStore::new("p", m)),
        _keep: Vec::new(),
        cleanup: None,
    }
}

fn nested_prefix_over_tcp() -> Fixture {
    let (a, b) = tcp_pair();
    let wrap = |s: Arc<TcpStore>| -> Arc<dyn Store> {
        Arc::new(PrefixStore::new(
            "inner",
            Arc::new(PrefixStore::new("outer", s)),
        ))
    };
    Fixture {
        a: wrap(a),
        b: wrap(b),
        _keep: Vec::new(),
        cleanup: None,
    }
}

/// One etcd server for the whole test process (each fixture gets its own namespace),
/// or why there is none. A shell wrapper ends it (and removes its data) once this
/// process is gone.
#[cfg(feature = "etcd")]
fn etcd_endpoint() -> Result<String, String> {
    use std::sync::OnceLock;
    static ENDPOINT: OnceLock<Result<String, String>> = OnceLock::new();
    ENDPOINT
        .get_or_init(|| {
            let free = || {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .and_then(|l| l.local_addr())
                    .map(|a| a.port())
                    .map_err(|e| e.to_string())
            };
            let (client, peer) = (free()?, free()?);
            let dir = std::env::temp_dir().join(format!("tp-etcd-{}", std::process::id()));
            let script = format!(
                "etcd --name tp --data-dir {dir} \\
                   --listen-client-urls http://127.0.0.1:{client} \\
                   --advertise-client-urls http://127.0.0.1:{client} \\
                   --listen-peer-urls http://127.0.0.1:{peer} \\
                   --initial-advertise-peer-urls http://127.0.0.1:{peer} \\
                   --initial-cluster tp=http://127.0.0.1:{peer} >{dir}.log 2>&1 &
                 E=$!
                 while kill -0 {me} 2>/dev/null && kill -0 $E 2>/dev/null; do sleep 0.5; done
                 kill $E 2>/dev/null; wait $E 2>/dev/null; rm -rf {dir} {dir}.log",
                dir = dir.display(),
                me = std::process::id()
            );
            let found = std::process::Command::new("sh")
                .args(["-c", "command -v etcd"])
                .output()
                .map_err(|e| e.to_string())?;
            if !found.status.success() {
                return Err("no `etcd` on PATH (Debian package etcd-server)".into());
            }
            std::process::Command::new("sh")
                .args(["-c", &script])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?;
            Ok(format!("http://127.0.0.1:{client}"))
        })
        .clone()
}

#[cfg(feature = "etcd")]
fn etcd() -> Fixture {
    static N: AtomicU64 = AtomicU64::new(0);
    let endpoint = etcd_endpoint().expect("checked by the case");
    let ns = format!(
        "test-{}-{}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let open = || -> Arc<dyn Store> {
        // Waiting up to 30 s for the server to come up; then the default timeout.
        let s = tp_store::EtcdStore::connect_with_timeout(&endpoint, &ns, Duration::from_secs(30))
            .unwrap();
        s.set_timeout(tp_store::DEFAULT_TIMEOUT);
        Arc::new(s)
    };
    Fixture {
        a: open(),
        b: open(),
        _keep: Vec::new(),
        cleanup: None,
    }
}

/// Whether etcd cases can run here; prints why not (and fails where
/// `TP_REQUIRE_ETCD=1`).
#[cfg(feature = "etcd")]
fn etcd_here() -> bool {
    match etcd_endpoint() {
        Ok(_) => true,
        Err(why) => {
            assert!(
                std::env::var("TP_REQUIRE_ETCD").as_deref() != Ok("1"),
                "TP_REQUIRE_ETCD=1 but {why}"
            );
            eprintln!("SKIPPED: etcd store conformance: {why}");
            false
        }
    }
}

/// Runs `case` with a deadline, so that a hang fails.
fn run(make: fn() -> Fixture, case: fn(&Fixture)) {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let f = make();
        case(&f);
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("case panicked or did not finish within 60 s (a hang)");
}

/// Does `f` on another thread after `ms`.
fn later(ms: u64, f: impl FnOnce() + Send + 'static) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        thread::sleep(Duration::from_millis(ms));
        f();
    })
}

fn set_then_get_across_handles(f: &Fixture) {
    f.a.set("k", b"value").unwrap();
    assert_eq!(f.b.get("k").unwrap(), b"value");
    f.a.set("k", b"").unwrap();
    assert_eq!(f.b.get("k").unwrap(), b"", "empty values are values");
    let binary: Vec<u8> = (0..=255).collect();
    f.b.set("bin", &binary).unwrap();
    assert_eq!(f.a.get("bin").unwrap(), binary);
}

fn get_waits_for_a_later_set(f: &Fixture) {
    let b = f.b.clone();
    let t = later(100, move || b.set("late", b"here").unwrap());
    assert_eq!(f.a.get("late").unwrap(), b"here");
    t.join().unwrap();
}

fn get_times_out_naming_the_key_and_the_time(f: &Fixture) {
    f.a.set_timeout(Duration::from_millis(200));
    let start = Instant::now();
    let err = f.a.get("never").unwrap_err();
    let waited = start.elapsed();
    assert!(err.is_timeout(), "{err}");
    assert!(waited >= Duration::from_millis(190), "{waited:?}");
    let text = err.to_string();
    assert!(text.contains("never") && text.contains("0.2"), "{text}");
    // The handle still works after a timeout.
    f.b.set("after", b"1").unwrap();
    assert_eq!(f.a.get("after").unwrap(), b"1");
}

fn add_counts_in_decimal_and_refuses_non_numbers(f: &Fixture) {
    assert_eq!(f.a.add("c", 5).unwrap(), 5);
    assert_eq!(f.b.add("c", -7).unwrap(), -2);
    assert_eq!(f.a.get("c").unwrap(), b"-2");
    f.a.set("text", b"hello").unwrap();
    let err = f.a.add("text", 1).unwrap_err();
    assert!(matches!(err, StoreError::NotANumber { .. }), "{err}");
    assert!(err.to_string().contains("text"), "{err}");
    // Nothing changed, and the handle still works.
    assert_eq!(f.a.get("text").unwrap(), b"hello");
    assert_eq!(f.a.add("c", 2).unwrap(), 0);
}

fn compare_set_follows_c10d(f: &Fixture) {
    // Missing key, non-empty expected: returns expected, sets nothing.
    assert_eq!(f.a.compare_set("cas", b"x", b"y").unwrap(), b"x");
    assert!(!f.a.check(&["cas"]).unwrap());
    // Missing key, empty expected: sets desired.
    assert_eq!(f.a.compare_set("cas", b"", b"v1").unwrap(), b"v1");
    // Present, mismatch: returns the current value.
    assert_eq!(f.b.compare_set("cas", b"nope", b"v2").unwrap(), b"v1");
    // Present, match.
    assert_eq!(f.b.compare_set("cas", b"v1", b"v2").unwrap(), b"v2");
    assert_eq!(f.a.get("cas").unwrap(), b"v2");
}

fn delete_removes_once(f: &Fixture) {
    f.a.set("d", b"1").unwrap();
    assert!(f.b.delete_key("d").unwrap());
    assert!(!f.b.delete_key("d").unwrap());
    assert!(!f.a.check(&["d"]).unwrap());
    f.a.set_timeout(Duration::from_millis(50));
    assert!(f.a.get("d").unwrap_err().is_timeout());
}

fn check_does_not_wait(f: &Fixture) {
    f.a.set_timeout(Duration::from_secs(30));
    let start = Instant::now();
    assert!(!f.a.check(&["x", "y"]).unwrap());
    f.b.set("x", b"").unwrap();
    assert!(!f.a.check(&["x", "y"]).unwrap());
    f.b.set("y", b"").unwrap();
    assert!(f.a.check(&["x", "y"]).unwrap());
    assert!(f.a.check(&[]).unwrap());
    assert!(start.elapsed() < Duration::from_secs(10));
}

fn wait_for_several_keys_woken_by_set_add_and_append(f: &Fixture) {
    let b = f.b.clone();
    let t = later(50, move || {
        b.set("w1", b"").unwrap();
        thread::sleep(Duration::from_millis(30));
        b.add("w2", 1).unwrap();
        thread::sleep(Duration::from_millis(30));
        b.append("w3", b"x").unwrap();
    });
    f.a.wait(&["w1", "w2", "w3"], Some(Duration::from_secs(20)))
        .unwrap();
    t.join().unwrap();
    // Already there: returns at once, even with a tiny timeout.
    f.a.wait(&["w1", "w2"], Some(Duration::from_millis(1)))
        .unwrap();
}

fn wait_times_out_with_the_keys_named(f: &Fixture) {
    f.a.set("have", b"").unwrap();
    let start = Instant::now();
    let err =
        f.a.wait(&["have", "missing"], Some(Duration::from_millis(150)))
            .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(start.elapsed() >= Duration::from_millis(140));
    assert!(err.to_string().contains("missing"), "{err}");
    // A wait that timed out leaves the handle usable, even when the key arrives just
    // after (over TCP: the late STOP_WAITING must not be taken for a later reply).
    f.b.set("missing", b"").unwrap();
    f.a.set("n", b"7").unwrap();
    assert_eq!(f.a.get("n").unwrap(), b"7");
    f.a.wait(&["missing"], Some(Duration::from_secs(5)))
        .unwrap();
}

fn zero_timeout_waits_forever(f: &Fixture) {
    assert_eq!(f.a.timeout(), tp_store::DEFAULT_TIMEOUT);
    f.a.set_timeout(Duration::ZERO);
    assert_eq!(f.a.timeout(), Duration::ZERO);
    let b = f.b.clone();
    let t = later(400, move || b.set("z", b"ok").unwrap());
    // Zero is "forever", not "fail at once".
    assert_eq!(f.a.get("z").unwrap(), b"ok");
    t.join().unwrap();
    f.a.wait(&["z"], Some(Duration::ZERO)).unwrap();
}

fn num_keys_counts_what_was_set(f: &Fixture) {
    let n0 = f.a.num_keys().unwrap();
    f.a.set("n1", b"").unwrap();
    f.b.set("n2", b"").unwrap();
    assert_eq!(f.a.num_keys().unwrap(), n0 + 2);
    f.b.delete_key("n1").unwrap();
    assert_eq!(f.b.num_keys().unwrap(), n0 + 1);
}

fn append_creates_then_concatenates(f: &Fixture) {
    f.a.append("ap", b"ab").unwrap();
    f.b.append("ap", b"cd").unwrap();
    assert_eq!(f.a.get("ap").unwrap(), b"abcd");
}

fn multi_get_and_multi_set(f: &Fixture) {
    f.a.multi_set(&[("m1", b"one"), ("m2", b""), ("m3", b"three")])
        .unwrap();
    assert_eq!(
        f.b.multi_get(&["m3", "m1", "m2"]).unwrap(),
        vec![b"three".to_vec(), b"one".to_vec(), vec![]]
    );
    // multi_get waits for every key.
    let b = f.b.clone();
    let t = later(50, move || b.set("m4", b"4").unwrap());
    assert_eq!(
        f.a.multi_get(&["m1", "m4"]).unwrap(),
        vec![b"one".to_vec(), b"4".to_vec()]
    );
    t.join().unwrap();
}

fn queues_are_fifo_and_pop_blocks_or_refuses(f: &Fixture) {
    assert_eq!(f.a.queue_len("q").unwrap(), 0);
    f.a.queue_push("q", b"1").unwrap();
    f.b.queue_push("q", b"2").unwrap();
    f.a.queue_push("q", b"3").unwrap();
    assert_eq!(f.b.queue_len("q").unwrap(), 3);
    assert!(
        f.b.check(&["q"]).unwrap(),
        "a non-empty queue counts for check"
    );
    assert_eq!(f.b.queue_pop("q", false).unwrap(), b"1");
    assert_eq!(f.a.queue_pop("q", true).unwrap(), b"2");
    assert_eq!(f.b.queue_pop("q", false).unwrap(), b"3");
    let err = f.a.queue_pop("q", false).unwrap_err();
    assert!(matches!(err, StoreError::QueueEmpty { .. }), "{err}");
    // A blocking pop waits for a push.
    let b = f.b.clone();
    let t = later(100, move || b.queue_push("q", b"late").unwrap());
    assert_eq!(f.a.queue_pop("q", true).unwrap(), b"late");
    t.join().unwrap();
    // ... up to the timeout.
    f.a.set_timeout(Duration::from_millis(100));
    assert!(f.a.queue_pop("q", true).unwrap_err().is_timeout());
    // Values and queues live apart.
    assert!(!f.a.check(&["q"]).unwrap());
}

fn concurrent_adds_are_atomic(f: &Fixture) {
    let threads: Vec<_> = (0..4)
        .map(|i| {
            let s = if i % 2 == 0 { f.a.clone() } else { f.b.clone() };
            thread::spawn(move || {
                for _ in 0..50 {
                    s.add("sum", 1).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(f.a.add("sum", 0).unwrap(), 200);
}

fn large_values_round_trip(f: &Fixture) {
    let big: Vec<u8> = (0..(1 << 20)).map(|i: u32| (i * 31 % 251) as u8).collect();
    f.a.set("big", &big).unwrap();
    assert_eq!(f.b.get("big").unwrap(), big);
}

macro_rules! store_conformance {
    ($backend:ident, $make:expr) => {
        store_conformance!($backend, $make, || true);
    };
    ($backend:ident, $make:expr, $here:expr) => {
        mod $backend {
            use super::*;

            store_conformance!(@cases $make, $here;
                set_then_get_across_handles, get_waits_for_a_later_set,
                get_times_out_naming_the_key_and_the_time,
                add_counts_in_decimal_and_refuses_non_numbers, compare_set_follows_c10d,
                delete_removes_once, check_does_not_wait,
                wait_for_several_keys_woken_by_set_add_and_append,
                wait_times_out_with_the_keys_named, zero_timeout_waits_forever,
                num_keys_counts_what_was_set, append_creates_then_concatenates,
                multi_get_and_multi_set, queues_are_fifo_and_pop_blocks_or_refuses,
                concurrent_adds_are_atomic, large_values_round_trip);
        }
    };
    (@cases $make:expr, $here:expr; $($case:ident),*) => {
        $(
            #[test]
            fn $case() {
                if $here() {
                    run($make, super::$case);
                }
            }
        )*
    };
}

store_conformance!(memory, memory);
store_conformance!(file, file);
store_conformance!(tcp, tcp);
store_conformance!(prefix, prefix);
store_conformance!(nested_prefix_over_tcp, nested_prefix_over_tcp);
#[cfg(feature = "etcd")]
store_conformance!(etcd, etcd, etcd_here);
