//! Golden-byte tests: every packet's encoding is pinned by a hex vector in docs/wire.md.
//!
//! The vectors live in the document (fenced blocks tagged `hex golden:<name>`); this
//! test reads them from there, so the document and the code cannot drift apart. It also
//! checks that the fuzz seed corpora (`fuzz/corpus/<target>/seed-golden-<name>`) hold the
//! same bytes; run with `TP_WRITE_CORPUS=1` to regenerate them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tp_wire::packet::*;
use tp_wire::{DecodeError, Device, Limits};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Every `hex golden:<name>` block of docs/wire.md, decoded.
fn document_vectors() -> BTreeMap<String, Vec<u8>> {
    let doc = std::fs::read_to_string(root().join("docs/wire.md")).expect("docs/wire.md");
    let mut out = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    for line in doc.lines() {
        if let Some((name, hex)) = &mut current {
            if line.trim_start().starts_with("```") {
                let bytes = hex
                    .split_whitespace()
                    .map(|b| u8::from_str_radix(b, 16).expect("hex byte"))
                    .collect();
                out.insert(std::mem::take(name), bytes);
                current = None;
            } else {
                // Everything after '#' on a line is a comment.
                hex.push_str(line.split('#').next().unwrap_or(""));
                hex.push(' ');
            }
        } else if let Some(name) = line.trim().strip_prefix("```hex golden:") {
            current = Some((name.trim().to_string(), String::new()));
        }
    }
    out
}

const PAYLOADS: [PayloadDesc<'static>; 1] = [PayloadDesc {
    length: 3,
    metadata: b"p",
}];
const TENSORS: [TensorDesc<'static>; 1] = [TensorDesc {
    length: 4,
    source_device: Device::CPU,
    target_device: Some(Device::cuda(1)),
    metadata: b"t",
}];
const TRANSPORTS: [TransportOffer<'static>; 1] = [TransportOffer {
    name: "tcp",
    priority: 0,
    domain_descriptor: b"",
}];
const CPU_DESC: [DeviceDescriptor<'static>; 1] = [DeviceDescriptor {
    device: Device::CPU,
    descriptor: b"",
}];
const CHANNELS: [ChannelOffer<'static>; 1] = [ChannelOffer {
    name: "basic",
    priority: 1000,
    devices: Seq::Slice(&CPU_DESC),
}];
const IDS: [RegistrationId; 1] = [RegistrationId(0x11)];
const REGS: [ChannelRegistration<'static>; 1] = [ChannelRegistration {
    channel: "basic",
    ids: Seq::Slice(&IDS),
}];
const PAIRS: [DevicePairChoice<'static>; 1] = [DevicePairChoice {
    server_device: Device::CPU,
    client_device: Device::CPU,
    channel: "basic",
}];
const REPLY_DEVICES: [Device; 1] = [Device::cuda(0)];

fn spontaneous() -> SpontaneousConnection<'static> {
    SpontaneousConnection {
        context_name: "ctx",
    }
}
fn requested() -> RequestedConnection {
    RequestedConnection {
        registration_id: RegistrationId(0x0102_0304_0506_0708),
    }
}
fn brochure() -> BrochureRepr<'static> {
    BrochureRepr {
        min_version: 1,
        max_version: 1,
        transports: Seq::Slice(&TRANSPORTS),
        channels: Seq::Slice(&CHANNELS),
    }
}
fn answer() -> BrochureAnswerRepr<'static> {
    BrochureAnswerRepr {
        version: 1,
        transports: Seq::Slice(&TRANSPORTS),
        channels: Seq::Slice(&CHANNELS),
        transport: "tcp",
        address: "h:1",
        primary_registration: None,
        reply_registration: RegistrationId(0x10),
        channel_registrations: Seq::Slice(&REGS),
        pairs: Seq::Slice(&PAIRS),
    }
}
fn descriptor() -> DescriptorRepr<'static> {
    DescriptorRepr {
        metadata: b"m",
        payloads: Seq::Slice(&PAYLOADS),
        tensors: Seq::Slice(&TENSORS),
    }
}
fn reply() -> DescriptorReplyRepr<'static> {
    DescriptorReplyRepr {
        target_devices: Seq::Slice(&REPLY_DEVICES),
    }
}
fn goodbye() -> GoodbyeRepr<'static> {
    GoodbyeRepr {
        reason: CloseReason::Normal,
        max_version: 1,
        message: "bye",
    }
}

