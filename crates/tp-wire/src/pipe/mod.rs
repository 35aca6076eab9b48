//! The pipe protocol as a sans-IO state machine.
//!
//! A [`Pipe`] is one end of a TensorPipe-style pipe: it runs the handshake (brochure →
//! answer → requested connections), picks the transport and a channel for every device
//! pair ([`negotiate`]), and sequences messages: descriptor, payloads, descriptor reply,
//! channel operations. It does no I/O, reads no clock and holds no user memory: it
//! sees `(OpId, index, length, device)` and tells a *driver* what to do.
//!
//! # Driving a pipe
//!
//! Methods fall into four groups (quinn-proto's contract):
//! - getters ([`Pipe::side`], [`Pipe::remote_name`], ...);
//! - inputs, `handle_*`: frames read, payload and channel operations completed,
//!   connection failures, requested connections, timeouts;
//! - commands: [`Pipe::write`], [`Pipe::read_descriptor`], [`Pipe::read`],
//!   [`Pipe::close`];
//! - outputs, `poll_*`, drained after every input or command in this order:
//!   [`Pipe::poll_io`] → [`Pipe::poll_channel_op`] → [`Pipe::poll_timeout`] →
//!   [`Pipe::poll_event`].
//!
//! Two optional hand-backs let a steady stream of messages run without allocating:
//! [`Pipe::recycle_frame`] takes back a sent frame's buffer, and
//! [`Pipe::recycled_descriptor`] gives out a spent descriptor to fill for the next write.
//!
//! Time comes in as [`Instant`]; registration ids come from a seed the driver draws.
//!
//! # Guarantees
//!
//! - Every write gets exactly one [`Event::WriteDone`]; every read exactly one
//!   [`Event::DescriptorReady`] and, once [`Pipe::read`] was accepted, exactly one
//!   [`Event::ReadDone`]. Each kind completes in issue order: an operation that finishes
//!   early is held back until all earlier ones of its kind have completed.
//! - Messages keep their order on the wire, and the k-th tensor sent on a channel pairs
//!   with the peer's k-th receive.
//! - The first pipe-level error is sticky: the pipe closes, and every operation whose I/O
//!   had not all completed gets that error. An operation whose I/O did complete reports
//!   success (the original reported the later error; tp does not lose a success).
//! - An operation completes only after every payload or channel operation touching its
//!   buffers was reported done by the driver.
//! - Peer input never panics: it yields [`PipeError::Decode`] or [`PipeError::Peer`],
//!   a goodbye, and a close.
//!
//! # Connections
//!
//! The client starts on `ConnId(0)`, the connection it opened to the listener's URL. If
//! the negotiated transport differs, it opens a replacement primary connection. It always
//! opens one descriptor-reply connection, and `connections` connections for each selected
//! channel, each starting with a `RequestedConnection`.

mod negotiate;
mod types;

use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

pub use negotiate::{
    Compatible, NegotiationError, Selection, negotiate, negotiate_version, negotiate_with,
};
pub use types::{
    ChannelId, ChannelOp, CommandError, ConnId, Endpoint, Event, Io, IoErrorKind, LocalChannel,
    LocalOffer, LocalTransport, OpId, PeerMisbehaved, PipeConfig, PipeError,
};

use crate::allocation::{Buffer, validate};
use crate::device::Device;
use crate::frame::{FrameKind, MIN_VERSION, VERSION, split_frame};
use crate::packet::{
    Brochure, BrochureAnswer, BrochureAnswerRepr, BrochureRepr, ChannelOffer, Descriptor,
    DescriptorReply, DescriptorReplyRepr, DescriptorRepr, GoodbyeRepr, OwnedChannelOffer,
    OwnedChannelRegistration, OwnedTransportOffer, Packet, RegistrationId, RequestedConnection,
    Seq, SpontaneousConnection, TransportOffer, frame_into, frame_to_vec, parse_frame,
};
use crate::time::Instant;

/// The largest frame buffer [`Pipe::recycle_frame`] keeps.
const SPARE_FRAME_MAX: usize = 64 << 10;

/// How many emptied descriptors a pipe keeps for reuse, and the most payloads plus
/// tensors, and metadata bytes, one may have room for to be kept.
const SPARE_DESCS: usize = 2;
const SPARE_DESC_ENTRIES: usize = 64;
const SPARE_DESC_METADATA: usize = 4 << 10;

/// Which end of the pipe this is.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub enum Side {
    /// Opened the pipe with a connect.
    Client,
    /// Accepted it from a listener.
    Server,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Phase {
    ClientAwaitingAnswer,
    ServerAwaitingBrochure,
    ServerAwaitingConnections,
    Established,
    Closed,
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Expect {
    Answer,
    Brochure,
    Descriptor(OpId),
    Reply(OpId),
}

#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Role {
    Primary,
    Reply,
    Channel { channel: ChannelId, index: usize },
}

#[derive(Debug)]
struct ChannelSlot {
    name: String,
    conns: Vec<Option<ConnId>>,
    ready: bool,
}

/// The two kinds of operation.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Kind {
    Write,
    Read,
}

#[derive(Debug, Eq, PartialEq)]
enum WriteStage {
    Queued,
    AwaitingReply,
    ReadyToSend,
    Issued,
}

#[derive(Debug)]
struct WriteOp {
    id: OpId,
    desc: Descriptor,
    frame: Vec<u8>,
    targets: Vec<Option<Device>>,
    stage: WriteStage,
    pending: usize,
    io_failed: bool,
    op_error: Option<PipeError>,
}

#[derive(Debug, Default)]
enum ReadStage {
    WaitingDescriptor {
        issued: bool,
    },
    AwaitingRead(Descriptor),
    Reading {
        pending: usize,
        failed: bool,
    },
    #[default]
    DescriptorFailed,
}

#[derive(Debug)]
struct ReadOp {
    id: OpId,
    stage: ReadStage,
}

