//! Random interleavings of write, read and close through the harness.

use std::collections::BTreeMap;

use proptest::prelude::*;
use tp_wire::Device;
use tp_wire::pipe::{Event, OpId, PipeConfig, Side};
use tp_wire::testing::{Knobs, Message, Pair, TestTensor, offer};

#[derive(Clone, Debug)]
enum Action {
    Write(bool, Vec<usize>, Vec<(usize, bool)>),
    ReadDescriptor(bool),
    Step(u8),
    Close(bool),
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (any::<bool>(), prop::collection::vec(0usize..300, 0..3), prop::collection::vec((0usize..3000, any::<bool>()), 0..3))
            .prop_map(|(s, p, t)| Action::Write(s, p, t)),
        4 => any::<bool>().prop_map(Action::ReadDescriptor),
        3 => any::<u8>().prop_map(Action::Step),
        1 => any::<bool>().prop_map(Action::Close),
    ]
}

fn side(server: bool) -> Side {
    if server { Side::Server } else { Side::Client }
}

#[derive(Default, Debug)]
struct Log {
    writes: Vec<OpId>,
    reads: Vec<OpId>,
    write_done: Vec<(OpId, bool)>,
    desc_ready: Vec<OpId>,
    read_done: Vec<(OpId, bool)>,
    accepted: Vec<OpId>,
    sent: Vec<Message>,
}

fn observe(p: &mut Pair, s: Side, log: &mut Log) {
    for e in p.events(s) {
        match e {
            Event::WriteDone { op, result } => log.write_done.push((op, result.is_ok())),
            Event::DescriptorReady { op, result } => {
                log.desc_ready.push(op);
                if let Ok(d) = result {
                    p.read(s, op, &d, &[Device::CPU; 3])
                        .expect("read of a delivered descriptor");
                    log.accepted.push(op);
                }
            }
            Event::ReadDone { op, result } => log.read_done.push((op, result.is_ok())),
            _ => {}
        }
    }
}

/// Drives the pair and answers its events until neither produces anything more. Each
/// delivered descriptor is read in its own round (the next descriptor follows the previous
/// message's payloads on the connection), so the number of rounds grows with the reads
/// pending; a fixed count would stop early and report a message as lost.
fn settle(p: &mut Pair, logs: &mut [Log; 2]) {
    for _ in 0..10_000 {
        let steps = p.drive();
        let before: usize = logs.iter().map(Log::events).sum();
        for (i, log) in logs.iter_mut().enumerate() {
            observe(p, side(i == 1), log);
        }
        if steps == 0 && logs.iter().map(Log::events).sum::<usize>() == before {
            return;
        }
    }
    panic!("the pair never went quiet");
}

impl Log {
    fn events(&self) -> usize {
        self.write_done.len() + self.desc_ready.len() + self.read_done.len()
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn interleavings_keep_order_and_exactly_once(
        seed in any::<u64>(),
        chunk in 1usize..64,
        delay in 0u8..90,
        actions in prop::collection::vec(action(), 0..40),
    ) {
        let mut p = Pair::new(PipeConfig::default(), offer("c", b"b", 0), offer("s", b"b", 0), "tcp",
            Knobs { max_chunk: chunk, delay_percent: delay, fail_channels: false }, seed);
        p.drive();
        let mut logs = [Log::default(), Log::default()];
        let mut closed = false;
        let mut received: BTreeMap<(usize, OpId), ()> = BTreeMap::new();
        for a in actions {
            match a {
                Action::Write(s, payloads, tensors) => {
                    let msg = Message {
                        metadata: vec![1, 2, 3],
                        payloads: payloads.iter().map(|&n| ((0..n).map(|i| i as u8).collect(), vec![n as u8])).collect(),
                        tensors: tensors.iter().map(|&(n, t)| TestTensor {
                            data: (0..n).map(|i| (i * 7) as u8).collect(),
                            source: Device::CPU,
                            target: t.then_some(Device::CPU),
                            metadata: vec![],
                        }).collect(),
                    };
                    let op = p.write(side(s), msg.clone()).unwrap();
                    logs[s as usize].writes.push(op);
                    logs[s as usize].sent.push(msg);
                }
                Action::ReadDescriptor(s) => {
                    let op = p.read_descriptor(side(s));
                    logs[s as usize].reads.push(op);
                }
                Action::Step(n) => for _ in 0..n { p.step(); },
                Action::Close(s) => { p.close(side(s)); closed = true; }
            }
            for (i, log) in logs.iter_mut().enumerate() { observe(&mut p, side(i == 1), log); }
        }
        // Settle, then check what arrived before closing.
        settle(&mut p, &mut logs);
        prop_assert_eq!(p.mismatches, 0);
        for i in 0..2 {
            let reader = side(i == 1);
            let writer = &logs[1 - i];
            let ok_reads: Vec<OpId> = logs[i].read_done.iter().filter(|r| r.1).map(|r| r.0).collect();
            // Successful reads deliver the peer's messages intact, in write order.
            for (k, op) in ok_reads.iter().enumerate() {
                let got = p.take_received(reader, *op).unwrap();
                let msg = &writer.sent[k];
                prop_assert_eq!(got.payloads.len(), msg.payloads.len());
                for (g, (d, _)) in got.payloads.iter().zip(&msg.payloads) { prop_assert_eq!(g, d); }
                for ((g, _), t) in got.tensors.iter().zip(&msg.tensors) { prop_assert_eq!(g, &t.data); }
                received.insert((i, *op), ());
            }
            if !closed {
                // Nothing failed. A write with tensors needs the peer to read it (its tensors
                // pair with the peer's receives); writes complete in order, so exactly the
                // longest prefix of writes that are read or tensor-free has completed.
                prop_assert!(logs[i].write_done.iter().all(|w| w.1));
                let peer_reads = logs[1 - i].reads.len();
                let done = logs[i].sent.iter().enumerate()
                    .take_while(|(k, m)| *k < peer_reads || m.tensors.is_empty())
                    .count();
                prop_assert_eq!(logs[i].write_done.len(), done);
                let expected = logs[i].reads.len().min(writer.writes.len());
                prop_assert_eq!(ok_reads.len(), expected);
            }
        }
        // Close both, settle: everything completes exactly once, in issue order.
        p.close(Side::Client);
        p.close(Side::Server);
        settle(&mut p, &mut logs);
        for log in &logs {
            prop_assert_eq!(log.write_done.iter().map(|w| w.0).collect::<Vec<_>>(), log.writes.clone());
            prop_assert_eq!(&log.desc_ready, &log.reads);
            prop_assert_eq!(log.read_done.iter().map(|r| r.0).collect::<Vec<_>>(), log.accepted.clone());
        }
    }
}
