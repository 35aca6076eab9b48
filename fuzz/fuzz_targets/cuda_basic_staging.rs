#![no_main]
//! cuda_basic's staging setup, as a peer sends it: never panics, whatever decodes
//! re-encodes to the same bytes within `MAX_LEN`, and an offer's slot layout is within
//! the limits checked before anything is mapped.

use libfuzzer_sys::fuzz_target;
use tp_cuda::basic::staging::{MAX_SLOT_LEN, MAX_SLOTS, StagingSetup};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = StagingSetup::decode(data) {
        assert_eq!(s.encode(), data);
        assert!(data.len() as u64 <= StagingSetup::MAX_LEN);
        if let StagingSetup::Offer(o) = s {
            assert!((1..=MAX_SLOTS).contains(&o.slots));
            assert!(o.slot_len > 0 && o.slot_len <= MAX_SLOT_LEN && o.slot_len % 4096 == 0);
        }
    }
});
