//! What the TCP client puts on the wire, byte for byte, against a fake server: the
//! handshake PyTorch's own test expects, and a `set` as store-and-agent.md §1.4.6
//! shows it (followed by tp's confirming PING).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use tp_store::{Store, TcpStore, TcpStoreOptions};

fn read_n(s: &mut std::net::TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b).unwrap();
    b
}

#[test]
fn the_client_sends_pytorchs_bytes() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // VALIDATE + magic, then PING + the pid as nonce.
        assert_eq!(read_n(&mut s, 5), [0x00, 0xCE, 0xF7, 0x85, 0x3C]);
        let ping = read_n(&mut s, 5);
        assert_eq!(ping[0], 0x0D);
        assert_eq!(ping[1..], std::process::id().to_le_bytes());
        s.write_all(&ping[1..]).unwrap();
        // set("k", b"v"): SET, "/k", "v" ...
        let set = read_n(&mut s, 1 + 8 + 2 + 8 + 1);
        let mut want = vec![0x01, 2, 0, 0, 0, 0, 0, 0, 0, b'/', b'k'];
        want.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0, b'v']);
        assert_eq!(set, want);
        // ... then the confirming PING, answered.
        let confirm = read_n(&mut s, 5);
        assert_eq!(confirm[0], 0x0D);
        s.write_all(&confirm[1..]).unwrap();
        // add("c", 5): ADD, "/c", 5 → reply 5.
        let add = read_n(&mut s, 1 + 8 + 2 + 8);
        let mut want = vec![0x04, 2, 0, 0, 0, 0, 0, 0, 0, b'/', b'c'];
        want.extend_from_slice(&5i64.to_le_bytes());
        assert_eq!(add, want);
        s.write_all(&5i64.to_le_bytes()).unwrap();
        // get("c"): WAIT [/c] (answered STOP_WAITING), then GET /c (answered "5").
        let wait = read_n(&mut s, 1 + 8 + 8 + 2);
        let mut want = vec![0x06, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0];
        want.extend_from_slice(b"/c");
        assert_eq!(wait, want);
        s.write_all(&[0]).unwrap();
        let get = read_n(&mut s, 1 + 8 + 2);
        assert_eq!(get, [0x03, 2, 0, 0, 0, 0, 0, 0, 0, b'/', b'c']);
        s.write_all(&[1, 0, 0, 0, 0, 0, 0, 0, b'5']).unwrap();
    });
    let store = TcpStore::new(TcpStoreOptions {
        port,
        timeout: Duration::from_secs(20),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    store.set("k", b"v").unwrap();
    assert_eq!(store.add("c", 5).unwrap(), 5);
    assert_eq!(store.get("c").unwrap(), b"5");
    fake.join().unwrap();
}

#[test]
fn a_wait_that_times_out_cancels_and_reads_past_a_crossing_stop_waiting() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let _hello = read_n(&mut s, 5);
        let ping = read_n(&mut s, 5);
        s.write_all(&ping[1..]).unwrap();
        // WAIT [/k]: no answer until the client cancels ...
        let _wait = read_n(&mut s, 1 + 8 + 8 + 2);
        assert_eq!(read_n(&mut s, 1), [0x0C], "CANCEL_WAIT");
        // ... and the STOP_WAITING crossed the cancel: 0, then WAIT_CANCELED.
        s.write_all(&[0, 1]).unwrap();
        // The connection is in step: the next request is a clean CHECK.
        let check = read_n(&mut s, 1 + 8 + 8 + 2);
        assert_eq!(check[0], 0x05);
        s.write_all(&[0]).unwrap();
    });
    let store = TcpStore::new(TcpStoreOptions {
        port,
        timeout: Duration::from_secs(20),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    let err = store
        .wait(&["k"], Some(Duration::from_millis(200)))
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(store.check(&["k"]).unwrap());
    fake.join().unwrap();
}

#[test]
fn a_server_that_never_answers_costs_a_timeout_not_a_hang() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _hello = read_n(&mut s, 5);
        let ping = read_n(&mut s, 5);
        s.write_all(&ping[1..]).unwrap();
        // Then silence, while holding the connection open.
        std::thread::sleep(Duration::from_secs(2));
    });
    let store = TcpStore::new(TcpStoreOptions {
        port,
        timeout: Duration::from_millis(300),
        ..TcpStoreOptions::default()
    })
    .unwrap();
    let start = std::time::Instant::now();
    let err = store.add("k", 1).unwrap_err();
    assert!(err.is_timeout(), "{err}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    fake.join().unwrap();
}
