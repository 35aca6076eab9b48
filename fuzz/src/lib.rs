//! Oracles shared by tp's fuzz targets.

use tp_wire::Limits;
use tp_wire::packet::{Packet, frame_to_vec, parse_frame};

/// Parses `data` as a complete frame carrying `P`. When it parses, the encoding is
/// canonical, so emitting the view must give back exactly `data`; `owned` must round-trip
/// the same way.
pub fn check_packet<'a, P, O>(
    data: &'a [u8],
    owned: impl Fn(&P) -> O,
    emit_owned: impl Fn(&O) -> Vec<u8>,
) where
    P: Packet<'a> + PartialEq + core::fmt::Debug,
{
    for limits in [Limits::DEFAULT, TIGHT] {
        if let Ok(p) = parse_frame::<P>(data, &limits) {
            let again = frame_to_vec(&p).expect("a parsed packet re-encodes");
            assert_eq!(again, data, "re-encoding differs from the input");
            assert_eq!(
                emit_owned(&owned(&p)),
                data,
                "owned form re-encodes differently"
            );
        }
    }
}

/// Small limits, so the fuzzer reaches every limit check.
pub const TIGHT: Limits = Limits {
    max_frame_len: 4096,
    max_metadata_len: 64,
    max_string_len: 32,
    max_payloads: 4,
    max_tensors: 4,
    max_list_len: 4,
    max_message_len: 1 << 20,
};
