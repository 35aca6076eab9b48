#![no_main]
//! BrochureAnswerRepr from peer bytes: never panics; what parses re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;
use tp_wire::packet::{BrochureAnswerRepr, frame_to_vec};

fuzz_target!(|data: &[u8]| {
    tp_fuzz::check_packet::<BrochureAnswerRepr<'_>, _>(
        data,
        |p| p.to_owned(),
        |o| o.with_repr(|r| frame_to_vec(r)).unwrap(),
    );
});
