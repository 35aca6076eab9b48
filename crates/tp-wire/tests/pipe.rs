//! Pipe behaviours from tensorpipe.md §6 and tp's own failure cases, through the
//! deterministic harness. Each scenario runs under several schedules (seeds, chunking,
//! delays) so it holds whatever the delivery order.

use std::time::Duration;

use tp_wire::packet::{
    BrochureRepr, ChannelOffer, Descriptor, DeviceDescriptor, Seq, SpontaneousConnection,
    TransportOffer, frame_to_vec,
};
use tp_wire::pipe::{
    CommandError, ConnId, Event, Io, LocalOffer, NegotiationError, OpId, PeerMisbehaved, Pipe,
    PipeConfig, PipeError, Side,
};
use tp_wire::testing::{FakeBuf, Knobs, Message, Pair, TestTensor, offer};
use tp_wire::{DecodeError, Device, Instant, Limits};

const SCHEDULES: [(u64, Knobs); 4] = [
    (
        1,
        Knobs {
            max_chunk: usize::MAX,
            delay_percent: 0,
            fail_channels: false,
        },
    ),
    (
        2,
        Knobs {
            max_chunk: 1,
            delay_percent: 0,
            fail_channels: false,
        },
    ),
    (
        3,
        Knobs {
            max_chunk: 5,
            delay_percent: 50,
            fail_channels: false,
        },
    ),
    (
        4,
        Knobs {
            max_chunk: 64,
            delay_percent: 90,
            fail_channels: false,
        },
    ),
];

fn pair_with(client: LocalOffer, server: LocalOffer, seed: u64, knobs: Knobs) -> Pair {
    let mut p = Pair::new(PipeConfig::default(), client, server, "tcp", knobs, seed);
    p.drive();
    p
}

fn pair(seed: u64, knobs: Knobs) -> Pair {
    pair_with(
        offer("client", b"boot-1", 2),
        offer("server", b"boot-1", 2),
        seed,
        knobs,
    )
}

fn message(
    tag: u8,
    payloads: usize,
    tensors: usize,
    target: impl Fn(usize) -> Option<Device>,
) -> Message {
    Message {
        metadata: vec![tag; 3],
        payloads: (0..payloads)
            .map(|i| {
                (
                    vec![tag.wrapping_add(i as u8); 17 * i + 1],
                    vec![b'p', i as u8],
                )
            })
            .collect(),
        tensors: (0..tensors)
            .map(|i| TestTensor {
                data: (0..(1000 * i + 3)).map(|b| (b as u8) ^ tag).collect(),
                source: Device::CPU,
                target: target(i),
                metadata: vec![b't', i as u8],
            })
            .collect(),
    }
}

/// Reads one message on `side`, allocating tensors without a target on `devices`.
fn read_one(p: &mut Pair, side: Side, devices: &[Device]) -> (Descriptor, OpId) {
    let op = p.read_descriptor(side);
    p.drive();
    let desc = take_descriptor(p, side, op);
    p.read(side, op, &desc, devices).unwrap();
    p.drive();
    (desc, op)
}

fn take_descriptor(p: &mut Pair, side: Side, op: OpId) -> Descriptor {
    let events = p.events(side);
    events
        .into_iter()
        .find_map(|e| match e {
            Event::DescriptorReady { op: got, result } if got == op => {
                Some(result.expect("descriptor"))
            }
            _ => None,
        })
        .expect("descriptor event")
}

fn assert_delivered(p: &mut Pair, side: Side, op: OpId, desc: &Descriptor, msg: &Message) {
    assert_eq!(desc, &msg.descriptor());
    let got = p.take_received(side, op).expect("read completed");
    for (g, (d, _)) in got.payloads.iter().zip(&msg.payloads) {
        assert_eq!(g, d);
    }
    for ((g, _), t) in got.tensors.iter().zip(&msg.tensors) {
        assert_eq!(g, &t.data);
    }
}

