#![no_main]
//! The TCPStore server state machine fed by three clients whose bytes (after a valid
//! VALIDATE) are chopped from the input: never panics; a client whose bytes are
//! refused is disconnected and the others go on; replies only go to connected clients.

use libfuzzer_sys::fuzz_target;
use tp_store::proto::{Limits, Request, VALIDATE_MAGIC};
use tp_store::serve::{ClientId, Server};

fuzz_target!(|data: &[u8]| {
    let mut server = Server::new(Limits {
        max_key: 64,
        max_value: 1024,
        max_keys: 8,
    });
    let mut hello = Vec::new();
    Request::Validate {
        magic: VALIDATE_MAGIC,
    }
    .encode(&mut hello);
    let mut pending: [Vec<u8>; 3] = Default::default();
    let mut alive = [true; 3];
    for i in 0..3u64 {
        server.connect(ClientId(i));
        assert_eq!(server.receive(ClientId(i), &hello), Ok(5));
    }
    // Each step: one control byte (client, chunk length), then that many bytes.
    let mut rest = data;
    while let Some((&ctl, tail)) = rest.split_first() {
        let who = usize::from(ctl % 3);
        let n = usize::from(ctl / 3).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        if !alive[who] {
            continue;
        }
        let id = ClientId(who as u64);
        pending[who].extend_from_slice(chunk);
        match server.receive(id, &pending[who]) {
            Ok(used) => {
                pending[who].drain(..used);
            }
            Err(_) => {
                server.disconnect(id);
                alive[who] = false;
            }
        }
        while let Some((to, _bytes)) = server.poll_output() {
            assert!(alive[to.0 as usize], "a reply for a disconnected client");
        }
    }
});
