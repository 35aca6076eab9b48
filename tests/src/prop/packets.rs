//! Property tests for every packet codec.

use proptest::prelude::*;
use tp_wire::packet::*;
use tp_wire::{DecodeError, Device, DeviceKind, Limits};

fn device() -> impl Strategy<Value = Device> {
    (any::<bool>(), any::<u32>()).prop_map(|(cuda, index)| Device {
        kind: if cuda {
            DeviceKind::Cuda
        } else {
            DeviceKind::Cpu
        },
        index,
    })
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn name() -> impl Strategy<Value = String> {
    "[a-z_]{0,8}"
}

fn descriptor() -> impl Strategy<Value = Descriptor> {
    (
        bytes(32),
        prop::collection::vec((0..=u64::from(u32::MAX), bytes(16)), 0..6),
        prop::collection::vec(
            (
                0..=u64::from(u32::MAX),
                device(),
                prop::option::of(device()),
                bytes(16),
            ),
            0..6,
        ),
    )
        .prop_map(|(metadata, payloads, tensors)| Descriptor {
            metadata,
            payloads: payloads
                .into_iter()
                .map(|(length, metadata)| Payload { length, metadata })
                .collect(),
            tensors: tensors
                .into_iter()
                .map(|(length, source_device, target_device, metadata)| Tensor {
                    length,
                    source_device,
                    target_device,
                    metadata,
                })
                .collect(),
        })
}

fn transports() -> impl Strategy<Value = Vec<OwnedTransportOffer>> {
    prop::collection::vec(
        (name(), any::<i64>(), bytes(8)).prop_map(|(name, priority, domain_descriptor)| {
            OwnedTransportOffer {
                name,
                priority,
                domain_descriptor,
            }
        }),
        0..4,
    )
}

fn channels() -> impl Strategy<Value = Vec<OwnedChannelOffer>> {
    prop::collection::vec(
        (
            name(),
            any::<i64>(),
            prop::collection::vec(
                (device(), bytes(8))
                    .prop_map(|(device, descriptor)| OwnedDeviceDescriptor { device, descriptor }),
                0..4,
            ),
        )
            .prop_map(|(name, priority, devices)| OwnedChannelOffer {
                name,
                priority,
                devices,
            }),
        0..4,
    )
}

fn brochure() -> impl Strategy<Value = Brochure> {
    (any::<u8>(), any::<u8>(), transports(), channels()).prop_map(
        |(min_version, max_version, transports, channels)| Brochure {
            min_version,
            max_version,
            transports,
            channels,
        },
    )
}

fn answer() -> impl Strategy<Value = BrochureAnswer> {
    (
        any::<u8>(),
        transports(),
        channels(),
        (name(), "[a-z0-9:.]{0,12}"),
        (prop::option::of(any::<u64>()), any::<u64>()),
        prop::collection::vec((name(), prop::collection::vec(any::<u64>(), 0..4)), 0..4),
        prop::collection::vec((device(), device(), name()), 0..4),
    )
        .prop_map(
            |(
                version,
                transports,
                channels,
                (transport, address),
                (primary, reply),
                regs,
                pairs,
            )| BrochureAnswer {
                version,
                transports,
                channels,
                transport,
                address,
                primary_registration: primary.map(RegistrationId),
                reply_registration: RegistrationId(reply),
                channel_registrations: regs
                    .into_iter()
                    .map(|(channel, ids)| OwnedChannelRegistration {
                        channel,
                        ids: ids.into_iter().map(RegistrationId).collect(),
                    })
                    .collect(),
                pairs: pairs
                    .into_iter()
                    .map(
                        |(server_device, client_device, channel)| OwnedDevicePairChoice {
                            server_device,
                            client_device,
                            channel,
                        },
                    )
                    .collect(),
            },
        )
}

fn reply() -> impl Strategy<Value = DescriptorReply> {
    prop::collection::vec(device(), 0..8)
        .prop_map(|target_devices| DescriptorReply { target_devices })
}

fn goodbye() -> impl Strategy<Value = Goodbye> {
    (any::<u16>(), any::<u8>(), "\\PC{0,16}").prop_map(|(code, max_version, message)| Goodbye {
        reason: CloseReason::from_code(code),
        max_version,
        message,
    })
}

/// Every encoded frame of every packet kind, for the byte-level properties.
fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        descriptor().prop_map(|d| d.with_repr(|r| frame_to_vec(r)).unwrap()),
        brochure().prop_map(|b| b.with_repr(|r| frame_to_vec(r)).unwrap()),
        answer().prop_map(|a| a.with_repr(|r| frame_to_vec(r)).unwrap()),
        reply().prop_map(|r| frame_to_vec(&r.as_repr()).unwrap()),
        goodbye().prop_map(|g| frame_to_vec(&g.as_repr()).unwrap()),
        name().prop_map(|n| frame_to_vec(&SpontaneousConnection { context_name: &n }).unwrap()),
        any::<u64>().prop_map(|id| frame_to_vec(&RequestedConnection {
            registration_id: RegistrationId(id)
        })
        .unwrap()),
    ]
}

const L: Limits = Limits::UNLIMITED;

