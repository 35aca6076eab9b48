//! A deterministic two-endpoint harness: two [`Pipe`]s joined through in-memory links.
//!
//! [`Pair`] plays the driver for both ends (quinn-proto's `Pair` idiom): it carries out
//! every [`Io`] and [`ChannelOp`] the pipes emit on in-memory byte links and channels,
//! and feeds completions back. Nothing happens until [`Pair::step`] or [`Pair::drive`]
//! is called, and every choice — which link delivers next, how many bytes, when a
//! completion is reported — comes from a seeded generator, so a run is reproducible from
//! its seed. [`Knobs`] set how hard the schedule shakes things:
//! - `max_chunk`: bytes are delivered in pieces of 1..=`max_chunk` (splits frames and
//!   payloads at arbitrary offsets);
//! - `delay_percent`: the chance that a step leaves a ready action for later (delays);
//! - actions on different connections and channels are picked in random order, so
//!   deliveries are reordered across connections (never within one: links are streams).
//!
//! The harness also plays the listener: it reads the first frame of each connection the
//! client opens and routes it by its [`Greeting`].
//!
//! It checks the driver contract as it goes: a channel send and its paired receive must
//! have the same length; a mismatch fails both and is counted in [`Pair::mismatches`].
#![allow(
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::as_conversions,
    missing_docs
)]

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

use crate::Limits;
use crate::device::Device;
use crate::frame::{FrameHeader, HEADER_LEN};
use crate::packet::{Descriptor, Greeting, Payload, Tensor};
use crate::pipe::{
    ChannelId, ChannelOp, CommandError, ConnId, Event, Io, IoErrorKind, LocalOffer, OpId, Pipe,
    PipeConfig, Side,
};
use crate::time::Instant;

/// A message with its bytes, as a user would write it.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Message {
    pub metadata: Vec<u8>,
    /// `(data, metadata)` per payload.
    pub payloads: Vec<(Vec<u8>, Vec<u8>)>,
    pub tensors: Vec<TestTensor>,
}

/// A tensor with its bytes.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct TestTensor {
    pub data: Vec<u8>,
    pub source: Device,
    pub target: Option<Device>,
    pub metadata: Vec<u8>,
}

impl Message {
    /// The descriptor a writer passes to [`Pipe::write`].
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            metadata: self.metadata.clone(),
            payloads: self
                .payloads
                .iter()
                .map(|(d, m)| Payload {
                    length: d.len() as u64,
                    metadata: m.clone(),
                })
                .collect(),
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor {
                    length: t.data.len() as u64,
                    source_device: t.source,
                    target_device: t.target,
                    metadata: t.metadata.clone(),
                })
                .collect(),
        }
    }
}

/// What a read delivered.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Received {
    pub payloads: Vec<Vec<u8>>,
    /// `(data, device it was allocated on)`.
    pub tensors: Vec<(Vec<u8>, Device)>,
}

/// A buffer stand-in for [`Pipe::read`]: a length and a device.
#[derive(Clone, Copy, Debug)]
pub struct FakeBuf {
    pub len: usize,
    pub device: Device,
}

impl FakeBuf {
    /// Buffers fitting `desc`: payloads on the CPU; tensor `i` on its target device, else
    /// on `devices[i]`, else on the CPU.
    pub fn allocation(desc: &Descriptor, devices: &[Device]) -> (Vec<Self>, Vec<Self>) {
        let payloads = desc
            .payloads
            .iter()
            .map(|p| Self {
                len: p.length as usize,
                device: Device::CPU,
            })
            .collect();
        let tensors = desc
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| Self {
                len: t.length as usize,
                device: t
                    .target_device
                    .or(devices.get(i).copied())
                    .unwrap_or(Device::CPU),
            })
            .collect();
        (payloads, tensors)
    }
}

impl crate::allocation::Buffer for FakeBuf {
    fn len(&self) -> usize {
        self.len
    }

    fn device(&self) -> Device {
        self.device
    }
}

/// How hard the schedule shakes deliveries.
#[derive(Clone, Copy, Debug)]
pub struct Knobs {
    /// Largest piece of a byte stream delivered in one step (at least 1).
    pub max_chunk: usize,
    /// Chance, in percent, that a step defers a ready action.
    pub delay_percent: u8,
    /// Every channel transfer fails on both ends (a channel whose peer died).
    pub fail_channels: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            max_chunk: usize::MAX,
            delay_percent: 0,
            fail_channels: false,
        }
    }
}

