#![no_main]
//! cma's tensor descriptor and help request, as a peer sends them: never panic, and
//! whatever decodes re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use tp_channel::cma::wire::{HelpRequest, TensorDescriptor};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = TensorDescriptor::decode(data) {
        assert_eq!(d.encode(), data);
    }
    if let Ok(r) = HelpRequest::decode(data) {
        assert_eq!(r.encode(), data);
    }
});
