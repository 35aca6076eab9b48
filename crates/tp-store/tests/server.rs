//! The TCP server against hostile and vanishing clients, and under load: a bad
//! connection is closed and costs nothing else; everyone else is served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tp_store::proto::{Command, VALIDATE_MAGIC, put_string, put_strings};
use tp_store::tcp::ServerConfig;
use tp_store::{Store, TcpStore, TcpStoreOptions, TcpStoreServer};

fn server(config: ServerConfig) -> TcpStoreServer {
    TcpStoreServer::bind("127.0.0.1", 0, config).unwrap()
}

fn client(port: u16) -> TcpStore {
    TcpStore::new(TcpStoreOptions {
        port,
        timeout: Duration::from_secs(20),
        ..TcpStoreOptions::default()
    })
    .unwrap()
}

fn raw(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

fn validated(port: u16) -> TcpStream {
    let mut s = raw(port);
    let mut b = vec![Command::Validate as u8];
    b.extend_from_slice(&VALIDATE_MAGIC.to_le_bytes());
    s.write_all(&b).unwrap();
    s
}

/// Reads until the server closes the connection; true if it did (not a timeout).
fn closed_by_server(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// Waits for the server's counters to say `n` connections were refused.
fn refused(srv: &TcpStoreServer, n: u64) {
    let start = Instant::now();
    while srv
        .stats()
        .refused
        .load(std::sync::atomic::Ordering::Relaxed)
        < n
    {
        assert!(start.elapsed() < Duration::from_secs(20), "not refused");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_port_scan_is_closed_and_others_are_served() {
    let srv = server(ServerConfig::default());
    let good = client(srv.port());
    good.set("k", b"v").unwrap();
    let mut scan = raw(srv.port());
    scan.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(closed_by_server(&mut scan));
    refused(&srv, 1);
    assert_eq!(good.get("k").unwrap(), b"v");
}

#[test]
fn a_huge_announced_length_is_refused_before_anything_is_buffered() {
    let srv = server(ServerConfig::default());
    let good = client(srv.port());
    let mut bad = validated(srv.port());
    // SET with a key of 2^62 bytes announced.
    let mut b = vec![Command::Set as u8];
    b.extend_from_slice(&(1u64 << 62).to_le_bytes());
    bad.write_all(&b).unwrap();
    assert!(closed_by_server(&mut bad));
    // A value just over PyTorch's 8 MiB limit, announced only.
    let mut bad = validated(srv.port());
    let mut b = vec![Command::Set as u8];
    put_string(&mut b, b"/k");
    b.extend_from_slice(&((8u64 << 20) + 1).to_le_bytes());
    bad.write_all(&b).unwrap();
    assert!(closed_by_server(&mut bad));
    refused(&srv, 2);
    good.set("still", b"fine").unwrap();
    assert_eq!(good.get("still").unwrap(), b"fine");
}

#[test]
fn a_half_sent_command_is_closed_after_the_request_timeout() {
    let srv = server(ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    let good = client(srv.port());
    let mut half = validated(srv.port());
    let mut b = vec![Command::Set as u8];
    put_string(&mut b, b"/k");
    b.extend_from_slice(&100u64.to_le_bytes());
    b.extend_from_slice(&[7u8; 10]); // 10 of the 100 value bytes
    half.write_all(&b).unwrap();
    // A connection that never validates, too.
    let mut silent = raw(srv.port());
    let start = Instant::now();
    assert!(closed_by_server(&mut half));
    assert!(closed_by_server(&mut silent));
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(!good.check(&["k"]).unwrap(), "the half SET was not applied");
    good.set("k", b"whole").unwrap();
    assert_eq!(good.get("k").unwrap(), b"whole");
}

#[test]
fn a_client_that_vanishes_while_waiting_costs_nothing() {
    let srv = server(ServerConfig::default());
    let good = client(srv.port());
    for _ in 0..20 {
        let mut waiter = validated(srv.port());
        let mut b = vec![Command::Wait as u8];
        put_strings(&mut b, [&b"/never"[..], b"/also-never"]);
        waiter.write_all(&b).unwrap();
        drop(waiter);
    }
    let start = Instant::now();
    while srv.stats().open.load(std::sync::atomic::Ordering::Relaxed) > 1 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "waiters not dropped"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    good.set("never", b"now").unwrap();
    assert_eq!(good.get("never").unwrap(), b"now");
}

#[test]
fn a_client_reconnects_after_its_connection_breaks() {
    let srv = server(ServerConfig::default());
    let c = client(srv.port());
    c.set("text", b"abc").unwrap();
    // ADD on text: the server closes this connection ...
    assert!(c.add("text", 1).is_err());
    // ... and the next operation connects again.
    assert_eq!(c.add("n", 2).unwrap(), 2);
    assert_eq!(c.get("text").unwrap(), b"abc");
}

#[test]
fn a_client_started_before_its_server_retries_until_it_appears() {
    // Find a free port, then start the server on it a little later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        TcpStoreServer::bind("127.0.0.1", port, ServerConfig::default()).unwrap()
    });
    let c = client(port);
    let _srv = started.join().unwrap();
    c.set("k", b"v").unwrap();
    assert_eq!(c.get("k").unwrap(), b"v");
}

#[test]
fn connecting_to_nothing_fails_within_the_timeout_with_a_network_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let start = Instant::now();
    let err = TcpStore::new(TcpStoreOptions {
        port,
        timeout: Duration::from_millis(500),
        ..TcpStoreOptions::default()
    })
    .unwrap_err();
    assert!(matches!(err, tp_store::StoreError::Network { .. }), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(err.to_string().contains(&port.to_string()), "{err}");
}

#[test]
fn the_worker_count_gates_the_server_until_every_worker_joined() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let workers: Vec<_> = (0..2)
        .map(|i| {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200 * (i + 1)));
                TcpStore::new(TcpStoreOptions {
                    port,
                    num_workers: Some(3),
                    timeout: Duration::from_secs(20),
                    ..TcpStoreOptions::default()
                })
                .unwrap()
            })
        })
        .collect();
    let start = Instant::now();
    let master = TcpStore::new(TcpStoreOptions {
        port,
        is_server: true,
        num_workers: Some(3),
        timeout: Duration::from_secs(20),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(350),
        "waited for both"
    );
    let workers: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    // `init/` is the raw key upstream uses, and it counts in num_keys.
    assert_eq!(master.num_keys().unwrap(), 1);
    drop(workers);
    // Too few workers: a timeout that says how many joined.
    let err = TcpStore::new(TcpStoreOptions {
        port: 0,
        is_server: true,
        num_workers: Some(2),
        timeout: Duration::from_millis(300),
        ..TcpStoreOptions::default()
    })
    .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(err.to_string().contains("1/2"), "{err}");
}