/// One end of a pipe, as a state machine. See the [module docs](self).
#[derive(Debug)]
pub struct Pipe {
    side: Side,
    config: PipeConfig,
    offer: LocalOffer,
    remote_name: String,
    initial_transport: String,
    transport: Option<String>,
    brochure: Option<Brochure>,
    phase: Phase,
    version: u8,
    next_conn: u32,
    primary: ConnId,
    reply: Option<ConnId>,
    live: BTreeSet<ConnId>,
    expect: BTreeMap<ConnId, VecDeque<Expect>>,
    channels: Vec<ChannelSlot>,
    pairs: BTreeMap<(Device, Device), ChannelId>,
    pending_regs: BTreeMap<RegistrationId, Role>,
    registration_seed: u64,
    deadline: Option<Instant>,
    error: Option<PipeError>,
    next_op: u64,
    writes: VecDeque<WriteOp>,
    reads: VecDeque<ReadOp>,
    io: VecDeque<Io>,
    chan_ops: VecDeque<ChannelOp>,
    events: VecDeque<Event>,
    compatible: Rule,
    /// A sent frame's buffer, handed back by the driver for the next descriptor.
    spare_frame: Vec<u8>,
    /// Descriptors done with (a completed write's, a read's kept copy), emptied, whose
    /// lists' room serves the next ones.
    spare_descs: Vec<Descriptor>,
}

/// The channel compatibility rule of a pipe ([`Pipe::set_compatibility`]).
#[derive(Clone, Default)]
struct Rule(Option<alloc::sync::Arc<Compatible>>);

impl fmt::Debug for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() { "custom" } else { "equal" })
    }
}

impl Rule {
    fn negotiate(
        &self,
        client: &BrochureRepr<'_>,
        transports: &Seq<'_, TransportOffer<'_>>,
        channels: &Seq<'_, ChannelOffer<'_>>,
    ) -> Result<Selection, NegotiationError> {
        match &self.0 {
            Some(rule) => negotiate_with(client, transports, channels, &**rule),
            None => negotiate(client, transports, channels),
        }
    }
}

fn offer_transports(offer: &LocalOffer, server: bool) -> Vec<OwnedTransportOffer> {
    offer
        .transports
        .iter()
        .filter(|t| !server || t.address.is_some())
        .map(|t| OwnedTransportOffer {
            name: t.name.clone(),
            priority: t.priority,
            domain_descriptor: t.domain_descriptor.clone(),
        })
        .collect()
}

fn offer_channels(offer: &LocalOffer) -> Vec<OwnedChannelOffer> {
    offer
        .channels
        .iter()
        .map(|c| OwnedChannelOffer {
            name: c.name.clone(),
            priority: c.priority,
            devices: c.devices.clone(),
        })
        .collect()
}

impl Pipe {
    fn new(
        side: Side,
        config: PipeConfig,
        offer: LocalOffer,
        transport: &str,
        remote_name: String,
        now: Instant,
    ) -> Self {
        let mut live = BTreeSet::new();
        live.insert(ConnId(0));
        Self {
            side,
            config,
            offer,
            remote_name,
            initial_transport: transport.to_string(),
            transport: None,
            brochure: None,
            phase: Phase::Closed,
            version: VERSION,
            next_conn: 1,
            primary: ConnId(0),
            reply: None,
            live,
            expect: BTreeMap::new(),
            channels: Vec::new(),
            pairs: BTreeMap::new(),
            pending_regs: BTreeMap::new(),
            registration_seed: 0,
            deadline: config.handshake_timeout.map(|t| now.saturating_add(t)),
            error: None,
            next_op: 0,
            writes: VecDeque::new(),
            reads: VecDeque::new(),
            io: VecDeque::new(),
            chan_ops: VecDeque::new(),
            events: VecDeque::new(),
            compatible: Rule::default(),
            spare_frame: Vec::new(),
            spare_descs: Vec::new(),
        }
    }

    /// Judges channel descriptors by `rule` instead of byte equality (see
    /// [`negotiate_with`]). Call it before the handshake's first frame arrives; both
    /// ends must use the same rule.
    pub fn set_compatibility(&mut self, rule: alloc::sync::Arc<Compatible>) {
        self.compatible = Rule(Some(rule));
    }

    /// Starts the client end on `ConnId(0)`, a connection the driver opened with
    /// `transport` to the listener. `remote_name` is what [`Pipe::remote_name`] reports.
    pub fn connect(
        config: PipeConfig,
        offer: LocalOffer,
        transport: &str,
        remote_name: String,
        now: Instant,
    ) -> Self {
        let mut p = Self::new(Side::Client, config, offer, transport, remote_name, now);
        p.phase = Phase::ClientAwaitingAnswer;
        let brochure = Brochure {
            min_version: MIN_VERSION,
            max_version: VERSION,
            transports: offer_transports(&p.offer, false),
            channels: offer_channels(&p.offer),
        };
        let hello = SpontaneousConnection {
            context_name: &p.offer.context_name,
        };
        let frames = [
            frame_to_vec(&hello),
            brochure.with_repr(|b| frame_to_vec(b)),
        ];
        p.brochure = Some(brochure);
        for frame in frames {
            match frame {
                Ok(frame) => p.io.push_back(Io::Send {
                    conn: ConnId(0),
                    frame,
                }),
                Err(e) => {
                    // The local offer itself does not fit the format (a name over 4 GiB).
                    p.fail(PipeError::Encode(e));
                    return p;
                }
            }
        }
        p.recv_frame(ConnId(0), Expect::Answer);
        p
    }