fn framed<'a, P: Packet<'a>>(p: &P) -> Vec<u8> {
    let mut v = vec![0u8; frame_len(p)];
    assert_eq!(emit_frame(p, &mut v).unwrap(), v.len());
    v
}

/// Checks emit, parse, and that every truncation is an error (never a misparse).
fn check<'a, P: Packet<'a> + PartialEq + std::fmt::Debug>(
    name: &str,
    p: P,
    doc: &BTreeMap<String, Vec<u8>>,
    parse: fn(&[u8]) -> Result<(), DecodeError>,
) {
    let bytes = framed(&p);
    let want = doc
        .get(name)
        .unwrap_or_else(|| panic!("docs/wire.md has no `hex golden:{name}` block"));
    assert_eq!(&bytes, want, "{name}: encoding differs from docs/wire.md");
    parse(want).unwrap_or_else(|e| panic!("{name}: golden bytes do not parse: {e}"));
    for cut in 0..want.len() {
        assert!(
            parse(&want[..cut]).is_err(),
            "{name}: truncation at {cut} parsed"
        );
    }
    let mut longer = want.clone();
    longer.push(0);
    assert!(
        parse(&longer).is_err(),
        "{name}: a trailing byte was accepted"
    );
    // The corpus seeds for the fuzz targets are these same bytes.
    for target in [fuzz_target(name), "frame"] {
        let seed = root().join(format!("fuzz/corpus/{target}/seed-golden-{name}"));
        if std::env::var_os("TP_WRITE_CORPUS").is_some() {
            std::fs::create_dir_all(seed.parent().unwrap()).unwrap();
            std::fs::write(&seed, want).unwrap();
        } else {
            assert_eq!(
                std::fs::read(&seed).ok().as_ref(),
                Some(want),
                "{name}: stale fuzz seed {}; run with TP_WRITE_CORPUS=1",
                seed.display()
            );
        }
    }
}

fn fuzz_target(name: &str) -> &str {
    match name {
        "descriptor" | "descriptor_reply" | "goodbye" | "brochure" | "brochure_answer" => name,
        "spontaneous" | "requested" => "greeting",
        _ => "frame",
    }
}

fn parse_as<'a, P: Packet<'a>>(b: &'a [u8]) -> Result<(), DecodeError> {
    parse_frame::<P>(b, &Limits::DEFAULT).map(|_| ())
}

#[test]
fn golden_vectors_match_the_document() {
    let doc = document_vectors();
    check("spontaneous", spontaneous(), &doc, |b| {
        parse_as::<SpontaneousConnection<'_>>(b)
    });
    check("requested", requested(), &doc, |b| {
        parse_as::<RequestedConnection>(b)
    });
    check("brochure", brochure(), &doc, |b| {
        parse_as::<BrochureRepr<'_>>(b)
    });
    check("brochure_answer", answer(), &doc, |b| {
        parse_as::<BrochureAnswerRepr<'_>>(b)
    });
    check("descriptor", descriptor(), &doc, |b| {
        parse_as::<DescriptorRepr<'_>>(b)
    });
    check("descriptor_reply", reply(), &doc, |b| {
        parse_as::<DescriptorReplyRepr<'_>>(b)
    });
    check("goodbye", goodbye(), &doc, |b| {
        parse_as::<GoodbyeRepr<'_>>(b)
    });
}

#[test]
fn golden_vectors_parse_to_the_same_values() {
    let doc = document_vectors();
    let l = Limits::DEFAULT;
    assert_eq!(
        parse_frame::<SpontaneousConnection<'_>>(&doc["spontaneous"], &l).unwrap(),
        spontaneous()
    );
    assert_eq!(
        parse_frame::<RequestedConnection>(&doc["requested"], &l).unwrap(),
        requested()
    );
    assert_eq!(
        parse_frame::<BrochureRepr<'_>>(&doc["brochure"], &l).unwrap(),
        brochure()
    );
    assert_eq!(
        parse_frame::<BrochureAnswerRepr<'_>>(&doc["brochure_answer"], &l).unwrap(),
        answer()
    );
    assert_eq!(
        parse_frame::<DescriptorRepr<'_>>(&doc["descriptor"], &l).unwrap(),
        descriptor()
    );
    assert_eq!(
        parse_frame::<DescriptorReplyRepr<'_>>(&doc["descriptor_reply"], &l).unwrap(),
        reply()
    );
    assert_eq!(
        parse_frame::<GoodbyeRepr<'_>>(&doc["goodbye"], &l).unwrap(),
        goodbye()
    );
    assert!(matches!(
        Greeting::parse_frame(&doc["spontaneous"], &l),
        Ok(Greeting::Spontaneous(_))
    ));
    assert!(matches!(
        Greeting::parse_frame(&doc["requested"], &l),
        Ok(Greeting::Requested(_))
    ));
    assert!(Greeting::parse_frame(&doc["descriptor"], &l).is_err());
}