fn write_results(events: &[Event]) -> Vec<(OpId, Result<(), PipeError>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::WriteDone { op, result } => Some((*op, result.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn handshake_switches_to_shm_and_picks_cma_when_domains_match() {
    for (seed, knobs) in SCHEDULES {
        let mut p = pair(seed, knobs);
        for side in [Side::Client, Side::Server] {
            let pipe = &p.peer(side).pipe;
            assert!(pipe.is_established(), "{side:?} seed {seed}");
            assert_eq!(pipe.transport(), Some("shm"));
            assert_eq!(
                pipe.channel_names().collect::<Vec<_>>(),
                ["cma", "cuda_ipc"]
            );
            assert!(pipe.channel_for(Device::CPU, Device::CPU).is_some());
            assert!(pipe.channel_for(Device::cuda(1), Device::cuda(0)).is_some());
            assert!(pipe.channel_for(Device::CPU, Device::cuda(0)).is_none());
        }
        assert_eq!(p.peer(Side::Server).pipe.remote_name(), "client");
    }
}

#[test]
fn handshake_across_machines_keeps_tcp_and_basic() {
    let mut p = pair_with(
        offer("c", b"boot-1", 0),
        offer("s", b"boot-2", 0),
        7,
        Knobs::default(),
    );
    for side in [Side::Client, Side::Server] {
        let pipe = &p.peer(side).pipe;
        assert_eq!(pipe.transport(), Some("tcp"));
        assert_eq!(pipe.channel_names().collect::<Vec<_>>(), ["basic"]);
    }
}

#[test]
fn simple_write_read_with_payloads_and_tensors() {
    for (seed, knobs) in SCHEDULES {
        for (payloads, tensors) in [(3, 3), (3, 0), (0, 3), (0, 0)] {
            let mut p = pair(seed, knobs);
            let msg = message(9, payloads, tensors, |_| None);
            let w = p.write(Side::Client, msg.clone()).unwrap();
            let (desc, op) = read_one(&mut p, Side::Server, &[]);
            assert_delivered(&mut p, Side::Server, op, &desc, &msg);
            assert_eq!(write_results(&p.events(Side::Client)), [(w, Ok(()))]);
            assert!(
                desc.tensors
                    .iter()
                    .all(|t| t.source_device == Device::CPU && t.target_device.is_none())
            );
        }
    }
}

#[test]
fn write_read_with_all_and_some_target_devices() {
    for (seed, knobs) in SCHEDULES {
        let mut p = pair(seed, knobs);
        let all = message(1, 2, 3, |_| Some(Device::CPU));
        let some = message(2, 1, 4, |i| (i % 2 == 0).then_some(Device::CPU));
        for msg in [&all, &some] {
            p.write(Side::Client, msg.clone()).unwrap();
            let (desc, op) = read_one(&mut p, Side::Server, &[Device::CPU; 4]);
            assert_delivered(&mut p, Side::Server, op, &desc, msg);
        }
    }
}

#[test]
fn cuda_tensors_route_over_the_pair_the_reader_picks() {
    let mut p = pair(5, Knobs::default());
    let mut msg = message(3, 0, 3, |_| None);
    msg.tensors[0].source = Device::cuda(1);
    msg.tensors[1].target = Some(Device::cuda(0));
    msg.tensors[1].source = Device::cuda(0);
    p.write(Side::Client, msg.clone()).unwrap();
    let (desc, op) = read_one(
        &mut p,
        Side::Server,
        &[Device::cuda(0), Device::cuda(0), Device::CPU],
    );
    assert_delivered(&mut p, Side::Server, op, &desc, &msg);
    let got = p.take_received(Side::Server, op);
    assert!(got.is_none(), "received data is taken once");
}

#[test]
fn multiple_writes_and_reads_arrive_in_order_from_both_sides() {
    for (seed, knobs) in SCHEDULES {
        let mut p = pair(seed, knobs);
        let msgs: Vec<Message> = (0..6)
            .map(|i| message(i, (i % 3) as usize, (i % 4) as usize, |_| None))
            .collect();
        let mut writes = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let side = if i % 2 == 0 {
                Side::Client
            } else {
                Side::Server
            };
            writes.push((side, p.write(side, m.clone()).unwrap()));
        }
        // Both sides read three messages each, interleaved.
        let mut reads = Vec::new();
        for _ in 0..3 {
            for side in [Side::Client, Side::Server] {
                reads.push((side, p.read_descriptor(side)));
            }
        }
        let mut pending: Vec<(Side, OpId)> = reads.clone();
        let mut got = Vec::new();
        for _ in 0..100 {
            p.drive();
            for side in [Side::Client, Side::Server] {
                for e in p.events(side) {
                    match e {
                        Event::DescriptorReady { op, result } => {
                            let d = result.unwrap();
                            p.read(side, op, &d, &[]).unwrap();
                            got.push((side, op, d));
                        }
                        Event::ReadDone { op, result } => {
                            result.unwrap();
                            pending.retain(|r| *r != (side, op));
                        }
                        Event::WriteDone { result, .. } => result.unwrap(),
                        _ => {}
                    }
                }
            }
            if pending.is_empty() {
                break;
            }
        }
        assert!(pending.is_empty(), "seed {seed}: reads left {pending:?}");
        for side in [Side::Client, Side::Server] {
            let sent: Vec<&Message> = msgs
                .iter()
                .enumerate()
                .filter(|(i, _)| (i % 2 == 0) == (side == Side::Server))
                .map(|(_, m)| m)
                .collect();
            let received: Vec<&(Side, OpId, Descriptor)> =
                got.iter().filter(|g| g.0 == side).collect();
            assert_eq!(received.len(), 3);
            for (r, m) in received.iter().zip(sent) {
                assert_delivered(&mut p, side, r.1, &r.2, m);
            }
        }
    }
}

#[test]
fn empty_and_zero_length_messages() {
    let mut p = pair(
        11,
        Knobs {
            max_chunk: 3,
            delay_percent: 30,
            fail_channels: false,
        },
    );
    let mut msg = message(4, 2, 2, |_| None);
    msg.payloads[0].0.clear();
    msg.tensors[1].data.clear();
    for m in [Message::default(), msg] {
        p.write(Side::Server, m.clone()).unwrap();
        let (desc, op) = read_one(&mut p, Side::Client, &[]);
        assert_delivered(&mut p, Side::Client, op, &desc, &m);
    }
}

#[test]
fn close_with_operations_pending_completes_each_once_in_order() {
    for (seed, knobs) in SCHEDULES {
        let mut p = pair(seed, knobs);
        let ops: Vec<OpId> = (0..4)
            .map(|i| p.write(Side::Client, message(i, 2, 2, |_| None)).unwrap())
            .collect();
        let reads: Vec<OpId> = (0..3).map(|_| p.read_descriptor(Side::Client)).collect();
        p.close(Side::Client);
        p.drive();
        let events = p.events(Side::Client);
        let writes = write_results(&events);
        assert_eq!(
            writes.iter().map(|w| w.0).collect::<Vec<_>>(),
            ops,
            "every write once, in order"
        );
        // Every write had tensors in flight when the pipe closed: none can report success.
        assert!(
            writes.iter().all(|w| w.1 == Err(PipeError::Closed)),
            "{writes:?}"
        );
        let descs: Vec<OpId> = events
            .iter()
            .filter_map(|e| match e {
                Event::DescriptorReady {
                    op,
                    result: Err(PipeError::Closed),
                } => Some(*op),
                _ => None,
            })
            .collect();
        assert_eq!(descs, reads);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::Closed { .. }))
                .count(),
            1
        );
        // New operations after close fail at once, still exactly once.
        let late = p.write(Side::Client, message(9, 1, 1, |_| None)).unwrap();
        let late_read = p.read_descriptor(Side::Client);
        p.drive();
        let events = p.events(Side::Client);
        assert_eq!(write_results(&events), [(late, Err(PipeError::Closed))]);
        assert!(events.contains(&Event::DescriptorReady {
            op: late_read,
            result: Err(PipeError::Closed)
        }));
    }
}

