#![no_main]
//! GoodbyeRepr from peer bytes: never panics; what parses re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use tp_wire::packet::{GoodbyeRepr, frame_to_vec};

fuzz_target!(|data: &[u8]| {
    tp_fuzz::check_packet::<GoodbyeRepr<'_>, _>(
        data,
        |p| p.to_owned(),
        |o| frame_to_vec(&o.as_repr()).unwrap(),
    );
});