    /// Starts the server end on `ConnId(0)`, a connection the listener accepted on
    /// `transport` and whose first frame was `greeting`.
    ///
    /// Registration ids for the extra connections are `registration_seed`,
    /// `registration_seed + 1`, ...: the driver draws the seed at random so the ids cannot
    /// be guessed, and routes them as [`Event::ConnectionsRequested`] says.
    pub fn accept(
        config: PipeConfig,
        offer: LocalOffer,
        transport: &str,
        greeting: &SpontaneousConnection<'_>,
        registration_seed: u64,
        now: Instant,
    ) -> Self {
        let mut p = Self::new(
            Side::Server,
            config,
            offer,
            transport,
            greeting.context_name.to_string(),
            now,
        );
        p.registration_seed = registration_seed;
        p.phase = Phase::ServerAwaitingBrochure;
        p.recv_frame(ConnId(0), Expect::Brochure);
        p
    }

    // ----- getters -------------------------------------------------------------------

    /// Which end this is.
    pub const fn side(&self) -> Side {
        self.side
    }

    /// The peer's name: the server learns it from the client's greeting; the client
    /// reports what it was given.
    pub fn remote_name(&self) -> &str {
        &self.remote_name
    }

    /// The negotiated transport, once known.
    pub fn transport(&self) -> Option<&str> {
        self.transport.as_deref()
    }

    /// The negotiated protocol version.
    pub const fn version(&self) -> u8 {
        self.version
    }

    /// The selected channels' names, by [`ChannelId`].
    pub fn channel_names(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(|c| c.name.as_str())
    }

    /// The channel chosen for a (local device, remote device) pair.
    pub fn channel_for(&self, local: Device, remote: Device) -> Option<ChannelId> {
        self.pairs.get(&(local, remote)).copied()
    }

    /// Returns `true` once the handshake finished (and until the pipe closes).
    pub fn is_established(&self) -> bool {
        self.phase == Phase::Established
    }

    /// The sticky error, once the pipe failed or was closed.
    pub const fn error(&self) -> Option<&PipeError> {
        self.error.as_ref()
    }

    /// Returns `true` when no operation is outstanding and no output is queued.
    pub fn is_idle(&self) -> bool {
        self.writes.is_empty()
            && self.reads.is_empty()
            && self.io.is_empty()
            && self.chan_ops.is_empty()
    }

    // ----- outputs -------------------------------------------------------------------

    /// Returns the next connection action.
    #[must_use]
    #[inline]
    pub fn poll_io(&mut self) -> Option<Io> {
        self.io.pop_front()
    }

    /// Hands back the buffer of a frame from an [`Io::Send`] once it was written (or
    /// dropped): the next message's descriptor is encoded into it instead of a new
    /// allocation. Optional; a buffer over 64 KiB, or one while another is kept, is freed.
    pub fn recycle_frame(&mut self, frame: Vec<u8>) {
        if self.spare_frame.capacity() == 0 && frame.capacity() <= SPARE_FRAME_MAX {
            self.spare_frame = frame;
        }
    }

    /// An empty descriptor to fill for the next [`Pipe::write`]: one this pipe is done
    /// with (a completed write's, say), so filling it allocates nothing when the
    /// message is shaped like an earlier one. Optional; `Descriptor::default()` serves
    /// as well.
    pub fn recycled_descriptor(&mut self) -> Descriptor {
        self.spare_descs.pop().unwrap_or_default()
    }

    /// Keeps `desc`, emptied, for [`Pipe::recycled_descriptor`] and this pipe's own
    /// copies, unless enough are kept or its room is large.
    fn keep_descriptor(&mut self, mut desc: Descriptor) {
        if self.spare_descs.len() < SPARE_DESCS
            && desc
                .payloads
                .capacity()
                .saturating_add(desc.tensors.capacity())
                <= SPARE_DESC_ENTRIES
            && desc.metadata.capacity() <= SPARE_DESC_METADATA
        {
            desc.metadata.clear();
            desc.payloads.clear();
            desc.tensors.clear();
            self.spare_descs.push(desc);
        }
    }

    /// Returns the next channel action.
    #[must_use]
    #[inline]
    pub fn poll_channel_op(&mut self) -> Option<ChannelOp> {
        self.chan_ops.pop_front()
    }

