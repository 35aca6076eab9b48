#![no_main]
//! What an ibv peer controls: its 64-byte setup record, and the immediates of its RDMA
//! writes and acknowledgements. Never panics; a setup that parses re-encodes to the same
//! bytes; whatever the peer claims, neither ring ever holds more than its capacity.

use libfuzzer_sys::fuzz_target;
use tp_transport::ibv::proto::{Receiver, SETUP_LEN, Sender, SetupInfo};

fuzz_target!(|data: &[u8]| {
    let (setup, ops) = data.split_at(data.len().min(SETUP_LEN));
    if let Ok(info) = SetupInfo::decode(setup) {
        assert_eq!(&info.encode()[..], setup);
    }
    // A small ring so that the fuzzer reaches wrap-around and overflow quickly.
    let cap = 64u64;
    let mut sender = Sender::new(cap, 3);
    let mut receiver = Receiver::new(cap, 16);
    for op in ops.chunks_exact(5) {
        let v = u32::from_le_bytes([op[1], op[2], op[3], op[4]]);
        match op[0] % 7 {
            // Peer input: errors are fine, panics and broken invariants are not.
            0 => {
                let _ = receiver.on_write(v);
            }
            1 => {
                let _ = sender.on_ack(v);
            }
            2 => {
                let _ = sender.on_write_complete();
            }
            // Local actions.
            3 => {
                let _ = receiver.consume(u64::from(v));
            }
            4 => {
                let _ = sender.commit(u64::from(v));
            }
            5 => {
                if let Some(w) = sender.poll_write() {
                    assert!(w.offset < cap && u64::from(w.len) <= cap - w.offset);
                }
            }
            _ => {
                let _ = receiver.poll_ack();
            }
        }
        assert!(receiver.readable().1 <= cap);
        assert!(sender.unacknowledged() <= cap);
        assert!(sender.writable().1 <= cap);
    }
});