#[test]
fn peer_close_fails_pending_reads_with_its_reason() {
    let mut p = pair(3, Knobs::default());
    let r = p.read_descriptor(Side::Server);
    p.close(Side::Client);
    p.drive();
    let events = p.events(Side::Server);
    assert!(events.iter().any(|e| matches!(e,
        Event::DescriptorReady { op, result: Err(PipeError::PeerClosed { reason: tp_wire::packet::CloseReason::Normal, .. }) } if *op == r)));
}

#[test]
fn peer_killed_mid_message_fails_every_pending_operation() {
    for (seed, knobs) in SCHEDULES {
        let mut p = pair(seed, knobs);
        let msg = message(5, 3, 3, |_| None);
        p.write(Side::Client, msg).unwrap();
        let r = p.read_descriptor(Side::Server);
        let w = p
            .write(Side::Server, message(6, 1, 1, |_| Some(Device::CPU)))
            .unwrap();
        // Let the descriptor arrive, then allocate, then kill before the data lands.
        p.drive();
        let desc = take_descriptor(&mut p, Side::Server, r);
        p.kill(Side::Client);
        p.read(Side::Server, r, &desc, &[]).unwrap();
        let r2 = p.read_descriptor(Side::Server);
        p.drive();
        let events = p.events(Side::Server);
        let read_done: Vec<&Event> = events
            .iter()
            .filter(|e| matches!(e, Event::ReadDone { .. }))
            .collect();
        assert_eq!(read_done.len(), 1, "seed {seed}: {events:?}");
        assert!(matches!(read_done[0], Event::ReadDone { op, result: Err(_) } if *op == r));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::DescriptorReady { op, result: Err(_) } if *op == r2))
        );
        let writes = write_results(&events);
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].0, w);
        assert!(
            events.iter().any(|e| matches!(e, Event::Closed { .. })),
            "seed {seed}"
        );
    }
}

