#![no_main]
//! TCPStore requests from a client's bytes, as the server parses them incrementally:
//! never panics; what parses re-encodes to exactly the bytes it used; every prefix of a
//! parsed request is "incomplete", never an error and never a different request.

use libfuzzer_sys::fuzz_target;
use tp_store::proto::{Command, Limits, parse_request, parse_response};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_key: 256,
        max_value: 4096,
        max_keys: 16,
    };
    let mut rest = data;
    // A stream of requests, as a server would consume them.
    while let Ok(Some((req, used))) = parse_request(rest, &limits) {
        let mut again = Vec::new();
        req.encode(&mut again);
        assert_eq!(&again[..], &rest[..used]);
        for cut in 0..used {
            assert_eq!(parse_request(&rest[..cut], &limits), Ok(None));
        }
        rest = &rest[used..];
    }
    // The same bytes as a reply to every command: never a panic.
    if let Some((&c, body)) = data.split_first() {
        if let Some(cmd) = Command::from_byte(c % 19) {
            let _ = parse_response(cmd, usize::from(c % 5), body, &limits);
        }
    }
});