    /// Returns when [`Pipe::handle_timeout`] must next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Established | Phase::Closed => None,
            _ => self.deadline,
        }
    }

    /// Returns the next event.
    #[must_use]
    #[inline]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ----- commands ------------------------------------------------------------------

    fn next_op_id(&mut self) -> OpId {
        let id = OpId(self.next_op);
        self.next_op = self.next_op.wrapping_add(1);
        id
    }

    /// Queues a message. `desc` describes it (the driver holds the bytes); each tensor's
    /// `source_device` is where its buffer lives.
    ///
    /// # Errors
    /// [`CommandError::Encode`], or [`CommandError::ExceedsLimits`] when the descriptor
    /// breaks this pipe's [`Limits`](crate::Limits) — then nothing was queued and no
    /// event follows.
    pub fn write(&mut self, desc: Descriptor) -> Result<OpId, CommandError> {
        let mut frame = core::mem::take(&mut self.spare_frame);
        desc.with_repr(|r| frame_into(r, &mut frame))
            .map_err(CommandError::Encode)?;
        // The peer checks the descriptor against its limits; check ours first so a
        // message that would be refused is refused here, before anything is sent.
        parse_frame::<DescriptorRepr<'_>>(&frame, &self.config.limits)
            .map_err(CommandError::ExceedsLimits)?;
        let id = self.next_op_id();
        let targets = desc.tensors.iter().map(|t| t.target_device).collect();
        self.writes.push_back(WriteOp {
            id,
            desc,
            frame,
            targets,
            stage: WriteStage::Queued,
            pending: 0,
            io_failed: false,
            op_error: None,
        });
        self.advance_one(Kind::Write);
        Ok(id)
    }

    /// Starts reading the next message; its descriptor arrives as
    /// [`Event::DescriptorReady`].
    pub fn read_descriptor(&mut self) -> OpId {
        let id = self.next_op_id();
        self.reads.push_back(ReadOp {
            id,
            stage: ReadStage::WaitingDescriptor { issued: false },
        });
        if let Some(error) = self.error.clone() {
            self.fail_waiting_reads(&error);
        }
        self.advance_one(Kind::Read);
        id
    }

    /// Supplies the buffers for read `op`, whose descriptor was delivered: one per
    /// payload and one per tensor, in order. Only their lengths and devices are looked
    /// at; the driver keeps the memory.
    ///
    /// # Errors
    /// A [`CommandError`] when `op` is not the next message awaiting its buffers or the
    /// buffers do not fit the descriptor. Nothing changes then; the call may be retried.
    pub fn read<P: Buffer, T: Buffer>(
        &mut self,
        op: OpId,
        payloads: &[P],
        tensors: &[T],
    ) -> Result<(), CommandError> {
        let pos = self
            .reads
            .iter()
            .position(|r| r.id == op)
            .ok_or(CommandError::UnknownOp(op))?;
        let earlier_pending = self.reads.iter().take(pos).any(|r| {
            matches!(
                r.stage,
                ReadStage::WaitingDescriptor { .. } | ReadStage::AwaitingRead(_)
            )
        });
        let Some(ReadOp {
            stage: ReadStage::AwaitingRead(desc),
            ..
        }) = self.reads.get(pos)
        else {
            return Err(CommandError::NotAwaitingRead(op));
        };
        if earlier_pending {
            return Err(CommandError::NotFirstInLine(op));
        }
        desc.with_repr(|r| validate(r, payloads, tensors))
            .map_err(CommandError::Allocation)?;
        let mut channels = Vec::with_capacity(tensors.len());
        for (tensor, (t, b)) in desc.tensors.iter().zip(tensors).enumerate() {
            let local = b.device();
            let ch = self
                .channel_for(local, t.source_device)
                .ok_or(CommandError::NoChannel {
                    tensor,
                    local,
                    remote: t.source_device,
                })?;
            channels.push(ch);
        }
        let desc = core::mem::take(
            &mut self
                .reads
                .get_mut(pos)
                .ok_or(CommandError::UnknownOp(op))?
                .stage,
        );
        let ReadStage::AwaitingRead(desc) = desc else {
            return Err(CommandError::NotAwaitingRead(op));
        };
        let mut pending = 0usize;
        let failed = self.error.is_some();
        if !failed {
            for (index, p) in desc.payloads.iter().enumerate() {
                if p.length > 0 {
                    pending = pending.saturating_add(1);
                    self.io.push_back(Io::RecvPayload {
                        conn: self.primary,
                        op,
                        index,
                        len: p.length,
                    });
                }
            }
            let reply: Vec<Device> = desc
                .tensors
                .iter()
                .zip(tensors)
                .filter(|(t, _)| t.target_device.is_none())
                .map(|(_, b)| b.device())
                .collect();
            if desc.tensors.iter().any(|t| t.target_device.is_none()) {
                match (
                    self.reply,
                    frame_to_vec(
                        &DescriptorReply {
                            target_devices: reply,
                        }
                        .as_repr(),
                    ),
                ) {
                    (Some(conn), Ok(frame)) => self.io.push_back(Io::Send { conn, frame }),
                    (_, Err(e)) => self.fail(PipeError::Encode(e)),
                    // Unreachable: a descriptor arrives only once established, and an
                    // established pipe has its reply connection. Fail safe, not panic.
                    (None, Ok(_)) => self.fail(PipeError::Peer(PeerMisbehaved::UnexpectedFrame {
                        kind: FrameKind::Descriptor.to_u8(),
                    })),
                }
            }
            for (tensor, (t, channel)) in desc.tensors.iter().zip(channels).enumerate() {
                pending = pending.saturating_add(1);
                self.chan_ops.push_back(ChannelOp::Recv {
                    channel,
                    op,
                    tensor,
                    len: t.length,
                });
            }
        }
        if let Some(r) = self.reads.get_mut(pos) {
            r.stage = ReadStage::Reading { pending, failed };
        }
        self.keep_descriptor(desc);
        self.advance_one(Kind::Read);
        Ok(())
    }

    /// Closes the pipe: sends a goodbye when it can, closes every connection and channel,
    /// and completes every pending operation with [`PipeError::Closed`] (those with I/O in
    /// flight once the driver reports it done). Idempotent.
    pub fn close(&mut self) {
        self.fail(PipeError::Closed);
        self.advance();
    }

    // ----- inputs --------------------------------------------------------------------

    /// Checks the handshake deadline.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            self.fail(PipeError::HandshakeTimeout);
            self.advance();
        }
    }

    /// Reports that a connection failed (a connect, a write or a read on it).
    /// Failures of connections the pipe no longer uses are ignored.
    pub fn handle_connection_error(&mut self, conn: ConnId, kind: IoErrorKind) {
        if self.live.contains(&conn) {
            self.fail(PipeError::Connection { conn, kind });
            self.advance();
        }
    }

    /// Reports that a `SendPayload` or `RecvPayload` of `op` finished.
    ///
    /// # Errors
    /// [`CommandError::UnknownOp`] if no operation of the pipe has I/O pending under `op`.
    pub fn handle_payload_done(
        &mut self,
        op: OpId,
        result: Result<(), IoErrorKind>,
    ) -> Result<(), CommandError> {
        if result.is_err() {
            self.mark_failed(op);
        }
        let kind_of_op = self.io_done(op)?;
        if let Err(kind) = result {
            let conn = self.primary;
            self.fail(PipeError::Connection { conn, kind });
        }
        self.complete_one(kind_of_op);
        Ok(())
    }

    /// Reports that a channel `Send` or `Recv` of `op` finished.
    ///
    /// # Errors
    /// [`CommandError::UnknownOp`] if no operation of the pipe has I/O pending under `op`.
    pub fn handle_channel_done(
        &mut self,
        channel: ChannelId,
        op: OpId,
        result: Result<(), IoErrorKind>,
    ) -> Result<(), CommandError> {
        if result.is_err() {
            self.mark_failed(op);
        }
        let kind_of_op = self.io_done(op)?;
        if let Err(kind) = result {
            self.fail(PipeError::Channel { channel, kind });
        }
        self.complete_one(kind_of_op);
        Ok(())
    }

    /// An operation whose own I/O failed fails, even if it was the last I/O it had
    /// (the pipe-level error set next would otherwise find it complete).
    fn mark_failed(&mut self, op: OpId) {
        if let Some(w) = self.writes.iter_mut().find(|w| w.id == op) {
            w.io_failed = true;
            return;
        }
        if let Some(r) = self.reads.iter_mut().find(|r| r.id == op)
            && let ReadStage::Reading { failed, .. } = &mut r.stage
        {
            *failed = true;
        }
    }

    /// Counts one I/O of `op` done; says whether `op` is a write or a read.
    fn io_done(&mut self, op: OpId) -> Result<Kind, CommandError> {
        if let Some(w) = self.writes.iter_mut().find(|w| w.id == op && w.pending > 0) {
            w.pending = w.pending.saturating_sub(1);
            if self.error.is_some() {
                w.io_failed = true;
            }
            return Ok(Kind::Write);
        }
        for r in &mut self.reads {
            if r.id == op
                && let ReadStage::Reading { pending, failed } = &mut r.stage
                && *pending > 0
            {
                *pending = pending.saturating_sub(1);
                if self.error.is_some() {
                    *failed = true;
                }
                return Ok(Kind::Read);
            }
        }
        Err(CommandError::UnknownOp(op))
    }

    /// Server: a connection presented `id` in its [`RequestedConnection`]; returns the
    /// connection id the driver must use for it from now on.
    ///
    /// # Errors
    /// [`CommandError::UnknownRegistration`] when the id is not one this pipe is waiting
    /// for; the driver closes that connection, the pipe is unaffected.
    pub fn handle_requested_connection(
        &mut self,
        id: RegistrationId,
    ) -> Result<ConnId, CommandError> {
        let role = self
            .pending_regs
            .remove(&id)
            .ok_or(CommandError::UnknownRegistration(id))?;
        let conn = self.new_conn();
        match role {
            Role::Primary => {
                self.primary = conn;
            }
            Role::Reply => self.reply = Some(conn),
            Role::Channel { channel, index } => {
                if let Some(slot) = self
                    .channels
                    .get_mut(crate::codec::usize_from(channel.0))
                    .and_then(|c| c.conns.get_mut(index))
                {
                    *slot = Some(conn);
                }
                self.channel_maybe_ready(channel, Endpoint::Listen);
            }
        }
        if self.pending_regs.is_empty() && self.phase == Phase::ServerAwaitingConnections {
            self.establish();
        }
        self.advance();
        Ok(conn)
    }

    /// Passes a complete frame (header and body) read on `conn` after an
    /// [`Io::RecvFrame`]. Bad bytes fail the pipe; they never panic.
    pub fn handle_frame(&mut self, conn: ConnId, frame: &[u8]) {
        if self.error.is_some() {
            return;
        }
        let Some(expect) = self.expect.get_mut(&conn).and_then(VecDeque::pop_front) else {
            self.fail(PipeError::Peer(PeerMisbehaved::UnexpectedFrame {
                kind: frame.get(5).copied().unwrap_or(0),
            }));
            self.advance();
            return;
        };
        let limits = self.config.limits;
        match split_frame(frame, &limits) {
            Err(error) => self.fail(PipeError::Decode { conn, error }),
            Ok((header, body)) if header.kind == FrameKind::Goodbye => {
                match GoodbyeRepr::parse(body, &limits) {
                    Ok(g) => self.fail(PipeError::PeerClosed {
                        reason: g.reason,
                        message: g.message.to_string(),
                    }),
                    Err(error) => self.fail(PipeError::Decode { conn, error }),
                }
            }
            Ok((header, _)) if header.version != self.version => {
                self.fail(PipeError::Peer(PeerMisbehaved::VersionChanged(
                    header.version,
                )));
            }
            Ok(_) => {
                let outcome = match expect {
                    Expect::Brochure => self.on_brochure(conn, frame),
                    Expect::Answer => self.on_answer(conn, frame),
                    Expect::Descriptor(op) => self.on_descriptor(conn, op, frame),
                    Expect::Reply(op) => self.on_reply(conn, op, frame),
                };
                match outcome {
                    Err(e) => self.fail(e),
                    // A descriptor moves its read on to awaiting its buffers, and that is
                    // all: the reads after it wait behind it, no write depends on it, and
                    // nothing completes — there is nothing to advance.
                    Ok(()) if matches!(expect, Expect::Descriptor(_)) => return,
                    Ok(()) => {}
                }
            }
        }
        self.advance();
    }

    // ----- handshake -----------------------------------------------------------------

    fn new_conn(&mut self) -> ConnId {
        let c = ConnId(self.next_conn);
        self.next_conn = self.next_conn.wrapping_add(1);
        self.live.insert(c);
        c
    }

    fn recv_frame(&mut self, conn: ConnId, what: Expect) {
        self.expect.entry(conn).or_default().push_back(what);
        self.io.push_back(Io::RecvFrame { conn });
    }

    fn decode<'a, P: Packet<'a>>(&self, conn: ConnId, frame: &'a [u8]) -> Result<P, PipeError> {
        parse_frame::<P>(frame, &self.config.limits).map_err(|error| match error {
            crate::DecodeError::UnexpectedKind { found, .. } => {
                PipeError::Peer(PeerMisbehaved::UnexpectedFrame { kind: found })
            }
            error => PipeError::Decode { conn, error },
        })
    }

    fn on_brochure(&mut self, conn: ConnId, frame: &[u8]) -> Result<(), PipeError> {
        let brochure: BrochureRepr<'_> = self.decode(conn, frame)?;
        let version = negotiate_version(
            (brochure.min_version, brochure.max_version),
            (MIN_VERSION, VERSION),
        )
        .map_err(PipeError::Negotiation)?;
        let transports = offer_transports(&self.offer, true);
        let channels = offer_channels(&self.offer);
        let answer = BrochureAnswer {
            version,
            transports,
            channels,
            transport: String::new(),
            address: String::new(),
            primary_registration: None,
            reply_registration: RegistrationId(0),
            channel_registrations: Vec::new(),
            pairs: Vec::new(),
        };
        let rule = self.compatible.clone();
        let selection = answer
            .with_repr(|a| rule.negotiate(&brochure, &a.transports, &a.channels))
            .map_err(PipeError::Negotiation)?;
        let mut answer = answer;
        let address = self
            .offer
            .transports
            .iter()
            .find(|t| t.name == selection.transport)
            .and_then(|t| t.address.clone())
            .unwrap_or_default();
        let mut next = self.registration_seed;
        let mut take = |regs: &mut BTreeMap<RegistrationId, Role>, role: Role| {
            let id = RegistrationId(next);
            next = next.wrapping_add(1);
            regs.insert(id, role);
            id
        };
        let mut regs = BTreeMap::new();
        if selection.transport != self.initial_transport {
            answer.primary_registration = Some(take(&mut regs, Role::Primary));
        }
        answer.reply_registration = take(&mut regs, Role::Reply);
        for (i, name) in selection.channels.iter().enumerate() {
            let channel = ChannelId(u32::try_from(i).unwrap_or(u32::MAX));
            let n = self
                .offer
                .channels
                .iter()
                .find(|c| &c.name == name)
                .map_or(0, |c| c.connections);
            let ids = (0..crate::codec::usize_from(n))
                .map(|index| take(&mut regs, Role::Channel { channel, index }))
                .collect();
            answer.channel_registrations.push(OwnedChannelRegistration {
                channel: name.clone(),
                ids,
            });
            self.channels.push(ChannelSlot {
                name: name.clone(),
                conns: alloc::vec![None; crate::codec::usize_from(n)],
                ready: false,
            });
        }
        answer.transport.clone_from(&selection.transport);
        answer.address = address;
        answer.pairs.clone_from(&selection.pairs);
        let frame = answer
            .with_repr(|a| frame_to_vec(a))
            .map_err(PipeError::Encode)?;
        self.version = version;
        self.install_pairs(&selection, Side::Server);
        self.transport = Some(selection.transport.clone());
        self.io.push_back(Io::Send { conn, frame });
        if answer.primary_registration.is_some() {
            // The client moves to another transport: this connection is done.
            self.live.remove(&conn);
            self.io.push_back(Io::Close { conn });
        }
        self.events.push_back(Event::ConnectionsRequested {
            ids: regs.keys().copied().collect(),
        });
        self.pending_regs = regs;
        // Channels that need no connections are ready at once.
        for i in 0..self.channels.len() {
            self.channel_maybe_ready(
                ChannelId(u32::try_from(i).unwrap_or(u32::MAX)),
                Endpoint::Listen,
            );
        }
        self.phase = Phase::ServerAwaitingConnections;
        Ok(())
    }

    fn on_answer(&mut self, conn: ConnId, frame: &[u8]) -> Result<(), PipeError> {
        let answer: BrochureAnswerRepr<'_> = self.decode(conn, frame)?;
        if !(MIN_VERSION..=VERSION).contains(&answer.version) {
            return Err(PipeError::Peer(PeerMisbehaved::BadVersion(answer.version)));
        }
        let inconsistent = PipeError::Peer(PeerMisbehaved::InconsistentSelection);
        let brochure = self.brochure.take().ok_or(PipeError::Closed)?;
        let selection = brochure
            .with_repr(|b| {
                self.compatible
                    .negotiate(b, &answer.transports, &answer.channels)
            })
            .map_err(PipeError::Negotiation)?;
        let pairs_match = answer.pairs.len() == selection.pairs.len()
            && answer.pairs.iter().zip(&selection.pairs).all(|(a, s)| {
                a.server_device == s.server_device
                    && a.client_device == s.client_device
                    && a.channel == s.channel
            });
        let channels_match = answer.channel_registrations.len() == selection.channels.len()
            && answer
                .channel_registrations
                .iter()
                .zip(&selection.channels)
                .all(|(r, name)| {
                    r.channel == name
                        && self.offer.channels.iter().any(|c| {
                            &c.name == name
                                && crate::codec::usize_from(c.connections) == r.ids.len()
                        })
                });
        let switch = selection.transport != self.initial_transport;
        if answer.transport != selection.transport
            || !pairs_match
            || !channels_match
            || switch != answer.primary_registration.is_some()
        {
            return Err(inconsistent);
        }
        self.version = answer.version;
        self.transport = Some(selection.transport.clone());
        self.install_pairs(&selection, Side::Client);
        let transport = selection.transport.clone();
        let address = answer.address.to_string();
        let open = |p: &mut Self, id: RegistrationId| -> Result<ConnId, PipeError> {
            let c = p.new_conn();
            p.io.push_back(Io::Connect {
                conn: c,
                transport: transport.clone(),
                address: address.clone(),
            });
            let frame = frame_to_vec(&RequestedConnection {
                registration_id: id,
            })
            .map_err(PipeError::Encode)?;
            p.io.push_back(Io::Send { conn: c, frame });
            Ok(c)
        };
        if let Some(id) = answer.primary_registration {
            let c = open(self, id)?;
            self.live.remove(&ConnId(0));
            self.io.push_back(Io::Close { conn: ConnId(0) });
            self.primary = c;
        }
        let reply = open(self, answer.reply_registration)?;
        self.reply = Some(reply);
        for (i, reg) in answer.channel_registrations.iter().enumerate() {
            let channel = ChannelId(u32::try_from(i).unwrap_or(u32::MAX));
            let mut conns = Vec::with_capacity(reg.ids.len());
            for id in reg.ids.iter() {
                conns.push(Some(open(self, id)?));
            }
            self.channels.push(ChannelSlot {
                name: reg.channel.to_string(),
                conns,
                ready: false,
            });
            self.channel_maybe_ready(channel, Endpoint::Connect);
        }
        self.establish();
        Ok(())
    }

    fn install_pairs(&mut self, selection: &Selection, side: Side) {
        for p in &selection.pairs {
            if let Some(i) = selection.channels.iter().position(|c| c == &p.channel) {
                let ch = ChannelId(u32::try_from(i).unwrap_or(u32::MAX));
                let key = match side {
                    Side::Server => (p.server_device, p.client_device),
                    Side::Client => (p.client_device, p.server_device),
                };
                self.pairs.insert(key, ch);
            }
        }
    }

    fn channel_maybe_ready(&mut self, channel: ChannelId, endpoint: Endpoint) {
        let Some(slot) = self.channels.get_mut(crate::codec::usize_from(channel.0)) else {
            return;
        };
        if slot.ready || slot.conns.iter().any(Option::is_none) {
            return;
        }
        slot.ready = true;
        self.events.push_back(Event::ChannelReady {
            channel,
            name: slot.name.clone(),
            conns: slot.conns.iter().flatten().copied().collect(),
            endpoint,
        });
    }

    fn establish(&mut self) {
        self.phase = Phase::Established;
        self.events.push_back(Event::Established {
            version: self.version,
            transport: self.transport.clone().unwrap_or_default(),
        });
    }

    // ----- messages ------------------------------------------------------------------

    fn on_descriptor(&mut self, conn: ConnId, op: OpId, frame: &[u8]) -> Result<(), PipeError> {
        let repr: DescriptorRepr<'_> = self.decode(conn, frame)?;
        for t in repr.tensors.iter() {
            if let Some(target) = t.target_device
                && self.channel_for(target, t.source_device).is_none()
            {
                return Err(PipeError::Peer(PeerMisbehaved::NoChannelForTarget {
                    target,
                    source: t.source_device,
                }));
            }
        }
        let desc = repr.to_owned();
        // The copy kept until the buffers come reuses a spent descriptor's room.
        let mut kept = self.recycled_descriptor();
        kept.metadata.clone_from(&desc.metadata);
        kept.payloads.clone_from(&desc.payloads);
        kept.tensors.clone_from(&desc.tensors);
        if let Some(r) = self.reads.iter_mut().find(|r| r.id == op) {
            r.stage = ReadStage::AwaitingRead(kept);
            self.events.push_back(Event::DescriptorReady {
                op,
                result: Ok(desc),
            });
        }
        Ok(())
    }

    fn on_reply(&mut self, conn: ConnId, op: OpId, frame: &[u8]) -> Result<(), PipeError> {
        let reply: DescriptorReplyRepr<'_> = self.decode(conn, frame)?;
        let bad = PipeError::Peer(PeerMisbehaved::BadDescriptorReply);
        let pairs = &self.pairs;
        let w = self
            .writes
            .iter_mut()
            .find(|w| w.id == op)
            .ok_or_else(|| bad.clone())?;
        let missing = w.targets.iter().filter(|t| t.is_none()).count();
        if reply.target_devices.len() != missing || w.stage != WriteStage::AwaitingReply {
            return Err(bad);
        }
        let mut chosen = reply.target_devices.iter();
        for (t, desc) in w.targets.iter_mut().zip(&w.desc.tensors) {
            if t.is_none() {
                let d = chosen.next().ok_or_else(|| bad.clone())?;
                if !pairs.contains_key(&(desc.source_device, d)) {
                    return Err(bad);
                }
                *t = Some(d);
            }
        }
        w.stage = WriteStage::ReadyToSend;
        Ok(())
    }

    /// Moves every operation as far as it can go, then emits completions in order.
    fn advance(&mut self) {
        if self.phase == Phase::Established && self.error.is_none() {
            self.advance_writes();
            self.advance_reads();
        }
        self.complete();
    }

    /// [`Pipe::advance`] after an input that only finished I/O (a payload or a tensor
    /// done): that changes no operation's stage, only what it still waits for, so
    /// nothing new can be issued — every input ends with `advance`, which issued all it
    /// could then — and only completions are left to report.
    fn complete(&mut self) {
        self.complete_writes();
        self.complete_reads();
    }

    /// [`Pipe::advance`] after a command that changed only operations of one kind (a
    /// new write; a new read, or a read given its buffers): operations of the other
    /// kind can neither be issued nor completed by it. Before the pipe is established,
    /// or once it failed, everything is looked at.
    fn advance_one(&mut self, kind: Kind) {
        if self.phase != Phase::Established || self.error.is_some() {
            return self.advance();
        }
        match kind {
            Kind::Write => {
                self.advance_writes();
                self.complete_writes();
            }
            Kind::Read => {
                self.advance_reads();
                self.complete_reads();
            }
        }
    }

    /// [`Pipe::complete`] after an I/O of an operation of `kind` finished; everything
    /// once the pipe failed (its error completes operations of both kinds).
    fn complete_one(&mut self, kind: Kind) {
        if self.error.is_some() {
            return self.complete();
        }
        match kind {
            Kind::Write => self.complete_writes(),
            Kind::Read => self.complete_reads(),
        }
    }

    fn advance_writes(&mut self) {
        let primary = self.primary;
        let reply = self.reply;
        let mut blocked = false;
        let mut recv_replies = Vec::new();
        for w in &mut self.writes {
            if w.stage == WriteStage::Queued {
                let missing = w.desc.tensors.iter().enumerate().find_map(|(tensor, t)| {
                    match t.target_device {
                        Some(remote) if !self.pairs.contains_key(&(t.source_device, remote)) => {
                            Some(PipeError::NoChannel {
                                tensor,
                                local: t.source_device,
                                remote,
                            })
                        }
                        _ => None,
                    }
                });
                if let Some(e) = missing {
                    w.op_error = Some(e);
                    w.stage = WriteStage::Issued;
                    continue;
                }
                self.io.push_back(Io::Send {
                    conn: primary,
                    frame: core::mem::take(&mut w.frame),
                });
                for (index, p) in w.desc.payloads.iter().enumerate() {
                    if p.length > 0 {
                        w.pending = w.pending.saturating_add(1);
                        self.io.push_back(Io::SendPayload {
                            conn: primary,
                            op: w.id,
                            index,
                            len: p.length,
                        });
                    }
                }
                if w.targets.iter().any(Option::is_none) {
                    w.stage = WriteStage::AwaitingReply;
                    recv_replies.push(w.id);
                } else {
                    w.stage = WriteStage::ReadyToSend;
                }
            }
            match w.stage {
                WriteStage::AwaitingReply => blocked = true,
                WriteStage::ReadyToSend if !blocked => {
                    for (tensor, (t, target)) in w.desc.tensors.iter().zip(&w.targets).enumerate() {
                        let channel = target
                            .and_then(|target| self.pairs.get(&(t.source_device, target)).copied());
                        if let Some(channel) = channel {
                            w.pending = w.pending.saturating_add(1);
                            self.chan_ops.push_back(ChannelOp::Send {
                                channel,
                                op: w.id,
                                tensor,
                                len: t.length,
                            });
                        }
                    }
                    w.stage = WriteStage::Issued;
                }
                _ => {}
            }
        }
        if let Some(reply) = reply {
            for op in recv_replies {
                self.recv_frame(reply, Expect::Reply(op));
            }
        }
    }

    fn advance_reads(&mut self) {
        let mut next = None;
        for r in &mut self.reads {
            match r.stage {
                ReadStage::WaitingDescriptor { issued: false } => {
                    r.stage = ReadStage::WaitingDescriptor { issued: true };
                    next = Some(r.id);
                    break;
                }
                ReadStage::WaitingDescriptor { issued: true } | ReadStage::AwaitingRead(_) => break,
                ReadStage::Reading { .. } | ReadStage::DescriptorFailed => {}
            }
        }
        if let Some(op) = next {
            self.recv_frame(self.primary, Expect::Descriptor(op));
        }
    }

    fn complete_writes(&mut self) {
        while let Some(w) = self.writes.front() {
            let issued_all = w.stage == WriteStage::Issued;
            let result = if w.pending > 0 {
                break;
            } else if let Some(e) = &w.op_error {
                Err(e.clone())
            } else if issued_all && !w.io_failed {
                Ok(())
            } else if let Some(e) = &self.error {
                Err(e.clone())
            } else {
                break;
            };
            let op = w.id;
            if let Some(w) = self.writes.pop_front() {
                self.keep_descriptor(w.desc);
            }
            self.events.push_back(Event::WriteDone { op, result });
        }
    }

    fn complete_reads(&mut self) {
        while let Some(r) = self.reads.front() {
            let result = match &r.stage {
                ReadStage::DescriptorFailed => None,
                ReadStage::Reading { pending: 0, failed } => Some(if *failed {
                    Err(self.error.clone().unwrap_or(PipeError::Closed))
                } else {
                    Ok(())
                }),
                _ => break,
            };
            let op = r.id;
            self.reads.pop_front();
            if let Some(result) = result {
                self.events.push_back(Event::ReadDone { op, result });
            }
        }
    }

    fn fail_waiting_reads(&mut self, error: &PipeError) {
        for r in &mut self.reads {
            if matches!(r.stage, ReadStage::WaitingDescriptor { .. }) {
                r.stage = ReadStage::DescriptorFailed;
                self.events.push_back(Event::DescriptorReady {
                    op: r.id,
                    result: Err(error.clone()),
                });
            }
        }
    }

    /// Records the first pipe-level error and tears the pipe down.
    fn fail(&mut self, error: PipeError) {
        if self.error.is_some() {
            return;
        }
        // Reads and channel operations the driver has not picked up yet are dropped and
        // count as failed. Queued payload *sends* stay: dropping one after its descriptor
        // went out would make the goodbye below land inside the peer's payload.
        let mut dropped = Vec::new();
        self.io.retain(|io| match io {
            Io::RecvPayload { op, .. } => {
                dropped.push(*op);
                false
            }
            Io::RecvFrame { .. } => false,
            _ => true,
        });
        self.chan_ops.retain(|c| match c {
            ChannelOp::Send { op, .. } | ChannelOp::Recv { op, .. } => {
                dropped.push(*op);
                false
            }
            ChannelOp::Close { .. } => true,
        });
        self.error = Some(error.clone());
        for op in dropped {
            let _ = self.io_done(op);
        }
        for w in &mut self.writes {
            if w.stage != WriteStage::Issued {
                w.io_failed = true;
            }
        }
        for r in &mut self.reads {
            if let ReadStage::Reading { failed, .. } = &mut r.stage {
                *failed = true;
            }
        }
        if let Some(reason) = error.goodbye_reason()
            && self.live.contains(&self.primary)
        {
            let message = alloc::format!("{error}");
            let goodbye = GoodbyeRepr {
                reason,
                max_version: VERSION,
                message: &message,
            };
            if let Ok(frame) = frame_to_vec(&goodbye) {
                self.io.push_back(Io::Send {
                    conn: self.primary,
                    frame,
                });
            }
        }
        for conn in core::mem::take(&mut self.live) {
            self.io.push_back(Io::Close { conn });
        }
        for (i, c) in self.channels.iter().enumerate() {
            if c.ready {
                self.chan_ops.push_back(ChannelOp::Close {
                    channel: ChannelId(u32::try_from(i).unwrap_or(u32::MAX)),
                });
            }
        }
        self.expect.clear();
        self.pending_regs.clear();
        self.phase = Phase::Closed;
        self.fail_waiting_reads(&error);
        self.events.push_back(Event::Closed { error });
    }
}