#[test]
fn handshake_times_out_when_the_server_never_answers() {
    let config = PipeConfig {
        handshake_timeout: Some(Duration::from_secs(5)),
        ..PipeConfig::default()
    };
    let mut pipe = Pipe::connect(
        config,
        offer("c", b"b", 0),
        "tcp",
        "s".into(),
        Instant::ZERO,
    );
    let w = pipe.write(Descriptor::default()).unwrap();
    assert_eq!(
        pipe.poll_timeout(),
        Some(Instant::from_nanos(5_000_000_000))
    );
    pipe.handle_timeout(Instant::from_nanos(4_999_999_999));
    assert!(pipe.error().is_none());
    pipe.handle_timeout(Instant::from_nanos(5_000_000_000));
    assert_eq!(pipe.error(), Some(&PipeError::HandshakeTimeout));
    let events: Vec<Event> = std::iter::from_fn(|| pipe.poll_event()).collect();
    assert!(events.contains(&Event::WriteDone {
        op: w,
        result: Err(PipeError::HandshakeTimeout)
    }));
    assert_eq!(pipe.poll_timeout(), None);
}

#[test]
fn garbage_on_the_primary_connection_fails_the_pipe_with_a_goodbye() {
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x54, 0x50, 0x49, 0x50, 1, 5, 0, 0, 0xff, 0xff, 0xff, 0xff],
    ] {
        let mut p = pair(8, Knobs::default());
        let r = p.read_descriptor(Side::Server);
        let primary = ConnId(1); // the replacement primary (transport switched to shm)
        p.inject(Side::Client, primary, bytes);
        p.drive();
        let events = p.events(Side::Server);
        let err = events
            .iter()
            .find_map(|e| match e {
                Event::DescriptorReady { op, result: Err(e) } if *op == r => Some(e.clone()),
                _ => None,
            })
            .expect("read failed");
        assert!(matches!(err, PipeError::Decode { .. }), "{err:?}");
        // The client is told why.
        let r = p.read_descriptor(Side::Client);
        p.drive();
        assert!(p.events(Side::Client).iter().any(|e| matches!(e,
            Event::DescriptorReady { op, result: Err(PipeError::PeerClosed { .. }) } if *op == r)));
    }
}

#[test]
fn descriptor_over_the_readers_limits_is_rejected() {
    let tight = PipeConfig {
        limits: Limits {
            max_tensors: 2,
            ..Limits::DEFAULT
        },
        ..PipeConfig::default()
    };
    let mut p = Pair::new(
        tight,
        offer("c", b"b", 0),
        offer("s", b"b", 0),
        "tcp",
        Knobs::default(),
        1,
    );
    p.drive();
    // The writer checks its own limits and refuses locally, with nothing sent...
    let too_many = message(1, 0, 3, |_| None);
    assert!(matches!(
        p.write(Side::Client, too_many.clone()),
        Err(CommandError::ExceedsLimits(_))
    ));
    // ...and a peer that sends one anyway is cut off before anything is allocated.
    let r = p.read_descriptor(Side::Server);
    let frame = too_many
        .descriptor()
        .with_repr(|d| frame_to_vec(d))
        .unwrap();
    p.inject(Side::Client, ConnId(1), &frame);
    p.drive();
    assert!(p.events(Side::Server).iter().any(|e| matches!(e,
        Event::DescriptorReady { op, result: Err(PipeError::Decode { error: DecodeError::LimitExceeded { limit: tp_wire::Limit::Tensors, .. }, .. }) } if *op == r)));
}