#[test]
fn owned_forms_round_trip_through_golden_bytes() {
    let doc = document_vectors();
    let l = Limits::DEFAULT;
    let d = parse_frame::<DescriptorRepr<'_>>(&doc["descriptor"], &l)
        .unwrap()
        .to_owned();
    assert_eq!(d.with_repr(|r| frame_to_vec(r)).unwrap(), doc["descriptor"]);
    let b = parse_frame::<BrochureRepr<'_>>(&doc["brochure"], &l)
        .unwrap()
        .to_owned();
    assert_eq!(b.with_repr(|r| frame_to_vec(r)).unwrap(), doc["brochure"]);
    let a = parse_frame::<BrochureAnswerRepr<'_>>(&doc["brochure_answer"], &l)
        .unwrap()
        .to_owned();
    assert_eq!(
        a.with_repr(|r| frame_to_vec(r)).unwrap(),
        doc["brochure_answer"]
    );
    let r = parse_frame::<DescriptorReplyRepr<'_>>(&doc["descriptor_reply"], &l)
        .unwrap()
        .to_owned();
    assert_eq!(frame_to_vec(&r.as_repr()).unwrap(), doc["descriptor_reply"]);
    let g = parse_frame::<GoodbyeRepr<'_>>(&doc["goodbye"], &l)
        .unwrap()
        .to_owned();
    assert_eq!(frame_to_vec(&g.as_repr()).unwrap(), doc["goodbye"]);
    let s = parse_frame::<SpontaneousConnection<'_>>(&doc["spontaneous"], &l)
        .unwrap()
        .to_owned();
    assert_eq!(frame_to_vec(&s.as_repr()).unwrap(), doc["spontaneous"]);
}

#[test]
fn frame_into_replaces_what_the_buffer_held_and_keeps_its_room() {
    let doc = document_vectors();
    let l = Limits::DEFAULT;
    let d = parse_frame::<DescriptorRepr<'_>>(&doc["descriptor"], &l)
        .unwrap()
        .to_owned();
    // A longer frame's leftovers, in a buffer with room to spare.
    let mut buf = vec![0xAB; doc["descriptor"].len() + 100];
    buf.reserve(1000);
    let room = buf.as_ptr();
    d.with_repr(|r| frame_into(r, &mut buf)).unwrap();
    assert_eq!(buf, doc["descriptor"]);
    assert_eq!(buf.as_ptr(), room, "the buffer's allocation is reused");
    // Too short a buffer grows.
    let mut small = vec![0xCD; 3];
    let g = parse_frame::<GoodbyeRepr<'_>>(&doc["goodbye"], &l)
        .unwrap()
        .to_owned();
    frame_into(&g.as_repr(), &mut small).unwrap();
    assert_eq!(small, doc["goodbye"]);
}

#[test]
fn descriptor_over_limits_rejected_before_allocation() {
    let doc = document_vectors();
    let tight = Limits {
        max_tensors: 0,
        ..Limits::DEFAULT
    };
    assert!(matches!(
        parse_frame::<DescriptorRepr<'_>>(&doc["descriptor"], &tight),
        Err(DecodeError::LimitExceeded {
            limit: tp_wire::Limit::Tensors,
            ..
        })
    ));
    let tight = Limits {
        max_message_len: 6,
        ..Limits::DEFAULT
    };
    assert!(matches!(
        parse_frame::<DescriptorRepr<'_>>(&doc["descriptor"], &tight),
        Err(DecodeError::LimitExceeded {
            limit: tp_wire::Limit::MessageLen,
            value: 7,
            ..
        })
    ));
}

/// Prints every vector, for writing the document: `cargo test -p tp-wire --test golden -- --ignored --nocapture`.
#[test]
#[ignore = "prints the vectors; not a check"]
fn print_vectors() {
    for (name, bytes) in [
        ("spontaneous", framed(&spontaneous())),
        ("requested", framed(&requested())),
        ("brochure", framed(&brochure())),
        ("brochure_answer", framed(&answer())),
        ("descriptor", framed(&descriptor())),
        ("descriptor_reply", framed(&reply())),
        ("goodbye", framed(&goodbye())),
    ] {
        let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
        println!("{name}: {}", hex.join(" "));
    }
}
