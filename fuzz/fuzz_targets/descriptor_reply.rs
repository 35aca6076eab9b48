#![no_main]
//! DescriptorReplyRepr from peer bytes: never panics; what parses re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use tp_wire::packet::{DescriptorReplyRepr, frame_to_vec};

fuzz_target!(|data: &[u8]| {
    tp_fuzz::check_packet::<DescriptorReplyRepr<'_>, _>(
        data,
        |p| p.to_owned(),
        |o| frame_to_vec(&o.as_repr()).unwrap(),
    );
});
