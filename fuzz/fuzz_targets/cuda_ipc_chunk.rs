#![no_main]
//! cuda_ipc's chunk descriptor, as a peer sends it: never panics, allocates only for
//! slot counts within `MAX_SLOTS`, and whatever decodes re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use tp_cuda::ipc::{ChunkDescriptor, MAX_SLOTS};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = ChunkDescriptor::decode(data) {
        assert_eq!(d.encode(), data);
        if let Some(o) = &d.outbox {
            assert!(!o.events.is_empty() && o.events.len() <= MAX_SLOTS as usize);
        }
    }
});
