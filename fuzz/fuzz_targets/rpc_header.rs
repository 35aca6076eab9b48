#![no_main]
//! The RPC agent's framing from a peer's bytes (a pipe message's metadata and each
//! tensor's metadata): never panics; what parses re-encodes to exactly those bytes.

use libfuzzer_sys::fuzz_target;
use tp_wire::rpc::{RpcHeader, decode_source_device, encode_source_device};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = RpcHeader::decode(data) {
        assert_eq!(&h.encode()[..], data);
    }
    if let Ok(d) = decode_source_device(data) {
        assert_eq!(&encode_source_device(d)[..], data);
    }
});