#[test]
fn write_without_a_channel_for_its_target_fails_alone() {
    let mut p = pair(2, Knobs::default());
    let mut bad = message(1, 1, 1, |_| Some(Device::cuda(7)));
    bad.tensors[0].source = Device::CPU;
    let w1 = p.write(Side::Client, bad).unwrap();
    let good = message(2, 1, 1, |_| None);
    let w2 = p.write(Side::Client, good.clone()).unwrap();
    let (desc, op) = read_one(&mut p, Side::Server, &[]);
    assert_delivered(&mut p, Side::Server, op, &desc, &good);
    let writes = write_results(&p.events(Side::Client));
    assert!(matches!(writes[0], (id, Err(PipeError::NoChannel { tensor: 0, .. })) if id == w1));
    assert_eq!(writes[1], (w2, Ok(())));
    assert!(p.peer(Side::Client).pipe.error().is_none());
}

#[test]
fn read_with_a_bad_allocation_is_refused_and_can_be_retried() {
    let mut p = pair(4, Knobs::default());
    let msg = message(1, 2, 1, |_| None);
    p.write(Side::Client, msg.clone()).unwrap();
    let op = p.read_descriptor(Side::Server);
    p.drive();
    let desc = take_descriptor(&mut p, Side::Server, op);
    let pipe = &mut p.peer(Side::Server).pipe;
    let one = [FakeBuf {
        len: 1,
        device: Device::CPU,
    }];
    assert!(matches!(
        pipe.read(op, &one, &one),
        Err(CommandError::Allocation(_))
    ));
    let (payloads, _) = FakeBuf::allocation(&desc, &[]);
    let gpu = [FakeBuf {
        len: desc.tensors[0].length as usize,
        device: Device::cuda(5),
    }];
    assert!(matches!(
        pipe.read(op, &payloads, &gpu),
        Err(CommandError::NoChannel { .. })
    ));
    assert!(matches!(
        pipe.read(OpId(999), &payloads, &gpu),
        Err(CommandError::UnknownOp(_))
    ));
    p.read(Side::Server, op, &desc, &[]).unwrap();
    p.drive();
    assert_delivered(&mut p, Side::Server, op, &desc, &msg);
    // A second read for the same op is refused.
    let pipe = &mut p.peer(Side::Server).pipe;
    assert!(pipe.read(op, &payloads, &gpu).is_err());
}

#[test]
fn reads_must_follow_message_order() {
    let mut p = pair(6, Knobs::default());
    p.write(Side::Client, message(1, 1, 0, |_| None)).unwrap();
    let first = p.read_descriptor(Side::Server);
    let second = p.read_descriptor(Side::Server);
    p.drive();
    let desc = take_descriptor(&mut p, Side::Server, first);
    let pipe = &mut p.peer(Side::Server).pipe;
    let bufs = [FakeBuf {
        len: 1,
        device: Device::CPU,
    }];
    let none: [FakeBuf; 0] = [];
    assert_eq!(
        pipe.read(second, &bufs, &none),
        Err(CommandError::NotAwaitingRead(second))
    );
    p.read(Side::Server, first, &desc, &[]).unwrap();
}

fn client_brochure_frame(min: u8, max: u8) -> Vec<u8> {
    let t = [TransportOffer {
        name: "tcp",
        priority: 0,
        domain_descriptor: b"",
    }];
    let d = [DeviceDescriptor {
        device: Device::CPU,
        descriptor: b"",
    }];
    let c = [ChannelOffer {
        name: "basic",
        priority: 0,
        devices: Seq::Slice(&d),
    }];
    frame_to_vec(&BrochureRepr {
        min_version: min,
        max_version: max,
        transports: Seq::Slice(&t),
        channels: Seq::Slice(&c),
    })
    .unwrap()
}

fn drain_io(pipe: &mut Pipe) -> Vec<Io> {
    std::iter::from_fn(|| pipe.poll_io()).collect()
}

#[test]
fn server_rejects_a_client_with_no_common_version() {
    let greeting = SpontaneousConnection {
        context_name: "future",
    };
    let mut s = Pipe::accept(
        PipeConfig::default(),
        offer("s", b"b", 0),
        "tcp",
        &greeting,
        7,
        Instant::ZERO,
    );
    drain_io(&mut s);
    s.handle_frame(ConnId(0), &client_brochure_frame(2, 3));
    assert!(matches!(
        s.error(),
        Some(PipeError::Negotiation(
            NegotiationError::NoCommonVersion { .. }
        ))
    ));
    let io = drain_io(&mut s);
    let Io::Send { frame, .. } = &io[0] else {
        panic!("expected a goodbye, got {io:?}")
    };
    let g: tp_wire::packet::GoodbyeRepr<'_> =
        tp_wire::packet::parse_frame(frame, &Limits::DEFAULT).unwrap();
    assert_eq!(g.reason, tp_wire::packet::CloseReason::VersionMismatch);
    assert!(io.contains(&Io::Close { conn: ConnId(0) }));
}

