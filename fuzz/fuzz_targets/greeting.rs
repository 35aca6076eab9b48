#![no_main]
//! The first frame a listener reads from anyone who connects.

use libfuzzer_sys::fuzz_target;
use tp_wire::Limits;
use tp_wire::packet::{Greeting, frame_to_vec};

fuzz_target!(|data: &[u8]| {
    for limits in [Limits::DEFAULT, tp_fuzz::TIGHT] {
        match Greeting::parse_frame(data, &limits) {
            Ok(Greeting::Spontaneous(s)) => {
                assert_eq!(frame_to_vec(&s).unwrap(), data);
                assert_eq!(frame_to_vec(&s.to_owned().as_repr()).unwrap(), data);
            }
            Ok(Greeting::Requested(r)) => assert_eq!(frame_to_vec(&r).unwrap(), data),
            Err(_) => {}
        }
    }
});
