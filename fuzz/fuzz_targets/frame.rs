#![no_main]
//! Any bytes through the frame header parser and every packet decoder.

use libfuzzer_sys::fuzz_target;
use tp_wire::Limits;
use tp_wire::frame::{FrameHeader, FrameKind, split_frame};
use tp_wire::packet::*;

fuzz_target!(|data: &[u8]| {
    for limits in [Limits::DEFAULT, tp_fuzz::TIGHT] {
        if let Ok(h) = FrameHeader::parse(data, &limits) {
            let mut again = [0u8; 12];
            h.emit(&mut again).unwrap();
            assert_eq!(&again[..], &data[..12]);
        }
        let Ok((header, body)) = split_frame(data, &limits) else {
            continue;
        };
        let _ = match header.kind {
            FrameKind::SpontaneousConnection => {
                SpontaneousConnection::parse(body, &limits).map(|_| ())
            }
            FrameKind::RequestedConnection => RequestedConnection::parse(body, &limits).map(|_| ()),
            FrameKind::Brochure => BrochureRepr::parse(body, &limits).map(|_| ()),
            FrameKind::BrochureAnswer => BrochureAnswerRepr::parse(body, &limits).map(|_| ()),
            FrameKind::Descriptor => DescriptorRepr::parse(body, &limits).map(|_| ()),
            FrameKind::DescriptorReply => DescriptorReplyRepr::parse(body, &limits).map(|_| ()),
            FrameKind::Goodbye => GoodbyeRepr::parse(body, &limits).map(|_| ()),
            _ => Ok(()),
        };
    }
});