#[test]
fn server_rejects_a_client_with_no_common_transport() {
    let greeting = SpontaneousConnection { context_name: "c" };
    let mut server_offer = offer("s", b"b", 0);
    server_offer.transports.retain(|t| t.name == "shm");
    let mut s = Pipe::accept(
        PipeConfig::default(),
        server_offer,
        "shm",
        &greeting,
        7,
        Instant::ZERO,
    );
    drain_io(&mut s);
    s.handle_frame(ConnId(0), &client_brochure_frame(1, 1));
    assert_eq!(
        s.error(),
        Some(&PipeError::Negotiation(NegotiationError::NoCommonTransport))
    );
}

#[test]
fn client_rejects_an_answer_that_breaks_the_selection_rules() {
    // A server that claims "basic" when both sides share "cma" is caught.
    let mut c = Pipe::connect(
        PipeConfig::default(),
        offer("c", b"b", 0),
        "tcp",
        "s".into(),
        Instant::ZERO,
    );
    drain_io(&mut c);
    let greeting = SpontaneousConnection { context_name: "c" };
    let mut honest = Pipe::accept(
        PipeConfig::default(),
        offer("s", b"b", 0),
        "tcp",
        &greeting,
        1,
        Instant::ZERO,
    );
    drain_io(&mut honest);
    let brochure = offer("c", b"b", 0);
    let mut client2 = Pipe::connect(
        PipeConfig::default(),
        brochure,
        "tcp",
        "s".into(),
        Instant::ZERO,
    );
    let sent = drain_io(&mut client2);
    let Io::Send {
        frame: brochure_frame,
        ..
    } = &sent[1]
    else {
        panic!()
    };
    honest.handle_frame(ConnId(0), brochure_frame);
    let answer = drain_io(&mut honest)
        .into_iter()
        .find_map(|io| match io {
            Io::Send { frame, .. } => Some(frame),
            _ => None,
        })
        .unwrap();
    let mut forged = tp_wire::packet::parse_frame::<tp_wire::packet::BrochureAnswerRepr<'_>>(
        &answer,
        &Limits::DEFAULT,
    )
    .unwrap()
    .to_owned();
    for pair in &mut forged.pairs {
        pair.channel = "basic".into();
    }
    let forged = forged.with_repr(|a| frame_to_vec(a)).unwrap();
    c.handle_frame(ConnId(0), &forged);
    assert_eq!(
        c.error(),
        Some(&PipeError::Peer(PeerMisbehaved::InconsistentSelection))
    );
    // The honest answer is accepted.
    client2.handle_frame(ConnId(0), &answer);
    assert!(client2.is_established());
}

#[test]
fn a_frame_nobody_asked_for_fails_the_pipe() {
    let mut c = Pipe::connect(
        PipeConfig::default(),
        offer("c", b"b", 0),
        "tcp",
        "s".into(),
        Instant::ZERO,
    );
    drain_io(&mut c);
    c.handle_frame(ConnId(9), &client_brochure_frame(1, 1));
    assert!(matches!(
        c.error(),
        Some(PipeError::Peer(PeerMisbehaved::UnexpectedFrame { .. }))
    ));
}

#[test]
fn unknown_registration_id_is_refused_without_harm() {
    let greeting = SpontaneousConnection { context_name: "c" };
    let mut s = Pipe::accept(
        PipeConfig::default(),
        offer("s", b"b", 0),
        "tcp",
        &greeting,
        100,
        Instant::ZERO,
    );
    assert!(
        s.handle_requested_connection(tp_wire::packet::RegistrationId(5))
            .is_err()
    );
    assert!(s.error().is_none());
}

