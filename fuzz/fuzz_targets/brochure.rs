#![no_main]
//! BrochureRepr from peer bytes: never panics; what parses re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use tp_wire::packet::{BrochureRepr, frame_to_vec};

fuzz_target!(|data: &[u8]| {
    tp_fuzz::check_packet::<BrochureRepr<'_>, _>(
        data,
        |p| p.to_owned(),
        |o| o.with_repr(|r| frame_to_vec(r)).unwrap(),
    );
});