/// 64 clients × 1,000 mixed operations, every result checked.
#[test]
fn load_64_clients_by_1000_mixed_operations() {
    let srv = server(ServerConfig::default());
    let port = srv.port();
    let threads: Vec<_> = (0..64)
        .map(|c| {
            std::thread::spawn(move || {
                let s = client(port);
                let mut counter = 0i64;
                for i in 0..1000u32 {
                    let key = format!("c{c}/k{}", i % 10);
                    match i % 5 {
                        0 => s.set(&key, &i.to_le_bytes()).unwrap(),
                        1 => {
                            let want = (i - 1).to_le_bytes();
                            assert_eq!(s.get(&format!("c{c}/k{}", (i - 1) % 10)).unwrap(), want);
                        }
                        2 => {
                            counter += 1;
                            assert_eq!(s.add(&format!("c{c}/n"), 1).unwrap(), counter);
                            s.add("shared", 1).unwrap();
                        }
                        3 => {
                            let old = (i - 3).to_le_bytes();
                            let new = i.to_le_bytes();
                            let k = format!("c{c}/k{}", (i - 3) % 10);
                            assert_eq!(s.compare_set(&k, &old, &new).unwrap(), new);
                        }
                        _ => assert!(s.check(&[&format!("c{c}/n")]).unwrap()),
                    }
                }
                counter
            })
        })
        .collect();
    let total: i64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let s = Arc::new(client(port));
    assert_eq!(total, 64 * 200);
    assert_eq!(s.add("shared", 0).unwrap(), total);
}
