#![no_main]
//! cuda_ipc's tensor descriptor, as a peer sends it: never panics, and whatever decodes
//! re-encodes to the same bytes, within `MAX_LEN`.

use libfuzzer_sys::fuzz_target;
use tp_cuda::ipc::TensorDescriptor;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = TensorDescriptor::decode(data) {
        assert_eq!(d.encode(), data);
        assert!(data.len() as u64 <= TensorDescriptor::MAX_LEN);
    }
});