/// splitmix64: a tiny deterministic generator for schedules.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

#[derive(Debug, Default)]
struct Dir {
    /// Sent, not yet visible to the reader.
    wire: VecDeque<u8>,
    /// Visible to the reader.
    arrived: VecDeque<u8>,
    /// The writer closed (or died): after the bytes, end of stream.
    closed: bool,
}

#[derive(Debug, Default)]
struct Link {
    /// Index 0: client → server; 1: server → client.
    dirs: [Dir; 2],
    client: Option<ConnId>,
    server: Option<ConnId>,
}

#[derive(Debug)]
enum PendingRead {
    Frame,
    Payload { op: OpId, index: usize, len: usize },
}

#[derive(Debug, Default)]
struct ChannelEnd {
    sends: VecDeque<(OpId, usize)>,
    recvs: VecDeque<(OpId, usize, usize)>,
    closed: bool,
}

/// One side's driver state.
#[derive(Debug)]
pub struct Peer {
    pub pipe: Pipe,
    reads: BTreeMap<ConnId, VecDeque<PendingRead>>,
    closed_conns: Vec<ConnId>,
    writes: BTreeMap<OpId, Message>,
    allocations: BTreeMap<OpId, Received>,
    done_reads: BTreeMap<OpId, Received>,
    channels: BTreeMap<ChannelId, ChannelEnd>,
    /// Completions waiting to be reported (payload sends), for delay.
    send_done: VecDeque<(OpId, Result<(), IoErrorKind>)>,
    channel_done: VecDeque<(ChannelId, OpId, Result<(), IoErrorKind>)>,
    /// Every event the pipe emitted, for the test to drain.
    pub events: VecDeque<Event>,
    dead: bool,
}

impl Peer {
    fn new(pipe: Pipe) -> Self {
        Self {
            pipe,
            reads: BTreeMap::new(),
            closed_conns: Vec::new(),
            writes: BTreeMap::new(),
            allocations: BTreeMap::new(),
            done_reads: BTreeMap::new(),
            channels: BTreeMap::new(),
            send_done: VecDeque::new(),
            channel_done: VecDeque::new(),
            events: VecDeque::new(),
            dead: false,
        }
    }
}

/// Two pipes and the links between them.
#[derive(Debug)]
pub struct Pair {
    pub client: Peer,
    pub server: Option<Peer>,
    server_offer: LocalOffer,
    server_transport: String,
    config: PipeConfig,
    links: Vec<Link>,
    rng: Rng,
    knobs: Knobs,
    pub now: Instant,
    /// Channel transfers whose send and receive lengths differed (must stay 0 unless
    /// bytes were injected).
    pub mismatches: usize,
}

const DIR_C2S: usize = 0;
const DIR_S2C: usize = 1;

impl Pair {
    /// Creates a pair: the client connects with `transport` to a server offering
    /// `server_offer`.
    pub fn new(
        config: PipeConfig,
        client_offer: LocalOffer,
        server_offer: LocalOffer,
        transport: &str,
        knobs: Knobs,
        seed: u64,
    ) -> Self {
        let client = Pipe::connect(
            config,
            client_offer,
            transport,
            String::from("server"),
            Instant::ZERO,
        );
        let links = alloc::vec![Link {
            client: Some(ConnId(0)),
            ..Link::default()
        }];
        Self {
            client: Peer::new(client),
            server: None,
            server_offer,
            server_transport: String::from(transport),
            config,
            links,
            rng: Rng(seed),
            knobs: Knobs {
                max_chunk: knobs.max_chunk.max(1),
                ..knobs
            },
            now: Instant::ZERO,
            mismatches: 0,
        }
    }