#[test]
fn truncated_frame_is_a_decode_error() {
    let mut c = Pipe::connect(
        PipeConfig::default(),
        offer("c", b"b", 0),
        "tcp",
        "s".into(),
        Instant::ZERO,
    );
    drain_io(&mut c);
    let f = client_brochure_frame(1, 1);
    c.handle_frame(ConnId(0), &f[..f.len() - 1]);
    assert!(matches!(
        c.error(),
        Some(PipeError::Decode {
            error: DecodeError::Truncated { .. },
            ..
        })
    ));
}

/// A channel operation that fails fails its own message, even when it was the message's
/// last I/O (found by tp-agent's two-process test: a write whose channel peer died
/// reported success).
#[test]
fn a_failed_channel_operation_fails_its_own_message() {
    for (seed, mut knobs) in SCHEDULES {
        knobs.fail_channels = true;
        let mut p = pair(seed, knobs);
        let w = p.write(Side::Client, message(7, 1, 1, |_| None)).unwrap();
        let r = p.read_descriptor(Side::Server);
        p.drive();
        let desc = take_descriptor(&mut p, Side::Server, r);
        p.read(Side::Server, r, &desc, &[]).unwrap();
        p.drive();
        let writes = write_results(&p.events(Side::Client));
        assert_eq!(writes.len(), 1, "seed {seed}");
        assert_eq!(writes[0].0, w);
        assert!(writes[0].1.is_err(), "seed {seed}: {writes:?}");
        let events = p.events(Side::Server);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::ReadDone { op, result: Err(_) } if *op == r)),
            "seed {seed}: {events:?}"
        );
    }
}

#[test]
fn a_recycled_frame_buffer_carries_the_next_descriptor() {
    let mut p = pair(1, SCHEDULES[0].1);
    let msg = message(7, 2, 0, |_| None);
    let pipe = &mut p.peer(Side::Client).pipe;
    let sent_frame = |pipe: &mut Pipe| {
        drain_io(pipe)
            .into_iter()
            .find_map(|io| match io {
                Io::Send { frame, .. } => Some(frame),
                _ => None,
            })
            .expect("the descriptor's frame")
    };

    // A write takes whatever buffer the harness handed back during the handshake.
    pipe.write(msg.descriptor()).unwrap();
    let fresh = sent_frame(pipe);

    let buf = Vec::with_capacity(4096);
    let room = buf.as_ptr();
    pipe.recycle_frame(buf);
    // One buffer is kept: a second is let go.
    pipe.recycle_frame(Vec::with_capacity(4096));
    pipe.write(msg.descriptor()).unwrap();
    let frame = sent_frame(pipe);
    assert_eq!(frame.as_ptr(), room, "encoded into the recycled buffer");
    assert_eq!(frame, fresh);

    // A buffer over the kept size is let go; the next frame is a fresh one.
    let big = Vec::with_capacity(1 << 20);
    let big_room = big.as_ptr();
    pipe.recycle_frame(big);
    pipe.write(msg.descriptor()).unwrap();
    let frame = sent_frame(pipe);
    assert_ne!(frame.as_ptr(), big_room);
    assert_eq!(frame, fresh);
}

#[test]
fn completed_writes_and_finished_reads_hand_their_descriptors_on() {
    let mut p = pair(1, SCHEDULES[0].1);
    let msg = message(3, 4, 0, |_| None);
    // Nothing completed yet: a recycled descriptor is a new, empty one.
    assert_eq!(
        p.peer(Side::Client).pipe.recycled_descriptor(),
        Descriptor::default()
    );
    let w = p.write(Side::Client, msg.clone()).unwrap();
    let (desc, r) = read_one(&mut p, Side::Server, &[]);
    assert_delivered(&mut p, Side::Server, r, &desc, &msg);
    assert!(write_results(&p.events(Side::Client)).contains(&(w, Ok(()))));

    // The completed write's descriptor comes back empty, with its room; so does the
    // reader's kept copy once the read took its buffers.
    for side in [Side::Client, Side::Server] {
        let d = p.peer(side).pipe.recycled_descriptor();
        assert_eq!(d, Descriptor::default());
        assert!(
            d.payloads.capacity() >= 4,
            "{side:?}: the lists keep their room"
        );
    }
    // And a descriptor filled from one carries the next message as a fresh one would.
    let next = message(4, 4, 0, |_| None);
    let mut d = p.peer(Side::Client).pipe.recycled_descriptor();
    d.metadata.extend_from_slice(&next.descriptor().metadata);
    d.payloads.extend(next.descriptor().payloads);
    assert_eq!(d, next.descriptor());
}
