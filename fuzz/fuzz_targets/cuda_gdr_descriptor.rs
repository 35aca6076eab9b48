#![no_main]
//! cuda_gdr's per-tensor descriptor, as a peer sends it: never panics, and whatever
//! decodes re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use tp_cuda::gdr::GdrDescriptor;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = GdrDescriptor::decode(data) {
        assert_eq!(d.encode(), data);
        assert!(data.len() <= GdrDescriptor::MAX_LEN);
    }
});