    pub fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Client => &mut self.client,
            Side::Server => self.server.as_mut().expect("server pipe not accepted yet"),
        }
    }

    /// Writes `msg` from `side`.
    pub fn write(&mut self, side: Side, msg: Message) -> Result<OpId, CommandError> {
        let reuse = self.rng.below(2) == 0;
        let peer = self.peer(side);
        let fresh = msg.descriptor();
        // Half the writes fill a descriptor the pipe recycled, as a driver may.
        let desc = if reuse {
            let mut d = peer.pipe.recycled_descriptor();
            assert_eq!(d, Descriptor::default(), "a recycled descriptor is empty");
            d.metadata.extend_from_slice(&fresh.metadata);
            d.payloads.extend(fresh.payloads.iter().cloned());
            d.tensors.extend(fresh.tensors.iter().cloned());
            d
        } else {
            fresh
        };
        let op = peer.pipe.write(desc)?;
        peer.writes.insert(op, msg);
        self.flush();
        Ok(op)
    }

    pub fn read_descriptor(&mut self, side: Side) -> OpId {
        let op = self.peer(side).pipe.read_descriptor();
        self.flush();
        op
    }

    /// Allocates buffers for `desc` (tensors on `devices`, or on their target device, or
    /// on the CPU) and calls [`Pipe::read`].
    pub fn read(
        &mut self,
        side: Side,
        op: OpId,
        desc: &Descriptor,
        devices: &[Device],
    ) -> Result<(), CommandError> {
        let peer = self.peer(side);
        let (payloads, tensors) = FakeBuf::allocation(desc, devices);
        peer.pipe.read(op, &payloads, &tensors)?;
        peer.allocations.insert(
            op,
            Received {
                payloads: payloads.iter().map(|b| alloc::vec![0u8; b.len]).collect(),
                tensors: tensors
                    .iter()
                    .map(|b| (alloc::vec![0u8; b.len], b.device))
                    .collect(),
            },
        );
        self.flush();
        Ok(())
    }

    /// The bytes a successful read delivered.
    pub fn take_received(&mut self, side: Side, op: OpId) -> Option<Received> {
        self.peer(side).done_reads.remove(&op)
    }

    pub fn close(&mut self, side: Side) {
        self.peer(side).pipe.close();
        self.flush();
    }

    /// Kills `side` as a crashed process would: its connections end abruptly, it runs no
    /// more, and its pending channel operations vanish.
    pub fn kill(&mut self, side: Side) {
        self.peer(side).dead = true;
        let dir = if side == Side::Client {
            DIR_C2S
        } else {
            DIR_S2C
        };
        for link in &mut self.links {
            link.dirs[dir].closed = true;
            link.dirs[dir].wire.clear();
            link.dirs[dir].arrived.clear();
        }
        // Its channels break: the survivor's pending channel operations fail.
        let other = if side == Side::Client {
            Side::Server
        } else {
            Side::Client
        };
        let channels: Vec<ChannelId> = self
            .peer_opt(other)
            .map(|p| p.channels.keys().copied().collect())
            .unwrap_or_default();
        for ch in channels {
            self.close_channel(other, ch);
        }
        self.flush();
    }

    /// Advances simulated time and lets the pipes check their timers.
    pub fn advance_time(&mut self, by: core::time::Duration) {
        self.now = self.now + by;
        let now = self.now;
        for side in [Side::Client, Side::Server] {
            if let Some(p) = self.peer_opt(side)
                && !p.dead
            {
                p.pipe.handle_timeout(now);
            }
        }
        self.flush();
    }

    fn peer_opt(&mut self, side: Side) -> Option<&mut Peer> {
        match side {
            Side::Client => Some(&mut self.client),
            Side::Server => self.server.as_mut(),
        }
    }

    /// Carries out everything the pipes queued (writes land on the wire at once).
    fn flush(&mut self) {
        loop {
            let mut progressed = false;
            for side in [Side::Client, Side::Server] {
                progressed |= self.flush_side(side);
            }
            if !progressed {
                break;
            }
        }
    }

    fn link_of(&self, side: Side, conn: ConnId) -> Option<usize> {
        self.links.iter().position(|l| match side {
            Side::Client => l.client == Some(conn),
            Side::Server => l.server == Some(conn),
        })
    }

    fn flush_side(&mut self, side: Side) -> bool {
        let mut progressed = false;
        loop {
            let Some(peer) = self.peer_opt(side) else {
                return progressed;
            };
            if peer.dead {
                return progressed;
            }
            if let Some(io) = peer.pipe.poll_io() {
                progressed = true;
                self.do_io(side, io);
                continue;
            }
            if let Some(op) = peer.pipe.poll_channel_op() {
                progressed = true;
                self.do_channel_op(side, op);
                continue;
            }
            if let Some(ev) = peer.pipe.poll_event() {
                progressed = true;
                self.on_event(side, &ev);
                self.peer(side).events.push_back(ev);
                continue;
            }
            return progressed;
        }
    }

    fn on_event(&mut self, side: Side, ev: &Event) {
        let peer = self.peer(side);
        match ev {
            Event::ChannelReady { channel, .. } => {
                peer.channels.entry(*channel).or_default();
            }
            Event::ReadDone { op, result } => {
                let data = peer.allocations.remove(op);
                if let (Ok(()), Some(data)) = (result, data) {
                    peer.done_reads.insert(*op, data);
                }
            }
            Event::WriteDone { op, .. } => {
                peer.writes.remove(op);
            }
            _ => {}
        }
    }

    fn do_io(&mut self, side: Side, io: Io) {
        let dir = if side == Side::Client {
            DIR_C2S
        } else {
            DIR_S2C
        };
        match io {
            Io::Connect { conn, .. } => {
                assert_eq!(side, Side::Client, "only clients connect");
                self.links.push(Link {
                    client: Some(conn),
                    ..Link::default()
                });
            }
            Io::Send { conn, frame } => {
                if let Some(l) = self
                    .link_of(side, conn)
                    .filter(|&l| !self.links[l].dirs[dir].closed)
                {
                    self.links[l].dirs[dir].wire.extend(&frame);
                }
                // Half the sent frames' buffers go back to be encoded into again, so
                // every scenario runs with reused and with fresh frame buffers.
                if self.rng.below(2) == 0 {
                    self.peer(side).pipe.recycle_frame(frame);
                }
            }
            Io::SendPayload {
                conn, op, index, ..
            } => {
                let link = self
                    .link_of(side, conn)
                    .filter(|&l| !self.links[l].dirs[dir].closed);
                let peer = self.peer(side);
                let result = match link {
                    Some(l) => {
                        let data = peer.writes[&op].payloads[index].0.clone();
                        self.links[l].dirs[dir].wire.extend(data);
                        Ok(())
                    }
                    None => Err(IoErrorKind::Reset),
                };
                self.peer(side).send_done.push_back((op, result));
            }
            Io::RecvFrame { conn } => {
                self.peer(side)
                    .reads
                    .entry(conn)
                    .or_default()
                    .push_back(PendingRead::Frame);
            }
            Io::RecvPayload {
                conn,
                op,
                index,
                len,
            } => {
                self.peer(side)
                    .reads
                    .entry(conn)
                    .or_default()
                    .push_back(PendingRead::Payload {
                        op,
                        index,
                        len: len as usize,
                    });
            }
            Io::Close { conn } => {
                if let Some(l) = self.link_of(side, conn) {
                    self.links[l].dirs[dir].closed = true;
                }
                let peer = self.peer(side);
                peer.closed_conns.push(conn);
                // Pending reads on a connection we closed fail now.
                if let Some(reads) = peer.reads.remove(&conn) {
                    for r in reads {
                        if let PendingRead::Payload { op, .. } = r {
                            peer.pipe
                                .handle_payload_done(op, Err(IoErrorKind::Reset))
                                .unwrap();
                        }
                    }
                }
            }
        }
    }

    fn do_channel_op(&mut self, side: Side, op: ChannelOp) {
        let peer = self.peer(side);
        match op {
            ChannelOp::Send {
                channel,
                op,
                tensor,
                ..
            } => {
                let ch = peer.channels.entry(channel).or_default();
                if ch.closed {
                    peer.channel_done
                        .push_back((channel, op, Err(IoErrorKind::Reset)));
                } else {
                    ch.sends.push_back((op, tensor));
                }
            }
            ChannelOp::Recv {
                channel,
                op,
                tensor,
                len,
            } => {
                let ch = peer.channels.entry(channel).or_default();
                if ch.closed {
                    peer.channel_done
                        .push_back((channel, op, Err(IoErrorKind::Reset)));
                } else {
                    ch.recvs.push_back((op, tensor, len as usize));
                }
            }
            ChannelOp::Close { channel } => {
                self.close_channel(side, channel);
                let other = if side == Side::Client {
                    Side::Server
                } else {
                    Side::Client
                };
                if self.peer_opt(other).is_some() {
                    self.close_channel(other, channel);
                }
            }
        }
    }

    fn close_channel(&mut self, side: Side, channel: ChannelId) {
        let peer = self.peer(side);
        let ch = peer.channels.entry(channel).or_default();
        ch.closed = true;
        let failed: Vec<OpId> = ch
            .sends
            .drain(..)
            .map(|(op, _)| op)
            .chain(ch.recvs.drain(..).map(|(op, _, _)| op))
            .collect();
        for op in failed {
            peer.channel_done
                .push_back((channel, op, Err(IoErrorKind::Reset)));
        }
    }

    /// Every action that could happen next.
    fn candidates(&self) -> Vec<Action> {
        let mut out = Vec::new();
        for (i, l) in self.links.iter().enumerate() {
            for dir in [DIR_C2S, DIR_S2C] {
                if !l.dirs[dir].wire.is_empty() {
                    out.push(Action::Deliver { link: i, dir });
                }
            }
            // Listener: an unbound server end with bytes waiting.
            if l.server.is_none() && !l.dirs[DIR_C2S].arrived.is_empty() {
                out.push(Action::Accept { link: i });
            }
            for (dir, side, conn) in [
                (DIR_S2C, Side::Client, l.client),
                (DIR_C2S, Side::Server, l.server),
            ] {
                if let Some(conn) = conn {
                    out.push(Action::Read {
                        side,
                        conn,
                        link: i,
                        dir,
                    });
                }
            }
        }
        for (side, peer) in [
            (Side::Client, Some(&self.client)),
            (Side::Server, self.server.as_ref()),
        ] {
            let Some(peer) = peer else { continue };
            if peer.dead {
                continue;
            }
            if !peer.send_done.is_empty() {
                out.push(Action::SendDone { side });
            }
            if !peer.channel_done.is_empty() {
                out.push(Action::ChannelDone { side });
            }
        }
        if let Some(server) = &self.server {
            for (ch, s) in &self.client.channels {
                if let Some(r) = server.channels.get(ch) {
                    if !s.sends.is_empty() && !r.recvs.is_empty() {
                        out.push(Action::Transfer {
                            from: Side::Client,
                            channel: *ch,
                        });
                    }
                    if !r.sends.is_empty() && !s.recvs.is_empty() {
                        out.push(Action::Transfer {
                            from: Side::Server,
                            channel: *ch,
                        });
                    }
                }
            }
        }
        out
    }

    /// Takes one scheduled action; returns `false` when nothing could happen.
    pub fn step(&mut self) -> bool {
        let mut cands = self.candidates();
        let mut deferred = Vec::new();
        while !cands.is_empty() {
            let i = self.rng.below(cands.len());
            let action = cands.swap_remove(i);
            if self.knobs.delay_percent > 0
                && (self.rng.below(100) as u8) < self.knobs.delay_percent
            {
                deferred.push(action);
                continue;
            }
            if self.perform(action) {
                self.flush();
                return true;
            }
        }
        // Everything else was stuck: a delayed action must run now, or nothing moves.
        for action in deferred {
            if self.perform(action) {
                self.flush();
                return true;
            }
        }
        false
    }

    /// Steps until nothing more can happen (bounded by `max_steps`); returns the steps taken.
    pub fn drive(&mut self) -> usize {
        self.flush();
        let mut n = 0;
        while n < 1_000_000 && self.step() {
            n += 1;
        }
        n
    }

    fn perform(&mut self, action: Action) -> bool {
        match action {
            Action::Deliver { link, dir } => {
                let chunk = 1 + self.rng.below(self.knobs.max_chunk.min(1 << 20));
                let d = &mut self.links[link].dirs[dir];
                let n = chunk.min(d.wire.len());
                let moved: Vec<u8> = d.wire.drain(..n).collect();
                d.arrived.extend(moved);
                true
            }
            Action::Accept { link } => self.accept(link),
            Action::Read {
                side,
                conn,
                link,
                dir,
            } => self.try_read(side, conn, link, dir),
            Action::SendDone { side } => {
                let peer = self.peer(side);
                let (op, result) = peer.send_done.pop_front().unwrap();
                peer.pipe.handle_payload_done(op, result).unwrap();
                true
            }
            Action::ChannelDone { side } => {
                let peer = self.peer(side);
                let (ch, op, result) = peer.channel_done.pop_front().unwrap();
                peer.pipe.handle_channel_done(ch, op, result).unwrap();
                true
            }
            Action::Transfer { from, channel } => {
                let to = if from == Side::Client {
                    Side::Server
                } else {
                    Side::Client
                };
                let (sop, tensor) = self
                    .peer(from)
                    .channels
                    .get_mut(&channel)
                    .unwrap()
                    .sends
                    .pop_front()
                    .unwrap();
                let data = self.peer(from).writes[&sop].tensors[tensor].data.clone();
                let (rop, rtensor, len) = self
                    .peer(to)
                    .channels
                    .get_mut(&channel)
                    .unwrap()
                    .recvs
                    .pop_front()
                    .unwrap();
                // Equal lengths unless the pipes paired the wrong tensors (a bug) or a peer
                // injected a forged descriptor; a real channel would fail, so does this one.
                let fail = self.knobs.fail_channels;
                let result = match self.peer(to).allocations.get_mut(&rop) {
                    _ if fail => Err(IoErrorKind::Reset),
                    Some(dst) if data.len() == len => {
                        dst.tensors[rtensor].0.copy_from_slice(&data);
                        Ok(())
                    }
                    _ => {
                        self.mismatches += 1;
                        Err(IoErrorKind::Other)
                    }
                };
                self.peer(from)
                    .channel_done
                    .push_back((channel, sop, result));
                self.peer(to).channel_done.push_back((channel, rop, result));
                true
            }
        }
    }

    fn accept(&mut self, link: usize) -> bool {
        let d = &self.links[link].dirs[DIR_C2S];
        let Some(frame) = peek_frame(&d.arrived) else {
            return false;
        };
        let len = frame.len();
        match Greeting::parse_frame(&frame, &self.config.limits) {
            Ok(Greeting::Spontaneous(g)) if self.server.is_none() => {
                let pipe = Pipe::accept(
                    self.config,
                    self.server_offer.clone(),
                    &self.server_transport,
                    &g,
                    0x5eed_0000_0000_0000,
                    self.now,
                );
                self.server = Some(Peer::new(pipe));
                self.links[link].server = Some(ConnId(0));
            }
            Ok(Greeting::Requested(r)) if self.server.as_ref().is_some_and(|s| !s.dead) => {
                let server = self.server.as_mut().unwrap();
                match server.pipe.handle_requested_connection(r.registration_id) {
                    Ok(conn) => self.links[link].server = Some(conn),
                    Err(_) => {
                        // Unknown id: the listener drops that connection.
                        self.links[link].dirs[DIR_S2C].closed = true;
                    }
                }
            }
            _ => {
                self.links[link].dirs[DIR_S2C].closed = true;
                self.links[link].dirs[DIR_C2S].arrived.clear();
                return true;
            }
        }
        self.links[link].dirs[DIR_C2S].arrived.drain(..len);
        true
    }

    fn try_read(&mut self, side: Side, conn: ConnId, link: usize, dir: usize) -> bool {
        let peer = match side {
            Side::Client => &mut self.client,
            Side::Server => match self.server.as_mut() {
                Some(s) => s,
                None => return false,
            },
        };
        if peer.dead || peer.closed_conns.contains(&conn) {
            return false;
        }
        let d = &mut self.links[link].dirs[dir];
        let Some(front) = peer.reads.get_mut(&conn).and_then(|q| q.front()) else {
            return false;
        };
        match *front {
            PendingRead::Frame => {
                if let Some(frame) = peek_frame(&d.arrived) {
                    d.arrived.drain(..frame.len());
                    peer.reads.get_mut(&conn).unwrap().pop_front();
                    peer.pipe.handle_frame(conn, &frame);
                    true
                } else if d.closed && d.wire.is_empty() {
                    peer.reads.get_mut(&conn).unwrap().pop_front();
                    peer.pipe.handle_connection_error(conn, IoErrorKind::Eof);
                    true
                } else if let Some(Err(e)) = header_of(&d.arrived, &self.config.limits) {
                    // A bad header: the driver reports the decode error by passing the bytes.
                    let _ = e;
                    let bytes: Vec<u8> = d.arrived.iter().take(HEADER_LEN).copied().collect();
                    peer.reads.get_mut(&conn).unwrap().pop_front();
                    peer.pipe.handle_frame(conn, &bytes);
                    true
                } else {
                    false
                }
            }
            PendingRead::Payload { op, index, len } => {
                if d.arrived.len() >= len {
                    let data: Vec<u8> = d.arrived.drain(..len).collect();
                    peer.reads.get_mut(&conn).unwrap().pop_front();
                    if let Some(a) = peer.allocations.get_mut(&op) {
                        a.payloads[index].copy_from_slice(&data);
                    }
                    peer.pipe.handle_payload_done(op, Ok(())).unwrap();
                    true
                } else if d.closed && d.wire.is_empty() {
                    peer.reads.get_mut(&conn).unwrap().pop_front();
                    peer.pipe
                        .handle_payload_done(op, Err(IoErrorKind::Eof))
                        .unwrap();
                    peer.pipe.handle_connection_error(conn, IoErrorKind::Eof);
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Drains every event `side` has seen.
    pub fn events(&mut self, side: Side) -> Vec<Event> {
        match self.peer_opt(side) {
            Some(p) => p.events.drain(..).collect(),
            None => Vec::new(),
        }
    }

    /// Injects raw bytes on the wire from `side` on `conn` (for malformed-input tests).
    pub fn inject(&mut self, side: Side, conn: ConnId, bytes: &[u8]) {
        let dir = if side == Side::Client {
            DIR_C2S
        } else {
            DIR_S2C
        };
        if let Some(l) = self.link_of(side, conn) {
            self.links[l].dirs[dir].wire.extend(bytes.iter().copied());
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Deliver {
        link: usize,
        dir: usize,
    },
    Accept {
        link: usize,
    },
    Read {
        side: Side,
        conn: ConnId,
        link: usize,
        dir: usize,
    },
    SendDone {
        side: Side,
    },
    ChannelDone {
        side: Side,
    },
    Transfer {
        from: Side,
        channel: ChannelId,
    },
}

fn header_of(
    bytes: &VecDeque<u8>,
    limits: &Limits,
) -> Option<Result<FrameHeader, crate::DecodeError>> {
    if bytes.len() < HEADER_LEN {
        return None;
    }
    let head: Vec<u8> = bytes.iter().take(HEADER_LEN).copied().collect();
    Some(FrameHeader::parse(&head, limits))
}

/// Returns a complete frame at the front of `bytes`, if one has fully arrived.
fn peek_frame(bytes: &VecDeque<u8>) -> Option<Vec<u8>> {
    let header = header_of(bytes, &Limits::UNLIMITED)?.ok()?;
    let total = HEADER_LEN + header.body_len as usize;
    (bytes.len() >= total).then(|| bytes.iter().take(total).copied().collect())
}

/// Offers for tests: `cpu_channels` on the CPU, plus `basic` and `cuda_gdr` on `gpus`
/// fake CUDA devices, and transports `tcp` (priority 0) and `shm` (100) with the given
/// shm domain descriptor.
pub fn offer(name: &str, shm_domain: &[u8], gpus: u32) -> LocalOffer {
    use crate::packet::OwnedDeviceDescriptor;
    use crate::pipe::{LocalChannel, LocalTransport};
    let cpu = |d: &[u8]| {
        alloc::vec![OwnedDeviceDescriptor {
            device: Device::CPU,
            descriptor: d.to_vec(),
        }]
    };
    let mut channels = alloc::vec![
        LocalChannel {
            name: "basic".into(),
            priority: 1000,
            connections: 1,
            devices: cpu(b""),
        },
        LocalChannel {
            name: "cma".into(),
            priority: 1200,
            connections: 2,
            devices: cpu(shm_domain),
        },
    ];
    if gpus > 0 {
        channels.push(LocalChannel {
            name: "cuda_ipc".into(),
            priority: 300,
            connections: 2,
            devices: (0..gpus)
                .map(|i| OwnedDeviceDescriptor {
                    device: Device::cuda(i),
                    descriptor: shm_domain.to_vec(),
                })
                .collect(),
        });
    }
    LocalOffer {
        context_name: name.into(),
        transports: alloc::vec![
            LocalTransport {
                name: "tcp".into(),
                priority: 0,
                domain_descriptor: Vec::new(),
                address: Some("127.0.0.1:5000".into()),
            },
            LocalTransport {
                name: "shm".into(),
                priority: 200,
                domain_descriptor: shm_domain.to_vec(),
                address: Some("tp-shm-test".into()),
            },
        ],
        channels,
    }
}
