//! tp-wire's main job, end to end, with no I/O: a client and a server pipe meet through
//! the in-memory harness, negotiate a transport and channels, and move one message —
//! payloads and tensors — both ways. Every step is printed.
//!
//! Run: `cargo run -p tp-wire --example walkthrough`

use tp_wire::Device;
use tp_wire::Limits;
use tp_wire::packet::{
    DescriptorRepr, PayloadDesc, Seq, TensorDesc, emit_frame, frame_len, parse_frame,
};
use tp_wire::pipe::{Event, PipeConfig, Side};
use tp_wire::testing::{Knobs, Message, Pair, TestTensor, offer};

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn show(pair: &mut Pair, side: Side) -> Vec<Event> {
    let events = pair.events(side);
    for e in &events {
        let line = match e {
            Event::ConnectionsRequested { ids } => {
                format!("asks the client for {} extra connections", ids.len())
            }
            Event::ChannelReady {
                channel,
                name,
                conns,
                endpoint,
            } => {
                format!(
                    "channel {} = {name} ready on {} connection(s) as {endpoint:?}",
                    channel.0,
                    conns.len()
                )
            }
            Event::Established { version, transport } => {
                format!("established: protocol v{version}, transport {transport}")
            }
            Event::DescriptorReady { op, result: Ok(d) } => format!(
                "descriptor of message {} arrived: {} payload(s), {} tensor(s), metadata {:?}",
                op.0,
                d.payloads.len(),
                d.tensors.len(),
                String::from_utf8_lossy(&d.metadata)
            ),
            Event::ReadDone { op, result } => format!("read {} done: {result:?}", op.0),
            Event::WriteDone { op, result } => format!("write {} done: {result:?}", op.0),
            other => format!("{other:?}"),
        };
        println!("  {side:?}: {line}");
    }
    events
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("1. Encoding a descriptor by hand (zero-copy view -> caller's buffer -> view)");
    let payloads = [PayloadDesc {
        length: 11,
        metadata: b"greeting",
    }];
    let tensors = [TensorDesc {
        length: 4096,
        source_device: Device::CPU,
        target_device: None,
        metadata: b"f32[1024]",
    }];
    let desc = DescriptorRepr {
        metadata: b"demo",
        payloads: Seq::Slice(&payloads),
        tensors: Seq::Slice(&tensors),
    };
    let mut buf = vec![0u8; frame_len(&desc)];
    let n = emit_frame(&desc, &mut buf)?;
    println!(
        "  {n} bytes: header {} | body {}",
        hex(&buf[..12]),
        hex(&buf[12..n])
    );
    let back: DescriptorRepr<'_> = parse_frame(&buf, &Limits::DEFAULT)?;
    assert_eq!(back, desc);
    println!("  decoded back, borrowing from the buffer: {back:?}\n");

    println!("2. Handshake: both sides share a boot id, so shm beats tcp and cma beats basic");
    let mut pair = Pair::new(
        PipeConfig::default(),
        offer("client", b"boot-1/netns-1", 0),
        offer("server", b"boot-1/netns-1", 0),
        "tcp",
        Knobs {
            max_chunk: 7,
            delay_percent: 20,
            ..Knobs::default()
        },
        42,
    );
    let steps = pair.drive();
    show(&mut pair, Side::Client);
    show(&mut pair, Side::Server);
    println!("  ({steps} scheduled steps, bytes delivered in pieces of at most 7)\n");

    println!("3. One message each way: 2 payloads + 2 tensors");
    let message = |tag: &str| Message {
        metadata: format!("hello from the {tag}").into_bytes(),
        payloads: vec![
            (b"payload one".to_vec(), b"p0".to_vec()),
            (vec![7u8; 3000], b"p1".to_vec()),
        ],
        tensors: vec![
            TestTensor {
                data: (0..=255).cycle().take(4096).collect(),
                source: Device::CPU,
                target: None,
                metadata: b"t0".to_vec(),
            },
            TestTensor {
                data: vec![1; 100],
                source: Device::CPU,
                target: Some(Device::CPU),
                metadata: b"t1".to_vec(),
            },
        ],
    };
    let sent = [
        (Side::Client, message("client")),
        (Side::Server, message("server")),
    ];
    for (side, msg) in &sent {
        pair.write(*side, msg.clone())?;
    }
    let reads = [Side::Server, Side::Client].map(|s| (s, pair.read_descriptor(s)));
    pair.drive();
    for (reader, op) in reads {
        for e in show(&mut pair, reader) {
            if let Event::DescriptorReady {
                op: got,
                result: Ok(d),
            } = e
            {
                assert_eq!(got, op);
                pair.read(reader, op, &d, &[Device::CPU, Device::CPU])?;
            }
        }
    }
    pair.drive();
    for (side, msg) in &sent {
        let reader = if *side == Side::Client {
            Side::Server
        } else {
            Side::Client
        };
        show(&mut pair, *side);
        show(&mut pair, reader);
        let op = reads
            .iter()
            .find(|(s, _)| *s == reader)
            .map(|(_, op)| *op)
            .ok_or("no read")?;
        let got = pair
            .take_received(reader, op)
            .ok_or("read did not complete")?;
        let ok = got
            .payloads
            .iter()
            .zip(&msg.payloads)
            .all(|(g, (d, _))| g == d)
            && got
                .tensors
                .iter()
                .zip(&msg.tensors)
                .all(|((g, _), t)| *g == t.data);
        println!("  {reader:?} verified every byte of the {side:?}'s message: {ok}");
        assert!(ok);
    }

    println!("\n4. Close: the client says goodbye, the server learns why");
    pair.close(Side::Client);
    pair.read_descriptor(Side::Server);
    pair.drive();
    show(&mut pair, Side::Client);
    show(&mut pair, Side::Server);
    Ok(())
}