/// Decodes `frame` as whatever its header says; re-encoding must reproduce it.
fn parse_any(frame: &[u8]) -> Result<Vec<u8>, DecodeError> {
    use tp_wire::frame::{FrameKind, split_frame};
    let (h, _) = split_frame(frame, &L)?;
    Ok(match h.kind {
        FrameKind::Descriptor => frame_to_vec(&parse_frame::<DescriptorRepr<'_>>(frame, &L)?),
        FrameKind::Brochure => frame_to_vec(&parse_frame::<BrochureRepr<'_>>(frame, &L)?),
        FrameKind::BrochureAnswer => {
            frame_to_vec(&parse_frame::<BrochureAnswerRepr<'_>>(frame, &L)?)
        }
        FrameKind::DescriptorReply => {
            frame_to_vec(&parse_frame::<DescriptorReplyRepr<'_>>(frame, &L)?)
        }
        FrameKind::Goodbye => frame_to_vec(&parse_frame::<GoodbyeRepr<'_>>(frame, &L)?),
        FrameKind::SpontaneousConnection => {
            frame_to_vec(&parse_frame::<SpontaneousConnection<'_>>(frame, &L)?)
        }
        FrameKind::RequestedConnection => {
            frame_to_vec(&parse_frame::<RequestedConnection>(frame, &L)?)
        }
        _ => return Err(DecodeError::UnknownKind(h.kind.to_u8())),
    }
    .expect("a parsed packet re-encodes"))
}

proptest! {
    /// Encoding into a buffer that held another frame gives the same bytes as into a
    /// new one, and keeps the buffer's allocation when it has the room.
    #[test]
    fn frame_into_a_used_buffer_matches_a_fresh_one(old in any_frame(), d in descriptor()) {
        let fresh = d.with_repr(|r| frame_to_vec(r)).unwrap();
        let mut buf = old;
        let roomy = buf.capacity() >= fresh.len();
        let at = buf.as_ptr();
        d.with_repr(|r| frame_into(r, &mut buf)).unwrap();
        prop_assert_eq!(&buf, &fresh);
        if roomy {
            prop_assert_eq!(buf.as_ptr(), at);
        }
    }

    #[test]
    fn descriptor_roundtrip(d in descriptor()) {
        let bytes = d.with_repr(|r| frame_to_vec(r)).unwrap();
        let back = parse_frame::<DescriptorRepr<'_>>(&bytes, &L).unwrap();
        prop_assert_eq!(back.to_owned(), d);
    }

    #[test]
    fn brochure_roundtrip(b in brochure()) {
        let bytes = b.with_repr(|r| frame_to_vec(r)).unwrap();
        prop_assert_eq!(parse_frame::<BrochureRepr<'_>>(&bytes, &L).unwrap().to_owned(), b);
    }

    #[test]
    fn brochure_answer_roundtrip(a in answer()) {
        let bytes = a.with_repr(|r| frame_to_vec(r)).unwrap();
        prop_assert_eq!(parse_frame::<BrochureAnswerRepr<'_>>(&bytes, &L).unwrap().to_owned(), a);
    }

    #[test]
    fn descriptor_reply_roundtrip(r in reply()) {
        let bytes = frame_to_vec(&r.as_repr()).unwrap();
        prop_assert_eq!(parse_frame::<DescriptorReplyRepr<'_>>(&bytes, &L).unwrap().to_owned(), r);
    }

    #[test]
    fn goodbye_roundtrip(g in goodbye()) {
        let bytes = frame_to_vec(&g.as_repr()).unwrap();
        prop_assert_eq!(parse_frame::<GoodbyeRepr<'_>>(&bytes, &L).unwrap().to_owned(), g);
    }

    #[test]
    fn greetings_roundtrip(n in name(), id in any::<u64>()) {
        let s = frame_to_vec(&SpontaneousConnection { context_name: &n }).unwrap();
        prop_assert_eq!(Greeting::parse_frame(&s, &L).unwrap(), Greeting::Spontaneous(SpontaneousConnection { context_name: &n }));
        let r = RequestedConnection { registration_id: RegistrationId(id) };
        let rb = frame_to_vec(&r).unwrap();
        prop_assert_eq!(Greeting::parse_frame(&rb, &L).unwrap(), Greeting::Requested(r));
    }

    #[test]
    fn every_truncation_is_an_error(frame in any_frame()) {
        prop_assert!(parse_any(&frame).is_ok());
        for cut in 0..frame.len() {
            prop_assert!(parse_any(&frame[..cut]).is_err(), "prefix of {} bytes parsed", cut);
        }
    }

    #[test]
    fn mutations_never_panic_and_what_parses_is_canonical(frame in any_frame(), at in any::<prop::sample::Index>(), xor in 1u8..) {
        let mut m = frame;
        let i = at.index(m.len());
        m[i] ^= xor;
        if let Ok(again) = parse_any(&m) {
            prop_assert_eq!(again, m);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_any(&data);
        let _ = Greeting::parse_frame(&data, &Limits::DEFAULT);
        // Also as bodies behind a valid header of every kind.
        for kind in tp_wire::frame::FrameKind::ALL {
            let mut f = vec![0u8; 12];
            tp_wire::frame::FrameHeader::new(kind, data.len() as u32).emit(&mut f).unwrap();
            f.extend_from_slice(&data);
            let _ = parse_any(&f);
        }
    }

    #[test]
    fn decoding_respects_limits(d in descriptor()) {
        let bytes = d.with_repr(|r| frame_to_vec(r)).unwrap();
        let tight = Limits { max_tensors: 2, max_payloads: 2, max_metadata_len: 8, ..Limits::UNLIMITED };
        let within = d.tensors.len() <= 2 && d.payloads.len() <= 2 && d.metadata.len() <= 8
            && d.payloads.iter().all(|p| p.metadata.len() <= 8)
            && d.tensors.iter().all(|t| t.metadata.len() <= 8);
        prop_assert_eq!(parse_frame::<DescriptorRepr<'_>>(&bytes, &tight).is_ok(), within);
    }
}
