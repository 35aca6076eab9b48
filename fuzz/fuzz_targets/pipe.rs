#![no_main]
//! Two pipes joined by the harness, driven by random local actions (writes, reads, closes,
//! kills, time) and random peer bytes injected on any connection at any moment. Nothing
//! may panic, and every operation must complete exactly once.

use std::collections::BTreeMap;
use std::time::Duration;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use tp_wire::Device;
use tp_wire::pipe::{ConnId, Event, OpId, PipeConfig, Side};
use tp_wire::testing::{Knobs, Message, Pair, TestTensor, offer};

#[derive(Arbitrary, Debug)]
enum Action {
    Write {
        server: bool,
        payloads: Vec<u8>,
        tensors: Vec<(u8, u8, Option<u8>)>,
        meta: u8,
    },
    ReadDescriptor {
        server: bool,
    },
    Step(u8),
    Inject {
        server: bool,
        conn: u8,
        bytes: Vec<u8>,
    },
    Close {
        server: bool,
    },
    Kill {
        server: bool,
    },
    Time(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    seed: u64,
    chunk: u8,
    delay: u8,
    gpus: (u8, u8),
    same_domain: bool,
    actions: Vec<Action>,
}

fn side(server: bool) -> Side {
    if server { Side::Server } else { Side::Client }
}

fn device(b: u8) -> Device {
    if b % 3 == 0 {
        Device::CPU
    } else {
        Device::cuda(u32::from(b % 3))
    }
}

#[derive(Default)]
struct Counts {
    writes: BTreeMap<OpId, u32>,
    descriptors: BTreeMap<OpId, u32>,
    reads: BTreeMap<OpId, u32>,
}

fn observe(p: &mut Pair, s: Side, counts: &mut Counts) {
    for e in p.events(s) {
        match e {
            Event::WriteDone { op, .. } => *counts.writes.entry(op).or_default() += 1,
            Event::DescriptorReady { op, result } => {
                *counts.descriptors.entry(op).or_default() += 1;
                if let Ok(d) = result {
                    let devices: Vec<Device> =
                        (0..d.tensors.len()).map(|i| device(i as u8)).collect();
                    if p.read(s, op, &d, &devices).is_ok() {
                        counts.reads.insert(op, 0);
                    } else if p.read(s, op, &d, &[]).is_ok() {
                        counts.reads.insert(op, 0);
                    }
                }
            }
            Event::ReadDone { op, .. } => *counts.reads.entry(op).or_default() += 1,
            _ => {}
        }
    }
}

fuzz_target!(|input: Input| {
    let domain: &[u8] = b"boot";
    let other: &[u8] = if input.same_domain {
        b"boot"
    } else {
        b"elsewhere"
    };
    let knobs = Knobs {
        max_chunk: usize::from(input.chunk).max(1),
        delay_percent: input.delay % 100,
        fail_channels: input.delay % 7 == 0,
    };
    let mut p = Pair::new(
        PipeConfig::default(),
        offer("c", domain, u32::from(input.gpus.0 % 3)),
        offer("s", other, u32::from(input.gpus.1 % 3)),
        "tcp",
        knobs,
        input.seed,
    );
    let mut counts = [Counts::default(), Counts::default()];
    let mut issued_writes = [Vec::new(), Vec::new()];
    let mut issued_reads = [Vec::new(), Vec::new()];
    let mut dead = [false, false];
    for action in input.actions.into_iter().take(64) {
        match action {
            Action::Write {
                server,
                payloads,
                tensors,
                meta,
            } => {
                let s = side(server);
                if dead[server as usize] || (s == Side::Server && p.server.is_none()) {
                    continue;
                }
                let msg = Message {
                    metadata: vec![meta; usize::from(meta % 8)],
                    payloads: payloads
                        .iter()
                        .take(4)
                        .map(|&n| (vec![n; usize::from(n)], vec![n]))
                        .collect(),
                    tensors: tensors
                        .iter()
                        .take(4)
                        .map(|&(n, src, dst)| TestTensor {
                            data: vec![n; usize::from(n) * 3],
                            source: device(src),
                            target: dst.map(device),
                            metadata: vec![],
                        })
                        .collect(),
                };
                if let Ok(op) = p.write(s, msg) {
                    issued_writes[server as usize].push(op);
                }
            }
            Action::ReadDescriptor { server } => {
                if dead[server as usize] || (server && p.server.is_none()) {
                    continue;
                }
                issued_reads[server as usize].push(p.read_descriptor(side(server)));
            }
            Action::Step(n) => {
                for _ in 0..n {
                    p.step();
                }
            }
            Action::Inject {
                server,
                conn,
                bytes,
            } => p.inject(side(server), ConnId(u32::from(conn % 8)), &bytes),
            Action::Close { server } => {
                if !dead[server as usize] && !(server && p.server.is_none()) {
                    p.close(side(server));
                }
            }
            Action::Kill { server } => {
                if !(server && p.server.is_none()) {
                    p.kill(side(server));
                    dead[server as usize] = true;
                }
            }
            Action::Time(secs) => p.advance_time(Duration::from_secs(u64::from(secs))),
        }
        for (i, s) in [Side::Client, Side::Server].into_iter().enumerate() {
            observe(&mut p, s, &mut counts[i]);
        }
    }
    // Wind down: close both live sides and let everything settle.
    for (i, s) in [Side::Client, Side::Server].into_iter().enumerate() {
        if !dead[i] && !(s == Side::Server && p.server.is_none()) {
            p.close(s);
        }
    }
    for _ in 0..4 {
        p.drive();
        for (i, s) in [Side::Client, Side::Server].into_iter().enumerate() {
            observe(&mut p, s, &mut counts[i]);
        }
    }
    for i in 0..2 {
        if dead[i] {
            continue; // a killed side's pipe never runs again: nothing to check
        }
        for op in &issued_writes[i] {
            assert_eq!(
                counts[i].writes.get(op),
                Some(&1),
                "write {op:?} completed wrongly"
            );
        }
        for op in &issued_reads[i] {
            assert_eq!(
                counts[i].descriptors.get(op),
                Some(&1),
                "descriptor {op:?} delivered wrongly"
            );
        }
        for (op, n) in &counts[i].reads {
            assert_eq!(*n, 1, "read {op:?} completed {n} times");
        }
    }
});
